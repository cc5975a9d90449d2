"""The streaming loader: WebDataset shards -> batches of model-ready tensors.

Used by training and evaluation alike. Decoding, augmentation, tokenisation and batching all
run inside DataLoader workers (`batch_size=None` on the DataLoader), so the main process only
receives finished batches.

Splitting is explicit from `rank`/`world_size` arguments, never from torch.distributed or
Accelerate (whose batch dispatching would duplicate or drop samples; see DESIGN.md):

- epoch mode, at least `world_size * workers` shards: shards are dealt to ranks, then to
  each rank's workers; each sample is read exactly once per epoch.
- epoch mode, fewer shards: every worker reads every shard and keeps the samples whose
  running index `i` satisfies `i % (world_size * workers) == global worker index`. Exact as
  well, at the price of every worker reading all bytes (fine for small eval sets).
- resampled mode: an endless stream; each worker draws shards with replacement from an RNG
  seeded by (seed, epoch, rank, worker).

Note that in epoch mode ranks may get different numbers of batches (shards hold different
sample counts); a DDP training loop should stop all ranks together or use resampled mode.
"""

from __future__ import annotations

import io
import json
import logging
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_tools.errors import DataError
from data_tools.urls import count_samples, expand_shards, shard_sample_counts

__all__ = ["make_loader", "expand_shards", "count_samples", "shard_sample_counts", "ShardLoader"]

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_MAX_BAD_WARNINGS = 20  # per worker; later bad samples are only counted (and logged at DEBUG)


def _rng(*parts: object) -> random.Random:
    """A private RNG for a tuple of ints; str seeds are hashed with SHA-512, stable across runs."""
    return random.Random("clip-train:" + ":".join(str(p) for p in parts))


@dataclass(frozen=True)
class _Plan:
    shards: tuple[str, ...]
    batch_size: int
    mode: str
    shuffle_buffer: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    drop_last: bool
    with_label: bool
    with_json: bool


@dataclass
class _PassState:
    """Counters of one worker's pass (kept off the dataset object, which workers share)."""

    where: str
    bad: int = 0
    seen: int = 0
    draws_without_sample: int = 0


class _ShardStream(IterableDataset):
    """One rank's share of the shards; yields finished batches (dicts)."""

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

    # -- which shards and samples this worker reads -------------------------------------------
    def _shard_order(self) -> list[str]:
        shards = list(self.plan.shards)
        if self.plan.shuffle_buffer > 0:
            # Same permutation on every rank and worker, so the split below stays a partition.
            _rng(self.plan.seed, self.plan.epoch, "shards").shuffle(shards)
        return shards

    def _sources(
        self, worker: int, num_workers: int, state: _PassState
    ) -> tuple[Iterator[dict], int, int]:
        """Shard URLs for this worker, plus (modulus, residue) for sample-level splitting."""
        p = self.plan
        if p.mode == "resampled":
            rng = _rng(p.seed, p.epoch, p.rank, worker, "resample")
            return self._resampled(rng, state), 1, 0
        shards = self._shard_order()
        groups = p.world_size * num_workers
        if len(shards) >= groups:
            mine = shards[p.rank :: p.world_size][worker::num_workers]
            return iter([{"url": u} for u in mine]), 1, 0
        return iter([{"url": u} for u in shards]), groups, p.rank * num_workers + worker

    def _resampled(self, rng: random.Random, state: _PassState) -> Iterator[dict]:
        shards = self.plan.shards
        # Drawing shards that hold no readable sample would spin forever; fail instead.
        limit = 10 * len(shards) + 10
        while True:
            if state.draws_without_sample >= limit:
                raise DataError(
                    f"no readable samples after drawing {limit} shards from {shards[0]} ... "
                    "(check them with `clip-data inspect`)"
                )
            state.draws_without_sample += 1
            yield {"url": shards[rng.randrange(len(shards))]}

    # -- the pipeline ----------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        p = self.plan
        reseed = getattr(self.image_transform, "reseed", None)
        if callable(reseed):
            reseed(_rng(p.seed, p.epoch, p.rank, worker, "augment").getrandbits(63))
        state = _PassState(where=f"rank {p.rank} worker {worker}")

        sources, modulus, residue = self._sources(worker, num_workers, state)
        samples: Iterable[dict] = wds.tarfile_samples(sources, handler=_tar_error)
        if modulus > 1:
            samples = (s for i, s in enumerate(samples) if i % modulus == residue)
        if p.mode == "resampled":
            samples = _reset_draws(samples, state)
        if p.shuffle_buffer > 0:
            rng = _rng(p.seed, p.epoch, p.rank, worker, "buffer")
            samples = _buffer_shuffle(samples, p.shuffle_buffer, rng)
        yield from self._batches(self._decoded(samples, state))
        if state.bad:
            log.warning("%s: skipped %d bad samples of %d read", state.where, state.bad, state.seen)

    def _decoded(self, samples: Iterable[dict], state: _PassState) -> Iterator[dict[str, Any]]:
        p = self.plan

        def skip(why: str) -> None:
            state.bad += 1
            level = logging.WARNING if state.bad <= _MAX_BAD_WARNINGS else logging.DEBUG
            log.log(level, "skipping bad sample %r in %s: %s", key, url, why)

        for s in samples:
            state.seen += 1
            key, url = s.get("__key__", "?"), s.get("__url__", "?")
            out: dict[str, Any] = {"key": key}
            # Cheap checks first, so a sample we would drop is never decoded.
            if "txt" in s:
                try:
                    out["caption"] = s["txt"].decode("utf-8").strip()
                except UnicodeDecodeError:
                    skip("caption is not UTF-8")
                    continue
            elif self.tokenizer is not None:
                skip("no caption (.txt) but a tokenizer was given")
                continue
            if p.with_label:
                try:
                    out["label"] = int(s["cls"].decode("ascii").strip())
                except (KeyError, ValueError, UnicodeDecodeError):
                    skip("missing or non-integer label (.cls)")
                    continue
            if p.with_json:
                try:
                    out["json"] = json.loads(s["json"].decode("utf-8"))
                except (KeyError, ValueError, UnicodeDecodeError):
                    skip("missing or invalid .json")
                    continue
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            if ext is None:
                skip("no image (.jpg/.jpeg/.png/.webp)")
                continue
            try:
                with warnings.catch_warnings():
                    # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; refuse those too.
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    out["image"] = self.image_transform(Image.open(io.BytesIO(s[ext])))
            except Exception as e:  # any decode failure is a bad sample, not a crash
                skip(f"undecodable image ({type(e).__name__}: {e})")
                continue
            yield out

    def _batches(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        buf: list[dict[str, Any]] = []
        for s in samples:
            buf.append(s)
            if len(buf) == self.plan.batch_size:
                yield self._collate(buf)
                buf = []
        if buf and not self.plan.drop_last:
            yield self._collate(buf)

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "image": torch.stack([s["image"] for s in items]),
            "key": [s["key"] for s in items],
        }
        if any("caption" in s for s in items):
            batch["caption"] = [s.get("caption", "") for s in items]
        if self.tokenizer is not None:
            batch["text"] = torch.as_tensor(self.tokenizer(batch["caption"])).long()
        if self.plan.with_label:
            batch["label"] = torch.tensor([s["label"] for s in items], dtype=torch.long)
        if self.plan.with_json:
            batch["json"] = [s["json"] for s in items]
        return batch


