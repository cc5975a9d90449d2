"""The loader the user holds: an iterable of batches that knows where its consumer is.

Each batch says which logical worker made it and how far that worker got; `ShardLoader`
keeps those positions, so `state_dict()` after any batch is a small JSON-able dict from which
`make_loader(..., state=...)` continues exactly (see "Exact resume" in `data_tools.loader`).
Every rank's states together let a pass continue on another layout (`start_position`,
`data_tools.redeal`); a state of such a pass lists the layouts before it under "rest".
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

from data_tools.bad_samples import BadSampleBudget
from data_tools.errors import DataError
from data_tools.read_plan import ReadPlan, epoch_batches
from data_tools.redeal import Segment

log = logging.getLogger("data_tools.loader")  # the name users filter the loader's log on

STATE_FORMAT = "clip-train-loader/1"


class ShardLoader:
    """An iterable of batches for one pass (one epoch, or endless in resampled mode).

    Make a new one per epoch with `epoch=e` (pass `reuse=` the previous one to keep its
    workers); call `close()` (or drop it) to stop workers.
    Iterating it again repeats the same pass (from `state`, when one was given).
    `state_dict()` says where the consumer is; see the module docstring.
    """

    def __init__(
        self,
        dataloader: DataLoader,
        plan: ReadPlan,
        config: dict[str, Any],
        start: dict[str, Any],
        limit: int | None,
        regime: str,
        budget: BadSampleBudget | None = None,
        rest_batches: int | None = None,
    ) -> None:
        self.dataloader = dataloader
        self.budget = budget  # fed every batch's bad-sample counts, dropped tails included
        self.plan = plan
        self.shards = list(plan.shards)
        self.regime = regime
        self.limit = limit
        self.rest_batches = rest_batches  # a re-dealt epoch-mode pass: this rank's share
        self._config = config
        self._start = start
        self._state = json.loads(json.dumps(start))
        self.skipped: Counter = Counter()  # per reason, this pass
        self.seen = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        st = json.loads(json.dumps(self._start))
        self._state = st
        self.skipped, self.seen = Counter(), 0
        if self.dataloader is None:
            raise RuntimeError("this pass's workers were handed to the next pass's loader")
        if self.limit is not None and st["batches"] >= self.limit:
            return
        try:
            batches = iter(self.dataloader)
            for batch in batches:
                if self._count(batch, st):
                    continue  # a worker's dropped tail: counted, not yielded
                if self.limit is not None and st["batches"] >= self.limit:
                    if self.plan.mode == "epoch":
                        # Workers at the end of their shards send the tallies of their dropped
                        # tails next; take them before the pass's last batch goes out, so a
                        # checkpoint after it holds them. A real batch means a worker had more
                        # (this rank's pass was cut short): it is dropped, uncounted.
                        for extra in batches:
                            if not extra.get("_tally"):
                                break
                            self._count(extra, st)
                    yield batch
                    break
                yield batch
        finally:
            if self.skipped:
                log.warning(
                    "rank %d: skipped %d bad samples of %d (%s)",
                    self.plan.rank,
                    sum(self.skipped.values()),
                    self.seen,
                    ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())),
                )

    def _count(self, batch: dict[str, Any], st: dict[str, Any]) -> bool:
        """Advance the state and the bad-sample counts past `batch`; True for a tally."""
        w = int(batch["_worker"])
        tally = bool(batch.get("_tally"))
        if tally:
            st["workers"][w][1] = int(batch["_emitted"])
        else:
            st["workers"][w] = [int(batch["_batch"]) + 1, int(batch["_emitted"])]
            st["next_worker"] = (w + 1) % self.plan.workers
            st["batches"] += 1
        self.seen += int(batch["_seen"])
        self.skipped.update({k: v for k, v in batch["_skipped"].items() if v})
        if self.budget is not None:
            self.budget.update(batch)
        return tally

    def state_dict(self) -> dict[str, Any]:
        """Where the consumer is: JSON-able (str, int and lists of them); pass it back as
        `make_loader(..., state=...)` to continue with exactly the batches not yet seen."""
        return {**self._config, **json.loads(json.dumps(self._state))}

    @property
    def num_batches(self) -> int | None:
        """Batches this pass yields on this rank (epoch mode: exact when no sample is bad),
        counting those before a resume state (a pass re-dealt to this layout: those since the
        re-deal); None when endless."""
        if self.plan.mode == "resampled":
            return self.limit
        if self.rest_batches is not None:
            n = self.rest_batches
            return n if self.limit is None else min(n, self.limit)
        n = epoch_batches(
            list(self.plan.shards),
            batch_size=self.plan.batch_size,
            world_size=self.plan.world_size,
            num_workers=self.plan.workers,
            drop_last=self.plan.drop_last,
        )[self.plan.rank]
        return n if self.limit is None else min(n, self.limit)

    def hand_over(self, stream: Any, **loader_args: Any) -> DataLoader | None:
        """This pass's DataLoader, its workers told to read `stream`'s pass next, when that pass
        differs from this one in its epoch alone and `loader_args` (num_workers, pin_memory,
        prefetch_factor) are the same; else None, the workers shut down. Either way this
        loader is done (iterating it raises)."""
        dataloader, ours = self.dataloader, getattr(self.dataloader, "dataset", None)
        new = stream.plan
        same = (
            dataloader is not None
            and dataloader.num_workers > 0
            and all(getattr(dataloader, k) == v for k, v in loader_args.items())
            and new == new.fresh(new.epoch)  # a pass from its start
            and ours.plan.fresh(new.epoch) == new
            and all(
                getattr(ours, k) is getattr(stream, k)
                for k in ("image_transform", "tokenizer", "view_transform")
            )
            and ours.uint8_images == stream.uint8_images
        )
        if not same:
            self.close()
            self.dataloader = None
            return None
        ours.next_pass(new.epoch)
        self.dataloader = None
        return dataloader

    def close(self) -> None:
        """Shut down persistent workers now rather than at garbage collection."""
        if self.dataloader is None:
            return
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None

    def __repr__(self) -> str:
        return f"ShardLoader({len(self.shards)} shards, {self.regime})"


# What a pass continued on another layout (`data_tools.redeal`) may change; the rest must match.
LAYOUT_KEYS = ("rank", "world_size", "num_workers", "batch_size")


def start_position(
    state: dict[str, Any] | list[dict[str, Any]] | None, config: dict[str, Any], workers: int
) -> tuple[dict[str, Any], bool]:
    """Where a pass starts, and whether it was re-dealt to a new layout.

    `state`: None (the beginning), this rank's state, or every rank's state in rank order (a
    list): with this layout, this rank's own is used; with another (world_size, num_workers or
    batch_size), the pass continues with the samples those ranks left (`data_tools.redeal`).
    A state saved by a loader with other settings raises a `DataError` naming the field."""
    if state is None:
        return _fresh(workers), False
    if isinstance(state, list):
        for s in state:
            _check_format(s)
        if state and all(state[0].get(k) == config[k] for k in LAYOUT_KEYS[1:]):
            if len(state) != config["world_size"]:
                raise DataError(
                    f"{len(state)} loader states for {config['world_size']} processes; pass "
                    "every rank's state, in rank order"
                )
            return start_position(state[config["rank"]], config, workers)
        return _redealt(state, config, workers), True
    _check_format(state)
    _check_config(state, config, LAYOUT_KEYS)
    try:
        ws = [[int(b), int(e)] for b, e in state["workers"]]
        start = {
            "batches": int(state["batches"]),
            "next_worker": int(state["next_worker"]),
            "workers": ws,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"loader state is incomplete or malformed ({e})") from e
    if len(ws) != workers or not 0 <= start["next_worker"] < workers:
        raise DataError("loader state is malformed: worker entries do not match num_workers")
    if state.get("rest"):
        start["rest"] = _segments(state["rest"])
    return start, False


def _fresh(workers: int) -> dict[str, Any]:
    return {"batches": 0, "next_worker": 0, "workers": [[0, 0] for _ in range(workers)]}


def _check_format(state: Any) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(
            f"loader state is not a {STATE_FORMAT} state dict (got "
            f"{type(state).__name__}); pass ShardLoader.state_dict() as saved"
        )


def _check_config(state: dict[str, Any], config: dict[str, Any], layout: Sequence[str]) -> None:
    """Every field of `config` must match; those in `layout` only in a single rank's state."""
    for k, v in config.items():
        if state.get(k) != v:
            how = "resume with the same data and loader settings"
            if k in layout:
                how += " (or pass every rank's state, as a list, to continue on this layout)"
            raise DataError(
                f"loader state does not match this loader: {k} differs (state {state.get(k)!r}, "
                f"now {v!r}); {how}"
            )


