"""Continue a pass on another layout: another number of processes, workers or batch size.

A worker's stream is a function of the plan, never of the data (`data_tools.read_plan`), and its
saved ``emitted`` counts the raw samples it took from its shuffle buffer, good and bad alike (a
bad sample is taken, then skipped). So which samples of an epoch-mode pass a run had taken when
it saved follows from the per-shard sample counts (`data_tools.counts`, which epoch mode relies
on already) and the saved positions alone: the shuffle buffer is replayed on positions with the
same RNG draws, made in bulk (`buffer_leftover`); no tar is opened and nothing is decoded. Every
sample not yet taken is then dealt once to the new ranks and workers (`deal`): each rank gets
as many whole batches as the samples allow (the same for all), each worker a contiguous stretch
of the samples left in an order shuffled by shard, so it reads a few shards (the first and last
in part). The next pass follows the
normal plan for the new layout.

A pass can be re-dealt again (8 -> 4 -> 6 processes): each layout it ran on is a *segment*; the
loader state lists the finished ones, and segment k's deal follows from segment k-1's. In
resampled mode nothing is dealt: a new segment draws its shards from new seeds.

Samples are named by (shard index, ordinal in the shard); a set of them is an int64 array of
*runs*, rows (shard, start, stop).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from data_tools.errors import DataError
from data_tools.read_plan import ReadPlan, rng, shard_order


@dataclass(frozen=True)
class Segment:
    """One layout a pass ran on, and where each of its ranks and workers stopped."""

    world_size: int
    workers: int  # logical workers per rank
    batch_size: int
    batches: tuple[int, ...]  # per rank: batches taken in this segment
    positions: tuple[tuple[tuple[int, int], ...], ...]  # [rank][worker]: (batches, emitted)

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "batches": list(self.batches),
            "positions": [[list(p) for p in rank] for rank in self.positions],
        }

    @classmethod
    def from_json(cls, d: Any) -> Segment:
        try:
            seg = cls(
                world_size=int(d["world_size"]),
                workers=int(d["workers"]),
                batch_size=int(d["batch_size"]),
                batches=tuple(int(b) for b in d["batches"]),
                positions=tuple(
                    tuple((int(b), int(e)) for b, e in rank) for rank in d["positions"]
                ),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"loader state is malformed: a 'rest' segment is broken ({e})") from e
        if len(seg.positions) != seg.world_size or len(seg.batches) != seg.world_size:
            raise DataError("loader state is malformed: a 'rest' segment lacks ranks")
        if any(len(rank) != seg.workers for rank in seg.positions):
            raise DataError("loader state is malformed: a 'rest' segment lacks workers")
        return seg

    @property
    def taken(self) -> int:
        """Raw samples its workers took from their buffers (good, bad and dropped tails)."""
        return sum(e for rank in self.positions for _, e in rank)


# -- the shuffle buffer, on positions -----------------------------------------------------------
def _draws(gen: random.Random, bound: int, count: int) -> tuple[np.ndarray, random.Random]:
    """The next `count` values of `gen.randrange(bound)`, and a Random in the state after them.

    CPython draws `randrange(bound)` as `getrandbits(k) = word >> (32 - k)` from 32-bit
    Mersenne Twister words, rejecting values >= bound; numpy's MT19937 makes the same words from
    the same state, thousands of times faster than a Python loop."""
    assert 0 < bound < 2**32
    _, internal, _ = gen.getstate()
    start = {
        "bit_generator": "MT19937",
        "state": {"key": np.array(internal[:624], dtype=np.uint32), "pos": internal[624]},
    }
    mt = np.random.MT19937()
    mt.state = start
    k = bound.bit_length()
    parts, got, used = [], 0, 0
    while got < count:
        want = count - got
        chunk = 2 * want + 64  # more than half of the words are accepted
        values = (mt.random_raw(chunk) >> np.uint64(32 - k)).astype(np.int64)
        ok = np.flatnonzero(values < bound)[:want]
        parts.append(values[ok])
        got += len(ok)
        used += int(ok[-1]) + 1 if got == count else chunk
    mt.state = start  # it read past the last draw: take exactly `used` words from the start
    while used:
        step = min(used, 1 << 22)
        mt.random_raw(step)
        used -= step
    after = random.Random()
    state = mt.state["state"]
    after.setstate((3, (*(int(x) for x in state["key"]), int(state["pos"])), None))
    return (np.concatenate(parts) if parts else np.empty(0, np.int64)), after


def buffer_leftover(n: int, taken: int, size: int, gen: random.Random) -> tuple[int, np.ndarray]:
    """`buffer_shuffle` (`data_tools.read_plan`) replayed on the positions of a stream of `n`
    samples: after `taken` samples came out, every position from `cut` on is unread and `left`
    (sorted) holds the positions read but still in the buffer. Returns (cut, left)."""
    if size <= 0 or taken >= n:
        return min(taken, n), np.empty(0, np.int64)
    fill = min(size, n)
    reads = n - fill  # one draw per sample read once the buffer is full
    draws, after = _draws(gen, size, min(taken, reads))
    slots = np.arange(fill, dtype=np.int64)
    if len(draws):  # a slot holds the sample read at its last draw t (position size + t)
        last = np.full(fill, -1, dtype=np.int64)
        np.maximum.at(last, draws, np.arange(len(draws), dtype=np.int64))
        drawn = last >= 0
        slots[drawn] = size + last[drawn]
    if taken <= reads:
        return fill + taken, np.sort(slots)
    rest = slots.tolist()
    after.shuffle(rest)  # the stream ended: the buffer is shuffled and yielded in order
    return n, np.sort(np.array(rest[taken - reads :], dtype=np.int64))


# -- runs --------------------------------------------------------------------------------------
def _ends(runs: np.ndarray) -> np.ndarray:
    return np.cumsum(runs[:, 2] - runs[:, 1])


def _slice(runs: np.ndarray, ends: np.ndarray, a: int, b: int) -> np.ndarray:
    """The runs covering stream positions [a, b) of a stream that reads `runs` in order."""
    if a >= b:
        return np.empty((0, 3), np.int64)
    i = int(np.searchsorted(ends, a, side="right"))
    j = int(np.searchsorted(ends, b, side="left"))
    out = runs[i : j + 1].copy()
    out[0, 1] += a - (ends[i] - (runs[i, 2] - runs[i, 1]))  # a minus the position run i starts at
    out[-1, 2] -= ends[j] - b
    return out


def _at(runs: np.ndarray, ends: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One-sample runs for stream positions of a stream that reads `runs` in order."""
    i = np.searchsorted(ends, positions, side="right")
    ordinal = runs[i, 2] - (ends[i] - positions)
    return np.stack([runs[i, 0], ordinal, ordinal + 1], axis=1).reshape(-1, 3)


