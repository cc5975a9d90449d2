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
from safetensors.torch import load_file

from clip_train.preempt import PREEMPTED_EXIT_CODE
from smoke_config import TINY

REPO = Path(__file__).resolve().parents[2]
STEPS = 40


def _train(synth_dir, out, name, *extra):
    """A `clip-train train` process in its own process group (its loader worker included)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    args = [f"data.train={synth_dir}/train", f"run.output_dir={out}", f"run.name={name}", *TINY,
            f"train.steps={STEPS}", "train.save_every=0", "data.num_workers=1",
            "eval.at_end=false", "export.at_end=false"]
    return subprocess.Popen([sys.executable, "-m", "clip_train", "-q", "train", "--config",
                             "configs/demo.yaml", *args, *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module")
def straight(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = _train(synth_dir, out, "run")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return load_file(str(out / "run" / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_checkpoints_exits_75_and_resumes_exactly(synth_dir, tmp_path, straight, sig):
    proc = _train(synth_dir, tmp_path, "run")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().strip()):  # a few steps are done
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, sig)  # like SLURM: every process of the job, loader workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert f"preempted ({sig.name}) after step" in err

    ckpts = tmp_path / "run" / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    step = int(latest.removeprefix("step_"))
    assert 2 <= step < STEPS and (ckpts / latest / "trainer_state.json").is_file()
    assert f"after step {step}:" in err

    proc = _train(synth_dir, tmp_path, "run", "--resume")
    _, err = proc.communicate(timeout=300)
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
