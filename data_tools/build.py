"""Shard builders: what people have -> clean, resumable WebDataset shards.

Inputs (`detect_input` tells them apart):

- a folder of images with same-named `.txt` captions (`cat.jpg` + `cat.txt`, any depth);
- a table of local image paths + captions: CSV, TSV, JSONL or parquet, column names
  configurable, every other column kept in the sample's `.json`;
- shards: an img2dataset output folder (`00000.tar` + `00000.parquet` + `00000_stats.json`)
  or any folder of WebDataset `.tar` files, re-sharded through the same filters (or, for
  img2dataset, `reuse`d as is: counted and checked against its stats, nothing copied).

All of them become `Item`s (`data_tools.build_inputs`), which one engine
(`data_tools.build_writer.write_split`) encodes in parallel (`data_tools.build_encode`) and
writes: each shard under a temporary name, renamed when complete, and recorded in
`.clip-data-build.json`, so a rerun with the same inputs and options skips the completed
shards (a resumable build) and a rerun with different ones is refused unless `overwrite`.
This module is the `clip-data build` command: list, split train/val, write, manifest.

Bad inputs are skipped and counted per reason, never half-written: missing_caption,
empty_caption, caption_too_short, caption_too_long, bad_utf8, missing_image, decode,
too_large (over `max_pixels`, e.g. decompression bombs), duplicate_key, unsafe_member,
truncated_tar.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from data_tools.build_encode import EncodeOptions
from data_tools.build_inputs import (
    MAX_LISTED,
    Item,
    Listing,
    detect_input,
    folder_items,
    shard_items,
    table_items,
)
from data_tools.build_writer import BUILD_FORMAT, write_split
from data_tools.errors import DataError
from data_tools.io import write_json_atomic

log = logging.getLogger(__name__)


def split_val(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Items whose seeded key hash falls under `fraction` go to val: stable when inputs grow."""
    if fraction <= 0:
        return items, []
    train, val = [], []
    for it in items:
        h = hashlib.sha1(f"{seed}:{it.key}".encode()).digest()
        (val if int.from_bytes(h[:8], "big") / 2**64 < fraction else train).append(it)
    return train, val


def build(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    opts: EncodeOptions | None = None,
    shuffle: bool = False,
    seed: int = 0,
    val_fraction: float = 0.0,
    num_workers: int = 0,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    image_root: str | Path | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build `out_dir/train/` (and `out_dir/val/`) shards from any supported input; returns
    the manifest, also written to `out_dir/manifest.json` (last, so it marks completion)."""
    opts = opts or EncodeOptions()
    opts.validate()
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    kind = detect_input(input_path)
    out = Path(out_dir)
    if kind == "table":
        listing = table_items(
            input_path,
            image_col=image_col,
            caption_col=caption_col,
            key_col=key_col,
            image_root=image_root,
        )
    elif kind == "folder":
        listing = folder_items(input_path)
    else:
        listing = shard_items(input_path)
    if reuse:
        return _reuse(listing, input_path, out)
    train, val = split_val(listing.items, val_fraction, seed)
    if shuffle:
        random.Random(f"clip-data:{seed}:train").shuffle(train)
        random.Random(f"clip-data:{seed}:val").shuffle(val)
    (out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    for name, its in (("train", train), ("val", val)):
        if not its:
            continue
        splits[name] = write_split(
            its,
            out / name,
            name,
            samples_per_shard=samples_per_shard,
            opts=opts,
            num_workers=num_workers,
            overwrite=overwrite,
            progress=progress,
            desc=f"build {name}",
        )
    skipped = Counter(listing.skipped)
    bad = list(listing.bad)
    for r in splits.values():
        skipped.update(r.skipped)
        bad.extend(r.bad[: max(0, MAX_LISTED - len(bad))])
    manifest = {
        "format": BUILD_FORMAT,
        "input": {**listing.info, "path": str(input_path), "kind": listing.info.get("kind", kind)},
        "options": {
            **asdict(opts),
            "samples_per_shard": samples_per_shard,
            "shuffle": shuffle,
            "seed": seed,
            "val_fraction": val_fraction,
        },
        "counts": {name: r.written for name, r in splits.items()},
        "splits": {name: r.to_json(out) for name, r in splits.items()},
        "inputs": len(listing.items) + sum(listing.skipped.values()),
        "written": sum(r.written for r in splits.values()),
        "skipped": dict(skipped),
        "bad_samples": bad,
        "resumed_shards": sum(r.resumed_shards for r in splits.values()),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _reuse(listing: Listing, input_path: str | Path, out: Path) -> dict[str, Any]:
    """img2dataset shards used where they are: count, compare with its stats, no copy."""
    if listing.info.get("kind") not in ("img2dataset", "shards"):
        raise DataError(
            "--reuse applies to an img2dataset (or shards) folder; "
            f"{input_path} is a {listing.info.get('kind')}"
        )
    counts: Counter = Counter(it.url for it in listing.items)
    stats = listing.info.get("img2dataset", {})
    n = len(listing.items)
    if stats.get("successes") is not None and stats["successes"] != n:
        log.warning(
            "img2dataset stats say %d successes but the shards hold %d samples",
            stats["successes"],
            n,
        )
    src = Path(input_path).resolve()
    manifest = {
        "format": BUILD_FORMAT,
        "input": {**listing.info, "path": str(input_path)},
        "reused": True,
        "counts": {"train": n},
        "splits": {
            "train": {
                "path": str(src),
                "samples": n,
                "shards": [os.path.basename(u) for u in counts],
                "shard_counts": list(counts.values()),
            }
        },
        "inputs": n + sum(listing.skipped.values()),
        "written": 0,
        "skipped": dict(listing.skipped),
        "bad_samples": list(listing.bad),
        "resumed_shards": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
