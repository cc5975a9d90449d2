"""Fully sharded data parallel (`train.fsdp`): shard the model, step it, and checkpoint it.

torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), not Accelerate's FSDP plugin: Accelerate
drops its plugin when it runs on the CPU (it gives plain multi-process DDP there), so a run under
it could only be tested on GPUs; FSDP2 runs the same code over gloo on the CPU, where the tests
compare it with DDP and check kill-and-resume bit for bit. Accelerate still launches the processes,
prepares the optimizer, runs autocast and the backward; it never wraps the model.

Each transformer block of both towers is one FSDP unit (its parameters are all-gathered just
before it runs and freed after), the rest of the model one more. The temperature `logit_scale`
is a 0-dim parameter, which FSDP2 cannot shard (it splits dim 0): it stays a whole tensor on every
process and its gradient is averaged here, as DDP would (`average_replicated_grads`).

Checkpoints (written by `clip_train.checkpoint`, layout in docs/scaling.md): the optimizer state,
twice the model's size under AdamW, is saved sharded through `torch.distributed.checkpoint`, each
process writing its own part, into safetensors files whose headers say where each part sits (its
HuggingFace storage); on resume each process reads back the slices it owns. That storage
is used instead of DCP's default because the default one unpickles its `.metadata` file and any
non-tensor entry on load, which checkpoints here never do (only tensors go through DCP; the
optimizer's hyper-parameters go into `optimizer.pt`). The model itself is gathered into one
complete `model.safetensors` as in any run, so evaluation, export, `clip_train.load` and resume
read it unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from clip_train.config import ModelConfig
from clip_train.model import CLIPModel, build_model

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: CLIPModel, device: torch.device) -> CLIPModel:
    """Shard `model` in place over all processes (call after locking towers, before the optimizer).

    Every process starts from rank 0's weights, as under DDP, so ranks that built or loaded their
    model differently still train one model.
    """
    model.to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in [*model.visual.trunk.blocks, *model.text.transformer.resblocks]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated_params(model)))
    return model


def replicated_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters FSDP2 cannot shard (0-dim): kept whole on every process."""
    return [p for p in model.parameters() if p.ndim == 0]


def average_replicated_grads(model: nn.Module) -> None:
    """Average the unsharded parameters' gradients over processes, as DDP does (divide, then
    sum)."""
    world = dist.get_world_size()
    for param in replicated_params(model):
        if param.grad is not None and not isinstance(param.grad, DTensor):
            param.grad.div_(world)
            dist.all_reduce(param.grad)


@contextlib.contextmanager
def no_gradient_sync(model: FSDPModule) -> Iterator[None]:
    """GradCache's non-final micro-batches: gradients accumulate locally, reduced on the last
    one."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Total gradient norm over all processes' shards (clipping to `max_norm` when set).

    torch's DTensor-aware norm combines the shards' norms across processes; the whole (replicated)
    gradients are counted once, not once per process. torch's `clip_grad_norm_` cannot take both
    kinds in one list, hence the two groups.
    """
    with_grad = [p for p in params if p.grad is not None]
    sharded = [p for p in with_grad if isinstance(p.grad, DTensor)]
    whole = [p for p in with_grad if not isinstance(p.grad, DTensor)]
    norms = []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor())
    if whole:
        norms.append(torch.nn.utils.get_total_norm([p.grad for p in whole]))
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm:
        for group in (sharded, whole):
            if group:
                torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)  # scales each p.grad
    return total


# -------------------------------------------------------------------------------- state
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The complete state dict on the CPU of rank 0 (empty elsewhere); every process must call
    it."""
    return get_model_state_dict(model, options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a complete state dict (given on every process) into the sharded model."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def plain_copy(state: dict[str, torch.Tensor], cfg: ModelConfig, device: torch.device) -> CLIPModel:
    """An unsharded model from a full state (rank 0): evaluation and export run on one process,
    which a sharded model cannot (its forward all-gathers from every process)."""
    with torch.random.fork_rng(devices=[]):  # building draws an init: keep the run's RNG untouched
        model = build_model(cfg)
    model.load_state_dict(state)
    return model.to(device)


def _flat_optimizer_tensors(osd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """{"state": {fqn: {"exp_avg": t, ...}}} -> {"fqn/exp_avg": t}; DCP then reads/writes in
    place."""
    flat = {}
    for fqn, entries in osd["state"].items():
        for name, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"optimizer state {fqn}/{name} is not a tensor ({type(value).__name__})"
                )
            flat[f"{fqn}/{name}"] = value
    return flat


def optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(this process's optimizer shards by name, the param groups) -- the groups are plain values,
    the same on every process, stored by the main process with the checkpoint (collective)."""
    osd = get_optimizer_state_dict(model, optimizer)
    return _flat_optimizer_tensors(osd), osd["param_groups"]


def save_shards(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write this process's part of `tensors` (DTensor shards; whole tensors once) under `path`
    (collective)."""
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(path), save_distributed=True))


def load_optimizer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    param_groups: list[dict[str, Any]],
) -> None:
    """Read the shards this process needs from `path` (any number of processes wrote them)."""
    osd = get_optimizer_state_dict(
        model, optimizer
    )  # creates AdamW's state (a zero-lr step) to load into
    dcp.load(_flat_optimizer_tensors(osd), storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    set_optimizer_state_dict(
        model, optimizer, {"state": osd["state"], "param_groups": param_groups}
    )
