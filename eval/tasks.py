"""Evaluation tasks on shard sets: what the trainer (in-training eval) and `clip-eval` call.

A task takes an encoder and a shard spec, streams the shards with the encoder's own
preprocessing (one ordered pass, no shuffling) and returns a flat dict of numbers.
"""

from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path
from typing import Sequence, Union

import torch

from data_tools.errors import DataError
from data_tools.loader import expand_shards, make_loader
from data_tools.urls import is_remote, sample_key
from eval._common import EvalDataError
from eval.encoder import Encoder
from eval.retrieval import evaluate_retrieval
from eval.zero_shot import Template, build_zero_shot_classifier, evaluate_zero_shot

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


def _spec_name(data: object) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else ", ".join(map(str, data))  # type: ignore[arg-type]


def _data_dir(data: object, shards: list[str]) -> Path:
    """Where `classnames.txt`/`templates.txt` live by default: the spec's directory."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        return Path(data)
    return Path(shards[0]).parent


def _read_lines(path: Path, option: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file (class names, templates), surrounding space removed."""
    if not path.is_file():
        raise DataError(f"{path.name} not found: {path} (pass {option} FILE, or put it next to the shards)")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc} (it must be UTF-8 text, one entry per line)") from exc
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path} is empty; it needs one entry per line")
    return lines


def _resolve(
    value: Sequence | PathLike | None, default_dir: Path, filename: str, option: str
) -> tuple[list, str]:
    """A list given directly, read from a file path, or read from `default_dir/filename`."""
    if value is None:
        path = default_dir / filename
        return _read_lines(path, option), str(path)
    if isinstance(value, (str, os.PathLike)):
        return _read_lines(Path(value), option), str(value)
    return list(value), f"the given {option.lstrip('-')}"


def zero_shot_task(
    encoder: Encoder,
    data: PathLike | Sequence[PathLike],
    *,
    classnames: Sequence[str] | PathLike | None = None,
    templates: Sequence[Template] | PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Zero-shot classification accuracy on labelled shards (`.cls` per sample).

    `classnames`/`templates` are lists or text files (one per line); by default
    `classnames.txt` and `templates.txt` next to the shards. The encoder must be on `device`.
    """
    shards = expand_shards(data)
    where = _spec_name(data)
    names, names_source = _resolve(classnames, _data_dir(data, shards), "classnames.txt", "--classnames")
    prompts, _ = _resolve(templates, _data_dir(data, shards), "templates.txt", "--templates")
    classifier = build_zero_shot_classifier(encoder, names, prompts, device)
    loader = make_loader(
        shards,
        batch_size=batch_size,
        image_transform=encoder.preprocess,
        mode="epoch",
        num_workers=num_workers,
        with_label=True,
        pin_memory=torch.device(device).type == "cuda",
    )
    try:
        metrics = evaluate_zero_shot(encoder, loader, classifier, device)
    except EvalDataError as exc:
        raise DataError(f"{where}: {exc} (class names from {names_source})") from exc
    finally:
        loader.close()
    metrics["num_classes"] = len(names)
    logger.info("zero-shot on %s: %s", where, metrics)
    return metrics


def retrieval_task(
    encoder: Encoder,
    data: PathLike | Sequence[PathLike],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Image-text retrieval recall@1/5/10 on caption shards (JSON "captions" or `.txt`).

    The encoder must be on `device`.
    """
    shards = expand_shards(data)
    where = _spec_name(data)
    # Only ask for .json when the shards carry it: the loader skips samples lacking a requested field.
    loader = make_loader(
        shards,
        batch_size=batch_size,
        image_transform=encoder.preprocess,
        mode="epoch",
        num_workers=num_workers,
        with_json=_has_json(shards[0]),
        pin_memory=torch.device(device).type == "cuda",
    )
    try:
        metrics = evaluate_retrieval(encoder, loader, device)
    except EvalDataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    finally:
        loader.close()
    logger.info("retrieval on %s: %s", where, metrics)
    return metrics


def _has_json(shard: str) -> bool:
    """Whether the first sample of a local shard has a .json member (remote shards: assume yes)."""
    if is_remote(shard):
        return True
    try:
        with tarfile.open(shard, "r:") as tf:
            first = None
            for info in tf:
                split = sample_key(info.name) if info.isreg() else None
                if split is None:
                    continue
                if first is None:
                    first = split[0]
                if split[0] != first:
                    return False
                if split[1] == "json":
                    return True
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"unreadable shard: {shard} ({exc}; rebuild it)") from exc
    return False
