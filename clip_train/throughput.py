"""Model FLOPs utilisation: how much of the accelerator's peak the training step uses.

FLOPs are counted analytically (6 x parameters x tokens for the matmuls of forward + backward,
plus the attention scores), the usual convention of MFU reports, so numbers compare across
frameworks.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no sparsity) bf16/fp16 tensor-core peak, FLOP/s, from the vendor datasheets, keyed by the
# exact name `torch.cuda.get_device_name` reports: PCIe and SXM parts differ (an H100 PCIe is 756,
# not 989), and a substring match would give an L40 the L4's figure. Unknown names get no MFU;
# `train.peak_flops` sets it.
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA GeForce RTX 4090": 165e12,
    "Tesla V100-SXM2-16GB": 125e12,
    "Tesla V100-SXM2-32GB": 125e12,
    "Tesla V100-PCIE-16GB": 112e12,
    "Tesla V100-PCIE-32GB": 112e12,
}


def _matmul_params(module: nn.Module) -> int:
    """Parameters that take part in a matmul per token (embedding tables are lookups)."""
    return sum(
        p.numel()
        for name, p in module.named_parameters()
        if p.ndim >= 2 and not any("embed" in part for part in name.split("."))
    )


class TrainFlops:
    """Forward + backward FLOPs per image-caption pair; the towers' sizes are read once."""

    def __init__(self, model: nn.Module):
        self.towers = []
        for tower in (model.visual, model.text):
            blocks = (
                getattr(getattr(tower, "trunk", tower), "blocks", None)
                or tower.transformer.resblocks
            )
            norm = blocks[0].norm1 if hasattr(blocks[0], "norm1") else blocks[0].ln_1
            self.towers.append((_matmul_params(tower), len(blocks), norm.normalized_shape[0]))

    def per_sample(self, image_tokens: int, text_tokens: int) -> float:
        total = 0.0
        for (params, layers, width), tokens in zip(self.towers, (image_tokens, text_tokens)):
            attention = 2 * 2 * layers * tokens * tokens * width  # QK^T and AV, 2 FLOPs per MAC
            total += 3 * (2 * params * tokens + attention)  # backward = 2 x forward
        return total


def device_peak_flops(device: torch.device, configured: float | None) -> float | None:
    if configured:
        return configured
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


def peak_flops_for(device_name: str) -> float | None:
    """The datasheet peak of a device by its exact CUDA name, or None when we do not know it."""
    return PEAK_FLOPS.get(device_name.strip())
