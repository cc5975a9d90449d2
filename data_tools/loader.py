"""The streaming loader: WebDataset shards -> batches of model-ready tensors.

Used by training and evaluation alike. Reading, shuffling, decoding, augmentation,
tokenisation and batching all run inside DataLoader workers (`batch_size=None` on the
DataLoader), so the main process only receives finished batches, whose image tensor was
written straight into shared memory.

Splitting is explicit from `rank`/`world_size`, never from torch.distributed or Accelerate
(whose batch dispatching would duplicate or drop samples; see DESIGN.md). Each rank runs
`max(1, num_workers)` *logical workers*; each logical worker reads its own stream of samples
and makes its own batches (a batch never mixes workers). The DataLoader hands out their
batches round-robin.

Modes
-----
- ``mode="epoch"``: every sample exactly once per epoch across all ranks and workers.
  With at least ``world_size * workers`` shards, shard ``i`` goes to rank ``i % world_size``
  and, within it, to worker ``(i // world_size) % workers`` (a fixed assignment, so
  `epoch_batches` can count batches without knowing the seed); with a shuffle buffer the
  worker reads its shards in an order drawn from (seed, epoch). With fewer shards every
  worker walks all shards and keeps the samples whose running index ``i`` satisfies
  ``i % (world_size * workers) == its global index``, reading only their bytes (tar headers
  of the others). Each worker ends with a partial batch unless ``drop_last``.
- ``mode="resampled"``: endless. Each worker draws shards with replacement from an RNG seeded
  by (seed, epoch, rank, worker). With several sources and ``weights``, each sample is drawn
  from source ``s`` with probability ``weights[s] / sum(weights)`` (each source has its own
  shard stream). ``samples_per_epoch`` sets the length of one pass:
  ``ceil(samples_per_epoch / (batch_size * world_size))`` batches per rank, i.e. an "epoch"
  for logging, schedules and checkpoints, with no relation to the data set size. Without it
  (and without ``max_batches``) iteration never ends.

Shuffling: ``shuffle_buffer=0`` keeps shard and sample order (evaluation); otherwise samples
pass through a buffer of that many (raw, undecoded) samples, and the order is a function of
(seed, epoch, rank, worker) only. The augmentation RNG is reseeded at the start of every batch
from (seed, epoch, rank, worker, batch index), through the transform's ``reseed(int)``
(`data_tools.transforms.ImageTransform` has one; for other transforms, workers reseed Python's
and torch's global RNGs instead; with ``num_workers=0`` those are left alone).

Batches
-------
A dict with "image" [B,3,H,W] float32, "key" list[str], "caption" list[str] (when the shards
have .txt), "text" [B,L] long (with a tokenizer), "label" [B] long (``with_label``), "json"
list[dict] (``with_json``), plus private keys (leading ``_``) that the trainer may read:

- ``_skipped``: {reason: count} of bad samples this worker skipped since its previous batch,
  for every reason in `SKIP_REASONS`; ``_seen``: samples it examined in that span (good and
  bad); ``_bad_keys``: up to 16 "key (reason) in shard" strings from that span. Summed over
  batches, ``_skipped`` / ``_seen`` is the bad fraction; `BadSampleBudget` does the sum.
- ``_worker``, ``_batch``, ``_emitted``: which logical worker made the batch, its index among
  that worker's batches, and how many samples that worker had taken from its shuffle buffer.
  `ShardLoader.state_dict` is built from these.

Bad samples (undecodable or oversized images, missing or non-UTF-8 captions, bad labels,
truncated shards, unsafe tar members) are skipped, counted per reason, logged with their key
(the first 20 per worker at WARNING) and never stop the run by themselves: pass
``max_bad_fraction`` (or use `BadSampleBudget` in the training loop) to stop past a bound.

Exact resume
------------
`ShardLoader.state_dict()` after any number of consumed batches returns a small JSON-able dict;
``make_loader(..., state=it)`` with the same shards, seed, epoch, rank, world_size, num_workers,
batch_size, mode (and shuffle buffer, drop_last, weights, label/json/tokenizer use) continues
with exactly the batches an uninterrupted iteration would have yielded next, in the same order
and with the same contents. Each worker replays its stream from tar headers only (no data read,
nothing decoded; remote and .tar.gz shards have no offsets, so theirs are read again) up to
where it stopped, which rebuilds the shuffle buffer; its augmentation RNG restarts at the
batch boundary; the round-robin restarts at the worker that was due next (physical worker 0
plays that logical worker). A state from another configuration raises
`DataError` naming the field that differs.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.errors import DataError
from data_tools.samples import REASONS, BadSample, check_sample, open_image
from data_tools.tario import FieldLoader, RawSample, ReadMode, iter_shard
from data_tools.counts import count_samples, shard_sample_counts
from data_tools.urls import expand_shards

__all__ = [
    "make_loader",
    "epoch_batches",
    "BadSampleBudget",
    "ShardLoader",
    "SKIP_REASONS",
    "expand_shards",
    "count_samples",
    "shard_sample_counts",
]

log = logging.getLogger(__name__)

# What the loader can meet (`data_tools.samples.REASONS` less the builders' own).
SKIP_REASONS = tuple(r for r in REASONS
                     if r not in ("caption_too_short", "caption_too_long", "duplicate_key"))
STATE_FORMAT = "clip-train-loader/1"
_MAX_BAD_WARNINGS = 20  # per worker; later bad samples are only counted (and logged at DEBUG)
_BAD_KEYS_PER_BATCH = 16

ShardSpec = Union[str, Path, Sequence[Union[str, Path]]]


def _rng(*parts: object) -> random.Random:
    """A private RNG for a tuple of ints; str seeds are hashed with SHA-512, stable across runs."""
    return random.Random("clip-train:" + ":".join(str(p) for p in parts))


# -- the plan: everything a worker needs, picklable ------------------------------------------
@dataclass(frozen=True)
class _Plan:
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

    @property
    def shards(self) -> tuple[str, ...]:
        return tuple(u for src in self.sources for u in src)

    @property
    def sample_split(self) -> bool:
        return self.mode == "epoch" and len(self.shards) < self.world_size * self.workers


def _worker_shards(shards: Sequence[str], rank: int, world_size: int, worker: int,
                   workers: int) -> list[str]:
    """Epoch mode with enough shards: the fixed shard assignment (see module docstring)."""
    return list(shards[rank::world_size][worker::workers])


@dataclass
class _Pending:
    """What a worker has to report with its next batch."""

    where: str
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    bad_keys: list[str] = field(default_factory=list)
    total_bad: int = 0
    silent: bool = False  # a resumed worker's replay: these were reported before

    def bad(self, reason: str, key: str, url: str, detail: str) -> None:
        if self.silent:
            return
        self.seen += reason in ("truncated_tar", "unsafe_member", "unreadable_shard")
        self.skipped[reason] += 1
        self.total_bad += 1
        if len(self.bad_keys) < _BAD_KEYS_PER_BATCH:
            self.bad_keys.append(f"{key or '?'} ({reason}) in {url}")
        level = logging.WARNING if self.total_bad <= _MAX_BAD_WARNINGS else logging.DEBUG
        log.log(level, "%s: skipping bad sample %r in %s: %s: %s", self.where, key, url,
                reason, detail)

    def take(self) -> dict[str, Any]:
        out = {
            "_seen": self.seen,
            "_skipped": {r: self.skipped.get(r, 0) for r in SKIP_REASONS},
            "_bad_keys": self.bad_keys,
        }
        self.seen, self.skipped, self.bad_keys = 0, Counter(), []
        return out


def _empty_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor whose storage is already in shared memory when made in a DataLoader worker,
    so sending it to the main process costs no copy (as torch's default_collate does)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class _Batcher:
    """Collects decoded samples of one batch; images go straight into the batch tensor."""

    def __init__(self, batch_size: int, transform: Any) -> None:
        self.batch_size = batch_size
        self.transform = transform
        self.fast = callable(getattr(transform, "resize_pil", None)) and callable(
            getattr(transform, "to_tensor_into", None)
        )
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.images: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []
        self.rows: list[dict[str, Any]] = []

    def image(self, img: Image.Image) -> None:
        """Transform one opened image into the next slot (raises on a bad image)."""
        if self.fast:
            small = self.transform.resize_pil(img)
            if self.images is None:
                s = self.transform.image_size
                self.images = _empty_shared((self.batch_size, 3, s, s), torch.float32)
            self.transform.to_tensor_into(small, self.images[self.n])
        else:
            self.tensors.append(self.transform(img))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.n += 1

    def finish(self, tokenizer: Any, with_label: bool, with_json: bool) -> dict[str, Any]:
        n = self.n
        if self.fast:
            assert self.images is not None
            images = self.images if n == self.batch_size else self.images[:n]
        else:
            first = self.tensors[0]
            images = _empty_shared((n, *first.shape), first.dtype)
            torch.stack(self.tensors, out=images)
        batch: dict[str, Any] = {"image": images, "key": [r["key"] for r in self.rows]}
        if any("caption" in r for r in self.rows):
            batch["caption"] = [r.get("caption", "") for r in self.rows]
        if tokenizer is not None:
            batch["text"] = torch.as_tensor(tokenizer(batch["caption"])).long()
        if with_label:
            batch["label"] = torch.tensor([r["label"] for r in self.rows], dtype=torch.long)
        if with_json:
            batch["json"] = [r["json"] for r in self.rows]
        self.reset()
        return batch


class _ShardStream(IterableDataset):
    """One rank's share of the data; each (logical) worker yields finished batches."""

    def __init__(
        self,
        plan: _Plan,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor] | None,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.image_transform = image_transform
        self.tokenizer = tokenizer

    # -- which samples this worker reads, in which order ------------------------------------
    def _raw(self, worker: int, mode: ReadMode, pending: _Pending) -> Iterator[RawSample]:
        p = self.plan
        if p.mode == "resampled":
            streams = [
                _resampled(src, _rng(p.seed, p.epoch, p.rank, worker, "resample", i), mode,
                           pending)
                for i, src in enumerate(p.sources)
            ]
            if len(streams) == 1:
                return streams[0]
            assert p.weights is not None
            return _mixed(streams, p.weights, _rng(p.seed, p.epoch, p.rank, worker, "mix"))
        shards = list(p.shards)
        if p.sample_split:
            if p.shuffle_buffer > 0:
                _rng(p.seed, p.epoch, "shards").shuffle(shards)  # same order in every worker
            groups = p.world_size * p.workers
            me = p.rank * p.workers + worker
            samples = _chain(shards, mode, pending)
            return (s for i, s in enumerate(samples) if i % groups == me)
        mine = _worker_shards(shards, p.rank, p.world_size, worker, p.workers)
        if p.shuffle_buffer > 0:
            _rng(p.seed, p.epoch, p.rank, worker, "shards").shuffle(mine)
        return _chain(mine, mode, pending)

    # -- the pipeline ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        p = self.plan
        worker = (physical + p.offset) % p.workers
        start_batches, start_emitted = p.resume[worker] if p.resume else (0, 0)
        pending = _Pending(where=f"rank {p.rank} worker {worker}")
        replaying = start_emitted > 0
        # Sample-split workers read only the headers of samples that are not theirs and
        # load the rest on demand; a resumed worker reads headers only until it catches up.
        mode = ReadMode(read_data=not (p.sample_split or replaying))
        quiet = _Pending(where="replay", silent=True)
        raw = self._raw(worker, mode, _Switch(lambda: quiet if replaying else pending))
        stream: Iterable[RawSample] = raw
        if p.shuffle_buffer > 0:
            stream = _buffer_shuffle(raw, p.shuffle_buffer,
                                     _rng(p.seed, p.epoch, p.rank, worker, "buffer"))
        it = iter(stream)
        emitted = sum(1 for _ in itertools.islice(it, start_emitted))
        if emitted < start_emitted:
            return  # this worker had finished its pass
        # One sample of look-ahead: shard problems met while reading the sample after a
        # batch travel with that batch (so a worker's last batch carries the truncation of
        # its last shard). A resumed worker takes that look-ahead still quietly: its
        # problems went with the batch the state ends on.
        nxt = next(it, None)
        replaying = False
        mode.read_data = not p.sample_split
        fields = FieldLoader()
        batcher = _Batcher(p.batch_size, self.image_transform)
        batch_index = start_batches
        in_worker = info is not None
        try:
            self._reseed(worker, batch_index, in_worker)
            while nxt is not None:
                s, emitted = nxt, emitted + 1
                pending.seen += 1
                done = None
                if self._decode(s if s.loaded else fields.load(s), batcher, pending):
                    if batcher.n == p.batch_size:
                        done = self._finish(batcher, worker, batch_index, emitted)
                        batch_index += 1
                        self._reseed(worker, batch_index, in_worker)
                nxt = next(it, None)
                if done is not None:
                    done.update(pending.take())
                    yield done
            if batcher.n and not p.drop_last:
                done = self._finish(batcher, worker, batch_index, emitted)
                done.update(pending.take())
                yield done
        finally:
            fields.close()
            if pending.total_bad:
                log.warning("%s: skipped %d bad samples of %d read this pass", pending.where,
                            pending.total_bad, emitted - start_emitted)

    def _finish(self, batcher: _Batcher, worker: int, index: int,
                emitted: int) -> dict[str, Any]:
        p = self.plan
        batch = batcher.finish(self.tokenizer, p.with_label, p.with_json)
        batch.update({"_worker": worker, "_batch": index, "_emitted": emitted})
        return batch

    def _reseed(self, worker: int, batch_index: int, in_worker: bool) -> None:
        p = self.plan
        seed = _rng(p.seed, p.epoch, p.rank, worker, "augment", batch_index).getrandbits(63)
        reseed = getattr(self.image_transform, "reseed", None)
        if callable(reseed):
            reseed(seed)
        elif in_worker:  # a worker process owns its global RNGs; the main process does not
            random.seed(seed)
            torch.manual_seed(seed)

    def _decode(self, s: RawSample, batcher: _Batcher, pending: _Pending) -> bool:
        """Check and decode one sample into `batcher`; False (and counted) when bad."""
        p = self.plan
        key, url = s.key, s.url
        # Cheap checks first, so a sample we would drop is never decoded.
        row, bad = check_sample(s.fields, caption="yes" if self.tokenizer is not None else "present",
                                label="yes" if p.with_label else "no",
                                meta="yes" if p.with_json else "no")
        if bad:
            pending.bad(bad[0][0], key, url, bad[0][1])
            return False
        try:
            img = open_image(s.fields[row.pop("image")], p.max_pixels)
        except BadSample as e:
            pending.bad(e.reason, key, url, str(e))
            return False
        row["key"] = key
        try:
            batcher.image(img)
        except Exception as e:  # truncated or corrupt data surfaces at decode time
            pending.bad("decode", key, url, f"{type(e).__name__}: {e}")
            return False
        batcher.add(row)
        return True


