"""Shard statistics and checks for `clip-data inspect` and `clip-data validate`.

`inspect` reads every member but decodes nothing: samples per shard, caption lengths, image
sizes (from image headers), and the problems visible without decoding (duplicate keys, empty
or non-UTF-8 captions, samples without an image or caption, unsafe members, truncated shards).
`validate` also decodes every image fully, so corrupt and truncated images are found, and
lists each bad sample. Shards are checked in parallel with `num_workers`.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.errors import DataError
from data_tools.images import check_image
from data_tools.samples import BadSample, check_sample, open_image
from data_tools.tario import iter_shard
from data_tools.urls import expand_shards, is_remote

CAPTION_EDGES = (0, 1, 10, 20, 50, 100, 200, 500)  # chars: [0], [1,10), ... [500, inf)
SIDE_EDGES = (0, 32, 64, 128, 224, 256, 384, 512, 1024, 2048)  # shorter side, px


@dataclass
class Problem:
    shard: str
    key: str
    reason: str
    detail: str

    def line(self) -> str:
        return f"{self.shard}  {self.key or '?'}  {self.reason}: {self.detail}"


@dataclass
class ShardStats:
    """Counts for a shard spec; caption lengths are in characters and in words."""

    shards: list[tuple[str, int]] = field(default_factory=list)
    total: int = 0
    with_caption: int = 0
    with_image: int = 0
    with_label: int = 0
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    missing_caption: list[Problem] = field(default_factory=list)  # problems only if others have one
    decoded: bool = False

    @staticmethod
    def _summary(xs: list[int]) -> tuple[int, float, int] | None:
        return (min(xs), sum(xs) / len(xs), max(xs)) if xs else None

    @property
    def chars(self) -> tuple[int, float, int] | None:
        """(min, mean, max) caption length in characters, None without captions."""
        return self._summary(self.caption_chars)

    @property
    def words(self) -> tuple[int, float, int] | None:
        """(min, mean, max) caption length in whitespace-separated words."""
        return self._summary(self.caption_words)

    @property
    def bad(self) -> list[Problem]:
        """Every problem found, missing captions included when other samples have one."""
        return self.problems + (self.missing_caption if self.with_caption else [])

    def problem_counts(self) -> Counter:
        return Counter(p.reason for p in self.bad)

    def merge(self, other: ShardStats) -> None:
        self.shards += other.shards
        self.total += other.total
        self.with_caption += other.with_caption
        self.with_image += other.with_image
        self.with_label += other.with_label
        self.caption_chars += other.caption_chars
        self.caption_words += other.caption_words
        self.image_sizes += other.image_sizes
        self.problems += other.problems
        self.missing_caption += other.missing_caption


def histogram(values: Sequence[int], edges: Sequence[int]) -> list[tuple[str, int]]:
    """Counts per bucket [edges[i], edges[i+1]), the last one open; labels like '64-127'."""
    counts = [0] * len(edges)
    for v in values:
        i = len(edges) - 1
        while i > 0 and v < edges[i]:
            i -= 1
        counts[i] += 1
    labels = []
    for i, lo in enumerate(edges):
        if i + 1 < len(edges):
            hi = edges[i + 1] - 1
            labels.append(str(lo) if hi == lo else f"{lo}-{hi}")
        else:
            labels.append(f">={lo}")
    return list(zip(labels, counts))


def _check_shard(args: tuple[str, bool, int]) -> tuple[ShardStats, list[str]]:
    """Stats of one shard and its keys in order (for duplicate detection across shards)."""
    url, decode, max_pixels = args
    st = ShardStats(decoded=decode)
    name = url

    def problem(reason: str, key: str, _url: str, detail: str) -> None:
        st.problems.append(Problem(name, key, reason, detail))

    keys = []
    n = 0
    for s in iter_shard(url, on_problem=problem):
        n += 1
        keys.append(s.key)
        row, bad = check_sample(s.fields, caption="yes", label="present", meta="present")
        for reason, detail in bad:
            p = Problem(name, s.key, reason, detail)
            # a missing caption is a problem only where other samples have one
            (st.missing_caption if reason == "missing_caption" else st.problems).append(p)
        if "caption" in row:
            st.with_caption += 1
            st.caption_chars.append(len(row["caption"]))
            st.caption_words.append(len(row["caption"].split()))
        st.with_label += "label" in row
        ext = row["image"]
        if ext is None:
            continue
        st.with_image += 1
        try:
            size = (
                check_image(s.fields[ext], max_pixels)
                if decode
                else open_image(s.fields[ext], max_pixels).size
            )
        except BadSample as e:
            st.problems.append(Problem(name, s.key, e.reason, str(e)))
        else:
            st.image_sizes.append(size)
    st.shards.append((url, n))
    st.total = n
    return st, keys


def inspect_shards(
    spec: str | Path | Sequence[str | Path],
    *,
    decode: bool = False,
    num_workers: int = 0,
    max_pixels: int | None = None,
    progress: bool = False,
) -> ShardStats:
    """Count, measure and check shards (`decode=True`: also decode every image)."""
    from data_tools.progress import progress as progress_bar

    urls = expand_shards(spec)
    for u in urls:
        if is_remote(u):
            raise DataError(f"cannot inspect a remote shard: {u} (copy it locally)")
    limit = int(max_pixels or Image.MAX_IMAGE_PIXELS or 89_478_485)
    tasks = [(u, decode, limit) for u in urls]
    stats = ShardStats(decoded=decode)
    seen: dict[str, str] = {}
    pool = None
    if num_workers > 0 and len(urls) > 1:
        pool = mp.get_context("spawn").Pool(min(num_workers, len(urls)))
        results = pool.imap(_check_shard, tasks)
    else:
        results = map(_check_shard, tasks)
    try:
        for st, keys in progress_bar(
            results,
            total=len(tasks),
            unit="shard",
            enabled=progress,
            desc="validate" if decode else "inspect",
        ):
            for p in st.problems:
                if p.reason == "unreadable_shard":
                    raise DataError(f"unreadable shard: {p.shard} ({p.detail}; rebuild it)")
            url = st.shards[0][0]
            for k in keys:
                if k in seen:
                    st.problems.append(
                        Problem(
                            url,
                            k,
                            "duplicate_key",
                            f"also in {seen[k]}" if seen[k] != url else "twice in this shard",
                        )
                    )
                else:
                    seen[k] = url
            stats.merge(st)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return stats


def stats_json(stats: ShardStats) -> dict[str, Any]:
    """A JSON summary (what `--json` prints)."""
    sides = [min(w, h) for w, h in stats.image_sizes]
    return {
        "total": stats.total,
        "shards": [{"path": s, "samples": n} for s, n in stats.shards],
        "with_caption": stats.with_caption,
        "with_label": stats.with_label,
        "caption_chars": stats.chars,
        "caption_words": stats.words,
        "caption_chars_histogram": dict(histogram(stats.caption_chars, CAPTION_EDGES)),
        "image_short_side_histogram": dict(histogram(sides, SIDE_EDGES)),
        "problems": dict(stats.problem_counts()),
        "decoded": stats.decoded,
    }
