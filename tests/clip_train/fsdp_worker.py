"""Run under torchrun by test_fsdp.py: one GradCache step (2 micro-batches) of the same model under
DDP and under FSDP on this rank's half of a batch; rank 0 writes each one's gradients before and
after clipping to norm 1, and the norm."""

import sys

import torch
from accelerate import Accelerator
from dist_worker import CFG, batch
from torch.distributed.tensor import DTensor

import clip_train
from clip_train import sharding
from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward


def _full(grads):
    return {n: g.full_tensor() if isinstance(g, DTensor) else g.clone() for n, g in grads}


def main(out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    images, tokens = batch()
    mine = slice(rank * 8, (rank + 1) * 8)
    loss_fn = build_loss("clip", rank=rank, world_size=world)
    results = {"clip_train": clip_train.__file__}
    for fsdp in (False, True):
        torch.manual_seed(0)
        plain = build_model(CFG)
        if fsdp:
            model = sharding.shard_model(plain, torch.device("cpu"))
            no_sync = lambda: sharding.no_gradient_sync(model)  # noqa: E731
        else:
            model = accelerator.prepare(plain)
            no_sync = lambda: accelerator.no_sync(model)  # noqa: E731
        forward_backward(
            model,
            loss_fn,
            images[mine],
            tokens[mine],
            accum_steps=2,
            backward=accelerator.backward,
            no_sync=no_sync,
        )
        params = [p for p in plain.parameters() if p.grad is not None]
        if fsdp:
            sharding.average_replicated_grads(plain)
        grads = _full((n, p.grad) for n, p in plain.named_parameters())
        if fsdp:
            norm = sharding.clip_grad_norm(list(plain.parameters()), 1.0)
        else:
            norm = accelerator.clip_grad_norm_(params, 1.0)
        results["fsdp" if fsdp else "ddp"] = {
            "grads": grads,
            "norm": torch.as_tensor(norm).detach().clone(),
            "clipped": _full((n, p.grad) for n, p in plain.named_parameters()),
        }
    if accelerator.is_main_process:
        torch.save(results, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
