"""Kill a real training process with SIGKILL once a checkpoint is published, then compare the
resumed run with an uninterrupted one: the kill-and-resume tests (end to end, moco, byol) share
this, so each states only its config and what it compares."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from checkout_env import REPO, checkout_env
from safetensors.torch import load_file


def kill_after_checkpoint(args: list[str], run_dir: Path, step: int) -> Path:
    """Start `clip-train train --config configs/demo.yaml ARGS` (this checkout's code, this
    process's threads) and SIGKILL it as soon as checkpoint `step` is published; returns the run's
    checkpoint folder. `args` must make the run write to `run_dir`."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "clip_train", "-q", "train", "--config", "configs/demo.yaml", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": checkout_env()["PYTHONPATH"]},
        cwd=REPO,
    )
    ckpts = run_dir / "checkpoints"
    deadline = time.monotonic() + 120
    try:
        while not (ckpts / f"step_{step}" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"no checkpoint step_{step} after 120 s"
            time.sleep(0.005)
    finally:  # also when the test fails: no training process is left running
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return ckpts


def assert_same_tensors(a: Path, b: Path, names: tuple[str, ...] = ("model.safetensors",)) -> None:
    """Every safetensors file in `names` holds the same tensors, bit for bit, in folders a and b."""
    for name in names:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys(), name
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key}"
