"""Contrastive losses, chosen by name (`loss.name`).

Each loss takes L2-normalized features of the local batch and returns a dict whose "loss" entry is
minimised; other entries are logged. Multi-process runs pass rank and world size; the loss gathers
features itself through `clip_train.distributed`.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from clip_train.distributed import gather_features
from data_tools.errors import ConfigError


class ClipInfoNCE(nn.Module):
    """Symmetric InfoNCE of CLIP: cross-entropy over image->text and text->image similarities.

    local_loss=False: every process computes the full (world*B) x (world*B) logits (as in
    open_clip's ClipLoss default). local_loss=True: each process computes only its own B rows
    against all world*B columns; with gather_with_grad=True the gradients still equal those of the
    full loss (see `clip_train.distributed.gather_features`).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_loss: bool = False, gather_with_grad: bool = True,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.rank, self.world_size = rank, world_size
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.label_smoothing = label_smoothing

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, **_: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = image_features.shape[0]
        all_image = gather_features(image_features, self.rank, self.world_size, self.gather_with_grad)
        all_text = gather_features(text_features, self.rank, self.world_size, self.gather_with_grad)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
            labels = torch.arange(batch, device=image_features.device) + self.rank * batch
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
            labels = torch.arange(all_image.shape[0], device=image_features.device)
        loss_i2t = F.cross_entropy(logits_per_image, labels, label_smoothing=self.label_smoothing)
        loss_t2i = F.cross_entropy(logits_per_text, labels, label_smoothing=self.label_smoothing)
        loss = (loss_i2t + loss_t2i) / 2
        return {"loss": loss, "loss_i2t": loss_i2t.detach(), "loss_t2i": loss_t2i.detach()}


LOSSES: Dict[str, Callable[..., nn.Module]] = {"clip": ClipInfoNCE}


def build_loss(name: str, **kwargs) -> nn.Module:
    if name not in LOSSES:
        raise ConfigError(f"loss.name '{name}' is not one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](**kwargs)
