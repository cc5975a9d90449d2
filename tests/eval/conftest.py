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
    from eval.encoder import load_open_clip

    torch.manual_seed(0)
    return load_open_clip(tiny_model_name, None, "cpu")
