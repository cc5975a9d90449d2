"""The training objective: a weighted sum of loss terms, each a small module from `TERMS`.

Every term takes the L2-normalised features of this process's batch, the temperature (and the
logit bias, when the model has one) and returns a dict whose "loss" entry it contributes; other
entries are logged. One term alone keeps its own names (`loss`, `loss_i2t`, ...), so a run with
`loss.name: clip` logs what it always logged; several terms log `loss/<term>` and their parts as
`<term>/<part>`, and `loss` is the weighted sum.

Multi-process runs: each term receives rank and world size and exchanges what it needs itself,
such that N processes give the gradient of one process on the whole batch once the gradients are
averaged (DDP): `clip` gathers features (`clip_train.distributed`), `siglip` passes text features
around the ring of processes (open_clip's implementation, never the whole batch at once),
`margin` gathers the columns of its pairwise distances; `supcon`, `simcse` and `simclr` take
their own samples as rows and everyone's (gathered) as columns.

A term with state outside the model (`moco`: momentum towers and key queues, clip_train/moco.py;
`byol`: the target network, clip_train/byol.py) also has `attach(model, device)` (builds that
state from the model, before training), `targets(images, tokens, images_2)` (per-sample inputs it
computes without a graph, once per micro-batch, from the images, the captions and the second
image view when there is one; the step passes them back to the loss under their names) and
`after_step()` (run once after each optimiser step that was taken); its state is part of the
objective's `state_dict`, which every checkpoint saves. The objective forwards each of these to
the terms that have them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.byol import BYOL
from clip_train.config import LossConfig, LossTermConfig, loss_terms
from clip_train.distributed import gather_features
from clip_train.losses import ClipInfoNCE
from clip_train.moco import MoCo
from data_tools.errors import ConfigError


class SigLIP(nn.Module):
    """Pairwise sigmoid loss with a learned bias (Zhai et al., 2023), open_clip's `SigLipLoss`.

    Per process: this batch's images against every process's texts, chunk by chunk as they come
    round the ring, divided by the local batch; the mean over processes is the full-batch loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, **_: object):
        super().__init__()
        from open_clip.loss import SigLipLoss

        self.loss = SigLipLoss(rank=rank, world_size=world_size)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if logit_bias is None:
            raise ValueError("the siglip term needs the model's logit_bias (model.init_logit_bias)")
        return {"loss": self.loss(image_features, text_features, logit_scale, logit_bias)}


class MarginLoss(nn.Module):
    """Hadsell, Chopra and LeCun's (2006) pairwise loss on image-text pairs: a matched pair's
    squared distance, and for every unmatched pair max(0, margin - distance)^2; mean over pairs.

    Distances are Euclidean between normalised features (in [0, 2]). Each process computes its
    rows against every process's columns (gathered with gradients) and divides by the number of
    pairs in the whole batch times the processes, so the mean over processes is the full loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, margin: float = 1.0, **_: object):
        super().__init__()
        self.rank, self.world_size, self.margin = rank, world_size, margin

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        batch = image_features.shape[0]
        all_text = gather_features(text_features, self.rank, self.world_size, True)
        distance = torch.cdist(image_features, all_text).clamp_min(0)
        matched = torch.zeros_like(distance, dtype=torch.bool)
        matched[torch.arange(batch), torch.arange(batch) + self.rank * batch] = True
        pulled = torch.where(matched, distance.square(), torch.zeros_like(distance))
        pushed = torch.where(
            matched, torch.zeros_like(distance), F.relu(self.margin - distance).square()
        )
        pairs = all_text.shape[0] * all_text.shape[0]
        loss = (pulled.sum() + pushed.sum()) * self.world_size / pairs
        return {"loss": loss, "matched": pulled.sum().detach() / batch}


class SupCon(nn.Module):
    """Supervised contrastive loss (Khosla et al., 2020) over images and captions together: every
    other sample of the same class, image or caption, is a positive of an anchor (its own caption
    always is), every other sample a candidate in the softmax; mean over anchors and positives.

    Each process anchors its own images and captions against everyone's (gathered with
    gradients) and scales by the processes, so the mean over processes is the full loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, temperature: float = 0.1, **_: object):
        super().__init__()
        self.rank, self.world_size, self.temperature = rank, world_size, temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if labels is None:
            raise ValueError("the supcon term needs class labels (.cls in the shards)")
        batch = image_features.shape[0]
        all_image = gather_features(image_features, self.rank, self.world_size, True)
        all_text = gather_features(text_features, self.rank, self.world_size, True)
        all_labels = gather_features(labels, self.rank, self.world_size, False)
        anchors = torch.cat([image_features, text_features])
        candidates = torch.cat([all_image, all_text])
        anchor_labels = torch.cat([labels, labels])
        candidate_labels = torch.cat([all_labels, all_labels])
        # an anchor's own column: its row in the gathered images (or texts) of this process
        own = torch.arange(batch, device=labels.device) + self.rank * batch
        self_column = torch.cat([own, own + all_image.shape[0]])
        logits = anchors @ candidates.T / self.temperature
        is_self = torch.zeros_like(logits, dtype=torch.bool)
        is_self[torch.arange(2 * batch), self_column] = True
        log_prob = logits - torch.logsumexp(
            logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True
        )
        positive = (anchor_labels[:, None] == candidate_labels[None, :]) & ~is_self
        per_anchor = -(log_prob * positive).sum(1) / positive.sum(1)
        loss = per_anchor.sum() * self.world_size / (2 * all_image.shape[0])
        return {"loss": loss}


