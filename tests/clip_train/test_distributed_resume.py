"""Two processes (torchrun, gloo) over shards with corrupt samples: the ranks end each pass
together, and a run killed with SIGKILL mid-epoch and again after an epoch boundary resumes to
the same weights, bit for bit, as the uninterrupted run (issue 10, item 1)."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import psutil
import torch
from checkout_env import checkout_env  # tests/, on sys.path
from safetensors.torch import load_file
from smoke_config import TINY

# The synth set's 4 shards hold 64, 64, 64 and 8 samples; shards are dealt to ranks by position, so
# rank 1 reads shards 1 and 3 (72 samples: 4 batches of 16, the pass length every rank is given).
# 10 corrupt JPEGs in shard 1 leave rank 1 with 62 good samples: it runs dry after 3 batches while
# rank 0 still has a 4th, in every pass.
BAD = 10


def _dirty_copy(synth_dir, out):
    out.mkdir()
    shards = sorted((synth_dir / "train").glob("*.tar"))
    assert len(shards) == 4
    for shard in shards:
        bad = BAD if shard == shards[1] else 0
        with (
            tarfile.open(shard) as src,
            tarfile.open(out / shard.name, "w", format=tarfile.PAX_FORMAT) as dst,
        ):
            for member in src.getmembers():
                data = src.extractfile(member).read()
                if bad and member.name.endswith(".jpg"):
                    data, bad = b"\xff\xd8 this is not a JPEG", bad - 1
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))


def _torchrun(*args):
    env = checkout_env()
    return subprocess.Popen(
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
            *args,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _finish(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


def _kill_when(proc, path):
    """SIGKILL the launcher and every worker (each in its own session) once `path` exists."""
    deadline = time.monotonic() + 240
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def test_dirty_shards_two_processes_kill_resume_is_exact(synth_dir, tmp_path):
    data = tmp_path / "dirty"
    _dirty_copy(synth_dir, data)
    common = [
        f"data.train={data}",
        f"run.output_dir={tmp_path}",
        *TINY,
        "train.steps=16",
        "train.save_every=2",
        "train.keep_last=20",
        "eval.at_end=false",
        "export.at_end=false",
        "data.num_workers=1",
        "data.max_bad_fraction=0.2",
    ]
    train = ["train", "--config", "configs/demo.yaml", *common]
    _finish(_torchrun(*train, "run.name=straight"))

    ckpts = tmp_path / "killed" / "checkpoints"
    # passes are 3 steps long (rank 1 runs dry): step 2 is inside epoch 0, step 10 inside epoch 3
    _kill_when(_torchrun(*train, "run.name=killed"), ckpts / "step_2" / "trainer_state.json")
    _kill_when(
        _torchrun("resume", str(tmp_path / "killed")), ckpts / "step_10" / "trainer_state.json"
    )
    assert not (ckpts / "step_16").exists()
    _finish(_torchrun("resume", str(tmp_path / "killed")))

    straight = tmp_path / "straight" / "checkpoints"
    a = load_file(str(straight / "step_16" / "model.safetensors"))
    b = load_file(str(ckpts / "step_16" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    epochs = set()
    for step_dir in sorted(straight.glob("step_*")):
        trainer = json.loads((step_dir / "trainer_state.json").read_text())
        ranks = [json.loads((step_dir / f"rank_{r}.json").read_text()) for r in (0, 1)]
        assert [r["loader"]["epoch"] for r in ranks] == [trainer["epoch"]] * 2, step_dir.name
        epochs.add(trainer["epoch"])
    final = json.loads((straight / "step_16" / "trainer_state.json").read_text())
    assert final["epoch"] == 5  # 16 steps in passes of 3: every pass ended when rank 1 ran dry
    bad = sum(
        r["bad_samples"]["bad"]
        for r in (json.loads((straight / "step_16" / f"rank_{i}.json").read_text()) for i in (0, 1))
    )
    assert bad >= BAD
