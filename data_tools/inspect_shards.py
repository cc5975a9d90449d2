"""Shard statistics for `clip-data inspect`: samples per shard and caption lengths.

Reads tar members directly (no image decoding), so it is quick even on many shards.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from data_tools.errors import DataError
from data_tools.urls import expand_shards, is_remote, sample_key


@dataclass
class ShardStats:
    """Counts for a shard spec; caption lengths are in characters and in words."""

    shards: list[tuple[str, int]] = field(default_factory=list)
    total: int = 0
    with_caption: int = 0
    caption_chars: list[int] = field(default_factory=list)
    caption_words: list[int] = field(default_factory=list)

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


def inspect_shards(spec: str | Path | Sequence[str | Path]) -> ShardStats:
    """Count samples per shard and measure `.txt` captions."""
    stats = ShardStats()
    for shard in expand_shards(spec):
        if is_remote(shard):
            raise DataError(f"cannot inspect a remote shard: {shard} (copy it locally)")
        n, last = 0, None
        try:
            with tarfile.open(shard, "r:") as tf:
                for info in tf:
                    if not info.isreg() or info.name.startswith("__"):
                        continue
                    split = sample_key(info.name)
                    if split is None:
                        continue
                    key, ext = split
                    if key != last:
                        n, last = n + 1, key
                    if ext.lower() == "txt":
                        f = tf.extractfile(info)
                        text = f.read().decode("utf-8", errors="replace").strip() if f else ""
                        stats.with_caption += 1
                        stats.caption_chars.append(len(text))
                        stats.caption_words.append(len(text.split()))
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"unreadable shard: {shard} ({e}; rebuild it)") from e
        stats.shards.append((shard, n))
        stats.total += n
    return stats
