"""`train.fsdp` under torchrun with two CPU processes (gloo): an FSDP run trains the same weights as
a DDP run, resumes after SIGKILL to the same model and optimizer state, bit for bit, as a run never
interrupted, and exports a model `clip_train.load` reads (issue 10, item 3).

Bit-equality with DDP is expected, not luck: each process computes its gradients from the same
all-gathered weights with the same kernels; both reduce them as a mean over two processes (DDP
divides before summing, FSDP's reduce-scatter after; halving is exact in floating point); AdamW is
elementwise, so it gives the same numbers on a shard as on the whole tensor; and the gradient norm
only decides whether a step is finite (no clipping here).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from checkout_env import checkout_env  # tests/, on sys.path
from safetensors.torch import load_file
from smoke_config import TINY

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
# GradCache's two micro-batches exercise FSDP's gradient accumulation without sync; the mid-run
# zero-shot evaluations run on a gathered copy of the sharded model.
COMMON = [
    *TINY,
    f"train.steps={STEPS}",
    "train.save_every=4",
    "train.keep_last=10",
    "train.accum_steps=2",
    "eval.every=4",
    "eval.at_end=false",
    "data.num_workers=1",
]


def _torchrun(synth_dir, out, *args):
    """A two-process `clip-train` on this checkout, each worker in its own session (torchrun's
    way)."""
    env = checkout_env()
    if args[0] == "train":
        args = (
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.train={synth_dir}/train",
            f"run.output_dir={out}",
            f"data.zeroshot={synth_dir}/zeroshot",
            "data.retrieval=null",
            *COMMON,
            *args[1:],
        )
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
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill(proc):
    """SIGKILL the launcher and every worker (a lost node; or a hung job left by a failed test)."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:  # it ended (and was reaped) by itself
        family = []
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _finish(proc):
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill(proc)
        pytest.fail("the run did not end in 300 s (a rank waiting for one that failed?)")
    assert proc.returncode == 0, err[-3000:]


def _kill_when(proc, path):
    deadline = time.monotonic() + 300
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            pytest.fail(f"{path} never appeared: {proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    _kill(proc)


def _same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _optimizer_shards(step_dir):
    """Every process's optimizer shard file of an FSDP checkpoint, by file name."""
    files = sorted((step_dir / "optimizer").iterdir())
    assert [f.suffix for f in files] == [
        ".safetensors"
    ] * 2  # one per process; no pickled .metadata
    return {f.name: load_file(str(f)) for f in files}


def test_fsdp_gradients_and_clipping_match_ddp(tmp_path):
    """Gradients before clipping are DDP's bit for bit; the norm and the clipped gradients agree to
    float32 rounding only: the norm's sum of squares runs over shards, then across processes, in
    another order than over whole tensors (relative differences ~1e-7)."""
    out = tmp_path / "grads.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(Path(__file__).parent / "fsdp_worker.py"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=checkout_env(),
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=True)
    assert Path(result["clip_train"]).resolve().is_relative_to(REPO)
    ddp, fsdp = result["ddp"], result["fsdp"]
    _same_tensors(fsdp["grads"], ddp["grads"])
    assert ddp["norm"] > 2  # clipping to 1 is active
    torch.testing.assert_close(fsdp["norm"], ddp["norm"], rtol=1e-6, atol=0)
    torch.testing.assert_close(fsdp["clipped"], ddp["clipped"], rtol=1e-5, atol=1e-8)


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    """One uninterrupted FSDP run (exporting at its end) and the DDP run of the same settings."""
    out = tmp_path_factory.mktemp("fsdp_runs")
    fsdp = _torchrun(synth_dir, out, "train", "run.name=fsdp", "train.fsdp=true")
    _finish(fsdp)  # one at a time: the machine's cores are few
    _finish(_torchrun(synth_dir, out, "train", "run.name=ddp", "export.at_end=false"))
    return out


