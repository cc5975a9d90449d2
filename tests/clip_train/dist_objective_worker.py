"""Run under torchrun by test_objective.py: one step of the objective's gradients on this rank's
half of a batch, for each term layout, DDP-averaged, written by rank 0."""

import dataclasses
import sys

import torch
from accelerate import Accelerator
from dist_worker import CFG, batch

from clip_train.config import (
    SSL_HEAD_TERMS,
    ImageSSLHeadConfig,
    LossConfig,
    LossTermConfig,
    ModelConfig,
)
from clip_train.model import build_model
from clip_train.objective import build_objective, freeze_unused
from clip_train.step import forward_backward

CFG.init_logit_bias = -10.0
VARIANTS = [
    dict(terms=[("siglip", 1.0)], accum_steps=1),
    dict(terms=[("siglip", 1.0)], accum_steps=2),
    dict(terms=[("margin", 1.0)], accum_steps=1),
    dict(terms=[("clip", 1.0), ("siglip", 0.5), ("margin", 0.25)], accum_steps=2),
    dict(terms=[("supcon", 1.0)], accum_steps=1),
    dict(terms=[("clip", 1.0), ("supcon", 0.5)], accum_steps=2),
    dict(terms=[("clip", 1.0), ("simcse", 0.5)], accum_steps=2),
    dict(terms=[("clip", 1.0), ("simclr", 0.5)], accum_steps=1),
    dict(terms=[("clip", 1.0), ("simclr", 0.5)], accum_steps=2),
]


def labels(n: int = 16) -> torch.Tensor:
    return torch.arange(n) % 3


def loss_config(variant: dict) -> LossConfig:
    return LossConfig(terms=[LossTermConfig(name=n, weight=w) for n, w in variant["terms"]])


def model_config(variant: dict) -> ModelConfig:
    """CFG, with the image SSL head when a term reads two image views (as the config sets it)."""
    views = any(n in SSL_HEAD_TERMS for n, _ in variant["terms"])
    return dataclasses.replace(CFG, image_ssl=ImageSSLHeadConfig(enabled=views))


def second_views(n: int = 16) -> torch.Tensor:
    """A second view of `batch()`'s images (any tensor of their shape: the loss only pairs rows)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    images, tokens = batch()
    per = images.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    results = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = build_model(model_config(variant))
        objective = build_objective(loss_config(variant), rank=rank, world_size=world)
        freeze_unused(model, objective)
        model = accelerator.prepare(model)
        losses = forward_backward(
            model,
            objective,
            images[mine],
            tokens[mine],
            accum_steps=variant["accum_steps"],
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
            labels=labels()[mine] if "labels" in objective.needs else None,
            text_views=2 if "text_views" in objective.needs else 1,
            images_2=second_views()[mine] if "image_views" in objective.needs else None,
        )
        loss = accelerator.reduce(losses["loss"].detach(), reduction="mean")
        grads = {
            n: p.grad.clone()
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.grad is not None
        }
        results.append({"variant": variant, "loss": loss, "grads": grads, "world": world})
    if accelerator.is_main_process:
        torch.save(results, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
