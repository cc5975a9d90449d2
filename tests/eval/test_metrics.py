"""Metrics against hand-checked cases and brute-force references built on a stable argsort."""

import math

import pytest
import torch

import clip_eval.metrics as metrics_module
from clip_eval.metrics import classification_metrics, per_class_counts, retrieval_metrics

# ---------------------------------------------------------------- references


def _descending(scores_row: torch.Tensor) -> list[int]:
    """Indices best first; equal scores keep index order (what every metric here promises)."""
    return torch.argsort(-scores_row, stable=True).tolist()


def reference_classification(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    num_samples, num_classes = logits.shape
    k5 = min(5, num_classes)
    top1 = top5 = 0
    hits: dict[int, int] = {}
    counts: dict[int, int] = {}
    for i in range(num_samples):
        order = _descending(logits[i])
        label = int(labels[i])
        top1 += order[0] == label
        top5 += label in order[:k5]
        counts[label] = counts.get(label, 0) + 1
        hits[label] = hits.get(label, 0) + (order[0] == label)
    recalls = [hits[c] / counts[c] for c in counts]
    return {
        "acc1": top1 / num_samples,
        "acc5": top5 / num_samples,
        "mean_per_class_recall": sum(recalls) / len(recalls),
    }


def reference_retrieval(images, texts, text_to_image, ks) -> dict:
    images = images / images.norm(dim=-1, keepdim=True)
    texts = texts / texts.norm(dim=-1, keepdim=True)
    scores = texts @ images.T  # [M, N]
    out = {}
    for k in ks:
        hits = [int(text_to_image[t]) in _descending(scores[t])[:k] for t in range(len(texts))]
        out[f"image_retrieval_recall@{k}"] = sum(hits) / len(hits)
        per_image = []
        for i in range(len(images)):
            mine = {t for t in range(len(texts)) if int(text_to_image[t]) == i}
            if mine:
                per_image.append(bool(mine & set(_descending(scores[:, i])[:k])))
        out[f"text_retrieval_recall@{k}"] = sum(per_image) / len(per_image)
    return out


# ---------------------------------------------------------------- classification


def test_classification_hand_case():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0: top-1 hit
            [0.2, 0.7, 0.1],  # label 2: miss at top-1, rank 2 (0-based)
            [0.1, 0.3, 0.6],  # label 2: hit
            [0.5, 0.4, 0.1],  # label 1: miss, rank 1
        ]
    )
    labels = torch.tensor([0, 2, 2, 1])
    m = classification_metrics(logits, labels)
    assert m["acc1"] == pytest.approx(0.5)
    assert m["acc5"] == pytest.approx(1.0)  # top-min(5, C) = top-3 with 3 classes
    # per-class recall: class 0 -> 1/1, class 1 -> 0/1, class 2 -> 1/2
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_classification_ties_break_by_lower_index():
    logits = torch.zeros(2, 7)
    m = classification_metrics(logits, torch.tensor([0, 6]))
    # all equal: class 0 is ranked first, class 6 last (rank 6 >= 5)
    assert m["acc1"] == 0.5
    assert m["acc5"] == 0.5


