"""The streaming loader: WebDataset shards -> batches of model-ready tensors.

Used by training and evaluation alike. Reading, shuffling, decoding, augmentation,
tokenisation and batching all run inside DataLoader workers (`batch_size=None` on the
DataLoader), so the main process only receives finished batches, whose image tensor was
written straight into shared memory.

Splitting is explicit from `rank`/`world_size`, never from torch.distributed or Accelerate
(whose batch dispatching would duplicate or drop samples; see docs/scaling.md). Each rank runs
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
A dict with "image" [B,3,H,W] float32 (uint8 pixels with ``uint8_images``: a quarter of the
bytes; ``image_transform.normalize`` turns them into the float32 batch, bit for bit), "key"
list[str], "caption" list[str] (when the shards have .txt), "text" [B,L] long (with a
tokenizer), "label" [B] long (``with_label``), "json" list[dict] (``with_json``), "image_2"
[B,3,H,W] like "image" (``image_views=2``: a second view of the same images, decoded once and
augmented again by ``view_transform``, by default SimCLR's augmentation
`data_tools.transforms.SimCLRTransform`; its RNG is reseeded per batch like the first view's,
from its own stream), plus private keys (leading ``_``) that the trainer may read:

- ``_skipped``: {reason: count} of bad samples this worker skipped since its previous batch,
  for every reason in `SKIP_REASONS`; ``_seen``: samples it examined in that span (good and
  bad); ``_bad_keys``: up to 16 "key (reason) in shard" strings from that span. Summed over
  batches, ``_skipped`` / ``_seen`` is the bad fraction; `BadSampleBudget` does the sum.
  Samples after a worker's last batch (a tail that ``drop_last`` drops) reach no batch: the
  worker sends their counts as a tally without samples, which `ShardLoader` counts (its budget
  and its end-of-pass warning) and never yields.
- ``_worker``, ``_batch``, ``_emitted``: which logical worker made the batch, its index among
  that worker's batches, and how many samples that worker had taken from its shuffle buffer.
  `ShardLoader.state_dict` is built from these.

Bad samples (undecodable or oversized images, missing or non-UTF-8 captions, bad labels,
truncated shards, unsafe tar members) are skipped, counted per reason, logged with their key
(the first 20 per worker at WARNING) and never stop the run by themselves: the consumer
sums the batches' counts in a `BadSampleBudget` to stop past a bound.

Exact resume
------------
`ShardLoader.state_dict()` after any number of consumed batches returns a small JSON-able dict;
``make_loader(..., state=it)`` with the same shards, seed, epoch, rank, world_size, num_workers,
batch_size, mode (and shuffle buffer, drop_last, weights, label/json/tokenizer/image_views use)
continues
with exactly the batches an uninterrupted iteration would have yielded next, in the same order
and with the same contents. Each worker replays its stream from tar headers only (no data read,
nothing decoded; remote and .tar.gz shards have no offsets, so theirs are read again) up to
where it stopped, which rebuilds the shuffle buffer; its augmentation RNG restarts at the
batch boundary; the round-robin restarts at the worker that was due next (physical worker 0
plays that logical worker). A state from another configuration raises
`DataError` naming the field that differs.

Resume on another layout
------------------------
``make_loader(..., state=[state of rank 0, ..., state of rank N-1])`` continues a pass saved on
N processes with another ``world_size``, ``num_workers`` or ``batch_size`` (the rest must match).
Epoch mode: the samples the N ranks had taken from their shuffle buffers (trained, skipped as
bad, or dropped in a worker's tail) are found from the saved positions and the per-shard counts,
without reading a tar; every other sample of the pass is dealt to exactly one new worker, each
rank getting the same number of whole batches, as many as the samples allow
(`data_tools.redeal`). So no sample of the pass is read twice, and none is left out but the
remainder short of one more batch on every rank (the loader stops every rank after the same
number of batches itself: ``max_batches`` then counts from the re-deal) and, as in any pass,
what bad samples cost. The next epoch follows the plan
for the new layout. Resampled mode: the pass keeps its length in batches and draws from new,
differently seeded shard streams. A state saved in such a pass resumes exactly on its own layout
or is re-dealt again.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_tools.bad_samples import SKIP_REASONS, BadSampleBudget
from data_tools.counts import count_samples, shard_sample_counts
from data_tools.errors import DataError
from data_tools.read_plan import ReadPlan, epoch_batches
from data_tools.redeal import Segment, rest_of_pass
from data_tools.shard_loader import STATE_FORMAT, ShardLoader, start_position
from data_tools.urls import expand_shards
from data_tools.worker_stream import ShardStream, worker_init

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


def _parse_sources(
    shards: Any, weights: Sequence[float] | None
) -> tuple[list[list[str]], tuple[float, ...] | None]:
    """Shard spec (+ weights) -> one list of shard paths per source, and the weights."""
    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    pairs = [
        it
        for it in items
        if isinstance(it, tuple)
        and len(it) == 2
        and isinstance(it[1], (int, float))
        and not isinstance(it[1], bool)
    ]
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


def _second_view(
    image_views: int, image_transform: Any, view_transform: Any
) -> Callable[[Image.Image], torch.Tensor] | None:
    """The transform of "image_2", or None for one view."""
    if image_views not in (1, 2):
        raise DataError(f"image_views must be 1 or 2, got {image_views}")
    if image_views == 1:
        if view_transform is not None:
            raise DataError("view_transform makes a second view: pass image_views=2 with it")
        return None
    if view_transform is not None:
        return view_transform
    from data_tools.transforms import ImageTransform, SimCLRTransform  # torchvision: only here

    if not isinstance(image_transform, ImageTransform):
        raise DataError(
            "image_views=2 with a transform other than ImageTransform needs view_transform "
            "(the second view's augmentation)"
        )
    t = image_transform
    return SimCLRTransform(t.image_size, mean=t.mean, std=t.std)


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
    state: dict[str, Any] | list[dict[str, Any]] | None = None,
    max_pixels: int | None = None,
    prefetch_factor: int = 2,
    budget: BadSampleBudget | None = None,
    image_views: int = 1,
    view_transform: Callable[[Image.Image], torch.Tensor] | None = None,
    uint8_images: bool = False,
    reuse: ShardLoader | None = None,
) -> ShardLoader:
    """Stream batches from WebDataset shards for one rank (see the module docstring).

    `shards`: a spec (directory, brace pattern, glob, file, '::'-joined list, or a list of
    those); with `weights` (resampled mode), each '::'-separated part (or list item) is one
    source; or a list of `(spec, weight)` pairs. `max_batches` stops the pass after that many
    batches on this rank, counting those before `state` (use `min(epoch_batches(...))` in
    DDP epoch mode). `samples_per_epoch` (resampled) makes a pass
    `ceil(samples_per_epoch / (batch_size * world_size))` batches long. `state` is a
    `ShardLoader.state_dict()` to resume from, or every rank's, in rank order, which also
    continues a pass saved with another world_size, num_workers or batch_size (see "Resume on
    another layout" in the module docstring). `budget` (a trainer's `BadSampleBudget`, which
    lives across passes and resumes) is fed every batch's bad-sample counts, including those
    of a tail that `drop_last` drops, and stops the run past its bound.
    Images with more than `max_pixels` pixels (default: PIL's `MAX_IMAGE_PIXELS`) are
    skipped as `too_large` before decoding. `image_views=2` adds "image_2", a second view of
    each image through `view_transform` (default: `SimCLRTransform` at the size, mean and std
    of `image_transform`, which must then be an `ImageTransform`). `uint8_images=True` sends
    "image" (and "image_2") as uint8 pixels, a quarter of the bytes; the consumer normalises them
    with `image_transform.normalize` (bit-identical to the float32 batch), per micro-batch on its
    device. It needs `ImageTransform`s, the second view's with the first's mean and std.
    `reuse`, the previous pass's loader, is taken over: when this pass differs from its pass in
    the epoch alone (no `state`; the same transform and tokenizer objects, num_workers,
    pin_memory, prefetch_factor), its workers go on with this pass instead of new ones being
    started; otherwise they are shut down. The batches are the same either way.
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
    view_transform = _second_view(image_views, image_transform, view_transform)
    if uint8_images:
        from data_tools.transforms import ImageTransform  # torchvision: only here

        for t in (image_transform, view_transform):
            if t is not None and not isinstance(t, ImageTransform):
                raise DataError(
                    f"uint8_images=True needs ImageTransforms (they normalise the pixels later), "
                    f"got {type(t).__name__}; pass uint8_images=False"
                )
        if view_transform is not None and (view_transform.mean, view_transform.std) != (
            image_transform.mean,
            image_transform.std,
        ):
            raise DataError(
                "uint8_images=True sends both views as pixels for one normalisation, but "
                "view_transform's mean/std differ from image_transform's; give them the same "
                "or pass uint8_images=False"
            )
    sources, mix = _parse_sources(shards, weights)
    if mix is not None:
        if mode != "resampled":
            raise DataError(
                "mixing sources with weights needs mode='resampled' "
                "(an epoch reads every sample once, whatever the weights)"
            )
        if any(w < 0 or not math.isfinite(w) for w in mix) or sum(mix) <= 0:
            raise DataError(f"source weights must be >= 0 with a positive sum, got {list(mix)}")
    limit = max_batches
    if samples_per_epoch is not None:
        if mode != "resampled":
            raise DataError(
                "samples_per_epoch applies to mode='resampled' only "
                "(an epoch-mode pass is the whole data set)"
            )
        if samples_per_epoch < 1:
            raise DataError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        per_pass = -(-samples_per_epoch // (batch_size * world_size))
        limit = per_pass if limit is None else min(limit, per_pass)
    workers = max(1, num_workers)
    flat = [u for src in sources for u in src]
    digest = hashlib.sha1("\n".join("::".join(src) for src in sources).encode("utf-8")).hexdigest()[
        :16
    ]
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
        "fields": ",".join(
            f
            for f, on in (
                ("label", with_label),
                ("json", with_json),
                ("text", tokenizer is not None),
                ("image_2", view_transform is not None),
            )
            if on
        ),
    }
    start, redealt = start_position(state, config, workers)
    segments = [Segment.from_json(x) for x in start.get("rest", ())]
    plan = ReadPlan(
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
        max_pixels=int(max_pixels if max_pixels is not None else (Image.MAX_IMAGE_PIXELS or 2**62)),
        offset=start["next_worker"],
        resume=tuple((b, e) for b, e in start["workers"]) if state is not None else None,
        segment=len(segments),
    )
    rest_batches = None
    if segments and mode == "epoch":
        counts = [n for _, n in shard_sample_counts(flat)]
        rest = rest_of_pass(plan, counts, segments)
        mine = rest.streams[rank * workers : (rank + 1) * workers]
        plan = replace(plan, rest=tuple(tuple(map(tuple, s.tolist())) for s in mine))
        per_rank = rest.batches(workers, batch_size, drop_last)
        rest_batches = per_rank[rank]
        limit = min(per_rank) if limit is None else min(limit, min(per_rank))
        if redealt and rank == 0:
            old = segments[-1]
            log.info(
                "epoch %d continues on %d processes x %d workers (saved on %d x %d): %d of its "
                "%d samples were taken before, the %d left are dealt out anew, %d batches of %d "
                "per process; no sample is read twice",
                epoch,
                world_size,
                workers,
                old.world_size,
                old.workers,
                rest.total - rest.left,
                rest.total,
                rest.left,
                limit,
                batch_size,
            )
    elif redealt and rank == 0:
        old = segments[-1]
        log.info(
            "epoch %d continues on %d processes x %d workers (saved on %d x %d) after %d "
            "batches per process, drawing from new shard streams (resampled: with replacement)",
            epoch,
            world_size,
            workers,
            old.world_size,
            old.workers,
            max(old.batches),
        )
    if mode == "resampled":
        regime = "resampled" if mix is None else f"resampled, {len(sources)} sources mixed"
    elif plan.rest is not None:
        regime = "re-dealt rest of a pass"
    elif not plan.sample_split:
        regime = "shard-split"
    else:
        regime = "sample-split"
        log.info(
            "%d shards < %d ranks x %d workers: every worker walks all shards and keeps "
            "1 sample in %d (exact; reads tar headers of the others); write more shards "
            "to avoid this",
            len(flat),
            world_size,
            workers,
            world_size * workers,
        )
    dataset = ShardStream(plan, image_transform, tokenizer, view_transform, uint8_images)
    args = {
        "num_workers": num_workers,
        "pin_memory": pin_memory,
        "prefetch_factor": prefetch_factor if num_workers > 0 else None,
    }
    dataloader = reuse.hand_over(dataset, **args) if reuse is not None else None
    if dataloader is None:
        dataloader = DataLoader(
            dataset,
            batch_size=None,
            persistent_workers=num_workers > 0,
            worker_init_fn=worker_init if num_workers > 0 else None,
            **args,
        )
    return ShardLoader(dataloader, plan, config, start, limit, regime, budget, rest_batches)
