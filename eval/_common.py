"""Helpers shared by the evaluators: inference mode, autocast, progress bars, results files."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch
from torch import nn

from data_tools.errors import DataError
from data_tools.io import write_text_atomic

T = TypeVar("T")


class EvalDataError(DataError):
    """Bad or missing evaluation data found while evaluating; tasks prefix it with the data spec."""


@contextlib.contextmanager
def inference(encoder: object) -> Iterator[None]:
    """No gradients and eval mode; every submodule's own mode restored afterwards.

    The trainer evaluates mid-run, so a frozen tower kept in eval mode must stay in eval mode and
    the rest must go back to training: restoring per module (not `train(was_training)`) does that.
    """
    modules = list(encoder.modules()) if isinstance(encoder, nn.Module) else []
    modes = [m.training for m in modules]
    try:
        if isinstance(encoder, nn.Module):
            encoder.eval()
        with torch.no_grad():
            yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (what the trainer uses); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_name(device: torch.device) -> str:
    """The numeric precision `autocast` gives on `device`; part of the classifier cache key."""
    return "bf16" if device.type == "cuda" else "fp32"


def progress_bar(
    iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None, unit: str = "it"
) -> Iterable[T]:
    """A tqdm bar on a terminal, plain log lines elsewhere (see data_tools.progress)."""
    if not enabled:
        return iterable
    from data_tools.progress import progress

    return progress(iterable, desc=desc, total=total, unit=unit, leave=False)


def write_json_atomic(path: str | os.PathLike, obj: object, what: str = "output") -> None:
    """Atomically (`data_tools.io`); ASCII-escaped JSON, as eval results always were."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n", what)
