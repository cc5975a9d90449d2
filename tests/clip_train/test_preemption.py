"""SIGTERM and SIGUSR1 to a real `clip-train train` (issue 10, item 4): the run stops after its
current step with a checkpoint and exit code 75, and a resume ends with the weights, bit for bit,
of a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkout_env import checkout_env  # tests/, on sys.path
from safetensors.torch import load_file
from smoke_config import TINY

from clip_train.preempt import PREEMPTED_EXIT_CODE

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _train(synth_dir, out, name, *extra):
    """A `clip-train train` process in its own process group (its loader worker included)."""
    env = checkout_env()
    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={out}",
        f"run.name={name}",
        *TINY,
        f"train.steps={STEPS}",
        "train.save_every=0",
        "data.num_workers=1",
        "eval.at_end=false",
        "export.at_end=false",
    ]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clip_train",
            "-q",
            "train",
            "--config",
            "configs/demo.yaml",
            *args,
            *extra,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _communicate(proc, timeout):
    """Wait for `proc`; a process group still running at the timeout is killed, not left over."""
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_a_log_line(proc, metrics):
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # a few steps are done
        if proc.poll() is not None or time.monotonic() > deadline:
            _, err = _communicate(proc, 1)
            pytest.fail(f"no metrics line (exit code {proc.returncode}): {err[-3000:]}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def straight(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = _train(synth_dir, out, "run")
    _, err = _communicate(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    return load_file(str(out / "run" / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_75_and_resumes_exactly(synth_dir, tmp_path, straight, sig):
    proc = _train(synth_dir, tmp_path, "run")
    _wait_for_a_log_line(proc, tmp_path / "run" / "metrics.jsonl")
    os.killpg(proc.pid, sig)  # like SLURM: every process of the job, loader workers too
    _, err = _communicate(proc, 120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert f"preempted ({sig.name}) after step" in err

    ckpts = tmp_path / "run" / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 2 <= step < STEPS and (ckpts / latest / "trainer_state.json").is_file()
    assert f"after step {step}:" in err

    proc = _train(synth_dir, tmp_path, "run", "--resume")
    _, err = _communicate(proc, 300)
    assert proc.returncode == 0, err[-3000:]
    final = load_file(str(ckpts / f"step_{STEPS}" / "model.safetensors"))
    assert final.keys() == straight.keys()
    assert all(torch.equal(final[k], straight[k]) for k in final)


def test_guard_records_the_signal_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    from clip_train.preempt import PreemptionGuard

    with PreemptionGuard() as guard:
        assert not guard.stop_agreed(lambda t: t, torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
        assert guard.stop_agreed(lambda t: t, torch.device("cpu"))
        assert guard.signal_name == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_signal_to_one_rank_stops_both(synth_dir, tmp_path):
    """SLURM may signal only some processes: the ranks agree at the step's end and all stop."""
    import json

    import psutil

    env = checkout_env()
    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={tmp_path}",
        "run.name=ddp",
        *TINY,
        f"train.steps={STEPS}",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
    ]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "clip_train",
            "-q",
            "train",
            "--config",
            "configs/demo.yaml",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _wait_for_a_log_line(proc, tmp_path / "ddp" / "metrics.jsonl")
    rank1 = [c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    _, err = _communicate(proc, 120)  # ranks that disagreed would deadlock here
    assert proc.returncode != 0  # torchrun reports any non-zero worker exit as its own failure
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in err, err[-3000:]
    ckpts = tmp_path / "ddp" / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip()
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert 2 <= step < STEPS
    assert (latest / "rank_0.json").is_file() and (latest / "rank_1.json").is_file()


def test_signal_on_a_save_step_saves_once_and_restores_handlers(
    synth_dir, tmp_path, make_cfg, monkeypatch
):
    """In process: a signal during a step that `train.save_every` saves adds no second save;
    the previous handlers are back after `train`."""
    import clip_train.train as train_module
    from clip_train.checkpoint import CheckpointManager

    real_step, real_save = train_module.forward_backward, CheckpointManager.save
    calls, saves = {"n": 0}, []

    def signalled_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", signalled_step)

    def counted_save(self, step, *args, **kwargs):
        saves.append(step)
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", counted_save)
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    summary = train_module.train(
        make_cfg(
            synth_dir,
            tmp_path,
            "inproc",
            "train.steps=10",
            "train.save_every=2",
            "eval.at_end=false",
            "export.at_end=false",
        )
    )
    assert summary["preempted"] == "SIGUSR1" and summary["steps"] == 4
    assert saves == [2, 4] and summary["checkpoint"].endswith("step_4")
    assert {s: signal.getsignal(s) for s in before} == before