class _Switch:
    """Forwards problem reports to whichever `_Pending` `get()` names right now."""

    def __init__(self, get: Callable[[], _Pending]) -> None:
        self.get = get

    def bad(self, reason: str, key: str, url: str, detail: str) -> None:
        self.get().bad(reason, key, url, detail)


def _chain(shards: Iterable[str], mode: ReadMode, pending: Any) -> Iterator[RawSample]:
    for url in shards:
        yield from iter_shard(url, mode=mode, on_problem=pending.bad)


def _resampled(shards: Sequence[str], rng: random.Random, mode: ReadMode,
               pending: Any) -> Iterator[RawSample]:
    # Drawing shards that hold no readable sample would spin forever; fail instead.
    limit = 10 * len(shards) + 10
    empty = 0
    while True:
        url = shards[rng.randrange(len(shards))]
        got = False
        for s in iter_shard(url, mode=mode, on_problem=pending.bad):
            got = True
            yield s
        empty = 0 if got else empty + 1
        if empty >= limit:
            raise DataError(
                f"no readable samples after drawing {limit} shards from {shards[0]} ... "
                "(check them with `clip-data validate`)"
            )


def _mixed(streams: list[Iterator[RawSample]], weights: Sequence[float],
           rng: random.Random) -> Iterator[RawSample]:
    cum = list(itertools.accumulate(weights))
    total = cum[-1]
    while True:
        i = min(bisect.bisect_right(cum, rng.random() * total), len(cum) - 1)
        yield next(streams[i])


