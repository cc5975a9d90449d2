"""Reading a score directory (see `score.py`) and checking it belongs to a given shard set."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    model: Any
    unscored: set[tuple[int, str]]

    def rows_of(self, i: int) -> dict[str, int]:
        """key -> row for the samples of shard i."""
        return {self.keys[r]: r for r in np.flatnonzero(self.shard == i)}


def read_scores(path: str | Path, *, embeddings: bool = True) -> Scores:
    """A complete score directory, or one line saying what to run."""
    out = Path(path)
    info_path = out / INFO
    if not info_path.is_file():
        raise DataError(
            f"--scores {out}: no {INFO} (not a finished `clip-data score` output); "
            "run or resume `clip-data score` first"
        )
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise DataError(f"--scores {out}: format {info.get('format')!r} is not {FORMAT!r}")
    rows = [json.loads(line) for line in (out / "keys.jsonl").read_text().splitlines() if line]
    score = np.load(out / "scores.npy")
    image = np.load(out / "image_emb.npy", mmap_mode="r") if embeddings else np.zeros((0, 0))
    if len(rows) != len(score) or (embeddings and len(image) != len(score)):
        raise DataError(
            f"--scores {out}: keys.jsonl, scores.npy and image_emb.npy disagree in "
            "length; score again into a new directory"
        )
    bad = [json.loads(line) for line in (out / "unscored.jsonl").read_text().splitlines() if line]
    return Scores(
        urls=list(info["shards"]),
        shard=np.array([r["shard"] for r in rows], np.int32),
        keys=[r["key"] for r in rows],
        score=score,
        image=image,
        model=info["model"],
        unscored={(r["shard"], r["key"]) for r in bad},
    )


def check_same_shards(scores: Scores, shards: object, where: str) -> list[str]:
    """The expanded `shards`, refused unless they are the scored shards or a curated subset.

    Shard i must hold only keys that were scored (or skipped as bad) in scored shard i, so
    `filter` then `dedup` can share one score run, and scores of another shard set never
    steer a decision. Output shards of filter/dedup keep the input's count and order.
    """
    urls = expand_shards(shards)  # type: ignore[arg-type]
    if len(urls) != len(scores.urls):
        raise DataError(
            f"--scores {where} was made from {len(scores.urls)} other shards "
            f"({os.path.basename(scores.urls[0]) if scores.urls else 'none'} ...) "
            f"than SHARDS ({len(urls)}); score these shards first"
        )
    known: dict[int, set[str]] = {}
    for r, i in enumerate(scores.shard.tolist()):
        known.setdefault(i, set()).add(scores.keys[r])
    for i, key in scores.unscored:
        known.setdefault(i, set()).add(key)
    for i, url in enumerate(urls):
        extra = [k for k in shard_keys(url) if k not in known.get(i, set())]
        if extra:
            raise DataError(
                f"--scores {where}: sample {extra[0]!r} of {url} was not scored "
                f"(keys do not match: scores of another shard set?); score these "
                "shards first"
            )
    return urls
