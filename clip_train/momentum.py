"""Momentum (EMA) copies of trained modules: the key encoders of MoCo, the target network of BYOL.

A `MomentumCopy` holds a frozen deep copy of a source module and, once per optimiser step,
moves each of its parameters towards the source's: `copy = m * copy + (1 - m) * source`. The
copy is never trained (no gradients, in no optimizer), runs in eval mode (no dropout, so its
outputs are deterministic and draw nothing from the RNG that GradCache replays), and is not part
of the model, so it is neither exported nor DDP-synchronised: every process applies the same
update to the same averaged weights, and the copies stay identical.

Its `state_dict()` holds the copy's tensors only (never the source's); a term that owns one saves
it through the objective's state (`objective.safetensors` in each checkpoint, see
clip_train/checkpoint.py), so resume restores it bit for bit.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumCopy(nn.Module):
    """An exponential moving average of `source`, updated by `update()` after each optimiser step.

    `source` must be on CPU or its final device and not yet wrapped (DDP, compile): the copy is
    taken once, here, and the source is only read afterwards. `momentum` in [0, 1): 0 follows the
    source exactly, values near 1 move slowly (MoCo 0.999, ALBEF 0.995).
    """

    def __init__(self, source: nn.Module, momentum: float):
        super().__init__()
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), not {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(source).requires_grad_(False).eval()
        # A plain tuple, not a submodule: the source's weights stay out of this state_dict.
        self._source = (source,)

    def train(self, mode: bool = True) -> MomentumCopy:
        """Stays in eval mode: the copy's outputs are targets, not a training forward."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """copy <- m * copy + (1 - m) * source for every parameter (frozen ones too: they do not
        move); buffers are copied. `momentum` overrides the constructor's for this step (BYOL
        raises it on a schedule)."""
        m = self.momentum if momentum is None else momentum
        source = self._source[0]
        ours = dict(self.module.named_parameters())
        theirs = dict(source.named_parameters())
        if ours.keys() != theirs.keys():
            raise RuntimeError(
                "the momentum copy and its source no longer have the same parameters"
            )
        names = list(ours)
        torch._foreach_lerp_(
            [ours[n] for n in names], [theirs[n].detach() for n in names], weight=1.0 - m
        )
        for mine, src in zip(self.module.buffers(), source.buffers()):
            mine.copy_(src)
