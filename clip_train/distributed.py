"""Feature gathering across processes for the contrastive loss.

The only module that talks to `torch.distributed` during training. Functions take rank and world
size as arguments so they are testable on the CPU with gloo, and models stay free of
communication code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def gather_features(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool = True
) -> torch.Tensor:
    """Concatenate `features` from every process along dim 0, in rank order.

    with_grad=True backpropagates through the all-gather, so each process gets the gradient of the
    whole-batch loss w.r.t. its own features, from every process's loss terms: with DDP's gradient
    averaging this equals one process on the whole batch, with or without the local loss.
    with_grad=False gathers detached copies and puts the local tensor (with its graph) back in its
    slot, so only this process's own loss terms reach its features: with the full loss that is the
    single-process gradient divided by the number of processes (open_clip's default); with the local
    loss it is not the full-batch gradient at all.
    """
    if world_size == 1:
        return features
    if with_grad:
        return torch.cat(dist_nn.all_gather(features), dim=0)
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)
