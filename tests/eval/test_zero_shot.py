"""Zero-shot classifier vs open_clip's own builder, template errors, and the evaluation pass."""

import open_clip
import pytest
import torch
import torch.nn.functional as F

from clip_eval.metrics import classification_metrics
from clip_eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot
from data_tools.errors import ConfigError, DataError

CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star", "cat", "dog", "car"]


@pytest.mark.parametrize("batch_size", [256, 5])
def test_classifier_matches_open_clip_string_templates(tiny_encoder, batch_size):
    templates = ["a photo of a {}.", "a drawing of the {}", "{}"]
    ours = build_zero_shot_classifier(
        tiny_encoder, CLASSNAMES, templates, "cpu", batch_size=batch_size
    )
    theirs = open_clip.build_zero_shot_classifier(
        tiny_encoder.model, tiny_encoder.tokenizer, CLASSNAMES, templates, num_classes_per_batch=3
    )
    assert ours.shape == (32, len(CLASSNAMES))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=0), torch.ones(len(CLASSNAMES)))


def test_classifier_matches_open_clip_callable_templates(tiny_encoder):
    templates = open_clip.OPENAI_IMAGENET_TEMPLATES[:6]
    assert callable(templates[0])
    ours = build_zero_shot_classifier(tiny_encoder, CLASSNAMES, templates, "cpu", batch_size=4)
    theirs = open_clip.build_zero_shot_classifier(
        tiny_encoder.model, tiny_encoder.tokenizer, CLASSNAMES, templates
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "template", ["a photo of a dog", "a photo of a {c}", "a {} and a {}", "a {0} photo"]
)
def test_bad_template_names_it(tiny_encoder, template):
    with pytest.raises(ConfigError) as info:
        build_zero_shot_classifier(tiny_encoder, CLASSNAMES, ["ok {}", template], "cpu")
    assert repr(template) in str(info.value)
    assert "\n" not in str(info.value)


def test_empty_classnames_or_templates(tiny_encoder):
    with pytest.raises(ConfigError):
        build_zero_shot_classifier(tiny_encoder, [], ["{}"], "cpu")
    with pytest.raises(ConfigError):
        build_zero_shot_classifier(tiny_encoder, ["a"], [], "cpu")


def _batches(num_batches=3, batch_size=4, num_classes=len(CLASSNAMES), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(num_batches):
        out.append(
            {
                "image": torch.randn(batch_size, 3, 32, 32, generator=g),
                "label": torch.randint(0, num_classes, (batch_size,), generator=g),
                "key": [f"s{b}_{i}" for i in range(batch_size)],
            }
        )
    return out


def test_evaluate_zero_shot_matches_direct_computation(tiny_encoder):
    classifier = build_zero_shot_classifier(tiny_encoder, CLASSNAMES, ["a {}"], "cpu")
    batches = _batches()
    got = evaluate_zero_shot(tiny_encoder, batches, classifier, "cpu")
    with torch.no_grad():
        images = torch.cat([b["image"] for b in batches])
        logits = F.normalize(tiny_encoder.encode_image(images), dim=-1) @ classifier
    want = classification_metrics(logits, torch.cat([b["label"] for b in batches]))
    assert got["num_samples"] == 12
    for key, value in want.items():
        assert got[key] == pytest.approx(value)


def test_evaluate_restores_each_module_mode(tiny_encoder):
    tiny_encoder.train()
    tiny_encoder.model.visual.eval()  # a frozen tower stays in eval mode
    classifier = build_zero_shot_classifier(tiny_encoder, CLASSNAMES, ["a {}"], "cpu")
    seen = []
    original = tiny_encoder.encode_image

    def spy(images, normalize=False):
        seen.append((tiny_encoder.training, torch.is_grad_enabled()))
        return original(images, normalize=normalize)

    tiny_encoder.encode_image = spy
    evaluate_zero_shot(tiny_encoder, _batches(1), classifier, "cpu")
    assert seen == [(False, False)]
    assert tiny_encoder.training and tiny_encoder.model.transformer.training
    assert not tiny_encoder.model.visual.training


def test_label_out_of_range_and_empty(tiny_encoder):
    classifier = build_zero_shot_classifier(tiny_encoder, CLASSNAMES[:3], ["a {}"], "cpu")
    with pytest.raises(DataError, match="only 3 class names"):
        evaluate_zero_shot(tiny_encoder, _batches(num_classes=7, seed=1), classifier, "cpu")
    with pytest.raises(DataError, match="no samples"):
        evaluate_zero_shot(tiny_encoder, [], classifier, "cpu")