def _buffer_shuffle(samples: Iterable[RawSample], size: int,
                    rng: random.Random) -> Iterator[RawSample]:
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


def _worker_init(_: int) -> None:
    # Each worker decodes one image at a time; intra-op threads would only oversubscribe.
    torch.set_num_threads(1)


# -- bad-sample budget -----------------------------------------------------------------------
class BadSampleBudget:
    """Sums the bad-sample counts that batches carry and stops the run past a bound.

    >>> budget = BadSampleBudget(cfg.data.max_bad_fraction, shards=cfg.data.train)
    >>> for batch in loader:
    ...     budget.update(batch)          # raises DataError past the bound

    Nothing is raised before `min_samples` samples were seen (a few bad samples early on
    say little about the fraction). `state_dict()`/`load_state_dict()` carry the counts
    across a resume.
    """

    def __init__(self, max_fraction: float, min_samples: int = 1000,
                 shards: ShardSpec | None = None, name: str = "data.max_bad_fraction") -> None:
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
        return {"seen": self.seen, "bad": self.bad, "by_reason": dict(self.by_reason),
                "first_keys": list(self.first_keys)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.bad = int(state["seen"]), int(state["bad"])
        self.by_reason = Counter(state.get("by_reason", {}))
        self.first_keys = list(state.get("first_keys", []))


# -- the loader the user holds ---------------------------------------------------------------
class ShardLoader:
    """An iterable of batches for one pass (one epoch, or endless in resampled mode).

    Make a new one per epoch with `epoch=e`; call `close()` (or drop it) to stop workers.
    Iterating it again repeats the same pass (from `state`, when one was given).
    `state_dict()` says where the consumer is; see the module docstring.
    """

    def __init__(self, dataloader: DataLoader, plan: _Plan, config: dict[str, Any],
                 start: dict[str, Any], limit: int | None, budget: BadSampleBudget | None,
                 regime: str) -> None:
        self.dataloader = dataloader
        self.plan = plan
        self.shards = list(plan.shards)
        self.regime = regime
        self.limit = limit
        self.budget = budget
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
        workers = self.plan.workers
        try:
            for batch in self.dataloader:
                w = int(batch["_worker"])
                st["workers"][w] = [int(batch["_batch"]) + 1, int(batch["_emitted"])]
                st["next_worker"] = (w + 1) % workers
                st["batches"] += 1
                self.seen += int(batch["_seen"])
                self.skipped.update({k: v for k, v in batch["_skipped"].items() if v})
                if self.budget is not None:
                    self.budget.update(batch)
                yield batch
                if self.limit is not None and st["batches"] >= self.limit:
                    break
        finally:
            if self.skipped:
                log.warning(
                    "rank %d: skipped %d bad samples of %d (%s)", self.plan.rank,
                    sum(self.skipped.values()), self.seen,
                    ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())),
                )

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
        n = epoch_batches(list(self.plan.shards), batch_size=self.plan.batch_size,
                          world_size=self.plan.world_size, num_workers=self.plan.workers,
                          drop_last=self.plan.drop_last)[self.plan.rank]
        return n if self.limit is None else min(n, self.limit)

    def close(self) -> None:
        """Shut down persistent workers now rather than at garbage collection."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None

    def __repr__(self) -> str:
        return f"ShardLoader({len(self.shards)} shards, {self.regime})"


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
                n = sum(counts[u] for u in _worker_shards(urls, rank, world_size, w, workers))
            else:
                g, all_n = rank * workers + w, sum(counts[u] for u in urls)
                n = all_n // groups + (1 if g < all_n % groups else 0)
            total += batches(n)
        out.append(total)
    return out


def _parse_sources(
    shards: Any, weights: Sequence[float] | None
) -> tuple[list[list[str]], tuple[float, ...] | None]:
    """Shard spec (+ weights) -> one list of shard paths per source, and the weights."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    pairs = [it for it in items if isinstance(it, tuple) and len(it) == 2
             and isinstance(it[1], (int, float)) and not isinstance(it[1], bool)]
    if pairs:
        if len(pairs) != len(items):
            raise DataError("give either shard specs or (spec, weight) pairs, not both")
        if weights is not None:
            raise DataError("weights were given twice: in (spec, weight) pairs and weights=")
        return [expand_shards(spec) for spec, _ in pairs], tuple(float(w) for _, w in pairs)
    if weights is None:
        return [expand_shards(shards)], None
    parts = [p.strip() for it in items for p in str(it).split("::") if p.strip()]
    if len(parts) != len(weights):
        raise DataError(
            f"{len(weights)} weights for {len(parts)} sources ({' :: '.join(parts)}); "
            "give one weight per '::'-separated source"
        )
    return [expand_shards(p) for p in parts], tuple(float(w) for w in weights)


