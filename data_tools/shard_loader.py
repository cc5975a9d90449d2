"""The loader the user holds: an iterable of batches that knows where its consumer is.

Each batch says which logical worker made it and how far that worker got; `ShardLoader`
keeps those positions, so `state_dict()` after any batch is a small JSON-able dict from which
`make_loader(..., state=...)` continues exactly (see "Exact resume" in `data_tools.loader`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from data_tools.bad_samples import BadSampleBudget
from data_tools.errors import DataError
from data_tools.read_plan import ReadPlan, epoch_batches

log = logging.getLogger("data_tools.loader")  # the name users filter the loader's log on

STATE_FORMAT = "clip-train-loader/1"


class ShardLoader:
    """An iterable of batches for one pass (one epoch, or endless in resampled mode).

    Make a new one per epoch with `epoch=e`; call `close()` (or drop it) to stop workers.
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
    ) -> None:
        self.dataloader = dataloader
        self.budget = budget  # fed every batch's bad-sample counts, dropped tails included
        self.plan = plan
        self.shards = list(plan.shards)
        self.regime = regime
        self.limit = limit
        self._config = config
        self._start = start
        self._state = json.loads(json.dumps(start))
        self.skipped: Counter = Counter()  # per reason, this pass
        self.seen = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        st = json.loads(json.dumps(self._start))
        self._state = st
        self.skipped, self.seen = Counter(), 0
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
        counting those before a resume state; None when endless."""
        if self.plan.mode == "resampled":
            return self.limit
        n = epoch_batches(
            list(self.plan.shards),
            batch_size=self.plan.batch_size,
            world_size=self.plan.world_size,
            num_workers=self.plan.workers,
            drop_last=self.plan.drop_last,
        )[self.plan.rank]
        return n if self.limit is None else min(n, self.limit)

    def close(self) -> None:
        """Shut down persistent workers now rather than at garbage collection."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None

    def __repr__(self) -> str:
        return f"ShardLoader({len(self.shards)} shards, {self.regime})"


def start_position(
    state: dict[str, Any] | None, config: dict[str, Any], workers: int
) -> dict[str, Any]:
    """Where a pass starts: the beginning, or the position in `state` after checking that it
    was saved by a loader with this `config` (a `DataError` names the field that differs)."""
    if state is None:
        return {"batches": 0, "next_worker": 0, "workers": [[0, 0] for _ in range(workers)]}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(
            f"loader state is not a {STATE_FORMAT} state dict (got "
            f"{type(state).__name__}); pass ShardLoader.state_dict() as saved"
        )
    for k, v in config.items():
        if state.get(k) != v:
            raise DataError(
                f"loader state does not match this loader: {k} differs (state {state.get(k)!r}, "
                f"now {v!r}); resume with the same data and loader settings"
            )
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
    return start
