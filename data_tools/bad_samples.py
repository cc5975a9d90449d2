"""Bad samples in the loader: what each worker reports with its batches, and the budget that
sums those reports in the training loop and stops the run past a bound.

A bad sample never stops a worker (one corrupt JPEG in a billion must not end a run); it is
counted per reason, logged with its key, and travels with the next batch as ``_skipped``,
``_seen`` and ``_bad_keys``, so the consumer, which sees every rank's batches, decides.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.errors import DataError
from data_tools.read_plan import ShardSpec
from data_tools.samples import REASONS

log = logging.getLogger("data_tools.loader")  # the name users filter the loader's log on

# What the loader can meet (`data_tools.samples.REASONS` less the builders' own).
SKIP_REASONS = tuple(
    r for r in REASONS if r not in ("caption_too_short", "caption_too_long", "duplicate_key")
)
_SHARD_REASONS = ("truncated_tar", "unsafe_member", "unreadable_shard")
_MAX_BAD_WARNINGS = 20  # per worker; later bad samples are only counted (and logged at DEBUG)
_BAD_KEYS_PER_BATCH = 16


@dataclass
class BadSampleLog:
    """One worker's bad samples since its previous batch: what it reports with the next one."""

    where: str
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad_keys: list[str] = field(default_factory=list)
    total_bad: int = 0
    muted: bool = False  # during a resumed worker's replay (see `replaying`)

    def bad(self, reason: str, key: str, url: str, detail: str) -> None:
        if self.muted:
            return
        self.seen += reason in _SHARD_REASONS
        self.skipped[reason] += 1
        self.total_bad += 1
        if len(self.bad_keys) < _BAD_KEYS_PER_BATCH:
            self.bad_keys.append(f"{key or '?'} ({reason}) in {url}")
        level = logging.WARNING if self.total_bad <= _MAX_BAD_WARNINGS else logging.DEBUG
        log.log(
            level, "%s: skipping bad sample %r in %s: %s: %s", self.where, key, url, reason, detail
        )

    def take(self) -> dict[str, Any]:
        """The batch keys ``_seen``, ``_skipped`` and ``_bad_keys``; starts a new span."""
        out = {
            "_seen": self.seen,
            "_skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "_bad_keys": self.bad_keys,
        }
        self.seen, self.skipped, self.bad_keys = 0, Counter(), []
        return out

    @contextlib.contextmanager
    def replaying(self, active: bool = True) -> Iterator[None]:
        """Report nothing inside the block: a resumed worker replays samples whose problems
        went out with the batches before its resume state."""
        self.muted = active
        try:
            yield
        finally:
            self.muted = False


class BadSampleBudget:
    """Sums the bad-sample counts that batches carry and stops the run past a bound.

    >>> budget = BadSampleBudget(cfg.data.max_bad_fraction, shards=cfg.data.train)
    >>> for batch in loader:
    ...     budget.update(batch)          # raises DataError past the bound

    Nothing is raised before `min_samples` samples were seen (a few bad samples early on
    say little about the fraction). `state_dict()`/`load_state_dict()` carry the counts
    across a resume.
    """

    def __init__(
        self,
        max_fraction: float,
        min_samples: int = 1000,
        shards: ShardSpec | None = None,
        name: str = "data.max_bad_fraction",
    ) -> None:
        if not 0 <= max_fraction <= 1:
            raise DataError(f"{name}={max_fraction!r} must be in [0, 1]")
        self.max_fraction = float(max_fraction)
        self.min_samples = int(min_samples)
        self.name = name
        self.shards = shards
        self.seen = 0
        self.bad = 0
        self.by_reason: Counter = Counter()
        self.first_keys: list[str] = []

    @property
    def fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def update(self, batch: dict[str, Any]) -> None:
        skipped = batch.get("_skipped") or {}
        bad = sum(int(v) for v in skipped.values())
        self.bad += bad
        self.seen += int(batch.get("_seen", len(batch.get("key", ())) + bad))
        self.by_reason.update({k: int(v) for k, v in skipped.items() if v})
        for k in batch.get("_bad_keys") or ():
            if len(self.first_keys) < 5:
                self.first_keys.append(k)
        self.check()

    def check(self) -> None:
        if self.seen < self.min_samples or self.fraction <= self.max_fraction:
            return
        where = self.shards if isinstance(self.shards, (str, Path)) else "<shards>"
        if self.shards is not None and not isinstance(self.shards, (str, Path)):
            where = " ".join(str(s) for s in self.shards)
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_reason.items()))
        raise DataError(
            f"{self.bad} of {self.seen} samples bad ({100 * self.fraction:.1f}%) > "
            f"{self.name}={self.max_fraction} ({reasons}); first bad keys: "
            f"{'; '.join(self.first_keys) or '?'}; run `clip-data validate {where}`"
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "seen": self.seen,
            "bad": self.bad,
            "by_reason": dict(self.by_reason),
            "first_keys": list(self.first_keys),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        self.by_reason = Counter(state.get("by_reason", {}))
        self.first_keys = list(state.get("first_keys", []))
