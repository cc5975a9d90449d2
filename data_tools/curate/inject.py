"""A copy of a shard set with known dirt, to show (and test) that curation finds it.

Injects exact duplicates (same bytes, new key), near duplicates (2% darker, re-encoded in
their format), mismatched captions (a caption of another sample) and
leaked eval images (copied from eval shards, with a training caption). `injected.json` lists
the keys of each kind. Run it as

    python -m data_tools.curate.inject data/synth/train data/dirty --eval data/synth/zeroshot
"""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.errors import DataError
from data_tools.io import write_json_atomic
from data_tools.shards import ShardWriter
from data_tools.tario import iter_shard
from data_tools.urls import expand_shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def _samples(spec: Any) -> list[dict[str, Any]]:
    return [{"__key__": s.key, **s.fields} for url in expand_shards(spec) for s in iter_shard(url)]


def _image_ext(sample: dict[str, Any]) -> str:
    return next(e for e in IMAGE_EXTS if e in sample)


def near_copy(data: bytes) -> bytes:
    """The same picture 2% darker, re-encoded in its own format: other bytes, same image.

    JPEG is written at quality 90 without chroma subsampling, which on a 32-pixel image of
    sharp coloured shapes would change it more than a re-upload does."""
    img = Image.open(io.BytesIO(data))
    fmt = img.format if img.format in ("PNG", "WEBP") else "JPEG"
    darker = img.convert("RGB").point(lambda v: int(v * 0.98))
    buffer = io.BytesIO()
    darker.save(buffer, format=fmt, **({"quality": 90, "subsampling": 0} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def dirty_copy(
    train: Any,
    out_dir: str | Path,
    *,
    exact: float = 0.05,
    near: float = 0.05,
    mismatched: float = 0.1,
    eval_sets: Sequence[str] = (),
    leaks: int = 20,
    seed: int = 0,
    samples_per_shard: int = 1000,
) -> dict[str, list[str]]:
    """Write `train` plus injected dirt to `out_dir`/train-NNNNNN.tar; returns the key lists."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; choose a new directory for the dirty copy")
    rng = random.Random(seed)
    samples = _samples(train)
    n = len(samples)
    if n < 2:
        raise DataError(f"{train}: need at least 2 samples to inject into")
    injected: dict[str, list[str]] = {"exact": [], "near": [], "mismatched": [], "leaked": []}
    for i in rng.sample(range(n), int(mismatched * n)):
        j = (i + rng.randrange(1, n)) % n
        samples[i]["txt"] = samples[j]["txt"]
        injected["mismatched"].append(samples[i]["__key__"])
    extra = []
    for i in rng.sample(range(n), int(exact * n)):
        extra.append({**samples[i], "__key__": samples[i]["__key__"] + "_dup"})
        injected["exact"].append(extra[-1]["__key__"])
    for i in rng.sample(range(n), int(near * n)):
        s = samples[i]
        ext = _image_ext(s)
        copy = {k: v for k, v in s.items() if k != ext}
        extra.append({**copy, "__key__": s["__key__"] + "_near", ext: near_copy(s[ext])})
        injected["near"].append(extra[-1]["__key__"])
    for spec in eval_sets:
        name = Path(str(spec).rstrip("/")).name
        pool = _samples(spec)
        for s in rng.sample(pool, min(leaks, len(pool))):
            ext = _image_ext(s)
            caption = samples[rng.randrange(n)]["txt"]
            extra.append({"__key__": f"{name}_{s['__key__']}_leak", ext: s[ext], "txt": caption})
            injected["leaked"].append(extra[-1]["__key__"])
    rows = samples + extra
    rng.shuffle(rows)
    with ShardWriter(out, "train", samples_per_shard) as writer:
        for row in rows:
            writer.write(row)
    write_json_atomic(out / "injected.json", injected)
    return injected


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("train")
    p.add_argument("output")
    p.add_argument("--eval", action="append", default=[], help="eval shards to leak from")
    p.add_argument("--exact", type=float, default=0.05)
    p.add_argument("--near", type=float, default=0.05)
    p.add_argument("--mismatched", type=float, default=0.1)
    p.add_argument("--leaks", type=int, default=20, help="images per eval set")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    got = dirty_copy(
        a.train,
        a.output,
        exact=a.exact,
        near=a.near,
        mismatched=a.mismatched,
        eval_sets=a.eval,
        leaks=a.leaks,
        seed=a.seed,
        samples_per_shard=a.samples_per_shard,
    )
    print(", ".join(f"{k} {len(v)}" for k, v in got.items()), f"injected into {a.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
