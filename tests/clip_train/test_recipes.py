"""Every recipe in configs/ loads, and the big recipes train on the batch and length they claim.

A recipe states its arithmetic in header comments:

    # global batch: 32768 = 1024 per process x 1 accum step x 32 processes
    # samples seen: 13,034,626,688 = ...
    # steps: 397786 = ceil(13,034,626,688 / 32768)

These tests hold the YAML values to those lines, so editing one without the other fails here.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from clip_train.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {  # published figures (sources in each YAML's header), pinned here as well
    "vit_b32_laion.yaml": {
        "global_batch": 32768,
        "samples": 13_034_626_688,
        "steps": 397_786,
        "timm_name": "vit_base_patch32_224",
    },
    "vit_b16_datacomp.yaml": {
        "global_batch": 8192,
        "samples": 1_280_000_000,
        "steps": 156_250,
        "timm_name": "vit_base_patch16_224",
    },
}

_NUM = r"([\d,_]+)"
_BATCH = re.compile(
    rf"^# global batch: {_NUM} = {_NUM} per process x {_NUM} accum steps? x {_NUM} processes", re.M
)
_SAMPLES = re.compile(rf"^# samples seen: {_NUM}", re.M)
_STEPS = re.compile(rf"^# steps: {_NUM} = ceil\({_NUM} / {_NUM}\)", re.M)


def _int(text: str) -> int:
    return int(text.replace(",", "").replace("_", ""))


def _header(path: Path) -> dict[str, int]:
    text = path.read_text()
    batch, samples, steps = _BATCH.search(text), _SAMPLES.search(text), _STEPS.search(text)
    assert batch and samples and steps, (
        f"{path.name}: header must state global batch, samples seen and steps"
    )
    g, per, accum, procs = map(_int, batch.groups())
    n_steps, s_num, s_den = map(_int, steps.groups())
    return {
        "global_batch": g,
        "batch_size": per,
        "accum_steps": accum,
        "processes": procs,
        "samples": _int(samples.group(1)),
        "steps": n_steps,
        "steps_num": s_num,
        "steps_den": s_den,
    }


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    cfg = load_config(path, ["data.train=/x"])
    assert cfg.data.train == "/x"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_batch_and_steps_match_header(name: str) -> None:
    path = CONFIGS / name
    want = RECIPES[name]
    head = _header(path)
    cfg = load_config(path, ["data.train=/x"])

    # The comment's arithmetic holds, and the YAML says what the comment says.
    assert head["batch_size"] * head["accum_steps"] * head["processes"] == head["global_batch"]
    assert (cfg.train.batch_size, cfg.train.accum_steps) == (
        head["batch_size"],
        head["accum_steps"],
    )
    assert cfg.train.batch_size * cfg.train.accum_steps * head["processes"] == want["global_batch"]
    assert head["global_batch"] == want["global_batch"] and head["samples"] == want["samples"]
    assert (head["steps_num"], head["steps_den"]) == (want["samples"], want["global_batch"])
    assert head["steps"] == math.ceil(want["samples"] / want["global_batch"]) == want["steps"]
    assert cfg.train.steps == want["steps"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_towers_are_clip_vit_b(name: str) -> None:
    cfg = load_config(CONFIGS / name, ["data.train=/x"])
    img, txt = cfg.model.image, cfg.model.text
    assert img.timm_name == RECIPES[name]["timm_name"]
    assert (img.img_size, img.patch_size, img.width, img.depth, img.heads, img.mlp_ratio) == (
        None,
    ) * 6
    assert (txt.context_length, txt.width, txt.heads, txt.layers, cfg.model.embed_dim) == (
        77,
        512,
        8,
        12,
        512,
    )
    assert cfg.train.mixed_precision == "bf16" and cfg.loss.local_loss and cfg.loss.gather_with_grad


@pytest.mark.parametrize(
    "recipe,open_clip_name",
    [("vit_b32_laion.yaml", "ViT-B-32"), ("vit_b16_datacomp.yaml", "ViT-B-16")],
)
def test_recipe_image_tower_is_open_clip_vit(recipe, open_clip_name):
    """Oracle: open_clip's own model config. The recipe's trunk is open_clip's ViT of that name
    (ln_pre, no patch bias, class token), which its export then names for open_clip; only the
    LayerNorm eps is timm's (1e-6, carried in the export's norm_kwargs)."""
    import open_clip
    import torch

    from clip_train import openclip_vit
    from clip_train.model import ImageTower

    cfg = load_config(CONFIGS / recipe, ["data.train=/x"])
    with torch.device("meta"):
        trunk = ImageTower(cfg.model.image, cfg.model.embed_dim).trunk
    assert openclip_vit.incompatibility(trunk) is None
    ours = openclip_vit.vision_config(trunk)
    theirs = open_clip.get_model_config(open_clip_name)
    assert {k: ours[k] for k in theirs["vision_cfg"]} == theirs["vision_cfg"]
    assert (ours["head_width"], ours["mlp_ratio"], ours["pool_type"]) == (64, 4.0, "tok")
    assert cfg.model.embed_dim == theirs["embed_dim"]


def test_recipe_data_modes_suit_their_data() -> None:
    # DataComp samples shards with replacement; an "epoch" is 1.28B // 5 checkpoints, as there.
    dc = load_config(CONFIGS / "vit_b16_datacomp.yaml", ["data.train=/x"])
    assert (dc.data.mode, dc.data.samples_per_epoch) == ("resampled", 1_280_000_000 // 5)
    # OpenCLIP's LAION-400M run walks 32 epochs; counts come from sidecars (data_tools.counts).
    laion = load_config(CONFIGS / "vit_b32_laion.yaml", ["data.train=/x"])
    assert laion.data.mode == "epoch"