def _check_state(state: dict[str, Any], config: dict[str, Any], workers: int) -> dict[str, Any]:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise DataError(f"loader state is not a {STATE_FORMAT} state dict (got "
                        f"{type(state).__name__}); pass ShardLoader.state_dict() as saved")
    for k, v in config.items():
        if state.get(k) != v:
            raise DataError(
                f"loader state does not match this loader: {k} differs (state {state.get(k)!r}, "
                f"now {v!r}); resume with the same data and loader settings"
            )
    try:
        ws = [[int(b), int(e)] for b, e in state["workers"]]
        start = {"batches": int(state["batches"]), "next_worker": int(state["next_worker"]),
                 "workers": ws}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"loader state is incomplete or malformed ({e})") from e
    if len(ws) != workers or not 0 <= start["next_worker"] < workers:
        raise DataError("loader state is malformed: worker entries do not match num_workers")
    return start


def make_loader(
    shards: Any,
    *,
    batch_size: int,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
    mode: str = "epoch",
    num_workers: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    with_label: bool = False,
    with_json: bool = False,
    pin_memory: bool = False,
    weights: Sequence[float] | None = None,
    samples_per_epoch: int | None = None,
    max_batches: int | None = None,
    state: dict[str, Any] | None = None,
    max_bad_fraction: float | None = None,
    bad_min_samples: int = 1000,
    max_pixels: int | None = None,
    prefetch_factor: int = 2,
) -> ShardLoader:
    """Stream batches from WebDataset shards for one rank (see the module docstring).

    `shards`: a spec (directory, brace pattern, glob, file, '::'-joined list, or a list of
    those); with `weights` (resampled mode), each '::'-separated part (or list item) is one
    source; or a list of `(spec, weight)` pairs. `max_batches` stops the pass after that many
    batches on this rank, counting those before `state` (use `min(epoch_batches(...))` in
    DDP epoch mode). `samples_per_epoch` (resampled) makes a pass
    `ceil(samples_per_epoch / (batch_size * world_size))` batches long. `state` is a
    `ShardLoader.state_dict()` to resume from. `max_bad_fraction` stops the pass with a
    `DataError` once more than that fraction of at least `bad_min_samples` samples was bad.
    Images with more than `max_pixels` pixels (default: PIL's `MAX_IMAGE_PIXELS`) are
    skipped as `too_large` before decoding.
    """
    if mode not in ("epoch", "resampled"):
        raise DataError(f"loader mode must be 'epoch' or 'resampled', got {mode!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0 or shuffle_buffer < 0:
        raise DataError("num_workers and shuffle_buffer must be >= 0")
    if max_batches is not None and max_batches < 0:
        raise DataError(f"max_batches must be >= 0, got {max_batches}")
    sources, mix = _parse_sources(shards, weights)
    if mix is not None:
        if mode != "resampled":
            raise DataError("mixing sources with weights needs mode='resampled' "
                            "(an epoch reads every sample once, whatever the weights)")
        if any(w < 0 or not math.isfinite(w) for w in mix) or sum(mix) <= 0:
            raise DataError(f"source weights must be >= 0 with a positive sum, got {list(mix)}")
    limit = max_batches
    if samples_per_epoch is not None:
        if mode != "resampled":
            raise DataError("samples_per_epoch applies to mode='resampled' only "
                            "(an epoch-mode pass is the whole data set)")
        if samples_per_epoch < 1:
            raise DataError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        per_pass = -(-samples_per_epoch // (batch_size * world_size))
        limit = per_pass if limit is None else min(limit, per_pass)
    workers = max(1, num_workers)
    flat = [u for src in sources for u in src]
    digest = hashlib.sha1("\n".join(
        "::".join(src) for src in sources).encode("utf-8")).hexdigest()[:16]
    config: dict[str, Any] = {
        "format": STATE_FORMAT,
        "shards": f"{len(flat)} shards sha1:{digest}",
        "weights": ",".join(repr(w) for w in mix) if mix is not None else "",
        "mode": mode,
        "seed": int(seed),
        "epoch": int(epoch),
        "rank": int(rank),
        "world_size": int(world_size),
        "num_workers": int(num_workers),
        "batch_size": int(batch_size),
        "shuffle_buffer": int(shuffle_buffer),
        "drop_last": int(bool(drop_last)),
        "fields": ",".join(f for f, on in (("label", with_label), ("json", with_json),
                                           ("text", tokenizer is not None)) if on),
    }
    if state is not None:
        start = _check_state(state, config, workers)
    else:
        start = {"batches": 0, "next_worker": 0, "workers": [[0, 0] for _ in range(workers)]}
    plan = _Plan(
        sources=tuple(tuple(s) for s in sources),
        weights=mix,
        batch_size=batch_size,
        mode=mode,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        workers=workers,
        drop_last=drop_last,
        with_label=with_label,
        with_json=with_json,
        max_pixels=int(max_pixels if max_pixels is not None
                       else (Image.MAX_IMAGE_PIXELS or 2**62)),
        offset=start["next_worker"],
        resume=tuple((b, e) for b, e in start["workers"]) if state is not None else None,
    )
    if mode == "resampled":
        regime = "resampled" if mix is None else f"resampled, {len(sources)} sources mixed"
    elif not plan.sample_split:
        regime = "shard-split"
    else:
        regime = "sample-split"
        log.info(
            "%d shards < %d ranks x %d workers: every worker walks all shards and keeps "
            "1 sample in %d (exact; reads tar headers of the others); write more shards "
            "to avoid this", len(flat), world_size, workers, world_size * workers,
        )
    budget = None
    if max_bad_fraction is not None:
        budget = BadSampleBudget(max_bad_fraction, min_samples=bad_min_samples,
                                 shards=shards if isinstance(shards, (str, Path)) else flat)
    dataset = _ShardStream(plan, image_transform, tokenizer)
    dataloader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )
    return ShardLoader(dataloader, plan, config, start, limit, budget, regime)
