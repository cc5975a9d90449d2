"""Near-duplicate search time of `clip-data dedup` on N image embeddings (default 1M x 256).

    python bench/dedup.py                         # 1,000,000 x 256 (k-means cells, as dedup
                                                  # above 50k)
    python bench/dedup.py --n 100000 --nprobe 2

Embeddings: random unit vectors (float16, as `clip-data score` stores them) plus 1% planted
near duplicates (cosine ~0.99 to a random other row). Times `dedup.decide` (k-means, cell
products, groups, kept choice) with no eval sets and no content hashing, and reports how many of
the planted pairs were found (the cell search can miss a pair split across cells).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--nprobe", type=int, default=3)
    a = p.parse_args()
    import faiss

    from data_tools.curate import dedup

    rng = np.random.default_rng(0)
    n_dup = a.n // 100
    x = rng.standard_normal((a.n, a.dim), dtype=np.float32)
    src = rng.choice(a.n - n_dup, n_dup, replace=False)
    x[a.n - n_dup :] = x[src] + 0.1 * rng.standard_normal((n_dup, a.dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = x.astype(np.float16)
    score = rng.random(a.n).astype(np.float32)
    order = list(zip([0] * a.n, range(a.n)))
    start = time.perf_counter()
    decisions = dedup.decide(
        score, emb, order, [None] * a.n, threshold=a.threshold, nprobe=a.nprobe
    )
    took = time.perf_counter() - start
    removed = {r for r, d in enumerate(decisions) if d["reason"]}
    found = sum(1 for i, s in zip(range(a.n - n_dup, a.n), src) if i in removed or s in removed)
    print(
        json.dumps(
            {
                "n": a.n,
                "dim": a.dim,
                "threshold": a.threshold,
                "search": "exact" if a.n <= dedup.FLAT_MAX else f"k-means cells, nprobe {a.nprobe}",
                "seconds": round(took, 1),
                "removed": len(removed),
                "planted_pairs_found": f"{found}/{n_dup}",
                "cpus": os.cpu_count(),
                "faiss_threads": faiss.omp_get_max_threads(),
                "faiss": faiss.__version__,
                "python": platform.python_version(),
            }
        )
    )


if __name__ == "__main__":
    main()
