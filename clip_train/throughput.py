"""Model FLOPs utilisation: how much of the accelerator's peak the training step uses.

FLOPs are counted analytically (6 x parameters x tokens for the matmuls of forward + backward,
plus the attention scores), the usual convention of MFU reports, so numbers compare across
frameworks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

# Dense bf16/fp16 tensor-core peak per device, FLOP/s (vendor datasheets, SXM parts).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
              "RTX 4090": 165e12, "V100": 125e12}


def _matmul_params(module: nn.Module) -> int:
    """Parameters that take part in a matmul per token (embedding tables are lookups)."""
    return sum(p.numel() for name, p in module.named_parameters()
               if p.ndim >= 2 and not any("embed" in part for part in name.split(".")))


class TrainFlops:
    """Forward + backward FLOPs per image-caption pair; the towers' sizes are read once."""

    def __init__(self, model: nn.Module):
        self.towers = []
        for tower in (model.visual, model.text):
            blocks = getattr(getattr(tower, "trunk", tower), "blocks", None) or tower.transformer.resblocks
            norm = blocks[0].norm1 if hasattr(blocks[0], "norm1") else blocks[0].ln_1
            self.towers.append((_matmul_params(tower), len(blocks), norm.normalized_shape[0]))

    def per_sample(self, image_tokens: int, text_tokens: int) -> float:
        total = 0.0
        for (params, layers, width), tokens in zip(self.towers, (image_tokens, text_tokens)):
            attention = 2 * 2 * layers * tokens * tokens * width  # QK^T and AV, 2 FLOPs per MAC
            total += 3 * (2 * params * tokens + attention)  # backward = 2 x forward
        return total


def device_peak_flops(device: torch.device, configured: Optional[float]) -> Optional[float]:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None
