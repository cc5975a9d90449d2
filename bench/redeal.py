"""Resume on another number of processes: the time to find what a pass has left and deal it out.

    .venv/bin/python bench/redeal.py                                   # LAION-400M-sized pass
    .venv/bin/python bench/redeal.py --shards 1000 --per-shard 1000    # a quick one

A run saved mid-pass on `--ranks` processes x `--workers` workers resumes on half as many
processes: every new process replays each old worker's shuffle buffer on positions and deals the
samples left (`data_tools.redeal.rest_of_pass`), once, before its first batch. Every old worker
had taken half its stream. Only counts are needed (no shard is opened), so none is written.

Prints one JSON line: {"bench": "redeal", "seconds": ..., "samples": N, "left": M, ...}.
"""

from __future__ import annotations

import argparse
import json
import time

from data_tools.read_plan import ReadPlan
from data_tools.redeal import Segment, rest_of_pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=41_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--ranks", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--buffer", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    shards = tuple(f"{i:06d}.tar" for i in range(args.shards))
    plan = ReadPlan(
        sources=(shards,),
        weights=None,
        batch_size=args.batch_size,
        mode="epoch",
        shuffle_buffer=args.buffer,
        seed=0,
        epoch=3,
        rank=0,
        world_size=args.ranks // 2,
        workers=args.workers,
        drop_last=True,
        with_label=False,
        with_json=False,
        max_pixels=1 << 30,
    )
    per_worker = args.shards * args.per_shard // (args.ranks * args.workers)
    batches = per_worker // 2 // args.batch_size
    taken = batches * args.batch_size
    seg = Segment(
        world_size=args.ranks,
        workers=args.workers,
        batch_size=args.batch_size,
        batches=(batches * args.workers,) * args.ranks,
        positions=(((batches, taken),) * args.workers,) * args.ranks,
    )
    t = time.perf_counter()
    rest = rest_of_pass(plan, [args.per_shard] * args.shards, [seg])
    seconds = time.perf_counter() - t
    print(
        json.dumps(
            {
                "bench": "redeal",
                "seconds": round(seconds, 2),
                "samples": rest.total,
                "left": rest.left,
                "from": f"{args.ranks} x {args.workers}",
                "to": f"{args.ranks // 2} x {args.workers}",
                "buffer": args.buffer,
            }
        )
    )


if __name__ == "__main__":
    main()
