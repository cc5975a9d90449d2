"""The model learns from the first steps on icon-like data, and its image trunk starts where
open_clip's ViT starts (issue 9: timm's N(0, 0.02) init left the class token reading a uniform
average of the patches, and the loss sat at ln(batch) for ~60 steps on real icons)."""

import io
import json
import math
import random

import open_clip
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from smoke_config import TINY

from clip_train.config import ModelConfig
from clip_train.model import ImageTower
from data_tools.shards import ShardWriter

KINDS = ("circle", "square", "triangle", "cross", "diamond", "star")
LOSS_BOUND = 2.6  # the regression run's final loss (mean of the last three logged) must be below


def _outline(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float) -> None:
    """A black outline on white, as the icon sets users train on (thin strokes, mostly
    background)."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline="black")
        return
    if kind == "cross":
        draw.line([(cx - r, cy), (cx + r, cy)], fill="black")
        draw.line([(cx, cy - r), (cx, cy + r)], fill="black")
        return
    if kind == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif kind == "triangle":
        pts = [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    elif kind == "diamond":
        pts = [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    else:  # star
        radii = [r if i % 2 == 0 else r / 2.5 for i in range(10)]
        pts = [
            (cx + q * math.sin(i * math.pi / 5), cy - q * math.cos(i * math.pi / 5))
            for i, q in enumerate(radii)
        ]
    draw.line(pts + [pts[0]], fill="black")


def write_outline_icons(out, n: int = 768, size: int = 32, seed: int = 0) -> None:
    rng = random.Random(seed)
    with ShardWriter(out, "outline", samples_per_shard=256) as writer:
        for i in range(n):
            kind, big, col, row = (
                rng.choice(KINDS),
                rng.random() < 0.5,
                rng.randrange(3),
                rng.randrange(3),
            )
            img = Image.new("RGB", (size, size), "white")
            _outline(
                ImageDraw.Draw(img),
                kind,
                size * (0.25 + 0.25 * col),
                size * (0.25 + 0.25 * row),
                size * (0.3 if big else 0.16),
            )
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            where = ("top", "middle", "bottom")[row] + " " + ("left", "center", "right")[col]
            caption = f"an outline icon of a {'large' if big else 'small'} {kind} at the {where}."
            writer.write({"__key__": f"icon{i:05d}", "jpg": buf.getvalue(), "txt": caption})


def outline_run_losses(tmp_path, *overrides: str) -> list[float]:
    """The logged losses of the regression run: 120 steps of batch 64 on generated outline icons
    (more or other settings through `overrides`, e.g. `train.seed=3`; bench/outline_icons.py
    sweeps seeds with it)."""
    from clip_train.config import load_config
    from clip_train.train import train

    write_outline_icons(tmp_path / "train")
    kept = [
        o
        for o in TINY
        if not o.startswith(
            (
                "model.image.width",
                "model.image.depth",
                "model.image.heads",
                "model.embed_dim",
                "model.text.width",
                "train.batch_size",
                "optim.warmup_steps",
                "train.log_every",
            )
        )
    ]
    cfg = load_config(
        "configs/demo.yaml",
        [
            f"data.train={tmp_path}/train",
            "data.zeroshot=null",
            "data.retrieval=null",
            f"run.output_dir={tmp_path}/runs",
            "run.name=learn",
            *kept,
            "model.image.width=192",
            "model.image.depth=2",
            "model.image.heads=3",
            "model.text.width=64",
            "model.embed_dim=64",
            "train.batch_size=64",
            "train.steps=120",
            "train.log_every=5",
            "train.save_every=0",
            "optim.lr=5e-4",
            "optim.warmup_steps=10",
            "data.shuffle_buffer=768",
            "eval.at_end=false",
            "export.at_end=false",
            *overrides,
        ],
    )
    train(cfg)
    return [
        json.loads(line)["loss"]
        for line in (tmp_path / "runs/learn/metrics.jsonl").read_text().splitlines()
    ]


def test_loss_leaves_chance_within_a_few_dozen_steps(tmp_path):
    """120 steps of batch 64 on outline icons: the loss must fall well below ln(64) = 4.16.

    Measured (bench/outline_icons.py, CPU): the default (open_clip's ViT, ln_pre) ends at
    1.65-2.27 over seeds 0-15, every seed below chance by step 50 (at 60 steps, 2 of 16 were
    still at chance); with timm's N(0, 0.02) init (the regression this guards against) seed 0,
    this test's, ends at 3.13 and seeds 0-15 at 1.94-3.26.
    """
    losses = outline_run_losses(tmp_path)
    final = sum(losses[-3:]) / 3
    assert final < LOSS_BOUND, f"loss stuck near chance ln(64)={math.log(64):.2f}: {losses}"


def _open_clip_vit(width: int, depth: int, heads: int, patch: int = 8):
    cfg = open_clip.CLIPVisionCfg(
        layers=depth, width=width, head_width=width // heads, image_size=64, patch_size=patch
    )
    return open_clip.model._build_vision_tower(256, cfg)


@pytest.mark.parametrize("width,heads", [(192, 3), (768, 12)])
def test_image_trunk_init_matches_open_clip_vit(width, heads):
    """Oracle: open_clip's own ViT of the same sizes. Weight scales of every block's linear layers
    and of the class/position embeddings agree within sampling noise (timm's init gives 0.02 for
    all of them: 2.5x smaller than open_clip's qkv at width 192)."""
    torch.manual_seed(0)
    cfg = ModelConfig().image
    cfg.width, cfg.heads, cfg.depth = width, heads, 2
    trunk = ImageTower(cfg, 256).trunk
    ref = _open_clip_vit(width, 2, heads)
    pairs = [(trunk.cls_token, ref.class_embedding), (trunk.pos_embed, ref.positional_embedding)]
    for ours, theirs in zip(trunk.blocks, ref.transformer.resblocks):
        pairs += [
            (ours.attn.qkv.weight, theirs.attn.in_proj_weight),
            (ours.attn.proj.weight, theirs.attn.out_proj.weight),
            (ours.mlp.fc1.weight, theirs.mlp.c_fc.weight),
            (ours.mlp.fc2.weight, theirs.mlp.c_proj.weight),
        ]
        assert (
            torch.count_nonzero(ours.attn.qkv.bias) == 0
            and torch.count_nonzero(ours.attn.proj.bias) == 0
        )
    for ours, theirs in pairs:
        assert ours.shape[-1] == theirs.shape[-1]
        assert ours.std().item() == pytest.approx(theirs.std().item(), rel=0.1)


@pytest.mark.parametrize("width,patch", [(192, 8), (768, 16)])
def test_patch_embedding_starts_as_the_original_vit_or_as_open_clip(width, patch):
    """Oracles: open_clip's conv1 for the default, timm's 'jax' init (the original ViT's LeCun
    normal patch embedding) for patch_init=lecun; both standard deviations against
    1/sqrt(3 fan_in) and 1/sqrt(fan_in) too, so neither oracle can drift with the other."""
    fan_in = 3 * patch * patch
    torch.manual_seed(0)
    cfg = ModelConfig().image
    cfg.pre_norm = False  # timm's patch bias, which LeCun's init zeroes (ln_pre has none)
    cfg.width, cfg.heads, cfg.depth, cfg.patch_size = width, 3, 1, patch
    proj = ImageTower(cfg, 64).trunk.patch_embed.proj
    conv1 = _open_clip_vit(width, 1, 3, patch).conv1
    assert proj.weight.std().item() == pytest.approx(conv1.weight.std().item(), rel=0.05)
    assert proj.weight.std().item() == pytest.approx((3 * fan_in) ** -0.5, rel=0.05)

    cfg.patch_init = "lecun"
    proj = ImageTower(cfg, 64).trunk.patch_embed.proj
    jax = timm.create_model(
        "vit_base_patch16_224",
        img_size=64,
        patch_size=patch,
        embed_dim=width,
        depth=1,
        num_heads=3,
        num_classes=0,
        weight_init="jax",
    ).patch_embed.proj
    assert proj.weight.std().item() == pytest.approx(jax.weight.std().item(), rel=0.05)
    assert proj.weight.std().item() == pytest.approx(fan_in**-0.5, rel=0.05)
    assert torch.count_nonzero(proj.bias) == 0


def test_timm_init_is_still_available():
    torch.manual_seed(0)
    cfg = ModelConfig().image
    cfg.init = "timm"
    trunk = ImageTower(cfg, 256).trunk
    assert trunk.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert trunk.cls_token.abs().max().item() < 1e-4
