"""The retrieval pass: captions from JSON or .txt, text batching, agreement with the metric."""

import pytest
import torch
import torch.nn.functional as F

from clip_eval.metrics import retrieval_metrics
from clip_eval.retrieval import evaluate_retrieval
from data_tools.errors import DataError


def _batches():
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(3, 3, 32, 32, generator=g),
            "key": ["a", "b", "c"],
            "caption": ["a cat", "a dog", "a car"],
            "json": [
                {"captions": ["a cat", "a small cat"]},
                {},
                {"captions": ["a car", "red car", "fast car"]},
            ],
        },
        {
            "image": torch.randn(2, 3, 32, 32, generator=g),
            "key": ["d", "e"],
            "caption": ["a tree", "a house"],  # no json at all: the .txt caption is used
        },
    ]


@pytest.mark.parametrize("text_batch_size", [256, 2])
def test_evaluate_retrieval_matches_metric(tiny_encoder, text_batch_size):
    batches = _batches()
    got = evaluate_retrieval(tiny_encoder, batches, "cpu", batch_size=text_batch_size)
    texts = ["a cat", "a small cat", "a dog", "a car", "red car", "fast car", "a tree", "a house"]
    text_to_image = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    with torch.no_grad():
        images = F.normalize(
            tiny_encoder.encode_image(torch.cat([b["image"] for b in batches])), dim=-1
        )
        text_features = tiny_encoder.encode_text(tiny_encoder.tokenizer(texts))
    want = retrieval_metrics(images, text_features, text_to_image)
    assert got["num_images"] == 5 and got["num_texts"] == 8
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_bad_captions_name_the_sample(tiny_encoder):
    batch = _batches()[0]
    batch["json"][1] = {"captions": "not a list"}
    with pytest.raises(DataError, match="'b'"):
        evaluate_retrieval(tiny_encoder, [batch], "cpu")


def test_empty_retrieval_set(tiny_encoder):
    with pytest.raises(DataError, match="no samples"):
        evaluate_retrieval(tiny_encoder, [], "cpu")
