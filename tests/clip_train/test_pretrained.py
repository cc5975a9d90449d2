"""model.init_from: starting weights from our exports, open_clip checkpoints and timm trunks.

Oracles: open_clip's own model (same weights -> same embeddings) and the exported model itself.
"""

import logging

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clip_train.export import export_model
from clip_train.model import build_model
from clip_train.pretrained import init_from_source
from data_tools.errors import ConfigError

IMAGES = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
TEXT = torch.randint(1, 400, (2, 16), generator=torch.Generator().manual_seed(1))


def _embeddings(model):
    model.eval()
    with torch.no_grad():
        return model.encode_image(IMAGES), model.encode_text(TEXT)


def _fresh(cfg, init_from=None, seed=1):
    cfg.init_from = init_from
    torch.manual_seed(seed)
    return build_model(cfg)


def test_init_from_our_export_reproduces_its_embeddings(tiny_model_cfg, tmp_path):
    source = _fresh(tiny_model_cfg, seed=0)
    export_model(source, tmp_path / "export")
    model = _fresh(tiny_model_cfg, str(tmp_path / "export"))
    assert (
        init_from_source(model, tiny_model_cfg)
        == "image trunk, image projection, text tower, logit_scale"
    )
    for ours, theirs in zip(_embeddings(model), _embeddings(source)):
        assert torch.equal(ours, theirs)


def _open_clip_model(cfg):
    """open_clip's CLIP (its own ViT and top-level text tower) of the tiny sizes; its ViT's
    LayerNorm eps set to timm's so that equal weights give equal numbers."""
    vision = {
        "layers": cfg.image.depth,
        "width": cfg.image.width,
        "head_width": cfg.image.width // cfg.image.heads,
        "patch_size": cfg.image.patch_size,
        "image_size": cfg.image.img_size,
        "norm_kwargs": {"eps": 1e-6},
        "no_ln_pre": not cfg.image.pre_norm,
    }
    text = {
        "context_length": cfg.text.context_length,
        "vocab_size": cfg.text.vocab_size,
        "width": cfg.text.width,
        "heads": cfg.text.heads,
        "layers": cfg.text.layers,
    }
    torch.manual_seed(5)
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text).eval()


@pytest.mark.parametrize("pre_norm", [True, False])
def test_init_from_open_clip_checkpoint_gives_open_clip_embeddings(
    tiny_model_cfg, tmp_path, pre_norm
):
    """open_clip's ViT with ln_pre, or its `no_ln_pre` form (into our trunk with a patch bias,
    which it sets to zero)."""
    tiny_model_cfg.image.pre_norm = pre_norm
    reference = _open_clip_model(tiny_model_cfg)
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}},
        tmp_path / "oc.pt",
    )
    model = _fresh(tiny_model_cfg, f"open_clip:{tmp_path / 'oc.pt'}")
    init_from_source(model, tiny_model_cfg)
    ours = _embeddings(model)
    with torch.no_grad():  # unit vectors; other attention kernels: ~1e-6 on some CPUs
        torch.testing.assert_close(ours[0], reference.encode_image(IMAGES), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours[1], reference.encode_text(TEXT), rtol=0, atol=1e-5)
    assert torch.equal(model.logit_scale, reference.logit_scale)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_init_from_our_open_clip_export_round_trips(tiny_model_cfg, tmp_path, pre_norm):
    """Our open_clip export (CustomTextCLIP layout, native ViT) read back as an open_clip source:
    bit for bit with ln_pre; without it the patch bias comes back inside the position embeddings
    (one float addition in another order)."""
    tiny_model_cfg.image.pre_norm = pre_norm
    source = _fresh(tiny_model_cfg, seed=0)
    if not pre_norm:
        torch.nn.init.normal_(source.visual.trunk.patch_embed.proj.bias, std=0.5)
    out = export_model(source, tmp_path / "export")
    model = _fresh(tiny_model_cfg, f"open_clip:{out / 'open_clip' / 'open_clip_model.safetensors'}")
    init_from_source(model, tiny_model_cfg)
    for ours, theirs in zip(_embeddings(model), _embeddings(source)):
        if pre_norm:
            assert torch.equal(ours, theirs)
        else:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_open_clip_vit_needs_matching_pre_norm_and_sizes(tiny_model_cfg, tmp_path):
    tiny_model_cfg.image.pre_norm = True
    torch.save(_open_clip_model(tiny_model_cfg).state_dict(), tmp_path / "oc.bin")
    tiny_model_cfg.image.pre_norm = False
    with pytest.raises(ConfigError, match="has an ln_pre; set model.image.pre_norm=true"):
        init_from_source(_fresh(tiny_model_cfg, f"open_clip:{tmp_path / 'oc.bin'}"), tiny_model_cfg)
    torch.save(_open_clip_model(tiny_model_cfg).state_dict(), tmp_path / "oc_no_ln_pre.bin")
    tiny_model_cfg.image.pre_norm = True
    with pytest.raises(ConfigError, match="has no ln_pre; set model.image.pre_norm=false"):
        init_from_source(
            _fresh(tiny_model_cfg, f"open_clip:{tmp_path / 'oc_no_ln_pre.bin'}"), tiny_model_cfg
        )
    tiny_model_cfg.text.width = 64
    with pytest.raises(ConfigError, match=r"text\..* is \(.*\) there and \(.*\) in this model"):
        init_from_source(_fresh(tiny_model_cfg, f"open_clip:{tmp_path / 'oc.bin'}"), tiny_model_cfg)
    with pytest.raises(ConfigError, match="no such file"):
        init_from_source(
            _fresh(tiny_model_cfg, f"open_clip:{tmp_path / 'none.bin'}"), tiny_model_cfg
        )


