"""Metric functions on tensors: classification accuracy and image-text retrieval recall.

They follow CLIP_benchmark's definitions so our numbers compare with published tables, with two
deliberate differences: ties are broken by index order (a stable sort, so results never depend
on `torch.topk`'s unspecified tie order), and top-5 accuracy with fewer than 5 classes is
top-C accuracy (CLIP_benchmark reports NaN there, which is not valid JSON).

Ranks are computed without sorting: the rank of a positive item is the number of items scoring
higher plus the number scoring equally at a lower index. That is exact, needs no top-k buffer,
and lets the similarity matrix be computed in row chunks so 50k x 50k retrieval fits in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one similarity chunk (float32): 16M elements = 64 MiB, plus a bool mask of the
# same shape. Large enough that the matmul is efficient, small enough for any machine.
_CHUNK_ELEMENTS = 1 << 24


def _stable_rank(scores: Tensor, index: Tensor) -> Tensor:
    """Rank (0 = best) of column `index[i]` in row `i` of `scores`, ties broken by lower index."""
    target = scores.gather(1, index[:, None])
    rank = (scores > target).sum(dim=1)
    # Exact ties are rare with real features; resolve them only on the rows that have them.
    tied = ((scores == target).sum(dim=1) > 1).nonzero().squeeze(1)
    if tied.numel():
        columns = torch.arange(scores.shape[1], device=scores.device)
        before = (scores[tied] == target[tied]) & (columns[None, :] < index[tied, None])
        rank[tied] += before.sum(dim=1)
    return rank


def classification_metrics(logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Top-1, top-5 (top-min(5, C)) accuracy and mean per-class recall of single-label logits.

    Mean per-class recall is sklearn's `balanced_accuracy_score` of the argmax predictions:
    the recall of each class present in `labels`, averaged with equal weight per class.
    """
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    num_samples, num_classes = logits.shape
    if num_samples == 0:
        raise ValueError("classification_metrics needs at least one sample")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )

    logits = logits.float()
    rank = _stable_rank(logits, labels)
    k5 = min(5, num_classes)
    correct1 = rank < 1
    # argmax with stable ties is exactly "rank of the label is 0", so per-class recall uses it.
    hits = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
    hits.index_add_(0, labels, correct1.double())
    counts = torch.bincount(labels, minlength=num_classes).double()
    present = counts > 0
    return {
        "acc1": correct1.double().mean().item(),
        "acc5": (rank < k5).double().mean().item(),
        "mean_per_class_recall": (hits[present] / counts[present]).mean().item(),
    }


def per_class_counts(logits: Tensor, labels: Tensor) -> dict[str, list[int]]:
    """Per class index: `samples` labelled with it, `correct` top-1 hits, `predicted` argmax
    predictions of it (ties to the lower index, as in `classification_metrics`).

    Top-1 accuracy near chance often says more about the class a model collapses onto than about
    what it learned; `predicted` shows that collapse, and `correct / samples` is the recall that
    `mean_per_class_recall` averages over the classes present.
    """
    num_classes = logits.shape[1]
    labels = labels.to(device=logits.device, dtype=torch.long)
    predicted = logits.float().argmax(dim=1)
    return {
        "samples": torch.bincount(labels, minlength=num_classes).tolist(),
        "correct": torch.bincount(labels[predicted == labels], minlength=num_classes).tolist(),
        "predicted": torch.bincount(predicted, minlength=num_classes).tolist(),
    }


def _chunk_rows(num_columns: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, num_columns))


def _positives_per_image(text_to_image: Tensor, num_images: int) -> Tensor:
    """[N, K] matrix of each image's text indices in ascending order, padded with -1."""
    order = torch.argsort(text_to_image, stable=True)
    owner = text_to_image[order]
    counts = torch.bincount(text_to_image, minlength=num_images)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order), device=order.device) - starts[owner]
    positives = torch.full(
        (num_images, int(counts.max())), -1, dtype=torch.long, device=order.device
    )
    positives[owner, slot] = order
    return positives


def retrieval_metrics(
    image_features: Tensor,
    text_features: Tensor,
    text_to_image: Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways for a set of images, each with one or more captions.

    `image_retrieval_recall@k`: for each text, whether its image is among the k most similar
    images (averaged over texts). `text_retrieval_recall@k`: for each image, whether ANY of its
    texts is among the k most similar texts (averaged over images that have texts). Features are
    L2-normalized here; similarities are float32 and computed in chunks of rows.
    """
    if (
        image_features.ndim != 2
        or text_features.ndim != 2
        or image_features.shape[1] != text_features.shape[1]
    ):
        raise ValueError(
            f"expected image features [N, D] and text features [M, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError("retrieval_metrics needs at least one image and one text")
    if text_to_image.shape != (num_texts,):
        raise ValueError(
            f"text_to_image must have shape [{num_texts}], got {tuple(text_to_image.shape)}"
        )
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")

    device = image_features.device
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.to(device).float(), dim=-1)
    text_to_image = text_to_image.to(device=device, dtype=torch.long)
    if text_to_image.min() < 0 or text_to_image.max() >= num_images:
        raise ValueError(f"text_to_image must index the {num_images} images")

    # Text -> image: one positive image per text.
    image_ranks = []
    step = _chunk_rows(num_images)
    for start in range(0, num_texts, step):
        scores = texts[start : start + step] @ images.T
        image_ranks.append(_stable_rank(scores, text_to_image[start : start + step]))
    image_rank = torch.cat(image_ranks)

    # Image -> text: the best-ranked positive text is the one with the highest score, lowest
    # index among equal scores; "any positive in the top k" is "that one is in the top k".
    positives = _positives_per_image(text_to_image, num_images)  # [N, K] text indices, -1 = none
    has_text = positives[:, 0] >= 0
    text_ranks = []
    step = _chunk_rows(num_texts)
    for start in range(0, num_images, step):
        scores = images[start : start + step] @ texts.T
        mine = positives[start : start + step]
        candidate = scores.gather(1, mine.clamp(min=0)).masked_fill(mine < 0, float("-inf"))
        # argmax returns the first maximum, and each row of `mine` is in ascending text order.
        best_text = mine.gather(1, candidate.argmax(dim=1, keepdim=True)).squeeze(1).clamp(min=0)
        text_ranks.append(_stable_rank(scores, best_text))
    # Images without any caption cannot be retrieved by text and are left out of the mean.
    text_rank = torch.cat(text_ranks)[has_text]

    metrics: dict[str, float] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = (image_rank < k).double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (text_rank < k).double().mean().item()
    return metrics
