"""Progress for a person or for a log file: a tqdm bar on a terminal, plain log lines elsewhere.

In a cluster job's log a redrawn bar piles up as one endless line of carriage returns; there a
dated log line every tenth of the work (or every `every` steps) says the same and survives.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class LineProgress:
    """The part of tqdm's interface we use, logging `desc: n/total unit (p%), rate` lines."""

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        every: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.enabled = enabled
        self.n = self._logged = self._start_n = initial
        self.every = every or (max(1, math.ceil(total / 10)) if total else 100)
        self._next = (initial // self.every + 1) * self.every
        self._start = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        """Count `n` more steps; log a line when a multiple of `every` is passed."""
        self.n += n
        if self.n >= self._next:
            self._next = (self.n // self.every + 1) * self.every
            self._log()

    def set_postfix(self, **values: Any) -> None:
        """Shown at the end of the next line, as tqdm shows it beside the bar."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _log(self) -> None:
        if not self.enabled or self.n == self._logged:
            return
        self._logged = self.n
        seconds = time.perf_counter() - self._start
        rate = (self.n - self._start_n) / seconds if seconds > 0 else 0.0
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        speed = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"
        log.info(
            "%s: %d%s %s%s, %s %s/s%s",
            self.desc or "progress",
            self.n,
            of,
            self.unit,
            share,
            speed,
            self.unit,
            extra,
        )

    def close(self) -> None:
        """The last line, unless the last update just logged it."""
        self._log()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None, "LineProgress(iterable) to iterate"
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    initial: int = 0,
    every: int | None = None,
    leave: bool = True,
) -> Any:
    """A tqdm bar when `enabled` and stderr is a terminal, a `LineProgress` otherwise.

    Use it as tqdm: iterate over it, or `with progress(total=n) as bar: bar.update(1)`.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            leave=leave,
            dynamic_ncols=True,
        )
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, initial=initial, every=every, enabled=enabled
    )
