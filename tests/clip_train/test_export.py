"""Export oracles: open_clip and timm load our files unchanged and give the same embeddings."""

import json

import open_clip
import pytest
import timm
import torch

import clip_train
from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clip_train.export import export_model, open_clip_incompatibility
from clip_train.model import build_model


@pytest.fixture
def test_vit_cfg() -> ModelConfig:
    """timm's registered `test_vit` (160px, patch 16) as it is: expressible in open_clip."""
    return ModelConfig(embed_dim=32, image=ImageTowerConfig(timm_name="test_vit", img_size=None, patch_size=None,
                                                            width=None, depth=None, heads=None, mlp_ratio=None),
                       text=TextTowerConfig(context_length=16, width=32, heads=2, layers=2))


def test_open_clip_loads_export_with_identical_embeddings(test_vit_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(test_vit_cfg).eval()
    out = export_model(model, tmp_path / "export")
    assert json.loads((out / "export_info.json").read_text())["open_clip"] is True

    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(f"local-dir:{out / 'open_clip'}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")
    oc_model.eval()
    ours = clip_train.load(out)
    images = torch.randn(3, 3, 160, 160)
    captions = ["a red circle", "two small blue squares on the left", "a star"]
    assert torch.equal(oc_tokenizer(captions), ours.tokenizer(captions))
    with torch.no_grad():
        torch.testing.assert_close(oc_model.encode_image(images), ours.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(oc_model.encode_text(oc_tokenizer(captions)),
                                   ours.encode_text(ours.tokenizer(captions)), rtol=1e-5, atol=1e-5)
        assert torch.equal(oc_model.logit_scale, ours.model.logit_scale)
    # and the same preprocessing of a PIL image
    from PIL import Image

    img = Image.new("RGB", (200, 120), (200, 30, 30))
    torch.testing.assert_close(oc_preprocess(img), ours.preprocess(img), atol=1e-6, rtol=0)


def test_timm_loads_image_trunk(tiny_model_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).eval()
    out = export_model(model, tmp_path / "export")
    trunk = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trunk(images), model.visual.trunk(images))


def test_resized_vit_says_why_not_open_clip(tiny_model_cfg, tmp_path):
    reason = open_clip_incompatibility(tiny_model_cfg)
    assert "img_size=32 (registered 224)" in reason
    out = export_model(build_model(tiny_model_cfg), tmp_path / "export")
    info = json.loads((out / "export_info.json").read_text())
    assert info["open_clip"] is False and info["open_clip_reason"] == reason
    assert not (out / "open_clip").exists()


def test_towers_alone_and_atomic_replace(tiny_model_cfg, tmp_path):
    from safetensors.torch import load_file

    model = build_model(tiny_model_cfg)
    out = export_model(model, tmp_path / "export")
    image = load_file(str(out / "image_tower.safetensors"))
    text = load_file(str(out / "text_tower.safetensors"))
    assert set(image) == {k[len("visual."):] for k in model.state_dict() if k.startswith("visual.")}
    assert set(text) == {k[len("text."):] for k in model.state_dict() if k.startswith("text.")}
    export_model(model, out)  # replacing an export leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(clip_train.ClipTrainError, match="not found"):
        clip_train.load(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(clip_train.ClipTrainError, match="neither"):
        clip_train.load(tmp_path / "junk")


def test_open_clip_style_trunk_exports(tiny_model_cfg, test_vit_cfg, tmp_path):
    """pre_norm (ln_pre, no patch bias: open_clip's ViT): timm rebuilds it from the export; open_clip's
    timm adapter cannot, and the export says why."""
    torch.manual_seed(0)
    tiny_model_cfg.image.pre_norm = True
    model = build_model(tiny_model_cfg).eval()
    assert model.visual.trunk.patch_embed.proj.bias is None
    out = export_model(model, tmp_path / "tiny")
    trunk = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trunk(images), model.visual.trunk(images))
    test_vit_cfg.image.pre_norm = True
    assert "pre_norm" in open_clip_incompatibility(test_vit_cfg)