@pytest.mark.slow
def test_fsdp_trains_the_weights_of_ddp(runs):
    ckpt = f"checkpoints/step_{STEPS}/model.safetensors"
    fsdp, ddp = load_file(str(runs / "fsdp" / ckpt)), load_file(str(runs / "ddp" / ckpt))
    _same_tensors(fsdp, ddp)  # bit-equal, for the reasons in the module docstring
    evals = [
        line
        for line in (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()
        if "eval/" in line
    ]
    assert len(evals) == 2  # steps 4 and 8
    assert fsdp["logit_scale"].shape == () and fsdp[
        "visual.trunk.blocks.0.attn.qkv.weight"
    ].shape == (144, 48)


@pytest.mark.slow
def test_fsdp_killed_and_resumed_ends_as_the_straight_run(synth_dir, runs, tmp_path):
    ckpts = tmp_path / "killed" / "checkpoints"
    _kill_when(
        _torchrun(synth_dir, tmp_path, "train", "run.name=killed", "train.fsdp=true"),
        ckpts / "step_4" / "trainer_state.json",
    )  # SIGKILL, every process
    assert not (ckpts / f"step_{STEPS}").exists()
    _finish(_torchrun(synth_dir, tmp_path, "resume", str(tmp_path / "killed")))

    straight, resumed = runs / "fsdp" / "checkpoints" / f"step_{STEPS}", ckpts / f"step_{STEPS}"
    _same_tensors(
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    a, b = _optimizer_shards(straight), _optimizer_shards(resumed)
    assert a.keys() == b.keys()
    for name in a:
        _same_tensors(a[name], b[name])
    meta_a, meta_b = (
        torch.load(d / "optimizer.pt", weights_only=True) for d in (straight, resumed)
    )
    assert meta_a == meta_b and meta_a["optimizer"]["sharded"] == "optimizer"
    # the shards cover every trainable parameter's AdamW state, whole tensors (logit_scale) once
    keys = set().union(*(shard.keys() for shard in a.values()))
    assert {
        "logit_scale/exp_avg",
        "visual.trunk.blocks.0.attn.qkv.weight/exp_avg_sq",
        "text.text_projection/step",
    } <= keys


@pytest.mark.slow
def test_fsdp_export_loads_with_the_checkpoint_embeddings(runs):
    import clip_train
    from clip_train.export import load_model

    run = runs / "fsdp"
    exported = clip_train.load(run / "export")
    from_ckpt = load_model(run / "checkpoints" / f"step_{STEPS}").eval()
    _same_tensors(load_file(str(run / "export" / "model.safetensors")), from_ckpt.state_dict())
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    tokens = exported.tokenizer(["a red circle", "two blue squares", "a small star", "green"])
    with torch.no_grad():
        assert torch.equal(exported.encode_image(images), from_ckpt.encode_image(images))
        assert torch.equal(exported.encode_text(tokens), from_ckpt.encode_text(tokens))


@pytest.mark.slow
def test_resume_refuses_a_changed_fsdp_setting(runs):
    from clip_train.config import load_config
    from clip_train.train import train
    from data_tools.errors import ConfigError

    cfg = load_config(runs / "fsdp" / "config.yaml", ["train.fsdp=false"])
    with pytest.raises(
        ConfigError, match="saved with train.fsdp=true; resume it with train.fsdp=true"
    ):
        train(cfg, resume=True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.mixed_precision=fp16"], "does not support train.mixed_precision=fp16"),
        (["train.compile=true"], "does not support train.compile=true"),
    ],
)
def test_config_refuses_what_fsdp_does_not_support(synth_dir, tmp_path, make_cfg, extra, message):
    from data_tools.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_cfg(synth_dir, tmp_path, "run", "train.fsdp=true", *extra)


def test_fsdp_refuses_one_process(synth_dir, tmp_path, make_cfg):
    from clip_train.train import train
    from data_tools.errors import ConfigError

    with pytest.raises(
        ConfigError, match="train.fsdp=true shards over several processes, but this run has one"
    ):
        train(make_cfg(synth_dir, tmp_path, "run", "train.fsdp=true"))
    assert not (tmp_path / "run").exists()
