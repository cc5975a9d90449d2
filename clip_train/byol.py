"""The byol term: BYOL's predictor against an EMA target network, on two views of each image.

BYOL (Grill et al., 2020) as an image self-supervision term beside an image-text term. The
online network is the image trunk, the image SSL head (BYOL's projector, shared with simclr when
both are on) and BYOL's predictor (`model.image_ssl_predictor`); both live in the model, so the
optimizer, DDP and checkpoints hold them, GradCache caches their outputs (`image_pred_1`,
`image_pred_2`) and exports leave them out. The target network is an EMA copy of the trunk and
the head (`MomentumCopy`), kept by this term: it is in no optimizer, gets no gradients and is
saved in the objective's state (`objective.safetensors`).

Loss per image, symmetric: 2 - 2 cos(q(v1), z'(v2)) + 2 - 2 cos(q(v2), z'(v1)), where q is the
online prediction and z' the target projection of the other view; the mean over this process's
images. There are no negatives, so nothing is exchanged: the mean of the processes' gradients
(DDP) is the gradient of one process on the whole batch.

Once per optimiser step, after it: the target moves to m x target + (1 - m) x online, with m
BYOL's cosine schedule from `momentum` at the first step to 1 at `total_steps` (or constant).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.momentum import MomentumCopy


def cosine_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: 1 - (1 - base) (cos(pi k / K) + 1) / 2, from `base` at k = 0 to 1 at
    k = K (and 1 after it)."""
    progress = min(step / total, 1.0)
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(nn.Module):
    """The byol loss term; `attach(model)` gives it its target network."""

    def __init__(
        self,
        momentum: float = 0.996,
        momentum_schedule: str = "cosine",
        total_steps: int | None = None,
        **_: object,
    ):
        super().__init__()
        if momentum_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"momentum_schedule must be constant or cosine, not {momentum_schedule}"
            )
        if momentum_schedule == "cosine" and not total_steps:
            raise ValueError("the cosine momentum schedule of byol needs total_steps")
        self.momentum, self.schedule, self.total_steps = momentum, momentum_schedule, total_steps
        self.target: MomentumCopy | None = None
        # Optimiser steps taken (the schedule's k): part of the state, so resume continues it.
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def attach(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        """The target network: a copy of `model`'s image trunk and SSL head as they are now."""
        if not hasattr(model, "image_ssl_head") or not hasattr(model, "image_ssl_predictor"):
            raise ValueError(
                "the byol term needs the model's image SSL head and predictor "
                "(model.image_ssl.enabled and .predictor, which a byol loss term turns on)"
            )
        device = next(model.parameters()).device if device is None else device
        online = nn.ModuleDict({"trunk": model.visual.trunk, "head": model.image_ssl_head})
        self.target = MomentumCopy(online, self.momentum).to(device)
        self.steps = self.steps.to(device)

    def _attached(self) -> MomentumCopy:
        if self.target is None:
            raise ValueError("the byol term has no target network: call attach(model) first")
        return self.target

    def momentum_now(self) -> float:
        """The EMA rate of the next update (after the step being taken)."""
        if self.schedule == "constant":
            return self.momentum
        return cosine_momentum(self.momentum, int(self.steps), self.total_steps)

    @torch.no_grad()
    def targets(
        self, images: torch.Tensor, tokens: torch.Tensor, images_2: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """The target network's normalised projections of both views, without a graph."""
        if images_2 is None:
            raise ValueError("the byol term needs a second view of the images (image_views=2)")
        target = self._attached().module
        n = images.shape[0]
        projected = F.normalize(
            target["head"](target["trunk"](torch.cat([images, images_2]))), dim=-1
        )
        return {"byol_target_1": projected[:n], "byol_target_2": projected[n:]}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        image_pred_1: torch.Tensor | None = None,
        image_pred_2: torch.Tensor | None = None,
        byol_target_1: torch.Tensor | None = None,
        byol_target_2: torch.Tensor | None = None,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        if image_pred_1 is None or image_pred_2 is None:
            raise ValueError("the byol term needs both views' predictions (the model's predictor)")
        if byol_target_1 is None or byol_target_2 is None:
            raise ValueError("the byol term needs the target network's projections (targets)")
        # Normalised on both sides, so ||q - z'||^2 = 2 - 2 q . z'; targets carry no gradient.
        cos_12 = (image_pred_1 * byol_target_2.detach().to(image_pred_1.dtype)).sum(-1)
        cos_21 = (image_pred_2 * byol_target_1.detach().to(image_pred_2.dtype)).sum(-1)
        loss = (4 - 2 * cos_12 - 2 * cos_21).mean()
        return {"loss": loss, "momentum": loss.new_tensor(self.momentum_now()).detach()}

    @torch.no_grad()
    def after_step(self) -> None:
        """After the optimiser step: the target moves towards the just-updated online network."""
        self._attached().update(self.momentum_now())
        self.steps += 1
