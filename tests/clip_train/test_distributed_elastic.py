"""A run saved mid-pass resumes on another number of processes (torchrun, gloo; issue 10, item
2): 1 process -> 2 and 2 -> 1. The sample ledger shows every sample of the pass trained exactly
once across the two layouts, the contrastive batch stays 16, and step, schedule and optimizer
step count continue as in the run that kept its processes."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from checkout_env import checkout_env  # tests/, on sys.path
from smoke_config import TINY

from data_tools.synth import SynthConfig, write_synth

# 4 shards of 48: a pass is 192 samples, 12 steps of 16. The checkpoint at step 5 is mid-pass
# (80 samples taken); the 112 left make 7 steps of 16 on the new layout, so the pass ends after
# step 12 on either layout and steps 13-14 are in epoch 1.
STEPS, SAVED = 14, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    write_synth(
        out,
        SynthConfig(
            train_samples=192,
            samples_per_shard=48,
            zeroshot_per_class=1,
            retrieval_samples=8,
            image_size=32,
        ),
    )
    return out / "train"


def _launch(processes, *args):
    head = [sys.executable, "-m", "clip_train"]
    if processes > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        head += ["--nproc_per_node", str(processes), "-m", "clip_train"]
    done = subprocess.run(
        [*head, *args],
        env=checkout_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _train(processes, root, name, *extra):
    _launch(
        processes,
        "-q",
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.train={root['shards']}",
        f"run.output_dir={root['runs']}",
        f"run.name={name}",
        *TINY,
        f"train.steps={STEPS}",
        f"train.save_every={SAVED}",
        "train.keep_last=10",
        "run.ledger=true",
        "eval.at_end=false",
        "export.at_end=false",
        *extra,
    )
    return root["runs"] / name


def _stopped_copy(run, name):
    """The run as it was when its checkpoint at step SAVED was the latest."""
    copy = run.parent / name
    shutil.copytree(run, copy)
    for ckpt in (copy / "checkpoints").glob("step_*"):
        if ckpt.name != f"step_{SAVED}":
            shutil.rmtree(ckpt)
    (copy / "checkpoints" / "latest").write_text(f"step_{SAVED}\n")
    return copy


def _ledger(run):
    rows = []
    for path in sorted((run / "ledger").glob("rank_*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _optimizer_steps(ckpt):
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    steps = {float(s["step"]) for s in state["optimizer"]["state"].values()}
    return steps, state["scheduler"]


def _check(straight, resumed, log, change, batch_size, accum, every_key):
    # the log says what changed
    assert change in log
    assert "80 of its 192 samples were taken before, the 112 left are dealt out anew" in log
    assert "no sample is read twice" in log
    saved = (resumed / "config.yaml").read_text()
    assert f"batch_size: {batch_size}\n" in saved and f"accum_steps: {accum}\n" in saved

    # the ledger: epoch 0 trains every sample once, before and after the change of layout
    rows = _ledger(resumed)
    assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
    assert all(sum(len(r["keys"]) for r in rows if r["step"] == s) == 16 for s in range(1, 15))
    epoch0 = [k for r in rows if r["epoch"] == 0 for k in r["keys"]]
    assert {r["step"] for r in rows if r["epoch"] == 0} == set(range(1, 13))
    assert len(epoch0) == len(set(epoch0)) == 192 and set(epoch0) == every_key
    epoch1 = [k for r in rows if r["epoch"] == 1 for k in r["keys"]]
    assert len(epoch1) == len(set(epoch1)) == 32

    # step, schedule, optimizer step count and samples seen go on as without the change
    lines = {
        name: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        for name, run in (("straight", straight), ("resumed", resumed))
    }
    lr = {name: {r["step"]: r["lr"] for r in rows if "lr" in r} for name, rows in lines.items()}
    assert lr["straight"] == lr["resumed"] and len(lr["resumed"]) == STEPS // 2
    for step in (10, STEPS):
        a = straight / "checkpoints" / f"step_{step}"
        b = resumed / "checkpoints" / f"step_{step}"
        steps_a, sched_a = _optimizer_steps(a)
        steps_b, sched_b = _optimizer_steps(b)
        assert steps_a == steps_b == {float(step)}
        assert sched_a == sched_b
        ta = json.loads((a / "trainer_state.json").read_text())
        tb = json.loads((b / "trainer_state.json").read_text())
        for key in ("step", "samples_seen", "epoch"):
            assert ta[key] == tb[key], key


def _keys(shards):
    from data_tools.tario import ReadMode, iter_shard

    return {
        s.key
        for url in sorted(shards.glob("*.tar"))
        for s in iter_shard(str(url), mode=ReadMode(False))
    }


def test_one_process_resumes_on_two(shards, tmp_path):
    root = {"shards": shards, "runs": tmp_path}
    straight = _train(1, root, "one", "train.batch_size=16", "data.num_workers=0")
    resumed = _stopped_copy(straight, "one_then_two")
    log = _launch(2, "resume", str(resumed), f"run.name={resumed.name}")
    change = (
        "resuming on 2 processes (saved on 1): contrastive batch 16 kept as train.batch_size "
        "16 -> 8 x train.accum_steps 1 -> 1 x 2 processes"
    )
    _check(straight, resumed, log, change, batch_size=8, accum=1, every_key=_keys(shards))


def test_two_processes_resume_on_one(shards, tmp_path):
    root = {"shards": shards, "runs": tmp_path}
    straight = _train(2, root, "two", "train.batch_size=8", "data.num_workers=1")
    resumed = _stopped_copy(straight, "two_then_one")
    log = _launch(1, "resume", str(resumed), f"run.name={resumed.name}")
    change = (
        "resuming on 1 processes (saved on 2): contrastive batch 16 kept as train.batch_size "
        "8 -> 8 x train.accum_steps 1 -> 2 x 1 processes"
    )
    _check(straight, resumed, log, change, batch_size=8, accum=2, every_key=_keys(shards))


@pytest.mark.slow
def test_fsdp_optimizer_shards_reshard_on_three_and_back(shards, tmp_path):
    """train.fsdp keeps the optimizer state in per-process shards: 3 processes read the 2 shards
    of a checkpoint (and re-save it in 3), and 2 processes read those back to the same tensors."""
    from safetensors.torch import load_file

    run = _train(
        2,
        {"shards": shards, "runs": tmp_path},
        "fsdp",
        "train.fsdp=true",
        "train.steps=5",
        "train.batch_size=12",
    )
    ckpt = run / "checkpoints" / f"step_{SAVED}"
    saved = {f.name: load_file(f) for f in sorted((ckpt / "optimizer").glob("*.safetensors"))}
    model = load_file(ckpt / "model.safetensors")
    _launch(3, "-q", "resume", str(run))  # no step left: it loads, then saves step 5 again
    assert len(list((ckpt / "optimizer").glob("*.safetensors"))) == 3
    _launch(2, "-q", "resume", str(run))
    again = {f.name: load_file(f) for f in sorted((ckpt / "optimizer").glob("*.safetensors"))}
    assert saved.keys() == again.keys() and len(saved) == 2
    for name, tensors in saved.items():
        assert tensors.keys() == again[name].keys()
        assert all(torch.equal(t, again[name][k]) for k, t in tensors.items())
    now = load_file(ckpt / "model.safetensors")
    assert all(torch.equal(t, now[k]) for k, t in model.items())