class SimCSE(nn.Module):
    """Unsupervised SimCSE (Gao et al., 2021) on captions: each caption's two encodings under
    different dropout masks are positives, the other captions' second encodings negatives;
    cross-entropy at a fixed temperature. Rows are this process's captions, columns everyone's
    (gathered with gradients), scaled so the mean over processes is the full loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, temperature: float = 0.05, **_: object):
        super().__init__()
        self.rank, self.world_size, self.temperature = rank, world_size, temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        text_features_2: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if text_features_2 is None:
            raise ValueError(
                "the simcse term needs a second encoding of the captions (text_views=2)"
            )
        batch = text_features.shape[0]
        columns = gather_features(text_features_2, self.rank, self.world_size, True)
        logits = text_features @ columns.T / self.temperature
        labels = torch.arange(batch, device=logits.device) + self.rank * batch
        loss = F.cross_entropy(logits, labels, reduction="sum") * self.world_size / columns.shape[0]
        return {"loss": loss}


class SimCLR(nn.Module):
    """NT-Xent of SimCLR (Chen et al., 2020) on two augmented views of each image, as SLIP adds
    it to CLIP: each of the 2N views' positive is the other view of its image, the other 2N - 2
    views are its negatives; cross-entropy at a fixed temperature, mean over the 2N views.

    Reads `image_ssl_1`, `image_ssl_2` (both views through the image SSL head, normalised). Rows
    are this process's views, columns everyone's (gathered with gradients), scaled so the mean
    over processes is the full loss.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, temperature: float = 0.1, **_: object):
        super().__init__()
        self.rank, self.world_size, self.temperature = rank, world_size, temperature

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_ssl_1: torch.Tensor | None = None,
        image_ssl_2: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if image_ssl_1 is None or image_ssl_2 is None:
            raise ValueError("the simclr term needs two image views through the SSL head")
        batch = image_ssl_1.shape[0]
        all_1 = gather_features(image_ssl_1, self.rank, self.world_size, True)
        all_2 = gather_features(image_ssl_2, self.rank, self.world_size, True)
        total = all_1.shape[0]
        logits = torch.cat([image_ssl_1, image_ssl_2]) @ torch.cat([all_1, all_2]).T
        logits = logits / self.temperature
        # row i (view 1 of local image i) is column own[i]; its positive is own[i] + total
        own = torch.arange(batch, device=logits.device) + self.rank * batch
        self_column = torch.cat([own, own + total])
        positive = torch.cat([own + total, own])
        rows = torch.arange(2 * batch, device=logits.device)
        logits = logits.index_put((rows, self_column), logits.new_tensor(float("-inf")))
        loss = F.cross_entropy(logits, positive, reduction="sum") * self.world_size / (2 * total)
        accuracy = (logits.argmax(1) == positive).float().mean()
        return {"loss": loss, "accuracy": accuracy.detach()}


def _clip(
    rank: int = 0,
    world_size: int = 1,
    local_loss: bool = False,
    gather_with_grad: bool = True,
    label_smoothing: float = 0.0,
    tiled: object = "auto",
    tile_size: int = 1024,
    **_: object,
) -> nn.Module:
    return ClipInfoNCE(
        rank=rank,
        world_size=world_size,
        local_loss=local_loss,
        gather_with_grad=gather_with_grad,
        tiled=tiled,
        tile_size=tile_size,
        label_smoothing=label_smoothing,
    )


