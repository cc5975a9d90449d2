"""`clip-data reshard`: the same samples in new shards (another size), images resized on write.

Every field of a sample is carried over as it is (captions, labels, json); an image is
re-encoded only when it is larger than `max_side` (or has an EXIF rotation), otherwise its
bytes are copied. Bad samples (undecodable or oversized images, non-UTF-8 captions, unsafe
members, the cut sample of a truncated shard) are skipped and counted. Resumable like
`clip-data build`: a rerun skips the shards already complete.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from data_tools.build_encode import EncodeOptions
from data_tools.build_inputs import shard_list_items
from data_tools.build_writer import BUILD_FORMAT, write_split
from data_tools.errors import DataError
from data_tools.io import write_json_atomic
from data_tools.urls import expand_shards, is_remote


def reshard(
    spec: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    max_side: int | None = None,
    jpeg_quality: int = 95,
    max_pixels: int | None = None,
    prefix: str = "shard",
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Rewrite the shards of `spec` into `out_dir/{prefix}-NNNNNN.tar`; returns the manifest."""
    urls = expand_shards(spec)
    for u in urls:
        if is_remote(u):
            raise DataError(f"cannot reshard a remote shard: {u} (copy it locally)")
    out = Path(out_dir).resolve()
    if any(Path(u).resolve().parent == out for u in urls):
        raise DataError(f"--output {out_dir} is where the input shards are; choose another folder")
    opts = EncodeOptions(
        max_side=max_side,
        jpeg_quality=jpeg_quality,
        require_caption=False,
        min_caption_len=0,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )
    opts.validate()
    listing = shard_list_items(urls)
    items = listing.items
    if shuffle:
        random.Random(f"clip-data:{seed}:reshard").shuffle(items)
    (out / "manifest.json").unlink(missing_ok=True)
    result = write_split(
        items,
        out,
        prefix,
        samples_per_shard=samples_per_shard,
        opts=opts,
        num_workers=num_workers,
        overwrite=overwrite,
        progress=progress,
        desc="reshard",
    )
    manifest = {
        "format": BUILD_FORMAT,
        "input": {"kind": "shards", "spec": str(spec), "shards": len(urls)},
        "options": {
            "samples_per_shard": samples_per_shard,
            "max_side": max_side,
            "jpeg_quality": jpeg_quality,
            "shuffle": shuffle,
            "seed": seed,
        },
        "counts": {prefix: result.written},
        "splits": {prefix: result.to_json(out)},
        "inputs": len(items) + sum(listing.skipped.values()),
        "written": result.written,
        "skipped": dict(result.skipped + listing.skipped),
        "bad_samples": (listing.bad + result.bad)[:50],
        "resumed_shards": result.resumed_shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