def test_mean_per_class_recall_ignores_absent_classes():
    logits = torch.eye(4)[[0, 0, 1]] * 3.0
    labels = torch.tensor([0, 1, 1])  # classes 2 and 3 never appear
    m = classification_metrics(logits, labels)
    assert m["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)


@pytest.mark.parametrize("num_classes", [3, 5, 12])
@pytest.mark.parametrize("integer_logits", [False, True])
def test_classification_matches_reference(num_classes, integer_logits):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(200, num_classes, generator=g)
    if integer_logits:  # many exact ties
        logits = torch.randint(0, 3, (200, num_classes), generator=g).float()
    labels = torch.randint(0, num_classes, (200,), generator=g)
    got = classification_metrics(logits, labels)
    want = reference_classification(logits, labels)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_classification_rejects_bad_labels():
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


@pytest.mark.parametrize("integer_logits", [False, True])
def test_per_class_counts_are_the_confusion_matrix_margins(integer_logits):
    """Oracle: sklearn's confusion matrix of the stable-argsort predictions (row sums are the
    samples, the diagonal the hits, column sums the predictions), and the counts give back
    `classification_metrics`' acc1 and mean per-class recall."""
    confusion_matrix = pytest.importorskip("sklearn.metrics").confusion_matrix
    g = torch.Generator().manual_seed(3)
    num_classes = 9
    logits = torch.randn(300, num_classes, generator=g)
    if integer_logits:  # many exact ties: the prediction is the lowest tied index
        logits = torch.randint(0, 3, (300, num_classes), generator=g).float()
    labels = torch.randint(0, num_classes - 2, (300,), generator=g)  # the last two never appear
    predicted = [_descending(row)[0] for row in logits]
    cm = confusion_matrix(labels.tolist(), predicted, labels=list(range(num_classes)))
    got = per_class_counts(logits, labels)
    assert got["samples"] == cm.sum(axis=1).tolist()
    assert got["correct"] == cm.diagonal().tolist()
    assert got["predicted"] == cm.sum(axis=0).tolist()
    m = classification_metrics(logits, labels)
    assert sum(got["correct"]) / 300 == pytest.approx(m["acc1"], abs=1e-12)
    recalls = [c / n for c, n in zip(got["correct"], got["samples"]) if n]
    assert sum(recalls) / len(recalls) == pytest.approx(m["mean_per_class_recall"], abs=1e-12)


# ---------------------------------------------------------------- retrieval


def test_retrieval_hand_case():
    # Image 0 has texts 0 and 1, image 1 has text 2. Unit vectors, so scores are exact.
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    m = retrieval_metrics(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # text->image: text0 best is image1 (miss), text1 -> image0 (hit), text2 -> image1 (hit)
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@2"] == 1.0
    # image->text: image0's best text is text1 (its own) -> hit; image1 ties texts 0 and 2, index
    # order puts text0 (not its own) first -> miss at k=1, hit at k=2
    assert m["text_retrieval_recall@1"] == 0.5
    assert m["text_retrieval_recall@2"] == 1.0


def test_retrieval_k_larger_than_set_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    images, texts = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    idx = torch.tensor([0, 1, 2])
    m = retrieval_metrics(images, texts, idx, ks=(10,))
    assert m == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}
    a = retrieval_metrics(images, texts, idx, ks=(1, 2))
    b = retrieval_metrics(images * 7.0, texts * 0.1, idx, ks=(1, 2))
    assert a == b


@pytest.mark.parametrize("chunk_elements", [None, 37])
def test_retrieval_matches_reference_multi_caption(monkeypatch, chunk_elements):
    if chunk_elements is not None:  # force many tiny chunks
        monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(1)
    num_images, dim = 40, 16
    per_image = torch.randint(1, 6, (num_images,), generator=g)
    per_image[3] = 0  # an image without captions is left out of text retrieval
    text_to_image = torch.repeat_interleave(torch.arange(num_images), per_image)
    images = torch.randn(num_images, dim, generator=g)
    # captions are noisy copies of their image, so recalls land strictly between 0 and 1
    texts = images[text_to_image] + 1.5 * torch.randn(len(text_to_image), dim, generator=g)
    ks = (1, 5, 10)
    got = retrieval_metrics(images, texts, text_to_image, ks=ks)
    want = reference_retrieval(images.double(), texts.double(), text_to_image, ks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
    assert 0.0 < got["image_retrieval_recall@1"] < 1.0


@pytest.mark.parametrize("chunk_elements", [None, 5])
def test_retrieval_ties_match_reference(monkeypatch, chunk_elements):
    if chunk_elements is not None:
        monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", chunk_elements)
    # One-hot features in 3 dims: every score is exactly 0 or 1, so ties are everywhere.
    g = torch.Generator().manual_seed(2)
    eye = torch.eye(3)
    images = eye[torch.randint(0, 3, (12,), generator=g)]
    text_to_image = torch.randint(0, 12, (30,), generator=g)
    texts = eye[torch.randint(0, 3, (30,), generator=g)]
    ks = (1, 2, 4, 8)
    got = retrieval_metrics(images, texts, text_to_image, ks=ks)
    want = reference_retrieval(images, texts, text_to_image, ks)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_retrieval_is_deterministic_and_finite():
    g = torch.Generator().manual_seed(3)
    images, texts = torch.randn(20, 8, generator=g), torch.randn(50, 8, generator=g)
    idx = torch.randint(0, 20, (50,), generator=g)
    a = retrieval_metrics(images, texts, idx)
    b = retrieval_metrics(images, texts, idx)
    assert a == b
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in a.values())