def _tar_error(exn: Exception) -> bool:
    log.warning("skipping unreadable shard data: %s", exn)
    return True


def _reset_draws(samples: Iterable[dict], state: _PassState) -> Iterator[dict]:
    for s in samples:
        state.draws_without_sample = 0
        yield s


def _buffer_shuffle(
    samples: Iterable[dict], size: int, rng: random.Random
) -> Iterator[dict]:
    """Shuffle within a sliding buffer of `size` samples (raw bytes, so memory stays small)."""
    buf: list[dict] = []
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


class ShardLoader:
    """An iterable of batches for one pass (one epoch, or endless in resampled mode).

    Make a new one per epoch with `epoch=e`; call `close()` (or drop it) to stop workers.
    """

    def __init__(self, dataloader: DataLoader, shards: list[str], regime: str) -> None:
        self.dataloader = dataloader
        self.shards = shards
        self.regime = regime

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.dataloader)

    def close(self) -> None:
        """Shut down persistent workers now rather than at garbage collection."""
        it = getattr(self.dataloader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self.dataloader._iterator = None

    def __repr__(self) -> str:
        return f"ShardLoader({len(self.shards)} shards, {self.regime})"


def make_loader(
    shards: str | Path | Sequence[str | Path],
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
) -> ShardLoader:
    """Stream batches from WebDataset shards for one rank.

    Each batch is a dict with "image" [B,3,H,W] float, "key" list[str], "caption" list[str]
    (when the shards have .txt), "text" [B,L] long (with a tokenizer), "label" [B] long
    (`with_label`), "json" list[dict] (`with_json`). `shuffle_buffer=0` keeps shard and sample
    order (evaluation); otherwise order is a function of (seed, epoch) only.
    """
    if mode not in ("epoch", "resampled"):
        raise DataError(f"loader mode must be 'epoch' or 'resampled', got {mode!r}")
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
    if num_workers < 0 or shuffle_buffer < 0:
        raise DataError("num_workers and shuffle_buffer must be >= 0")
    urls = expand_shards(shards)
    plan = _Plan(
        shards=tuple(urls),
        batch_size=batch_size,
        mode=mode,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        with_label=with_label,
        with_json=with_json,
    )
    workers = max(1, num_workers)
    if mode == "resampled":
        regime = "resampled"
    elif len(urls) >= world_size * workers:
        regime = "shard-split"
    else:
        regime = "sample-split"
        log.info(
            "%d shards < %d ranks x %d workers: every worker reads all shards and keeps "
            "1 sample in %d (exact, but more reading); write more shards to avoid this",
            len(urls), world_size, workers, world_size * workers,
        )
    dataset = _ShardStream(plan, image_transform, tokenizer)
    dataloader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    return ShardLoader(dataloader, urls, regime)
