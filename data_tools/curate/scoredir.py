"""Reading a score directory (see `score.py`) and checking it belongs to a given shard set."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.curate.score import FORMAT, INFO, shard_keys
from data_tools.errors import DataError
from data_tools.urls import expand_shards


@dataclass
class Scores:
    """Row i: sample `keys[i]` of shard `shard[i]` (an index into `urls`)."""

    urls: list[str]
    shard: np.ndarray  # int32 [N]
    keys: list[str]
    score: np.ndarray  # float32 [N]
    image: np.ndarray  # float16 [N, D]
    model: str

    def rows_of(self, i: int) -> dict[str, int]:
        """key -> row for the samples of shard i."""
        return {self.keys[r]: r for r in np.flatnonzero(self.shard == i)}


def read_scores(path: str | Path, *, embeddings: bool = True) -> Scores:
    """A complete score directory, or one line saying what to run."""
    out = Path(path)
    info_path = out / INFO
    if not info_path.is_file():
        raise DataError(f"--scores {out}: no {INFO} (not a finished `clip-data score` output); "
                        "run or resume `clip-data score` first")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise DataError(f"--scores {out}: format {info.get('format')!r} is not {FORMAT!r}")
    rows = [json.loads(line) for line in (out / "keys.jsonl").read_text().splitlines() if line]
    score = np.load(out / "scores.npy")
    image = np.load(out / "image_emb.npy", mmap_mode="r") if embeddings else np.zeros((0, 0))
    if len(rows) != len(score) or (embeddings and len(image) != len(score)):
        raise DataError(f"--scores {out}: keys.jsonl, scores.npy and image_emb.npy disagree in "
                        "length; score again into a new directory")
    return Scores(urls=list(info["shards"]), shard=np.array([r["shard"] for r in rows], np.int32),
                  keys=[r["key"] for r in rows], score=score, image=image, model=info["model"])


def check_same_shards(scores: Scores, shards: object, where: str) -> list[str]:
    """The expanded `shards`, refused unless they are the shards `scores` was made from.

    Same count and file names in the same order, and every scored key present in its shard
    (read from tar headers), so scores of another shard set never steer a filter.
    """
    urls = expand_shards(shards)  # type: ignore[arg-type]
    names = [os.path.basename(u) for u in urls]
    theirs = [os.path.basename(u) for u in scores.urls]
    if names != theirs:
        raise DataError(f"--scores {where} was made from {len(theirs)} other shards "
                        f"({theirs[0] if theirs else 'none'} ...) than SHARDS ({len(names)}: "
                        f"{names[0] if names else 'none'} ...); score these shards first")
    for i, url in enumerate(urls):
        have = set(shard_keys(url))
        rows = np.flatnonzero(scores.shard == i)
        missing = [scores.keys[r] for r in rows if scores.keys[r] not in have]
        if missing:
            raise DataError(f"--scores {where}: key {missing[0]!r} of shard {names[i]} is not "
                            f"in {url} (keys do not match: scores of another shard set?); "
                            "score these shards first")
    return urls
