"""Run under torchrun by test_byol.py: one optimiser step with a byol term on this rank's half
of a batch, for each variant; rank 0 writes the DDP-averaged gradients, the loss averaged over
processes, and every rank's target network after the step."""

import dataclasses
import sys

import torch
from accelerate import Accelerator
from dist_worker import CFG, batch

from clip_train.config import ImageSSLHeadConfig, LossConfig, LossTermConfig
from clip_train.model import build_model
from clip_train.objective import Objective, build_objective, freeze_unused
from clip_train.step import forward_backward

BYOL_CFG = dataclasses.replace(
    CFG, image_ssl=ImageSSLHeadConfig(enabled=True, hidden_dim=64, out_dim=16, predictor=True)
)
VARIANTS = [
    dict(terms=[("clip", 1.0), ("byol", 0.5)], accum_steps=1),
    dict(terms=[("clip", 1.0), ("simclr", 0.5), ("byol", 0.5)], accum_steps=2),
]


def second_views(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def byol_objective(variant: dict, rank: int = 0, world_size: int = 1) -> Objective:
    terms = [
        LossTermConfig(name=n, weight=w, momentum=0.5, momentum_schedule="constant")
        for n, w in variant["terms"]
    ]
    return build_objective(LossConfig(terms=terms), rank=rank, world_size=world_size)


def setup(variant: dict, rank: int = 0, world_size: int = 1):
    torch.manual_seed(0)
    model = build_model(BYOL_CFG)
    objective = byol_objective(variant, rank, world_size)
    freeze_unused(model, objective)
    objective.attach(model)
    return model, objective


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    images, tokens = batch()
    views = second_views()
    per = images.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    results = []
    for variant in VARIANTS:
        model, objective = setup(variant, rank, world)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model, optimizer = accelerator.prepare(model, optimizer)
        losses = forward_backward(
            model,
            objective,
            images[mine],
            tokens[mine],
            accum_steps=variant["accum_steps"],
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
            targets=objective.targets,
            images_2=views[mine],
        )
        loss = {k: accelerator.reduce(v.detach(), reduction="mean") for k, v in losses.items()}
        grads = {
            n: p.grad.clone()
            for n, p in accelerator.unwrap_model(model).named_parameters()
            if p.grad is not None
        }
        optimizer.step()
        objective.after_step()
        state = objective.state_dict()
        every_rank = {k: accelerator.gather(v[None]) for k, v in state.items()}
        results.append(
            {"variant": variant, "loss": loss, "grads": grads, "world": world, "state": every_rank}
        )
    if accelerator.is_main_process:
        torch.save(results, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
