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
def test_vit2_cfg() -> ModelConfig:
    """timm's registered `test_vit2` (160px, patch 16) as it is: layer scale, a register token and
    no class token, which open_clip's own ViT cannot express and its timm adapter can."""
    return ModelConfig(
        embed_dim=32,
        image=ImageTowerConfig(
            timm_name="test_vit2",
            img_size=None,
            patch_size=None,
            width=None,
            depth=None,
            heads=None,
            mlp_ratio=None,
            pool="avg",
            pre_norm=False,  # as registered
        ),
        text=TextTowerConfig(context_length=16, width=32, heads=2, layers=2),
    )


def assert_open_clip_matches(model, out, size: int) -> None:
    """open_clip loads `out/open_clip` and gives our embeddings, tokens, scale and preprocessing."""
    oc_model, _, oc_preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{out / 'open_clip'}"
    )
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'open_clip'}")
    oc_model.eval()
    ours = clip_train.load(out)
    images = torch.randn(3, 3, size, size)
    captions = ["a red circle", "two small blue squares on the left", "a star"]
    assert torch.equal(oc_tokenizer(captions), ours.tokenizer(captions))
    with torch.no_grad():
        torch.testing.assert_close(
            oc_model.encode_image(images), ours.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            oc_model.encode_image(images), model.encode_image(images), rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            oc_model.encode_text(oc_tokenizer(captions)),
            ours.encode_text(ours.tokenizer(captions)),
            rtol=1e-5,
            atol=1e-5,
        )
        assert torch.equal(oc_model.logit_scale, ours.model.logit_scale)
    # and the same preprocessing of a PIL image
    from PIL import Image

    img = Image.new("RGB", (200, 120), (200, 30, 30))
    torch.testing.assert_close(oc_preprocess(img), ours.preprocess(img), atol=1e-6, rtol=0)


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_open_clip_builds_its_own_vit_at_any_size(tiny_model_cfg, tmp_path, pool, pre_norm):
    """Our trunk is open_clip's VisionTransformer (with ln_pre, or its `no_ln_pre` form, the patch
    bias folded into the position embeddings): exported at sizes that no registered timm model
    has, open_clip builds it natively and gives the same embeddings."""
    torch.manual_seed(0)
    tiny_model_cfg.image.pool = pool
    tiny_model_cfg.image.pre_norm = pre_norm
    model = build_model(tiny_model_cfg).eval()
    bias = model.visual.trunk.patch_embed.proj.bias
    assert (bias is None) == pre_norm
    if bias is not None:  # timm starts it at zero: a trained bias must reach open_clip too
        torch.nn.init.normal_(bias, std=0.5)
    out = export_model(model, tmp_path / "export")
    assert json.loads((out / "export_info.json").read_text())["open_clip"] is True
    vision = json.loads((out / "open_clip" / "open_clip_config.json").read_text())["model_cfg"][
        "vision_cfg"
    ]
    assert "timm_model_name" not in vision and vision["width"] == 48 and vision["image_size"] == 32
    assert vision["no_ln_pre"] is not pre_norm
    assert_open_clip_matches(model, out, 32)


