"""`clip-data filter`: keep samples by CLIP score, caption length and image size.

The score cut has DataComp's two forms: `min_score` (keep cosine >= X) or `keep_fraction`
(keep the top F of the scored samples, ties broken by shard then key, so the cut is
deterministic). Each removed sample is counted under the first reason it fails, in the order
`unscored` (the scorer skipped it as bad), `caption_words`, `min_side`, `score`. All
decisions are made before anything is written; the shards are then copied as in `rewrite.py`.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_tools.curate import report
from data_tools.curate.rewrite import fingerprint, prepare_output, rewrite
from data_tools.curate.scoredir import check_same_shards, read_scores
from data_tools.errors import DataError
from data_tools.io import write_json_atomic
from data_tools.tario import iter_shard

REASONS = ("unscored", "caption_words", "min_side", "score")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class FilterOptions:
    min_score: float | None = None
    keep_fraction: float | None = None
    min_caption_words: int = 0
    min_side: int = 0

    def validate(self) -> None:
        """Out-of-range thresholds are refused before any data is read."""
        if self.min_score is not None and self.keep_fraction is not None:
            raise DataError("give --min-score or --keep-fraction, not both")
        if self.min_score is not None and not (
            math.isfinite(self.min_score) and -1.0 <= self.min_score <= 1.0
        ):
            raise DataError(f"--min-score {self.min_score}: a cosine similarity is in [-1, 1]")
        if self.keep_fraction is not None and not (0.0 < self.keep_fraction <= 1.0):
            raise DataError(f"--keep-fraction {self.keep_fraction}: give a fraction in (0, 1]")
        if self.min_caption_words < 0:
            raise DataError(f"--min-caption-words {self.min_caption_words}: give 0 or more")
        if self.min_side < 0:
            raise DataError(f"--min-side {self.min_side}: give 0 or more pixels")


def _attributes(url: str) -> dict[str, tuple[int, int]]:
    """key -> (caption words, shorter image side; -1 when the image does not open)."""
    attrs = {}
    for s in iter_shard(url):
        words = len(s.fields.get("txt", b"").decode("utf-8", "replace").split())
        side = -1
        img = next((s.fields[e] for e in IMAGE_EXTS if e in s.fields), None)
        if img is not None:
            try:
                side = min(Image.open(io.BytesIO(img)).size)  # header only, no decode
            except Exception:  # noqa: BLE001 - the scorer skipped it too: counts as unscored
                side = -1
        attrs[s.key] = (words, side)
    return attrs


def score_threshold(
    score: np.ndarray, keys: list[str], shard: np.ndarray, opts: FilterOptions
) -> tuple[np.ndarray, float | None]:
    """(passes the score cut [N], the effective threshold)."""
    if opts.keep_fraction is not None:
        n = len(score)
        k = min(n, math.ceil(opts.keep_fraction * n))
        order = sorted(range(n), key=lambda r: (-float(score[r]), int(shard[r]), keys[r]))
        passes = np.zeros(n, bool)
        passes[order[:k]] = True
        return passes, (float(score[order[k - 1]]) if k else None)
    if opts.min_score is not None:
        return score >= opts.min_score, opts.min_score
    return np.ones(len(score), bool), None


def filter_shards(
    shards: Any,
    scores_dir: str | Path,
    out_dir: str | Path,
    opts: FilterOptions,
    *,
    examples: int = 12,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the samples of `shards` that pass `opts` to `out_dir`; returns the report dict."""
    from data_tools.progress import progress as progress_bar

    opts.validate()
    out = Path(out_dir)
    scores = read_scores(scores_dir, embeddings=False)
    urls = check_same_shards(scores, shards, str(scores_dir))
    passes, threshold = score_threshold(scores.score, scores.keys, scores.shard, opts)
    fp = fingerprint(
        "filter",
        [str(Path(u).resolve()) for u in urls],
        str(Path(scores_dir).resolve()),
        asdict(opts),
    )
    state = prepare_output(out, fp, "filter")

    # 1. Decide every sample (reads captions and image headers), before writing anything.
    decision: dict[tuple[int, str], str] = {}  # (shard, key) -> "" (kept) or a reason
    counts = {"input": 0, "kept": 0, **{r: 0 for r in REASONS}}
    for i, url in enumerate(
        progress_bar(urls, desc="filter: read", unit="shard", enabled=progress)
    ):
        rows = scores.rows_of(i)
        for key, (words, side) in _attributes(url).items():
            r = rows.get(key)
            reason = (
                "unscored"
                if r is None or side < 0
                else "caption_words"
                if words < opts.min_caption_words
                else "min_side"
                if side < opts.min_side
                else ""
                if passes[r]
                else "score"
            )
            decision[(i, key)] = reason
            counts["input"] += 1
            counts[reason or "kept"] += 1

    # 2. Write the kept samples, shard by shard (resumable).
    with progress_bar(total=len(urls), desc="filter: write", unit="shard", enabled=progress) as bar:
        written = rewrite(
            urls, out, state, lambda i, key: decision.get((i, key)) == "", progress=bar
        )

    # 3. The report: counts, histogram, the pairs nearest the cut on either side.
    row_reason = np.array(
        [
            decision.get((int(scores.shard[r]), scores.keys[r]), "unscored")
            for r in range(len(scores.keys))
        ]
    )
    kept = row_reason == ""
    report.score_histogram(out / "score_hist.png", scores.score, kept, threshold)
    kept_rows = sorted(np.flatnonzero(kept), key=lambda r: scores.score[r])[:examples]
    removed_rows = sorted(np.flatnonzero(row_reason == "score"), key=lambda r: -scores.score[r])[
        :examples
    ]
    wanted = [(int(scores.shard[r]), scores.keys[r]) for r in [*kept_rows, *removed_rows]]
    pairs = report.fetch_pairs(urls, wanted)

    def listing(rows: list[int]) -> list[dict[str, Any]]:
        return [
            {
                "shard": int(scores.shard[r]),
                "key": scores.keys[r],
                "score": round(float(scores.score[r]), 4),
                "caption": pairs.get((int(scores.shard[r]), scores.keys[r]), (b"", ""))[1],
            }
            for r in rows
        ]

    lowest_kept, highest_removed = listing(kept_rows), listing(removed_rows)
    for name, title, items in (
        ("lowest_kept.png", "lowest-scored kept", lowest_kept),
        ("highest_removed.png", "highest-scored removed", highest_removed),
    ):
        report.pair_sheet(
            out / name,
            title,
            [
                (pairs.get((it["shard"], it["key"]), (b"", ""))[0], it["caption"], it["score"])
                for it in items
            ],
        )
    result = {
        "command": "filter",
        "shards": len(urls),
        "options": asdict(opts),
        "score_threshold": threshold,
        "counts": counts,
        "written": written,
        "lowest_kept": lowest_kept,
        "highest_removed": highest_removed,
    }
    write_json_atomic(out / "report.json", result)
    return result
