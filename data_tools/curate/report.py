"""What a filter or dedup run shows a person: a score histogram and sheets of example pairs."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.io import write_bytes_atomic
from data_tools.tario import iter_shard


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    os.environ.setdefault("MPLCONFIGDIR", tempfile.gettempdir())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_histogram(
    path: Path, score: np.ndarray, kept: np.ndarray, threshold: float | None
) -> None:
    """Kept and removed scores stacked in one histogram, with the score threshold marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bins = np.linspace(float(score.min(initial=0)), float(score.max(initial=1)), 51)
    ax.hist(
        [score[kept], score[~kept]],
        bins=bins,
        stacked=True,
        label=["kept", "removed"],
        color=["tab:blue", "tab:red"],
    )
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("image-text cosine similarity")
    ax.set_ylabel("samples")
    ax.legend()
    write_bytes_atomic(path, _png(fig))
    plt.close(fig)


def fetch_pairs(
    urls: Sequence[str], wanted: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], tuple[bytes, str]]:
    """(image bytes, caption) of a few samples, reading only the shards that hold them."""
    found: dict[tuple[int, str], tuple[bytes, str]] = {}
    by_shard: dict[int, set[str]] = {}
    for i, key in wanted:
        by_shard.setdefault(i, set()).add(key)
    for i, keys in sorted(by_shard.items()):
        for s in iter_shard(urls[i]):
            if s.key in keys:
                img = next(
                    (s.fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in s.fields), b""
                )
                found[(i, s.key)] = (img, s.fields.get("txt", b"").decode("utf-8", "replace"))
    return found


def pair_sheet(path: Path, title: str, pairs: Sequence[tuple[bytes, str, float]]) -> None:
    """A grid of thumbnails, each with its score and caption, so a person can judge a cut."""
    from PIL import Image

    plt = _pyplot()
    n = max(1, len(pairs))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption, score) in zip(axes.flat, pairs):
        try:
            ax.imshow(Image.open(io.BytesIO(img)).convert("RGB"))
        except Exception:  # noqa: BLE001 - a sheet never fails on one bad image: its cell stays empty
            ax.text(0.5, 0.5, "no image", ha="center")
        ax.set_title(f"{score:.3f}: {caption[:60]}", fontsize=7, wrap=True)
    fig.suptitle(title)
    write_bytes_atomic(path, _png(fig))
    plt.close(fig)
