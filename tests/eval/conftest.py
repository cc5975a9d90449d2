"""Fixtures for eval tests: a tiny open_clip architecture registered under a test-only name."""

import json

import open_clip
import pytest
import torch

TINY_NAME = "cliptrain-eval-tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Classifier caches of the CLI go to a temp dir, never to the user's ~/.cache."""
    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory) -> str:
    """Register the tiny config with open_clip once per session; returns its model name."""
    if TINY_NAME not in open_clip.list_models():
        path = tmp_path_factory.mktemp("open_clip_cfg") / f"{TINY_NAME}.json"
        path.write_text(json.dumps(TINY_CONFIG))
        open_clip.add_model_config(path)
    return TINY_NAME


@pytest.fixture
def tiny_encoder(tiny_model_name):
    """A randomly initialised tiny open_clip encoder (seeded, so every test sees the same one)."""
    from clip_eval.encoder import load_open_clip

    torch.manual_seed(0)
    return load_open_clip(tiny_model_name, None, "cpu")


def _write_images(folder, count, seed=0, size=40, ext="png"):
    """`count` random RGB images in `folder` (distinct pixels, so no two embed the same)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.{ext}"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def custom_text_model_name(tmp_path_factory) -> str:
    """The tiny config as an open_clip CustomTextCLIP (a separate `TextTransformer` tower)."""
    name = TINY_NAME + "-custom"
    if name not in open_clip.list_models():
        path = tmp_path_factory.mktemp("open_clip_cfg") / f"{name}.json"
        path.write_text(json.dumps({**TINY_CONFIG, "custom_text": True}))
        open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="session")
def write_images():
    """`write_images(folder, count, seed=0, size=40, ext="png")` -> the paths written."""
    return _write_images
