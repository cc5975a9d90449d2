"""Probes on frozen image features: a linear probe and few-shot episodes with class prototypes.

Linear probe (the SimCLR / CLIP linear evaluation): image features are computed once, then a
multinomial logistic regression is fitted full-batch with L-BFGS for each weight decay of a
small sweep; the one with the best accuracy on a held-out part of the training set is refitted on
all training data and scored on the test set (`lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`,
CLIP_benchmark's names). Full-batch L-BFGS on a convex loss from a zero start is deterministic.

Few-shot (meta-learning evaluation, prototypical classifier): each episode draws N classes, K
support and Q query images per class from a seeded generator; queries go to the nearest class
mean of the L2-normalized support features. Reported: mean accuracy over episodes and the half
width of its 95% confidence interval (1.96 * sample std / sqrt(episodes)).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_eval._common import EvalDataError, autocast, inference, progress_bar
from clip_eval.encoder import Encoder
from clip_eval.metrics import classification_metrics
from data_tools.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
_FLOAT64_ELEMENTS = 1 << 27
# Below this many multiply-adds per logits matmul an L-BFGS fit is a long chain of tiny ops;
# threads only add synchronisation, which costs 100x on a busy machine, so it runs on one.
_SINGLE_THREAD_MACS = 1 << 24


@contextlib.contextmanager
def _cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `count` for the block (None: unchanged), then restored."""
    before = torch.get_num_threads()
    if count is not None and count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def extract_features(
    encoder: Encoder,
    batches: Iterable[dict],
    device: str | torch.device,
    progress: bool = False,
    total: int | None = None,
) -> tuple[Tensor, Tensor]:
    """L2-normalized image features [N, D] (float32, CPU) and labels [N] of every labelled
    sample."""
    device = torch.device(device)
    features: list[Tensor] = []
    labels: list[Tensor] = []
    with inference(encoder):
        for batch in progress_bar(batches, progress, "features", total=total, unit="batch"):
            if "label" not in batch:
                raise EvalDataError("probe batch has no 'label': the data needs a class per sample")
            images = batch["image"].to(device, non_blocking=True)
            with autocast(device):
                out = encoder.encode_image(images)
            features.append(F.normalize(out.float(), dim=-1).cpu())
            labels.append(torch.as_tensor(batch["label"]).long().reshape(-1))
    if not features:
        raise EvalDataError("got no samples")
    return torch.cat(features), torch.cat(labels)


# ------------------------------------------------------------------------------- linear probe


