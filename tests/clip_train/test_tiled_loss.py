"""The tiled InfoNCE (`loss.tiled`) equals the full loss: alone, with GradCache, over two processes,
and never creates a B x B tensor."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from checkout_env import checkout_env  # tests/, on sys.path
from open_clip.loss import ClipLoss
from torch.utils._python_dispatch import TorchDispatchMode

import clip_train.losses as losses
from clip_train.config import load_config
from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward
from clip_train.tiled_loss import tiled_cross_entropy
from data_tools.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CFG, batch  # noqa: E402


def _features(seed: int, n: int, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return image, text, torch.tensor(14.3)


def _loss_and_grads(loss_fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = loss_fn(*leaves)
    loss = out if torch.is_tensor(out) else out["loss"]
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _assert_all_close(got, want):
    for name, a, b in zip(("loss", "d image", "d text", "d logit_scale"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("n,tile", [(1, 1), (24, 5), (24, 8), (37, 6), (64, 64), (20, 100)])
@pytest.mark.parametrize("local_loss", [False, True])
def test_tiled_equals_full_loss_and_open_clip(n, tile, local_loss):
    """Loss and gradients (features and temperature) to 1e-5 against ours untiled and open_clip's
    ClipLoss, tiles dividing the batch or not."""
    inputs = _features(n * 7 + tile, n)
    tiled_fn = build_loss("clip", tiled=True, tile_size=tile, local_loss=local_loss)
    tiled = _loss_and_grads(tiled_fn, inputs)
    full_fn = build_loss("clip", tiled=False, local_loss=local_loss)
    _assert_all_close(tiled, _loss_and_grads(full_fn, inputs))
    _assert_all_close(tiled, _loss_and_grads(ClipLoss(local_loss=local_loss), inputs))


@pytest.mark.parametrize("offset,tile", [(0, 4), (8, 3), (16, 5)])
def test_rank_offset_rows_against_gathered_columns(offset, tile):
    """A rank's 8 rows against 24 gathered columns: labels start at rank x local batch."""
    g = torch.Generator().manual_seed(offset)
    x = F.normalize(torch.randn(8, 16, generator=g), dim=-1)
    y = F.normalize(torch.randn(24, 16, generator=g), dim=-1)
    inputs = (x, y, torch.tensor(9.0))
    rows = lambda a, b, s: tiled_cross_entropy(a, b, s, offset=offset, tile=tile)[0]  # noqa: E731
    tiled = _loss_and_grads(rows, inputs)
    labels = torch.arange(8) + offset
    full = _loss_and_grads(lambda a, b, s: F.cross_entropy(s * a @ b.T, labels), inputs)
    _assert_all_close(tiled, full)


def test_tiled_under_autocast_computes_in_fp32():
    """bf16 autocast does not reach the tiles: the result is the fp32 loss."""
    inputs = _features(3, 32)
    want = _loss_and_grads(build_loss("clip", tiled=False), inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(build_loss("clip", tiled=True, tile_size=7), inputs)
    _assert_all_close(got, want)


def test_gradcache_with_tiled_loss_equals_one_big_batch(tiny_model_cfg):
    """4 cached micro-batches of 16 through the tiled loss == batch 64 through the full loss."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    images, tokens = batch(64)
    results = []
    runs = ((build_loss("clip", tiled=False), 1), (build_loss("clip", tiled=True, tile_size=12), 4))
    for loss_fn, accum in runs:
        model.zero_grad()
        loss = forward_backward(model, loss_fn, images, tokens, accum_steps=accum)["loss"]
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_1, grads_1), (loss_4, grads_4) = results
    torch.testing.assert_close(loss_4, loss_1, rtol=1e-5, atol=1e-5)
    for name in grads_1:
        torch.testing.assert_close(
            grads_4[name], grads_1[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}"
        )


def test_two_processes_tiled_equal_one_untiled(tmp_path):
    """torchrun, gloo: full and local loss, with and without GradCache, tiled on each rank."""
    out = tmp_path / "grads.pt"
    env = checkout_env()  # the workers import this checkout, on the CPU
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            str(Path(__file__).parent / "dist_worker.py"),
            str(out),
            "--tiled",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = build_model(CFG)
    losses_1 = forward_backward(model, build_loss("clip", tiled=False), *batch())
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert len(results) == 3
    for result in results:
        assert result["world"] == 2
        torch.testing.assert_close(
            result["loss"], losses_1["loss"], rtol=1e-5, atol=1e-5, msg=str(result["variant"])
        )
        for name, grad in reference.items():
            torch.testing.assert_close(
                result["grads"][name],
                grad,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"{result['variant']} {name}: {m}",
            )


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("local_loss", [False, True])
def test_tiled_never_creates_a_batch_by_batch_tensor(local_loss):
    """Forward and backward at B=256 in tiles of 32: no operator output reaches B x B / 4 elements
    (the untiled loss, the control, creates B x B ones)."""
    n, tile = 256, 32
    sizes = {}
    for tiled in (False, True):
        with _LargestTensor() as mode:
            loss_fn = build_loss("clip", tiled=tiled, tile_size=tile, local_loss=local_loss)
            _loss_and_grads(loss_fn, _features(0, n))
        sizes[tiled] = mode.largest
    assert sizes[False] >= n * n
    assert sizes[True] <= max(tile * tile, n * 16), sizes


def test_auto_tiles_from_the_threshold(monkeypatch):
    calls = []
    real = losses.tiled_cross_entropy
    spy = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(losses, "tiled_cross_entropy", spy)
    monkeypatch.setattr(losses, "AUTO_TILED_BATCH", 32)
    loss_fn = build_loss("clip")  # tiled="auto" is the default
    loss_fn(*_features(0, 31))
    assert not calls
    loss_fn(*_features(0, 32))
    assert calls


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.tiled=maybe", "loss.tiled must be true, false or auto"),
        ("loss.tile_size=0", "loss.tile_size must be positive"),
    ],
)
def test_bad_tiled_config_is_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(ROOT / "configs" / "bench_tiny.yaml", ["data.train=unused", override])
    assert "\n" not in str(info.value)


def test_tiled_config_values():
    preset = ROOT / "configs" / "bench_tiny.yaml"
    cfg = load_config(preset, ["data.train=unused", "loss.tiled=true"])
    assert cfg.loss.tiled is True and cfg.loss.tile_size == 1024
    assert load_config(preset, ["data.train=unused"]).loss.tiled == "auto"
