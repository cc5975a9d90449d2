"""A resume on another number of processes: the contrastive batch, and whose saved state goes
where.

The contrastive batch is `train.batch_size x train.accum_steps x processes`: every process's rows
meet in one loss. A run saved on N processes and resumed on M keeps it, unless the resume's
overrides change `train.batch_size` or `train.accum_steps` (then their product x M is the new
one). The micro-batch (`train.batch_size`, what one forward holds in memory) never grows:
`train.accum_steps` takes up the change where the batch per process is a multiple of the
micro-batch, and otherwise the micro-batch shrinks to the largest divisor of the batch per
process below it. The data position is the loader's business (`data_tools.redeal`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from clip_train.config import Config
from data_tools.errors import ConfigError


def split_batch(per_process: int, micro: int) -> tuple[int, int]:
    """(train.batch_size, train.accum_steps) for `per_process` rows a step, micro-batches of at
    most `micro` rows: the largest micro-batch that divides the rows."""
    best = max(d for d in range(1, min(micro, per_process) + 1) if per_process % d == 0)
    return best, per_process // best


def saved_batch(ckpt_dir: Path) -> tuple[int, int]:
    """(train.batch_size, train.accum_steps) of the run that saved `ckpt_dir`."""
    from omegaconf import OmegaConf

    try:
        train = OmegaConf.load(ckpt_dir / "config.yaml").train
        return int(train.batch_size), int(train.accum_steps)
    except Exception as exc:  # OmegaConf and int() raise several types
        raise ConfigError(
            f"cannot read train.batch_size and train.accum_steps of {ckpt_dir}/config.yaml: "
            f"{str(exc).splitlines()[0]}"
        ) from None


def keep_contrastive_batch(
    cfg: Config, saved: tuple[int, int], saved_world: int, world: int
) -> tuple[Config, str]:
    """`cfg` for `world` processes resuming a run saved with `saved` (batch_size, accum_steps) on
    `saved_world`, and a line that says what changed. Raises `ConfigError` when the contrastive
    batch does not split over `world` processes."""
    batch, accum = cfg.train.batch_size, cfg.train.accum_steps
    old_total = saved[0] * saved[1] * saved_world
    head = f"resuming on {world} processes (saved on {saved_world})"
    if (batch, accum) != saved:  # the user chose the batch for this resume
        return cfg, (
            f"{head}: contrastive batch {old_total} -> {batch * accum * world} "
            f"(train.batch_size {batch} x train.accum_steps {accum} x {world}, as given)"
        )
    if old_total % world:
        raise ConfigError(
            f"cannot keep the contrastive batch of {old_total} (train.batch_size {batch} x "
            f"train.accum_steps {accum} x {saved_world} processes) on {world} processes: set "
            f"train.batch_size and train.accum_steps so that batch_size x accum_steps x {world} "
            "is the batch you want"
        )
    new_batch, new_accum = split_batch(old_total // world, batch)
    train = dataclasses.replace(cfg.train, batch_size=new_batch, accum_steps=new_accum)
    return dataclasses.replace(cfg, train=train), (
        f"{head}: contrastive batch {old_total} kept as train.batch_size {batch} -> {new_batch} "
        f"x train.accum_steps {accum} -> {new_accum} x {world} processes"
    )


def merged_budget(states: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """The bad-sample counts a process starts from on a new number of processes: the saving
    processes' summed on rank 0 (so totals stay exact through later resumes), none elsewhere."""
    if rank != 0:
        return None
    budgets = [s["bad_samples"] for s in states if s.get("bad_samples")]
    if not budgets:
        return None
    reasons: dict[str, int] = {}
    for b in budgets:
        for k, v in b.get("by_reason", {}).items():
            reasons[k] = reasons.get(k, 0) + int(v)
    return {
        "seen": sum(int(b["seen"]) for b in budgets),
        "bad": sum(int(b["bad"]) for b in budgets),
        "by_reason": reasons,
        "first_keys": [k for b in budgets for k in b.get("first_keys", [])][:5],
    }
