"""Run under torchrun by test_moco.py: one optimiser step with the moco term on this rank's half
of a batch, for each variant; rank 0 writes the DDP-averaged gradients, the loss averaged over
processes, and every rank's momentum towers and queues after the step."""

import sys

import torch
from accelerate import Accelerator
from dist_worker import CFG, batch

from clip_train.config import LossConfig, LossTermConfig
from clip_train.model import build_model
from clip_train.objective import Objective, build_objective, freeze_unused
from clip_train.step import forward_backward

QUEUE = 40  # holds PRELOAD keys before the step, 16 more after it
PRELOAD = 8
VARIANTS = [
    dict(terms=[("moco", 1.0)], accum_steps=1, temperature=None),
    dict(terms=[("clip", 1.0), ("moco", 0.5)], accum_steps=2, temperature=None),
    dict(terms=[("moco", 1.0)], accum_steps=2, temperature=0.1),
]


def moco_objective(variant: dict, rank: int = 0, world_size: int = 1) -> Objective:
    terms = [
        LossTermConfig(name=n, weight=w, queue_size=QUEUE, temperature=variant["temperature"])
        for n, w in variant["terms"]
    ]
    return build_objective(LossConfig(terms=terms), rank=rank, world_size=world_size)


def preload(objective: Objective) -> None:
    """The same earlier keys in every process's queues."""
    g = torch.Generator().manual_seed(7)
    term = objective.terms[objective.names.index("moco")]
    for queue in (term.image_queue, term.text_queue):
        queue.push(torch.nn.functional.normalize(torch.randn(PRELOAD, 32, generator=g), dim=-1))


def setup(variant: dict, rank: int = 0, world_size: int = 1):
    torch.manual_seed(0)
    model = build_model(CFG)
    objective = moco_objective(variant, rank, world_size)
    freeze_unused(model, objective)
    objective.attach(model)
    preload(objective)
    return model, objective


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    images, tokens = batch()
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
        )
        loss = accelerator.reduce(losses["loss"].detach(), reduction="mean")
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
