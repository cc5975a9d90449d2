"""The fast text path: length-sorted batches over trimmed width equal open_clip's own results."""

import json
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

import clip_eval.text as text_module
from clip_eval.encoder import load_open_clip
from clip_eval.text import encode_texts, token_lengths, trimmed_text_forward
from clip_eval.zero_shot import build_zero_shot_classifier

CLASSNAMES = [
    "tench",
    "goldfish",
    "great white shark",
    "a very long class name with many many words",
    "cat",
]
TEXTS = [
    "a",
    "a photo of a cat",
    "x " * 20,
    "a dog.",
    "the longest caption of them all, with commas, and words",
]


@pytest.fixture(params=["standard", "custom"])
def any_encoder(request, tiny_model_name, custom_text_model_name):
    """The tiny model as open_clip's `CLIP` (inlined text tower) and as `CustomTextCLIP`."""
    torch.manual_seed(0)
    name = tiny_model_name if request.param == "standard" else custom_text_model_name
    return load_open_clip(name, None, "cpu")


def test_trimmed_forward_equals_encode_text(any_encoder):
    forward = trimmed_text_forward(any_encoder)
    assert forward is not None
    tokens = any_encoder.tokenizer(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(
            forward(tokens), any_encoder.encode_text(tokens), atol=1e-5, rtol=0
        )


def test_trimming_runs_only_over_the_longest_prompt(any_encoder, monkeypatch):
    model = any_encoder.model
    transformer = model.transformer if hasattr(model, "transformer") else model.text.transformer
    widths = []
    original = transformer.forward
    monkeypatch.setattr(
        transformer,
        "forward",
        lambda x, attn_mask=None: widths.append(x.shape[1]) or original(x, attn_mask=attn_mask),
    )
    prompts = ["a cat", "a dog", "a photo of a cat", "a b"]
    with torch.no_grad():
        encode_texts(any_encoder, prompts, "cpu", batch_size=2)
    lengths = sorted(token_lengths(any_encoder.tokenizer(prompts)).tolist(), reverse=True)
    # the first batch is also run once in full by the self-check against encode_text
    assert widths[-2:] == [lengths[0], lengths[2]]
    assert max(widths[-2:]) < 16  # the context length


@pytest.mark.parametrize("batch_size", [256, 3])
def test_encode_texts_keeps_order(any_encoder, batch_size):
    with torch.no_grad():
        got = encode_texts(any_encoder, TEXTS, "cpu", batch_size=batch_size)
        want = F.normalize(any_encoder.encode_text(any_encoder.tokenizer(TEXTS)), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_classifier_equals_open_clip_on_both_model_kinds(any_encoder):
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES[:10]
    ours = build_zero_shot_classifier(any_encoder, CLASSNAMES, templates, "cpu", batch_size=7)
    theirs = open_clip.build_zero_shot_classifier(
        any_encoder.model, any_encoder.tokenizer, CLASSNAMES, templates
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "change", [dict(no_causal_mask=True), dict(pool_type="last"), dict(embed_cls=True)]
)
def test_non_causal_or_other_pooling_falls_back(tmp_path, change):
    name = "cliptrain-eval-fallback-" + "-".join(change)
    cfg = {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": {
            "image_size": 32,
            "layers": 1,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
            **change,
        },
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    encoder = load_open_clip(name, None, "cpu")
    assert trimmed_text_forward(encoder) is None
    ours = build_zero_shot_classifier(
        encoder, CLASSNAMES, ["a photo of a {}.", "{}"], "cpu", batch_size=2
    )
    theirs = open_clip.build_zero_shot_classifier(
        encoder.model, encoder.tokenizer, CLASSNAMES, ["a photo of a {}.", "{}"]
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_clip_train_tower_uses_its_own_trimming():
    from clip_train.config import ModelConfig
    from clip_train.encoder import ClipEncoder
    from clip_train.model import build_model

    cfg = ModelConfig()
    cfg.embed_dim, cfg.text.width, cfg.text.heads, cfg.text.layers = 16, 32, 2, 1
    cfg.image.width, cfg.image.depth, cfg.image.heads, cfg.image.img_size = 32, 1, 2, 32
    torch.manual_seed(0)
    encoder = ClipEncoder(build_model(cfg)).eval()
    assert trimmed_text_forward(encoder) is None  # a TextTransformer subclass: not replicated here
    ours = build_zero_shot_classifier(
        encoder, CLASSNAMES, ["a photo of a {}.", "{}"], "cpu", batch_size=2
    )
    theirs = open_clip.build_zero_shot_classifier(
        encoder, encoder.tokenizer, CLASSNAMES, ["a photo of a {}.", "{}"]
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_self_check_falls_back_when_trimmed_path_disagrees(tiny_encoder, monkeypatch, caplog):
    real = trimmed_text_forward(tiny_encoder)
    monkeypatch.setattr(
        text_module, "trimmed_text_forward", lambda enc: lambda tokens: real(tokens) + 1.0
    )
    with caplog.at_level(logging.WARNING, logger="clip_eval.text"), torch.no_grad():
        got = encode_texts(tiny_encoder, TEXTS, "cpu", batch_size=2)
        want = F.normalize(tiny_encoder.encode_text(tiny_encoder.tokenizer(TEXTS)), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert "plain path" in caplog.text
