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
               if p.ndim >= 2 and "embed" not in name.split(".")[-1] and "pos_embed" not in name)


def train_flops_per_sample(model: nn.Module, image_tokens: int, text_tokens: int) -> float:
    """Forward + backward FLOPs of one image-caption pair through both towers."""
    total = 0.0
    for tower, tokens in ((model.visual, image_tokens), (model.text, text_tokens)):
        blocks = getattr(getattr(tower, "trunk", tower), "blocks", None) or tower.transformer.resblocks
        width = blocks[0].norm1.normalized_shape[0] if hasattr(blocks[0], "norm1") else blocks[0].ln_1.normalized_shape[0]
        attention = 2 * 2 * len(blocks) * tokens * tokens * width  # QK^T and AV, 2 FLOPs per MAC
        total += 3 * (2 * _matmul_params(tower) * tokens + attention)  # backward = 2 x forward
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
