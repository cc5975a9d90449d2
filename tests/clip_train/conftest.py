import pytest

from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig


@pytest.fixture
def tiny_model_cfg() -> ModelConfig:
    """A model small enough for many tests a second: 32px, 2 blocks per tower."""
    return ModelConfig(
        embed_dim=32,
        image=ImageTowerConfig(
            timm_name="vit_base_patch16_224", img_size=32, patch_size=8, width=48, depth=2, heads=2
        ),
        text=TextTowerConfig(context_length=16, width=48, heads=2, layers=2),
    )


@pytest.fixture
def open_clip_train_decay_rule():
    """open_clip_train's own weight-decay rule, `exclude(name, param)`, read from its installed
    source (the oracle; not imported, since its data module needs pandas)."""
    import importlib.util
    import re
    from pathlib import Path

    source = Path(importlib.util.find_spec("open_clip_train.main").origin).read_text()
    return eval(re.search(r"exclude = (lambda n, p: .+)", source).group(1))