def fit_logistic_regression(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 1000,
    device: str | torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Weights [D, C] and bias [C] minimizing mean cross-entropy + weight_decay/2 * ||W||^2.

    Solved in float64 when the features fit in 1 GiB that way: float32 stalls L-BFGS once the
    loss stops changing in its last bit, well before the gradient is small. Runs on `device`
    (default: where the features are); returns float32 tensors on the CPU.
    """
    device = torch.device(device) if device is not None else features.device
    dtype = torch.float64 if features.numel() <= _FLOAT64_ELEMENTS else torch.float32
    x = features.to(device=device, dtype=dtype)
    y = labels.to(device).long()
    weight = torch.zeros(x.shape[1], num_classes, dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    small = device.type == "cpu" and x.numel() * num_classes <= _SINGLE_THREAD_MACS
    with torch.enable_grad(), _cpu_threads(1 if small else None):
        optimizer.step(closure)
    return weight.detach().float().cpu(), bias.detach().float().cpu()


def _standardizer(features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std of the training features, so one decay grid fits any model."""
    mean = features.mean(dim=0)
    std = features.std(dim=0, unbiased=False).clamp_min(1e-6)
    return mean, std


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Sweep weight decay on a seeded validation split of train, refit on all of train, test.

    Returns lp_acc1, lp_acc5, lp_mean_per_class_recall on the test features, the chosen
    weight_decay, its validation acc1 and the sample counts.
    """
    if not weight_decays or any(wd < 0 for wd in weight_decays):
        raise ConfigError(
            f"weight_decays must be a non-empty list of values >= 0, got {list(weight_decays)}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n = train_features.shape[0]
    if n < 2:
        raise EvalDataError(f"the training set has {n} sample(s); a linear probe needs at least 2")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    num_val = min(n - 1, max(1, round(val_fraction * n)))
    val_idx, fit_idx = order[:num_val], order[num_val:]

    mean, std = _standardizer(train_features[fit_idx])
    fit_x = (train_features[fit_idx] - mean) / std
    val_x = (train_features[val_idx] - mean) / std
    sweep: list[tuple[float, float]] = []
    for wd in weight_decays:
        weight, bias = fit_logistic_regression(
            fit_x, train_labels[fit_idx], num_classes, wd, max_iter, device
        )
        acc = classification_metrics(val_x @ weight + bias, train_labels[val_idx])["acc1"]
        sweep.append((acc, wd))
        log.info("linear probe: weight decay %g -> val acc1 %.4f", wd, acc)
    # Best validation accuracy; among ties the strongest regularization (simplest model).
    best_acc, best_wd = max(sweep, key=lambda item: (item[0], item[1]))

    mean, std = _standardizer(train_features)
    weight, bias = fit_logistic_regression(
        (train_features - mean) / std, train_labels, num_classes, best_wd, max_iter, device
    )
    logits = ((test_features - mean) / std) @ weight + bias
    test = classification_metrics(logits, test_labels)
    return {
        "lp_acc1": test["acc1"],
        "lp_acc5": test["acc5"],
        "lp_mean_per_class_recall": test["mean_per_class_recall"],
        "weight_decay": best_wd,
        "val_acc1": best_acc,
        "num_train": n,
        "num_test": int(test_features.shape[0]),
        "num_classes": num_classes,
    }


# ------------------------------------------------------------------------------- few-shot


def _episodes(
    features: Tensor,
    labels: Tensor,
    eligible: Tensor,
    members: dict[int, Tensor],
    n_way: int,
    k_shot: int,
    n_query: int,
    generator: torch.Generator,
    accuracies: Tensor,
) -> None:
    """Fill `accuracies[e]` with episode e's prototype-classifier accuracy."""
    truth = torch.arange(n_way).repeat_interleave(n_query)
    for e in range(accuracies.numel()):
        classes = eligible[torch.randperm(eligible.numel(), generator=generator)[:n_way]]
        support, query = [], []
        for c in classes.tolist():
            pool = members[c]
            pick = pool[torch.randperm(pool.numel(), generator=generator)[: k_shot + n_query]]
            support.append(features[pick[:k_shot]])
            query.append(features[pick[k_shot:]])
        prototypes = torch.stack([s.mean(dim=0) for s in support])  # [N, D]
        queries = torch.cat(query)  # [N*Q, D], class-major
        predicted = torch.cdist(queries, prototypes).argmin(dim=1)
        accuracies[e] = (predicted == truth).double().mean()


def few_shot(
    features: Tensor,
    labels: Tensor,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    episodes: int = 600,
    seed: int = 0,
) -> dict[str, float]:
    """Mean accuracy and 95% CI half width of N-way K-shot prototype classification episodes."""
    for name, value, low in (
        ("n_way", n_way, 2),
        ("k_shot", k_shot, 1),
        ("n_query", n_query, 1),
        ("episodes", episodes, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    features = F.normalize(features.float(), dim=-1)
    labels = labels.long()
    counts = torch.bincount(labels)
    eligible = (counts >= k_shot + n_query).nonzero().squeeze(1)
    if eligible.numel() < n_way:
        raise EvalDataError(
            f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with at least "
            f"{k_shot + n_query} images each; only {eligible.numel()} have that many"
        )
    members = {int(c): (labels == c).nonzero().squeeze(1) for c in eligible}
    generator = torch.Generator().manual_seed(seed)
    accuracies = torch.empty(episodes, dtype=torch.float64)
    with _cpu_threads(1):  # episodes are many tiny ops: threads only add synchronisation
        _episodes(
            features, labels, eligible, members, n_way, k_shot, n_query, generator, accuracies
        )
    mean = accuracies.mean().item()
    ci95 = (
        1.96 * accuracies.std(unbiased=True).item() / math.sqrt(episodes) if episodes > 1 else 0.0
    )
    return {
        "fewshot_acc": mean,
        "fewshot_acc_ci95": ci95,
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": n_query,
        "episodes": episodes,
        "num_samples": int(labels.numel()),
    }
