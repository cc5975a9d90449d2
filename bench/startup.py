"""Epoch-mode start-up: counting samples for `epoch_batches`, before and after sidecar counts.

    .venv/bin/python bench/startup.py                          # 10,000 shards x 1,000 samples
    .venv/bin/python bench/startup.py --shards 500 --keep      # smaller; keep the folders

Every process of an epoch-mode run needs each shard's sample count before step 1 (equal batch
counts across ranks), at every start and resume. The shards here hold tar headers only: each
sample is `KEY.jpg` + `KEY.txt` + `KEY.json` with empty data (3 headers a sample, as real
image-caption shards have), so nothing but start-up is measured. To spare the disk, `--distinct`
real files are written and every other shard is a hard link to one of them; reads therefore come
from the page cache, so "before" is a lower bound (cold disks or network file systems are slower).

Measures `epoch_batches(spec, world_size=8, num_workers=8)` on the same shards laid out as:

- `headers`: the old way, every tar header read (`data_tools.counts.count_headers` per shard);
- `manifest`: a folder with our `manifest.json` (what synth/build/reshard write, with sizes);
- `img2dataset`: `NNNNN.tar` + `NNNNN_stats.json` ("successes"), as img2dataset writes them;
- `no sidecar, first start`: headers read once, count cache written;
- `no sidecar, cached`: every later start and resume.

Prints one JSON line per layout: {"bench": "startup", "layout": ..., "seconds": ...,
"shards": N, "samples": M}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_tools import counts  # noqa: E402
from data_tools.loader import epoch_batches  # noqa: E402


def header_shard(path: Path, samples: int, offset: int) -> None:
    """A tar of `samples` samples of 3 empty members each (tar headers only)."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for i in range(offset, offset + samples):
            for ext in ("jpg", "txt", "json"):
                info = tarfile.TarInfo(f"{i:012d}.{ext}")
                info.size = 0
                tf.addfile(info, io.BytesIO(b""))


def layout(
    root: Path, name: str, templates: list[Path], shards: int, stats: bool, per_shard: int
) -> Path:
    """`shards` hard links to the templates in root/name, img2dataset-style names."""
    d = root / name
    d.mkdir()
    for i in range(shards):
        tar = d / f"{i:05d}.tar"
        os.link(templates[i % len(templates)], tar)
        if stats:
            (d / f"{i:05d}_stats.json").write_text(
                json.dumps(
                    {
                        "count": per_shard,
                        "successes": per_shard,
                        "failed_to_download": 0,
                        "failed_to_resize": 0,
                        "duration": 1.0,
                        "status_dict": {},
                    },
                    indent=4,
                )
            )
    return d


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--per-shard", type=int, default=1_000)
    ap.add_argument("--distinct", type=int, default=10, help="real files; the rest hard links")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="clip-startup-", dir=args.dir))
    os.environ["XDG_CACHE_HOME"] = str(root / "user-cache")  # leave the real one alone
    try:
        tpl = root / "templates"
        tpl.mkdir()
        templates = []
        for j in range(args.distinct):
            templates.append(tpl / f"t{j}.tar")
            header_shard(templates[-1], args.per_shard, j * args.per_shard)
        n, total = args.shards, args.shards * args.per_shard
        kw = dict(batch_size=256, world_size=8, num_workers=8, drop_last=True)

        plain = layout(root, "plain", templates, n, False, args.per_shard)
        built = layout(root, "built", templates, n, False, args.per_shard)
        names = sorted(p.name for p in built.glob("*.tar"))
        size = templates[0].stat().st_size
        (root / "manifest.json").write_text(
            json.dumps(
                {
                    "splits": {
                        "train": {
                            "path": "built",
                            "shards": names,
                            "shard_counts": [args.per_shard] * n,
                            "shard_bytes": [size] * n,
                        }
                    }
                }
            )
        )
        i2d = layout(root, "img2dataset", templates, n, True, args.per_shard)

        def before() -> None:  # the old epoch_batches: every header of every shard
            urls = sorted(str(p) for p in plain.glob("*.tar"))
            assert sum(counts.count_headers(u) for u in urls) == total

        rows = [("headers (before)", before)]
        for name, d in (
            ("manifest", built),
            ("img2dataset", i2d),
            ("no sidecar, first start", plain),
            ("no sidecar, cached", plain),
        ):
            rows.append((name, lambda d=d: epoch_batches(d, **kw)))
        for name, fn in rows:
            secs = timed(fn)
            print(
                json.dumps(
                    {
                        "bench": "startup",
                        "layout": name,
                        "seconds": round(secs, 3),
                        "shards": n,
                        "samples": total,
                        "samples_per_s": round(total / secs) if secs else None,
                    }
                ),
                flush=True,
            )
        assert counts.count_samples(built) == counts.count_samples(plain) == total
        print(
            json.dumps(
                {
                    "bench": "startup",
                    "machine": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                }
            )
        )
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