def test_timm_converts_our_open_clip_export_back(tiny_model_cfg, tmp_path):
    """Oracle for the name map: timm's own open_clip -> timm conversion of the exported state dict
    gives back our trunk's tensors, every one of them."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    torch.manual_seed(0)
    tiny_model_cfg.image.pre_norm = True
    model = build_model(tiny_model_cfg)
    out = export_model(model, tmp_path / "export")
    converted = checkpoint_filter_fn(
        load_file(str(out / "open_clip" / "open_clip_model.safetensors")), model.visual.trunk
    )
    trunk = model.visual.trunk.state_dict()
    assert set(trunk) <= set(converted)
    for key, value in trunk.items():
        assert torch.equal(converted[key], value), key


def test_open_clip_loads_registered_timm_trunk(test_vit2_cfg, tmp_path):
    """A trunk open_clip's own ViT cannot express goes, at its registered sizes, through open_clip's
    timm adapter, with our state dict unchanged."""
    torch.manual_seed(0)
    model = build_model(test_vit2_cfg).eval()
    out = export_model(model, tmp_path / "export")
    vision = json.loads((out / "open_clip" / "open_clip_config.json").read_text())["model_cfg"][
        "vision_cfg"
    ]
    assert vision["timm_model_name"] == "test_vit2"
    assert_open_clip_matches(model, out, 160)


def test_resized_trunk_open_clip_cannot_express_says_why_not(test_vit2_cfg, tmp_path):
    test_vit2_cfg.image.img_size = 32
    model = build_model(test_vit2_cfg)
    reason = open_clip_incompatibility(model)
    assert "one class token" in reason and "img_size=32 (registered 160)" in reason
    out = export_model(model, tmp_path / "export")
    info = json.loads((out / "export_info.json").read_text())
    assert info["open_clip"] is False and info["open_clip_reason"] == reason
    assert not (out / "open_clip").exists()


def test_pre_norm_unlike_the_registered_trunk_says_which_value_loads(test_vit2_cfg):
    """open_clip's timm adapter builds the registered ViT as it is: a trunk with ln_pre where the
    registered one has none is refused, naming the setting that would load."""
    test_vit2_cfg.image.pre_norm = True
    reason = open_clip_incompatibility(build_model(test_vit2_cfg))
    assert "'test_vit2' as registered, without pre_norm" in reason
    assert "set model.image.pre_norm=false" in reason


def test_towers_alone_and_atomic_replace(tiny_model_cfg, tmp_path):
    from safetensors.torch import load_file

    model = build_model(tiny_model_cfg)
    out = export_model(model, tmp_path / "export")
    image = load_file(str(out / "image_tower.safetensors"))
    text = load_file(str(out / "text_tower.safetensors"))
    assert set(image) == {
        k[len("visual.") :] for k in model.state_dict() if k.startswith("visual.")
    }
    assert set(text) == {k[len("text.") :] for k in model.state_dict() if k.startswith("text.")}
    export_model(model, out)  # replacing an export leaves no temp dirs behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(clip_train.ClipTrainError, match="not found"):
        clip_train.load(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    with pytest.raises(clip_train.ClipTrainError, match="neither"):
        clip_train.load(tmp_path / "junk")


@pytest.mark.parametrize("pre_norm", [True, False])
def test_timm_rebuilds_trunk_with_or_without_ln_pre(tiny_model_cfg, tmp_path, pre_norm):
    torch.manual_seed(0)
    tiny_model_cfg.image.pre_norm = pre_norm
    model = build_model(tiny_model_cfg).eval()
    assert (model.visual.trunk.patch_embed.proj.bias is None) == pre_norm
    out = export_model(model, tmp_path / "tiny")
    trunk = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(trunk(images), model.visual.trunk(images))


def test_a_run_saved_by_a_newer_version_loads_or_says_why(tiny_model_cfg, tmp_path, caplog):
    """A key this version does not know: ignored with a warning outside `model`; under `model`
    (it may change what the weights compute) one line asking for a newer clip-train."""
    import yaml
    from safetensors.torch import save_file

    from clip_train.checkpoint import MODEL_FILE
    from clip_train.config import Config, config_to_dict

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    save_file(model.state_dict(), str(tmp_path / MODEL_FILE))
    saved = config_to_dict(Config(model=tiny_model_cfg))
    saved["data"]["train"] = "/x"
    saved["train"]["a_future_key"] = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    loaded = clip_train.load(tmp_path)
    assert "train.a_future_key" in caplog.text
    image = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.encode_image(image), model.eval().encode_image(image))

    saved["model"]["image"]["a_future_switch"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(clip_train.ClipTrainError, match="model.image.a_future_switch") as info:
        clip_train.load(tmp_path)
    assert "\n" not in str(info.value)
