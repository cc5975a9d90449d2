"""Atomic checkpoints and exact resume.

A checkpoint is a directory `step_N/` built under a temporary name and published by one
`os.rename`; `latest` is rewritten (temp file + rename) only after that. A crash at any moment
therefore leaves every published checkpoint complete. On load, a directory that is incomplete or
unreadable is skipped in favour of the previous one. Nothing is unpickled beyond tensors and plain
containers (safetensors, `torch.load(weights_only=True)`).

A run with `train.fsdp` keeps its optimizer state sharded: `optimizer.pt` then holds
`{"sharded": "optimizer", "param_groups": ...}` and every process writes its part into `optimizer/`
(clip_train/sharding.py) inside the same temporary directory, before anything is published.

An objective with state of its own (moco's momentum towers and key queues) writes it to
`objective.safetensors`, beside the model and never inside it: exports and `clip_train.load` read
the model file alone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_tools.errors import ClipTrainError
from data_tools.io import share_tree, write_text_atomic

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
OBJECTIVE_FILE = "objective.safetensors"  # the objective's own state (momentum towers, queues)
SHARDED_OPTIM_DIR = "optimizer"  # FSDP runs: each process's optimizer shards (safetensors)
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete directory
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(ClipTrainError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """Every global RNG this process uses, as tensors and plain values (safe to load)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """What `load` returns; the trainer puts each part back where it belongs."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    training: dict[str, Any]  # optimizer, scheduler, scaler state dicts
    rng: dict[str, Any] | None
    trainer_state: dict[str, Any]
    rank_state: dict[str, Any] | None = None  # this process's data position (JSON)
    objective: dict[str, torch.Tensor] | None = None  # the objective's state, when it has one
    # Every process's, in rank order, when the checkpoint has them all (a resume on another
    # number of processes deals out the data the saving processes left).
    rank_states: list[dict[str, Any]] | None = None


class CheckpointManager:
    """Save, find, load and prune the checkpoints of one run directory.

    `barrier` synchronises processes (Accelerate's `wait_for_everyone`); every process saves its own
    RNG state, the main process everything else.
    """

    def __init__(
        self,
        root: str | Path,
        keep_last: int = 2,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
    ):
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size, self.barrier = (
            keep_last,
            rank,
            world_size,
            barrier,
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- save -----------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        training_state: dict[str, Any],
        trainer_state: dict[str, Any],
        config_yaml: str,
        rank_state: dict[str, Any] | None = None,
        write_shards: Callable[[Path], None] | None = None,
        objective_state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Publish checkpoint `step_N` (every process calls this; `model_state`, `training_state`
        and `objective_state` are read on the main process only). `write_shards(tmp_dir)`, when
        given, runs on every process before the checkpoint is published: state each process holds
        a part of."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        if self.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        self.barrier()
        torch.save(rng_state(), tmp / f"rng_{self.rank}.pt")
        if rank_state is not None:  # every process has its own loader position
            (tmp / f"rank_{self.rank}.json").write_text(json.dumps(rank_state))
        if write_shards is not None:
            write_shards(tmp)
        if self.is_main:
            save_file(
                {k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                str(tmp / MODEL_FILE),
            )
            torch.save(training_state, tmp / OPTIM_FILE)
            if objective_state:
                save_file(
                    {k: v.detach().contiguous().cpu() for k, v in objective_state.items()},
                    str(tmp / OBJECTIVE_FILE),
                )
            (tmp / "config.yaml").write_text(config_yaml)
        self.barrier()
        if self.is_main:
            state = dict(trainer_state, step=step, world_size=self.world_size)
            with open(tmp / STATE_FILE, "w") as f:
                json.dump(state, f, indent=1)
            share_tree(tmp)  # safetensors writes 0600
            for child in sorted(tmp.rglob("*"), reverse=True):  # files and sub-directories first
                if child.is_dir():
                    _fsync_dir(child)
                else:
                    with open(child, "rb") as f:
                        os.fsync(f.fileno())
            _fsync_dir(tmp)
            if final.exists():  # a re-save of the same step (e.g. after resume) replaces it whole
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            write_text_atomic(self.root / LATEST, final.name + "\n")
            self.prune()
            log.info("saved checkpoint %s", final)
        self.barrier()
        return final

    def prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[: -self.keep_last]:
            shutil.rmtree(self.root / f"step_{step}", ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- find -----------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = []
        for child in self.root.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and (child / STATE_FILE).is_file() and (child / MODEL_FILE).is_file():
                steps.append(int(match.group(1)))
        return sorted(steps)

    def candidates(self) -> list[Path]:
        """Checkpoint dirs to try, newest first: the `latest` pointer, then every complete dir."""
        order: list[Path] = []
        pointer = self.root / LATEST
        if pointer.is_file():
            order.append(self.root / pointer.read_text().strip())
        order += [self.root / f"step_{s}" for s in reversed(self.complete_steps())]
        seen, unique = set(), []
        for path in order:
            if path not in seen:
                seen.add(path)
                unique.append(path)
        return unique

    # -- load -----------------------------------------------------------------------------------
    def load_latest(self, with_training_state: bool = True) -> Checkpoint | None:
        """The newest checkpoint that loads; broken ones are reported and skipped."""
        for path in self.candidates():
            try:
                return load_checkpoint_dir(
                    path, rank=self.rank, with_training_state=with_training_state
                )
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
        return None


def load_checkpoint_dir(path: Path, rank: int = 0, with_training_state: bool = True) -> Checkpoint:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise CheckpointError(
            f"{path} is incomplete (no {STATE_FILE}); it was being written when the run stopped"
        )
    try:
        trainer_state = json.loads(state_file.read_text())
        model = load_file(str(path / MODEL_FILE))
        training = torch.load(path / OPTIM_FILE, weights_only=True) if with_training_state else {}
        sharded = (training.get("optimizer") or {}).get("sharded")
        if sharded and not any((path / sharded).glob("*.safetensors")):
            raise ValueError(f"no optimizer shards in {sharded}/")
        rng_file = path / f"rng_{rank}.pt"
        rng = (
            torch.load(rng_file, weights_only=True)
            if with_training_state and rng_file.is_file()
            else None
        )
        objective_file = path / OBJECTIVE_FILE
        objective = (
            load_file(str(objective_file))
            if with_training_state and objective_file.is_file()
            else None
        )
        saved_world = int(trainer_state.get("world_size", 1))
        rank_files = [path / f"rank_{r}.json" for r in range(saved_world)]
        rank_states = (
            [json.loads(f.read_text()) for f in rank_files]
            if with_training_state and all(f.is_file() for f in rank_files)
            else None
        )
        rank_file = path / f"rank_{rank}.json"
        rank_state = (
            json.loads(rank_file.read_text())
            if with_training_state and rank_file.is_file()
            else None
        )
    except Exception as exc:  # corrupt files raise many types; report the directory and the cause
        raise CheckpointError(
            f"{path} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    return Checkpoint(
        path=path,
        step=int(trainer_state["step"]),
        model=model,
        training=training,
        rng=rng,
        trainer_state=trainer_state,
        rank_state=rank_state,
        objective=objective,
        rank_states=rank_states,
    )