def _segments(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise DataError("loader state is malformed: 'rest' is not a list")
    return [Segment.from_json(x).to_json() for x in raw]


def _redealt(states: list[dict[str, Any]], config: dict[str, Any], workers: int) -> dict[str, Any]:
    """Every old rank's state -> the start of the rest of the pass on this layout."""
    same = {k: v for k, v in config.items() if k not in LAYOUT_KEYS}
    for s in states:
        _check_config(s, same, ())
    world = states[0].get("world_size")
    if not isinstance(world, int) or [s.get("rank") for s in states] != list(range(world)):
        raise DataError(
            f"to continue a pass on {config['world_size']} processes, pass the loader state of "
            f"every rank it was saved on ({world}), in rank order; got ranks "
            f"{[s.get('rank') for s in states]}"
        )
    if any(s.get("world_size") != world for s in states) or any(
        s.get(k) != states[0].get(k) for s in states for k in ("num_workers", "batch_size")
    ):
        raise DataError("loader states disagree on world_size, num_workers or batch_size")
    earlier = [_segments(s.get("rest") or []) for s in states]
    if any(e != earlier[0] for e in earlier):
        raise DataError("loader states disagree on the pass's earlier layouts ('rest')")
    try:
        seg = Segment(
            world_size=world,
            workers=max(1, int(states[0]["num_workers"])),
            batch_size=int(states[0]["batch_size"]),
            batches=tuple(int(s["batches"]) for s in states),
            positions=tuple(tuple((int(b), int(e)) for b, e in s["workers"]) for s in states),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"loader state is incomplete or malformed ({e})") from e
    seg = Segment.from_json(seg.to_json())  # the same checks as a saved segment
    start = _fresh(workers)
    if config["mode"] == "resampled":  # a pass keeps its length: its batches so far count
        start["batches"] = max(seg.batches)
    start["rest"] = [*earlier[0], seg.to_json()]
    return start
