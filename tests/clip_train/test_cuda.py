"""The CUDA paths of training: fp16 with Accelerate's loss scaler through GradCache and resume,
bf16 autocast, the tiled loss on the GPU, uint8 pixels normalised on it (the GradCache replay of
CUDA's generator: tests/clip_train/test_objective.py).

Skipped without a GPU (CI has none); run on one with `python -m pytest tests -k cuda`.
"""

import pytest
import torch

import clip_train.train as train_module
from clip_train.checkpoint import load_checkpoint_dir
from clip_train.config import load_config
from clip_train.losses import build_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

QUIET = ("eval.at_end=false", "export.at_end=false")


class _Crash(Exception):
    pass


def test_fp16_gradcache_run_scales_saves_and_resumes_the_scaler(
    synth_dir, tmp_path, make_cfg, monkeypatch
):
    """fp16 + accum_steps=2: finite losses, the scaler's state saved in every checkpoint, and a run
    that crashes after step 5 resumes from step 4 with that state (its growth tracker counts on)."""
    common = (
        *QUIET,
        "train.steps=8",
        "train.mixed_precision=fp16",
        "train.accum_steps=2",
        "train.batch_size=8",
        "train.save_every=4",
        "train.keep_last=5",
    )
    summary = train_module.train(make_cfg(synth_dir, tmp_path, "straight", *common))
    assert summary["steps"] == 8
    straight = load_checkpoint_dir(tmp_path / "straight" / "checkpoints" / "step_8")
    scaler = straight.training["scaler"]
    assert scaler is not None and scaler["scale"] > 0

    real, calls = train_module.forward_backward, {"n": 0}

    def crash_at_step_6(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise _Crash
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", crash_at_step_6)
    with pytest.raises(_Crash):
        train_module.train(make_cfg(synth_dir, tmp_path, "crashed", *common))
    monkeypatch.setattr(train_module, "forward_backward", real)
    run = tmp_path / "crashed"
    assert not (run / "checkpoints" / "step_8").exists()
    train_module.train(load_config(run / "config.yaml"), resume=True)

    resumed = load_checkpoint_dir(run / "checkpoints" / "step_8")
    assert resumed.training["scaler"] == scaler  # a fresh scaler would count 4 steps, not 8
    for name, weight in straight.model.items():
        torch.testing.assert_close(resumed.model[name], weight, rtol=1e-3, atol=1e-5)


def test_bf16_gradcache_run_on_the_gpu(synth_dir, tmp_path, make_cfg):
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "bf16",
        *QUIET,
        "train.steps=6",
        "train.mixed_precision=bf16",
        "train.accum_steps=2",
        "train.batch_size=8",
        "model.text.dropout=0.1",
    )
    summary = train_module.train(cfg)
    assert summary["steps"] == 6 and summary["nonfinite_skipped"] == 0


@pytest.mark.parametrize("autocast", [False, True])
def test_tiled_loss_on_the_gpu_equals_the_full_loss(autocast):
    """Loss and gradients of the tiled InfoNCE on CUDA equal the full loss in fp32 (to 1e-5), also
    when called under bf16 autocast (the tiles compute in fp32)."""
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(1000, 64, generator=g), dim=-1).cuda()
    text = torch.nn.functional.normalize(torch.randn(1000, 64, generator=g), dim=-1).cuda()
    scale = torch.tensor(14.3, device="cuda")

    def run(loss_fn, ctx):
        leaves = [t.clone().requires_grad_() for t in (image, text, scale)]
        with ctx:
            loss = loss_fn(*leaves)["loss"]
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    tiled = run(build_loss("clip", tiled=True, tile_size=128), ctx)
    full = run(build_loss("clip", tiled=False), torch.autocast("cuda", enabled=False))
    for a, b in zip(tiled, full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_uint8_pixels_normalise_on_the_gpu_as_on_the_cpu():
    """data.uint8_images normalises on the device: bit-identical to the loader's CPU floats, and
    the statistics copied to the GPU once, never into a pickled transform (loader workers)."""
    import pickle

    from data_tools.transforms import ImageTransform

    t = ImageTransform(16)
    pixels = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    on_gpu = t.normalize(pixels.cuda())
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), t.normalize(pixels))
    assert len(t._on_device) == 1 and pickle.loads(pickle.dumps(t))._on_device == {}
