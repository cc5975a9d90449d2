"""Oracle: our zero-shot and retrieval numbers equal CLIP_benchmark's for the same open_clip model.

Same tiny open_clip model, same generated images read from disk, CLIP_benchmark fed by a plain
torch Dataset/DataLoader as its own builders would. Counts (acc1, acc5, recall@k) must match
exactly, means (mean per-class recall) to 1e-6. Images are distinct random pixels so no two
items tie; the order of items is the same on both sides.
"""

import builtins
import json

import numpy as np
import pytest
import torch
from PIL import Image

from clip_eval.tasks import retrieval_task, zero_shot_task

zeroshot_classification = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "{}", "art of a {}"]
WORDS = (
    "red green blue small large round square photo of a the an with on near far bright dark".split()
)


def _float_for_numpy2(value):
    """float() as numpy < 2.4 allowed it: CLIP_benchmark 1.6.2 passes one-element arrays."""
    if isinstance(value, np.ndarray) and value.size == 1:
        return builtins.float(value.reshape(()))
    return builtins.float(value)


@pytest.fixture
def clip_benchmark_float(monkeypatch):
    # Shadow the builtin only inside CLIP_benchmark's module; its code runs unchanged.
    monkeypatch.setattr(zeroshot_classification, "float", _float_for_numpy2, raising=False)


class _Files(torch.utils.data.Dataset):
    """What CLIP_benchmark's builders give: (preprocessed image, target), target a label or
    captions."""

    def __init__(self, paths, targets, transform, classes=None):
        self.paths, self.targets, self.transform = paths, targets, transform
        self.classes = classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB")), self.targets[i]


def test_zero_shot_equals_clip_benchmark(
    tiny_encoder, tmp_path, write_images, clip_benchmark_float
):
    paths, labels = [], []
    for c, name in enumerate(CLASSES):
        written = write_images(tmp_path / "data" / name, 3 + c % 3, seed=c)
        paths += written
        labels += [c] * len(written)
    ours = zero_shot_task(
        tiny_encoder, tmp_path / "data", classnames=CLASSES, templates=TEMPLATES, batch_size=5
    )

    dataset = _Files(paths, labels, tiny_encoder.preprocess, classes=CLASSES)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    theirs = zeroshot_classification.evaluate(
        tiny_encoder.model,
        loader,
        tiny_encoder.tokenizer,
        CLASSES,
        [t.replace("{}", "{c}") for t in TEMPLATES],
        device="cpu",
        amp=False,
    )
    assert ours["num_samples"] == len(paths)
    assert ours["acc1"] == theirs["acc1"]
    assert ours["acc5"] == theirs["acc5"]
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)
    assert 0 < ours["acc5"] < 1  # the comparison is not between two trivial values


def test_retrieval_equals_clip_benchmark(tiny_encoder, tmp_path, write_images):
    rng = np.random.default_rng(0)
    paths = write_images(tmp_path / "images", 14, seed=5)
    captions = [
        [
            " ".join(rng.choice(WORDS, size=int(rng.integers(2, 9))))
            for _ in range(5 if i % 4 else 3)
        ]
        for i in range(len(paths))
    ]
    table = tmp_path / "captions.jsonl"
    table.write_text(
        "\n".join(
            json.dumps({"image": f"images/{p.name}", "captions": c})
            for p, c in zip(paths, captions)
        )
    )
    ours = retrieval_task(tiny_encoder, table, batch_size=4)

    dataset = _Files(paths, captions, tiny_encoder.preprocess)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=4,
        collate_fn=lambda batch: (torch.stack([b[0] for b in batch]), [b[1] for b in batch]),
    )
    theirs = zeroshot_retrieval.evaluate(
        tiny_encoder.model,
        loader,
        tiny_encoder.tokenizer,
        device="cpu",
        amp=False,
        recall_k_list=[1, 5, 10],
    )
    assert ours["num_images"] == 14 and ours["num_texts"] == sum(map(len, captions))
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # recall@k are counts over images or texts: equal counts, not just close means
    for key, value in theirs.items():
        n = ours["num_images"] if key.startswith("text") else ours["num_texts"]
        assert round(ours[key] * n) == round(value * n), key
    assert 0 < ours["image_retrieval_recall@1"] < 1
