"""Contrastive losses, chosen by name (`loss.name`).

Each loss takes L2-normalized features of the local batch and returns a dict whose "loss" entry is
minimised; other entries are logged. Multi-process runs pass rank and world size; the loss gathers
features itself through `clip_train.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_train.distributed import gather_features
from clip_train.tiled_loss import tiled_cross_entropy
from data_tools.errors import ConfigError


class ClipInfoNCE(nn.Module):
    """Symmetric InfoNCE of CLIP: cross-entropy over image->text and text->image similarities.

    local_loss=False: every process computes the full (world*B) x (world*B) logits (as in
    open_clip's ClipLoss default). local_loss=True: each process computes only its own B rows
    against all world*B columns; with gather_with_grad=True the gradients still equal those of the
    full loss (see `clip_train.distributed.gather_features`).

    tiled=True computes the same loss and gradients in tiles of `tile_size` columns and rows
    (`clip_train.tiled_loss`), never holding the logits; "auto" does so when the logits would have
    AUTO_TILED_BATCH^2 entries or more (~16 bytes each with their softmax and gradient: 1 GiB).
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_loss: bool = False,
        gather_with_grad: bool = True,
        tiled: bool | str = "auto",
        tile_size: int = 1024,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        if tiled not in (True, False, "auto"):
            raise ConfigError(f"loss.tiled must be true, false or auto, not {tiled!r}")
        if tile_size < 1:
            raise ConfigError(f"loss.tile_size must be positive, not {tile_size}")
        if tiled is True and label_smoothing:
            raise ConfigError(
                "loss.tiled=true computes plain cross-entropy: set label_smoothing=0 or "
                "loss.tiled=auto/false"
            )
        self.tiled, self.tile_size = tiled, tile_size
        self.label_smoothing = label_smoothing  # the full logits only ("auto" then never tiles)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        **_: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        all_image = gather_features(
            image_features, self.rank, self.world_size, self.gather_with_grad
        )
        all_text = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        rows = image_features.shape[0] if self.local_loss else all_image.shape[0]
        auto = (
            self.tiled == "auto"
            and not self.label_smoothing
            and rows * all_image.shape[0] >= AUTO_TILED_BATCH**2
        )
        terms = self._tiled if self.tiled is True or auto else self._full
        loss_i2t, loss_t2i = terms(image_features, text_features, all_image, all_text, logit_scale)
        loss = (loss_i2t + loss_t2i) / 2
        return {"loss": loss, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()}

    def _tiled(
        self,
        image_features: Tensor,
        text_features: Tensor,
        all_image: Tensor,
        all_text: Tensor,
        logit_scale: Tensor,
    ) -> tuple[Tensor, Tensor]:
        if self.local_loss:
            offset = self.rank * image_features.shape[0]
            loss_i2t, _ = tiled_cross_entropy(
                image_features, all_text, logit_scale, offset=offset, tile=self.tile_size
            )
            loss_t2i, _ = tiled_cross_entropy(
                text_features, all_image, logit_scale, offset=offset, tile=self.tile_size
            )
            return loss_i2t, loss_t2i
        return tiled_cross_entropy(
            all_image, all_text, logit_scale, tile=self.tile_size, symmetric=True
        )

    def _full(
        self,
        image_features: Tensor,
        text_features: Tensor,
        all_image: Tensor,
        all_text: Tensor,
        logit_scale: Tensor,
    ) -> tuple[Tensor, Tensor]:
        batch = image_features.shape[0]
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + self.rank * batch
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        smoothing = self.label_smoothing
        return (
            F.cross_entropy(logits_per_image, labels, label_smoothing=smoothing),
            F.cross_entropy(logits_per_text, labels, label_smoothing=smoothing),
        )


# loss.tiled=auto tiles from this many rows x columns squared: a full 8192 x 8192 logit matrix costs
# ~1 GiB with its softmax and gradient (docs/benchmarks.md, "Tiled contrastive loss").
AUTO_TILED_BATCH = 8192

LOSSES: dict[str, Callable[..., nn.Module]] = {"clip": ClipInfoNCE}


def build_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ConfigError(f"loss.name '{name}' is not one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)