def _timm_trunk_file(cfg, path):
    torch.manual_seed(7)
    trunk = build_model(cfg).visual.trunk
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(path))
    return trunk


def test_timm_file_initialises_only_the_image_trunk(tiny_model_cfg, tmp_path):
    trunk = _timm_trunk_file(tiny_model_cfg, tmp_path / "trunk.safetensors")
    model = _fresh(tiny_model_cfg, f"timm:{tmp_path / 'trunk.safetensors'}")
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    assert init_from_source(model, tiny_model_cfg) == "image trunk"
    for key, value in trunk.state_dict().items():
        assert torch.equal(model.visual.trunk.state_dict()[key], value), key
    assert all(torch.equal(model.text.state_dict()[k], v) for k, v in text_before.items())


def test_timm_name_comes_from_the_cache_only(tiny_model_cfg, tmp_path, monkeypatch):
    """timm:NAME never downloads unless allowed: not cached is one line; cached is loaded."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    name = "vit_base_patch16_clip_224.openai"
    with pytest.raises(
        ConfigError, match="not in the local Hugging Face cache.*init_download=true"
    ):
        init_from_source(_fresh(tiny_model_cfg, f"timm:{name}"), tiny_model_cfg)
    # a cache entry as huggingface_hub lays it out (refs/main -> snapshots/<commit>/file)
    repo = tmp_path / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    trunk = _timm_trunk_file(tiny_model_cfg, repo / "snapshots" / "abc123" / "model.safetensors")
    model = _fresh(tiny_model_cfg, f"timm:{name}")
    assert init_from_source(model, tiny_model_cfg) == "image trunk"
    assert torch.equal(model.visual.trunk.pos_embed, trunk.pos_embed)


def test_locked_trunk_from_timm_weights_stays_bit_identical(synth_dir, tmp_path, caplog):
    """LiT-style: lock_image with a timm-initialised trunk trains the rest; the trunk ends exactly
    as the file holds it. Without weights, locking warns."""
    from smoke_config import make_cfg

    from clip_train.export import load_model
    from clip_train.train import train

    base = [
        "train.steps=3",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
        "model.lock_image=true",
    ]
    cfg = make_cfg(synth_dir, tmp_path, "plain", *base)
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert any(
        "model.lock_image=true freezes an image trunk that was not initialised" in r.message
        for r in caplog.records
    )

    trunk = _timm_trunk_file(cfg.model, tmp_path / "trunk.safetensors")
    caplog.clear()
    cfg = make_cfg(
        synth_dir, tmp_path, "lit", *base, f"model.init_from=timm:{tmp_path}/trunk.safetensors"
    )
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert not any("not initialised" in r.message for r in caplog.records)
    trained = load_model(tmp_path / "lit")
    for key, value in trunk.state_dict().items():
        assert torch.equal(trained.visual.trunk.state_dict()[key], value), key
