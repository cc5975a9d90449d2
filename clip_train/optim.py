"""AdamW with decay only where it regularises, and learning-rate schedules chosen by name.

Two weight-decay rules: ours (`clip-train`: no decay on 1-d parameters, embeddings, class token
and temperature) and open_clip_train's (`open_clip`: embeddings are decayed), which the recipes
that follow OpenCLIP's published runs use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from clip_train.config import OptimConfig
from data_tools.errors import ConfigError

# Parameters that are scales, offsets or lookup tables: decaying them towards zero hurts.
_NO_DECAY_NAMES = (
    "logit_scale",
    "logit_bias",
    "pos_embed",
    "positional_embedding",
    "cls_token",
    "token_embedding",
    "reg_token",
)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights (all 1-d) and embeddings/temperature get no weight decay."""
    return param.ndim < 2 or any(key in name for key in _NO_DECAY_NAMES)


def is_no_decay_open_clip(name: str, param: torch.Tensor) -> bool:
    """open_clip_train's rule: 1-d parameters, names with bn/ln/bias, and the temperature. Its class
    embedding is 1-d; timm's `cls_token`, the same parameter, is 3-d, so it is named here."""
    return (
        param.ndim < 2
        or "bn" in name
        or "ln" in name
        or "bias" in name
        or "logit_scale" in name
        or name.endswith("cls_token")
    )


DECAY_RULES: dict[str, Callable[[str, torch.Tensor], bool]] = {
    "clip-train": is_no_decay,
    "open_clip": is_no_decay_open_clip,
}


def param_groups(model: nn.Module, weight_decay: float, rule: str = "clip-train") -> list[dict]:
    """[decayed, not decayed] trainable parameters under a rule of `DECAY_RULES`."""
    no_decay_fn = DECAY_RULES[rule]
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_decay_fn(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters; on the CPU the default per-tensor loop was a sixth of a
    # bench_tiny step (bench/train_step.py).
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, cfg.decay_rule),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )


def _warmup(step: int, warmup: int) -> float:
    return (step + 1) / warmup if step < warmup else 1.0


def cosine(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup, then half a cosine from 1 down to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return _warmup(step, cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def constant(step: int, total: int, cfg: OptimConfig) -> float:
    return _warmup(step, cfg.warmup_steps)


def const_cooldown(step: int, total: int, cfg: OptimConfig) -> float:
    """Constant after warmup, then linear to `min_lr_ratio` over the last `cooldown_steps`.

    Lets a run be extended or branched from any checkpoint before its cooldown.
    """
    start = total - cfg.cooldown_steps
    if step < start:
        return _warmup(step, cfg.warmup_steps)
    progress = min(1.0, (step - start) / max(1, cfg.cooldown_steps))
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


SCHEDULES: dict[str, Callable[[int, int, OptimConfig], float]] = {
    "cosine": cosine,
    "constant": constant,
    "const-cooldown": const_cooldown,
}


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state is a step counter, so resume is exact) over a named schedule."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule '{cfg.schedule}' is not one of: {', '.join(sorted(SCHEDULES))}"
        )
    fn = SCHEDULES[cfg.schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: fn(step, total_steps, cfg))
