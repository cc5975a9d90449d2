"""The read plan: which raw samples each logical worker reads, in which order.

Everything here is a function of the plan (shards, seed, epoch, rank, worker), never of the
data, so a resumed worker replays the same stream from tar headers alone, and `epoch_batches`
counts batches without reading a sample. The modes and the shard split are described in
`data_tools.loader`.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, TypeVar

from data_tools.counts import shard_sample_counts
from data_tools.errors import DataError
from data_tools.tario import RawSample, ReadMode, iter_shard
from data_tools.urls import expand_shards

ShardSpec = str | Path | Sequence[str | Path]
T = TypeVar("T")


class ProblemSink(Protocol):
    """Where shard problems (truncated tar, unsafe member, unreadable shard) are reported."""

    def bad(self, reason: str, key: str, url: str, detail: str) -> None: ...


def rng(*parts: object) -> random.Random:
    """A private RNG for a tuple of ints; str seeds are hashed with SHA-512, stable across runs."""
    return random.Random("clip-train:" + ":".join(str(p) for p in parts))


@dataclass(frozen=True)
class ReadPlan:
    """Everything a worker needs to make its batches; picklable, so workers get a copy."""

    sources: tuple[tuple[str, ...], ...]
    weights: tuple[float, ...] | None
    batch_size: int
    mode: str
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int  # logical workers per rank: max(1, num_workers)
    drop_last: bool
    with_label: bool
    with_json: bool
    max_pixels: int
    offset: int = 0  # logical worker played by physical worker 0
    resume: tuple[tuple[int, int], ...] | None = None  # per logical worker: (batches, emitted)
    # A pass continued on another layout (`data_tools.redeal`): its segment number (0: the pass
    # as planned), and in epoch mode, per logical worker, the (shard, start, stop) ordinal runs
    # of the samples left over that it reads, in order.
    segment: int = 0
    rest: tuple[tuple[tuple[int, int, int], ...], ...] | None = None

    @functools.cached_property
    def shards(self) -> tuple[str, ...]:
        return tuple(u for src in self.sources for u in src)

    @property
    def sample_split(self) -> bool:
        return (
            self.mode == "epoch"
            and self.rest is None
            and len(self.shards) < self.world_size * self.workers
        )

    @property
    def on_demand(self) -> bool:
        """Workers read tar headers and load only the samples that are theirs."""
        return self.sample_split or self.rest is not None

    def fresh(self, epoch: int) -> ReadPlan:
        """The plan of pass `epoch` from its start on this layout (no resume, no re-deal)."""
        return replace(self, epoch=epoch, offset=0, resume=None, segment=0, rest=None)

    def worker_rng(self, worker: int, *what: object) -> random.Random:
        """The RNG of one stream of logical worker `worker` (shards, buffer, augment ...);
        a re-dealt segment draws its own."""
        tail = ("segment", self.segment) if self.segment else ()
        return rng(self.seed, self.epoch, self.rank, worker, *what, *tail)


def worker_shards(
    shards: Sequence[T], rank: int, world_size: int, worker: int, workers: int
) -> list[T]:
    """Epoch mode with enough shards: the fixed shard assignment (see `data_tools.loader`)."""
    return list(shards[rank::world_size][worker::workers])


def shard_order(p: ReadPlan, worker: int) -> list[int]:
    """Epoch mode: indices (into `p.shards`) of the shards logical worker `worker` reads, in
    order; in sample-split mode every worker walks all of them, in the same order."""
    order = list(range(len(p.shards)))
    if p.sample_split:
        if p.shuffle_buffer > 0:
            rng(p.seed, p.epoch, "shards").shuffle(order)  # same order in every worker
        return order
    mine = worker_shards(order, p.rank, p.world_size, worker, p.workers)
    if p.shuffle_buffer > 0:
        rng(p.seed, p.epoch, p.rank, worker, "shards").shuffle(mine)
    return mine


def worker_samples(
    p: ReadPlan, worker: int, mode: ReadMode, sink: ProblemSink
) -> Iterator[RawSample]:
    """The raw samples logical worker `worker` of rank `p.rank` reads, before the shuffle
    buffer; shard problems go to `sink`."""
    if p.mode == "resampled":
        streams = [
            _resampled(src, p.worker_rng(worker, "resample", i), mode, sink)
            for i, src in enumerate(p.sources)
        ]
        if len(streams) == 1:
            return streams[0]
        assert p.weights is not None
        return _mixed(streams, p.weights, p.worker_rng(worker, "mix"))
    shards = p.shards
    if p.rest is not None:
        return _runs(shards, p.rest[worker], mode, sink)
    order = [shards[i] for i in shard_order(p, worker)]
    if p.sample_split:
        groups = p.world_size * p.workers
        me = p.rank * p.workers + worker
        samples = _chain(order, mode, sink)
        return (s for i, s in enumerate(samples) if i % groups == me)
    return _chain(order, mode, sink)


def _chain(shards: Iterable[str], mode: ReadMode, sink: ProblemSink) -> Iterator[RawSample]:
    for url in shards:
        yield from iter_shard(url, mode=mode, on_problem=sink.bad)


def _runs(
    shards: Sequence[str], runs: Sequence[tuple[int, int, int]], mode: ReadMode, sink: ProblemSink
) -> Iterator[RawSample]:
    """The samples whose ordinals fall in `runs` ((shard, start, stop), a shard's runs together
    and in order); a shard is read no further than its last run."""
    for shard, group in itertools.groupby(runs, key=lambda r: r[0]):
        spans = [(a, b) for _, a, b in group]
        j = 0
        with contextlib.closing(iter_shard(shards[shard], mode=mode, on_problem=sink.bad)) as it:
            for i, s in enumerate(it):
                while j < len(spans) and i >= spans[j][1]:
                    j += 1
                if j == len(spans):
                    break
                if i >= spans[j][0]:
                    yield s


def _resampled(
    shards: Sequence[str], rng: random.Random, mode: ReadMode, sink: ProblemSink
) -> Iterator[RawSample]:
    # Drawing shards that hold no readable sample would spin forever; fail instead.
    limit = 10 * len(shards) + 10
    empty = 0
    while True:
        url = shards[rng.randrange(len(shards))]
        got = False
        for s in iter_shard(url, mode=mode, on_problem=sink.bad):
            got = True
            yield s
        empty = 0 if got else empty + 1
        if empty >= limit:
            raise DataError(
                f"no readable samples after drawing {limit} shards from {shards[0]} ... "
                "(check them with `clip-data validate`)"
            )


def _mixed(
    streams: list[Iterator[RawSample]], weights: Sequence[float], rng: random.Random
) -> Iterator[RawSample]:
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    while True:
        i = min(bisect.bisect_right(cum, rng.random() * total), len(cum) - 1)
        yield next(streams[i])


def buffer_shuffle(
    samples: Iterable[RawSample], size: int, rng: random.Random
) -> Iterator[RawSample]:
    """Shuffle within a sliding buffer of `size` raw (undecoded) samples.

    The RNG draws depend only on positions, never on data, so a resumed worker rebuilds the
    buffer by replaying headers alone."""
    buf: list[RawSample] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


def epoch_batches(
    shards: ShardSpec,
    *,
    batch_size: int,
    world_size: int,
    num_workers: int,
    drop_last: bool,
) -> list[int]:
    """Batches each rank yields in one epoch-mode pass, from per-shard sample counts.

    The counts come from sidecars (manifest, img2dataset stats) or a cache, so this costs
    O(shards), not O(samples); only shards with neither have their tar headers read, once
    (`data_tools.counts`). Remote shards raise: use mode="resampled" for them.

    Exact when no sample is bad (bad samples only make a rank's count smaller). Independent
    of seed, epoch and shuffle buffer: shards are assigned to ranks and workers by position.
    A DDP loop passes `max_batches=min(epoch_batches(...))` to every rank's `make_loader`.
    """
    if batch_size < 1 or world_size < 1 or num_workers < 0:
        raise DataError("batch_size and world_size must be >= 1, num_workers >= 0")
    urls = expand_shards(shards)
    counts = dict(shard_sample_counts(urls))
    workers = max(1, num_workers)
    groups = world_size * workers

    def batches(n: int) -> int:
        return n // batch_size if drop_last else -(-n // batch_size)

    out = []
    for rank in range(world_size):
        total = 0
        for w in range(workers):
            if len(urls) >= groups:
                n = sum(counts[u] for u in worker_shards(urls, rank, world_size, w, workers))
            else:
                g, all_n = rank * workers + w, sum(counts[u] for u in urls)
                n = all_n // groups + (1 if g < all_n % groups else 0)
            total += batches(n)
        out.append(total)
    return out
