"""`clip-data dedup`: exact and near duplicates, and decontamination against eval sets.

Three decisions, in this order:
1. Contaminated: a training image whose embedding is within `eval_threshold` cosine of any
   image of an eval set (zero-shot or retrieval shards, an ImageNet-style folder) is removed,
   so zero-shot numbers measured on that set are not inflated by training on it.
2. Groups: samples are joined when their image bytes hash equal (exact) or their image
   embeddings reach `threshold` cosine (near; exact faiss range search up to `flat_max`
   vectors, k-means cells compared by matrix products above). Each group keeps one sample among
   its clean members: the best
   scored, then the lowest (shard, key), so the choice never depends on run order.
3. The others are removed as `exact` (same bytes as the kept one) or `near`.
Samples without a score (the scorer skipped them as bad) are removed as `unscored`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.curate.rewrite import fingerprint, prepare_output, rewrite
from data_tools.curate.scoredir import check_same_shards, read_scores
from data_tools.errors import DataError
from data_tools.io import write_json_atomic, write_text_atomic
from data_tools.tario import iter_shard

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FLAT_MAX = 50_000  # above this many vectors, pairs are searched within k-means cells
CHUNK = 16_384  # queries per faiss call: bounds the memory of a range search's results


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise DataError("dedup needs the faiss package: pip install faiss-cpu") from None
    return faiss


def normalized(emb: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(emb, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _flat_pairs(x: np.ndarray, threshold: float) -> np.ndarray:
    faiss = _faiss()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    found = []
    for start in range(0, len(x), CHUNK):
        lims, _, ids = index.range_search(x[start : start + CHUNK], float(threshold))
        rows = np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64))
        found.append(np.stack([rows, ids.astype(np.int64)], 1))
    return np.concatenate(found)


def _cell_pairs(x: np.ndarray, threshold: float, nprobe: int) -> np.ndarray:
    """Pairs by k-means cells: each row is compared, by one matrix product per cell, with
    the rows that have that cell among their `nprobe` nearest.

    Near duplicates sit far closer to each other than to any cell boundary, so with the
    nearest cell of one and the `nprobe` nearest of the other they share a cell unless both
    straddle a boundary. About sqrt(2N) cells balance the assignment (N x cells) against the
    products within cells (2N^2 / cells); both run as BLAS matrix products, which an IVF
    range search (a scan per query) does not: 5.6x slower on 100k vectors here.
    """
    faiss = _faiss()
    n, dim = x.shape
    cells = max(2, int(np.sqrt(2 * n)))
    rng = np.random.default_rng(0)
    sample = x[np.sort(rng.choice(n, min(n, 32 * cells), replace=False))]
    kmeans = faiss.Kmeans(
        dim, cells, niter=10, seed=0, spherical=True, min_points_per_centroid=16, verbose=False
    )
    kmeans.train(sample)
    probes = max(1, min(nprobe, cells))
    _, assign = kmeans.index.search(x, probes)
    flat = assign.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.cumsum(np.bincount(flat, minlength=cells))[:-1]
    found = []
    for c, members in enumerate(np.split(order // probes, bounds)):
        primary = members[assign[members, 0] == c]
        if not len(primary) or len(members) < 2:
            continue
        for start in range(0, len(primary), CHUNK):
            q = primary[start : start + CHUNK]
            i, j = np.nonzero(x[q] @ x[members].T >= threshold)
            found.append(np.stack([q[i], members[j]], 1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def near_pairs(
    emb: np.ndarray, threshold: float, *, flat_max: int = FLAT_MAX, nprobe: int = 3
) -> np.ndarray:
    """Pairs (i, j), i < j, of rows whose cosine is >= `threshold`; int64 [M, 2].

    Exact (every pair, faiss range search) up to `flat_max` rows; above, by k-means cells
    (`_cell_pairs`), which can miss a pair whose members fall in different cells (raise
    `nprobe` to miss fewer).
    """
    x = normalized(emb)
    if not len(x):
        return np.zeros((0, 2), np.int64)
    pairs = _flat_pairs(x, threshold) if len(x) <= flat_max else _cell_pairs(x, threshold, nprobe)
    pairs = np.sort(pairs.astype(np.int64), axis=1)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def nearest_eval(train: np.ndarray, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, index) of each training row's nearest eval row (exact search)."""
    faiss = _faiss()
    e = normalized(evals)
    index = faiss.IndexFlatIP(e.shape[1])
    index.add(e)
    sims, ids = [], []
    x = normalized(train)
    for start in range(0, len(x), CHUNK):
        s, i = index.search(x[start : start + CHUNK], 1)
        sims.append(s[:, 0])
        ids.append(i[:, 0])
    return np.concatenate(sims), np.concatenate(ids)


def groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected component label of each of `n` items joined by `pairs`."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def choose_kept(
    labels: np.ndarray, score: np.ndarray, order_key: Sequence[Any], eligible: np.ndarray
) -> np.ndarray:
    """Index of the kept member of each item's group (-1: none eligible).

    The kept member is the eligible one with the best score, then the lowest `order_key`.
    """
    rank = sorted(np.flatnonzero(eligible), key=lambda r: (-float(score[r]), order_key[r]))
    best: dict[int, int] = {}
    for r in rank:
        best.setdefault(int(labels[r]), int(r))
    return np.array([best.get(int(g), -1) for g in labels], np.int64)


def content_hashes(urls: Sequence[str]) -> dict[tuple[int, str], str]:
    """(shard, key) -> sha256 of the image bytes, for every sample with an image."""
    out = {}
    for i, url in enumerate(urls):
        for s in iter_shard(url):
            img = next((s.fields[e] for e in IMAGE_EXTS if e in s.fields), None)
            if img is not None:
                out[(i, s.key)] = hashlib.sha256(img).hexdigest()
    return out


def decide(
    score: np.ndarray,
    image: np.ndarray,
    order_key: Sequence[Any],
    hashes: Sequence[str | None],
    *,
    threshold: float,
    eval_sets: dict[str, np.ndarray] | None = None,
    eval_threshold: float = 0.95,
    flat_max: int = FLAT_MAX,
    nprobe: int = 3,
) -> list[dict[str, Any]]:
    """The dedup decision for each row: {"reason": ""|"exact"|"near"|"contaminated", ...}.

    Removed rows name what they matched: `kept` (the row kept in their group) or
    `eval_set` + `eval_index` + `similarity` (the eval image they duplicate).
    """
    n = len(score)
    eligible = np.ones(n, bool)
    out: list[dict[str, Any]] = [{"reason": ""} for _ in range(n)]
    best_sim = np.full(n, -np.inf)
    for name, emb in (eval_sets or {}).items():
        if not len(emb):
            continue
        sim, idx = nearest_eval(image, emb)
        for r in np.flatnonzero((sim >= eval_threshold) & (sim > best_sim)):
            out[r] = {
                "reason": "contaminated",
                "eval_set": name,
                "eval_index": int(idx[r]),
                "similarity": round(float(sim[r]), 4),
            }
            best_sim[r] = sim[r]
    eligible &= best_sim == -np.inf
    pairs = near_pairs(image, threshold, flat_max=flat_max, nprobe=nprobe)
    by_hash: dict[str, int] = {}
    exact = []
    for r, h in enumerate(hashes):
        if h is not None:
            first = by_hash.setdefault(h, r)
            if first != r:
                exact.append((first, r))
    all_pairs = np.concatenate([pairs, np.array(exact, np.int64).reshape(-1, 2)])
    labels = groups(n, all_pairs)
    kept = choose_kept(labels, score, order_key, eligible)
    for r in range(n):
        if out[r]["reason"] or kept[r] in (r, -1):
            continue
        k = int(kept[r])
        same = hashes[r] is not None and hashes[r] == hashes[k]
        out[r] = {"reason": "exact" if same else "near", "kept": k}
    return out


