import json
import random

import numpy as np
import pytest
import torch

from clip_train.checkpoint import CheckpointError, CheckpointManager, load_checkpoint_dir


def _save(mgr, step, value):
    model = {"w": torch.full((3,), float(value))}
    return mgr.save(
        step,
        model,
        {"optimizer": {"state": {}, "param_groups": []}},
        {"samples_seen": step},
        "a: 1\n",
    )


def test_save_publish_prune_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=2)
    for step in (1, 2, 3):
        _save(mgr, step, step)
    assert mgr.complete_steps() == [2, 3]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step_3"
    ckpt = mgr.load_latest()
    assert ckpt.step == 3 and torch.equal(ckpt.model["w"], torch.full((3,), 3.0))
    assert not list((tmp_path / "ck").glob(".tmp*"))


def test_incomplete_or_corrupt_checkpoint_falls_back(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep_last=3)
    _save(mgr, 1, 1)
    _save(mgr, 2, 2)
    # corrupt the newest: truncated weights
    (tmp_path / "ck" / "step_2" / "model.safetensors").write_bytes(b"\x00" * 10)
    # and a half-written directory that a crash left behind, with the pointer already moved
    (tmp_path / "ck" / "step_3").mkdir()
    (tmp_path / "ck" / "latest").write_text("step_3\n")
    ckpt = mgr.load_latest()
    assert ckpt.step == 1
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint_dir(tmp_path / "ck" / "step_3")


def test_rng_round_trip_without_unpickling_objects(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    _save(mgr, 1, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    from clip_train.checkpoint import set_rng_state

    set_rng_state(mgr.load_latest().rng)  # loaded with weights_only=True
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    state = json.loads((tmp_path / "ck" / "step_1" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["samples_seen"] == 1
