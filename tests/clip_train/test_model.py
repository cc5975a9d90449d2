import open_clip
import pytest
import torch

from clip_train.model import build_model


def test_shapes_and_normalized_features(tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(
        ["a red circle", "two blue squares on the left"]
    )
    out = model(torch.randn(2, 3, 32, 32), tokens)
    assert out["image_features"].shape == (2, 32) and out["text_features"].shape == (2, 32)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out["logit_scale"], torch.tensor(1 / 0.07), rtol=1e-5)


def test_trimming_padding_is_exact(tiny_model_cfg):
    """A causal tower pooled at EOT must not depend on the padding after the longest caption."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).eval()
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(
        ["a red circle", "two blue squares here"]
    )
    trimmed = model.encode_text(tokens)
    model.text.trim_padding = False
    full = model.encode_text(tokens)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    # and a caption's features do not depend on the other captions in the batch
    alone = model.encode_text(tokens[:1])
    torch.testing.assert_close(alone, full[:1], atol=1e-5, rtol=1e-5)


def test_logit_scale_clamp(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert torch.isclose(model.logit_scale.exp(), torch.tensor(100.0))


@pytest.mark.parametrize("timm_name", ["vit_base_patch16_224", "vit_base_patch16_clip_224"])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_pre_norm_is_what_the_config_says(tiny_model_cfg, timm_name, pre_norm):
    """ln_pre and the patch bias follow `model.image.pre_norm` either way, also for a registered
    ViT whose own default differs (timm's CLIP ViTs have pre_norm on)."""
    tiny_model_cfg.image.timm_name = timm_name
    tiny_model_cfg.image.pre_norm = pre_norm
    trunk = build_model(tiny_model_cfg).visual.trunk
    assert isinstance(trunk.norm_pre, torch.nn.LayerNorm) is pre_norm
    assert (trunk.patch_embed.proj.bias is None) is pre_norm