def dedup_shards(
    shards: Any,
    scores_dir: str | Path,
    out_dir: str | Path,
    *,
    threshold: float = 0.95,
    eval_sets: dict[str, np.ndarray] | None = None,
    eval_threshold: float = 0.95,
    flat_max: int = FLAT_MAX,
    nprobe: int = 3,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the samples of `shards` that survive `decide` to `out_dir`; returns the report.

    `eval_sets` maps a name to image embeddings made with the model of `scores_dir`
    (see `evalsets.embed_eval_set`).
    """
    from data_tools.progress import progress as progress_bar

    check_thresholds(threshold, eval_threshold)
    out = Path(out_dir)
    scores = read_scores(scores_dir)
    urls = check_same_shards(scores, shards, str(scores_dir))
    eval_sets = eval_sets or {}
    fp = fingerprint(
        "dedup",
        [str(Path(u).resolve()) for u in urls],
        str(Path(scores_dir).resolve()),
        threshold,
        eval_threshold,
        flat_max,
        nprobe,
        {
            k: hashlib.sha1(np.ascontiguousarray(v, np.float32)).hexdigest()
            for k, v in sorted(eval_sets.items())
        },
    )
    state = prepare_output(out, fp, "dedup")

    # Only the scored samples still in SHARDS take part (after `filter`, a subset of them).
    hashes = content_hashes(urls)
    rows = np.array(
        [r for r, k in enumerate(zip(scores.shard.tolist(), scores.keys)) if k in hashes], np.int64
    )
    order_key = [(int(scores.shard[r]), scores.keys[r]) for r in rows]
    decisions = decide(
        scores.score[rows],
        np.asarray(scores.image[rows]),
        order_key,
        [hashes[k] for k in order_key],
        threshold=threshold,
        eval_sets=eval_sets,
        eval_threshold=eval_threshold,
        flat_max=flat_max,
        nprobe=nprobe,
    )
    keep = {order_key[j] for j, d in enumerate(decisions) if not d["reason"]}
    counts: dict[str, Any] = {
        "input": len(hashes),
        "kept": len(keep),
        "exact": 0,
        "near": 0,
        "contaminated": {name: 0 for name in eval_sets},
        "unscored": len(hashes) - len(order_key),
    }
    lines = []
    for j, d in enumerate(decisions):
        if not d["reason"]:
            continue
        entry = {"shard": order_key[j][0], "key": order_key[j][1], "reason": d["reason"]}
        if d["reason"] == "contaminated":
            counts["contaminated"][d["eval_set"]] += 1
            entry.update({k: d[k] for k in ("eval_set", "eval_index", "similarity")})
        else:
            counts[d["reason"]] += 1
            k = d["kept"]
            entry["kept"] = {"shard": order_key[k][0], "key": order_key[k][1]}
        lines.append(json.dumps(entry))

    with progress_bar(total=len(urls), desc="dedup: write", unit="shard", enabled=progress) as bar:
        written = rewrite(urls, out, state, lambda i, key: (i, key) in keep, progress=bar)
    write_text_atomic(out / "removed.jsonl", "".join(line + "\n" for line in lines))
    result = {
        "command": "dedup",
        "shards": len(urls),
        "threshold": threshold,
        "eval_threshold": eval_threshold if eval_sets else None,
        "search": "exact" if len(rows) <= flat_max else f"k-means cells (nprobe {nprobe})",
        "counts": counts,
        "written": written,
    }
    write_json_atomic(out / "report.json", result)
    return result


def check_thresholds(threshold: float, eval_threshold: float) -> None:
    for flag, value in (("--threshold", threshold), ("--eval-threshold", eval_threshold)):
        if not (np.isfinite(value) and 0.0 < value <= 1.0):
            raise DataError(
                f"{flag} {value}: a cosine similarity threshold in (0, 1], "
                "e.g. 0.95 for near duplicates"
            )