def _normalize(runs: np.ndarray) -> np.ndarray:
    """Sorted by (shard, start), touching runs joined; overlapping runs mean the states were
    not those of one run."""
    runs = runs[runs[:, 2] > runs[:, 1]]
    runs = runs[np.lexsort((runs[:, 1], runs[:, 0]))]
    if len(runs) < 2:
        return runs
    same = runs[1:, 0] == runs[:-1, 0]
    if np.any(same & (runs[1:, 1] < runs[:-1, 2])):
        raise DataError("loader states overlap: they were not saved by the ranks of one run")
    first = np.flatnonzero(np.concatenate([[True], ~(same & (runs[1:, 1] == runs[:-1, 2]))]))
    out = runs[first].copy()
    out[:, 2] = runs[np.concatenate([first[1:] - 1, [len(runs) - 1]]), 2]
    return out


def runs_length(runs: np.ndarray | Sequence[tuple[int, int, int]]) -> int:
    a = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    return int((a[:, 2] - a[:, 1]).sum())


# -- which samples a segment left -----------------------------------------------------------------
def _left_after(
    plan: ReadPlan, counts: np.ndarray, seg: Segment, streams: list[np.ndarray] | None
) -> np.ndarray:
    """The samples of the pass that segment `seg` (run with `plan`'s layout) had not taken.
    `streams`: its workers' runs when it was a re-deal itself; None for the pass as planned."""
    pieces = []
    split: list[tuple[int, int, np.ndarray]] = []
    groups = seg.world_size * seg.workers
    sample_split = streams is None and plan.sample_split
    whole = np.stack([np.arange(len(counts)), np.zeros_like(counts), counts], axis=1)
    if sample_split:
        total = int(counts.sum())
        order = whole[shard_order(plan, 0)]
    for r in range(seg.world_size):
        p = replace(plan, rank=r)
        for w in range(seg.workers):
            g = r * seg.workers + w
            if sample_split:
                n = max(0, -(-(total - g) // groups))
            else:
                runs = streams[g] if streams is not None else whole[shard_order(p, w)]
                n = runs_length(runs)
            taken = seg.positions[r][w][1]
            cut, left = buffer_leftover(n, taken, plan.shuffle_buffer, p.worker_rng(w, "buffer"))
            if sample_split:
                split.append((g, cut, left))
            else:
                ends = _ends(runs)
                pieces += [_at(runs, ends, left), _slice(runs, ends, cut, n)]
    if sample_split:  # worker g reads global positions g, g + groups, g + 2 groups ...
        ends = _ends(order)
        cuts = np.array([c for _, c, _ in split], dtype=np.int64)
        lo, hi = int(cuts.min()) * groups, min(int(cuts.max()) * groups, total)
        ragged = np.arange(lo, hi, dtype=np.int64)
        ragged = ragged[ragged // groups >= cuts[ragged % groups]]
        kept = [g + left * groups for g, _, left in split]
        pieces += [
            _at(order, ends, np.concatenate([ragged, *kept])),
            _slice(order, ends, hi, total),
        ]
    return _normalize(np.concatenate(pieces)) if pieces else np.empty((0, 3), np.int64)


def shares(total: int, world_size: int, workers: int, batch_size: int) -> list[int]:
    """How many of `total` samples each group (rank * workers + worker) gets: every rank the
    same number of whole batches, as many as the samples allow, spread over its workers; the
    spare (fewer than one batch per rank) spread evenly as tails. A pass stops every rank after
    the fewest batches any rank makes, so whole batches elsewhere would be dropped."""
    full = total // (batch_size * world_size)
    sizes = [
        batch_size * (full // workers + (w < full % workers))
        for _ in range(world_size)
        for w in range(workers)
    ]
    spare, groups = total - sum(sizes), len(sizes)
    return [n + spare // groups + (g < spare % groups) for g, n in enumerate(sizes)]


def deal(left: np.ndarray, sizes: Sequence[int], order: random.Random | None) -> list[np.ndarray]:
    """Cut the runs `left` into stretches of `sizes` samples, in order: group g takes the g-th
    stretch, of the runs in shard order shuffled by `order` (None: as they are)."""
    shards = np.unique(left[:, 0]).tolist()
    if order is not None:
        order.shuffle(shards)
    rank_of = np.zeros(int(left[:, 0].max()) + 1 if len(left) else 0, dtype=np.int64)
    rank_of[shards] = np.arange(len(shards))
    runs = left[np.lexsort((left[:, 1], rank_of[left[:, 0]]))] if len(left) else left
    ends = _ends(runs)
    cuts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    assert cuts[-1] == (int(ends[-1]) if len(ends) else 0)
    return [_slice(runs, ends, cuts[g], cuts[g + 1]) for g in range(len(sizes))]


@dataclass(frozen=True)
class Rest:
    """The samples a re-dealt pass has left, dealt: per group (rank * workers + worker) the runs
    it reads in order."""

    streams: list[np.ndarray]
    total: int  # samples in the pass

    @property
    def left(self) -> int:
        return sum(runs_length(s) for s in self.streams)

    def batches(self, workers: int, batch_size: int, drop_last: bool) -> list[int]:
        """Batches each rank makes from its share (exact when no sample is bad)."""
        per = [runs_length(s) for s in self.streams]
        if drop_last:
            made = [n // batch_size for n in per]
        else:
            made = [-(-n // batch_size) for n in per]
        return [sum(made[r : r + workers]) for r in range(0, len(made), workers)]


def rest_of_pass(plan: ReadPlan, counts: Sequence[int], segments: Sequence[Segment]) -> Rest:
    """What the pass of `plan` (its layout: the current one) has left after `segments`, dealt
    to `plan`'s ranks and workers. Every process computes the same deal."""
    sizes = np.asarray(counts, dtype=np.int64)
    layouts = [(s.world_size, s.workers) for s in segments[1:]]
    layouts.append((plan.world_size, plan.workers))
    streams = None
    for k, (seg, (world, workers)) in enumerate(zip(segments, layouts)):
        p = replace(plan, world_size=seg.world_size, workers=seg.workers, segment=k, rest=None)
        left = _left_after(p, sizes, seg, streams)
        shuffle = rng(plan.seed, plan.epoch, "rest", k + 1) if plan.shuffle_buffer > 0 else None
        batch = segments[k + 1].batch_size if k + 1 < len(segments) else plan.batch_size
        streams = deal(left, shares(runs_length(left), world, workers, batch), shuffle)
    assert streams is not None, "rest_of_pass needs a segment"
    return Rest(streams=streams, total=int(sizes.sum()))