TERMS: dict[str, Callable[..., nn.Module]] = {
    "clip": _clip,
    "siglip": SigLIP,
    "margin": MarginLoss,
    "supcon": SupCon,
    "simcse": SimCSE,
    "moco": MoCo,
    "simclr": SimCLR,
    "byol": BYOL,
}
# What each term reads besides the features: model parameters (a parameter no term reads is frozen
# by `freeze_unused`: it would get no gradient, and DDP would then skip averaging its bucket) and
# per-sample inputs the loader and model must provide (`labels`: the shards' .cls; `text_views`:
# a second encoding of each caption under another dropout mask; `image_views`: a second
# augmented view of each image, the loader's "image_2", which the model turns into
# `image_ssl_1`/`image_ssl_2` (and, with BYOL's predictor, `image_pred_1`/`image_pred_2`);
# `momentum`: momentum towers or a target network, which the term keeps itself once attached to
# the model). A term instance may narrow this in its own `needs` (moco reads no
# temperature when it has a fixed one).
TERM_NEEDS: dict[str, frozenset] = {
    "clip": frozenset({"logit_scale"}),
    "siglip": frozenset({"logit_scale", "logit_bias"}),
    "margin": frozenset(),
    "supcon": frozenset({"labels"}),
    "simcse": frozenset({"text_views"}),
    "moco": frozenset({"logit_scale", "momentum"}),
    "simclr": frozenset({"image_views"}),
    "byol": frozenset({"image_views", "momentum"}),
}


class Objective(nn.Module):
    """The weighted sum of the configured terms; what the trainer minimises."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.needs = frozenset().union(
            *(getattr(term, "needs", TERM_NEEDS[name]) for name, _, term in terms)
        )
        self.weights = [weight for _, weight, _ in terms]
        self.terms = nn.ModuleList(term for _, _, term in terms)

    def _with(self, hook: str) -> list:
        return [getattr(term, hook) for term in self.terms if hasattr(term, hook)]

    def attach(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """Give the stateful terms their state, built from `model` (its weights now)."""
        for attach in self._with("attach"):
            attach(model, device)

    @property
    def has_targets(self) -> bool:
        return bool(self._with("targets"))

    def targets(
        self, images: torch.Tensor, tokens: torch.Tensor, images_2: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample inputs the terms compute themselves, without a graph (momentum keys,
        target projections); `images_2`: the second image view, when the loader makes one."""
        out: dict[str, torch.Tensor] = {}
        for targets in self._with("targets"):
            out.update(targets(images, tokens, images_2))
        return out

    def after_step(self) -> None:
        """Once per optimiser step taken: the terms' state moves on (momentum, queues, target)."""
        for after_step in self._with("after_step"):
            after_step()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        **extra: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """`extra`: per-sample inputs some terms read (labels, text_features_2, targets)."""
        inputs = {"logit_bias": logit_bias, **{k: v for k, v in extra.items() if v is not None}}
        if len(self.terms) == 1 and self.weights[0] == 1.0:
            return self.terms[0](image_features, text_features, logit_scale, **inputs)
        out: dict[str, torch.Tensor] = {}
        total = image_features.new_zeros(())
        for name, weight, term in zip(self.names, self.weights, self.terms):
            parts = term(image_features, text_features, logit_scale, **inputs)
            total = total + weight * parts["loss"]
            out[f"loss/{name}"] = parts["loss"].detach()
            out.update({f"{name}/{k}": v.detach() for k, v in parts.items() if k != "loss"})
        out["loss"] = total
        return out


def freeze_unused(model: nn.Module, objective: Objective) -> None:
    """Freeze the temperature (or bias) when no term of `objective` reads it."""
    for name in ("logit_scale", "logit_bias"):
        param = getattr(model, name, None)
        if param is not None and name not in objective.needs:
            param.requires_grad_(False)


def build_objective(
    cfg: LossConfig, rank: int = 0, world_size: int = 1, total_steps: int | None = None
) -> Objective:
    """The terms of `cfg` (validated by the config) for this process; `total_steps`
    (train.steps) for a schedule over training (byol's momentum)."""
    terms = []
    for term in loss_terms(cfg):
        options = {
            k: getattr(term, k)
            for k in LossTermConfig.__dataclass_fields__
            if k not in ("name", "weight") and getattr(term, k) is not None
        }  # None: the term's default
        module = TERMS[term.name](
            rank=rank,
            world_size=world_size,
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            tiled=cfg.tiled,
            tile_size=cfg.tile_size,
            total_steps=total_steps,
            **options,
        )
        terms.append((term.name, float(term.weight), module))
    return Objective(terms)


def load_objective_state(
    objective: Objective, state: dict[str, torch.Tensor] | None, where: object
) -> None:
    """Put back the objective's own state (moco's momentum towers and queues, byol's target)
    from checkpoint `where`; a checkpoint saved with other stateful terms or sizes is refused
    with one line."""
    expected = objective.state_dict()
    state = state or {}
    if not expected and not state:
        return
    mismatch = sorted(
        k
        for k in expected.keys() | state.keys()
        if k not in expected or k not in state or expected[k].shape != state[k].shape
    )
    if mismatch:
        raise ConfigError(
            f"cannot resume {where}: its objective state does not fit loss.terms now (first "
            f"difference: {mismatch[0]}); resume with the run's loss.terms and queue_size"
        )
    objective.load_state_dict(state)
