"""End to end: `clip-train train` against open_clip_train's own `main`, whole processes, as run.

    bash bench/openclip_env.sh                                   # once: the OpenCLIP venv
    .venv/bin/python bench/end_to_end.py --data ../shared/data/icons --epochs 2 --rounds 2
    .venv/bin/python bench/end_to_end.py                         # the synthetic set

The same set-up as bench/time_to_quality.py (its run functions: the bench_tiny sizes, the same
shards, batch, schedule, AdamW, seed, loader workers, fp32, the same number of steps) without
the evaluation: what is measured is the training process, from launch to exit (imports, start-up,
every step with its data loading and logging, the final checkpoint). Four sides, run in a
rotating order within each round so that drifts of the machine's load reach all of them:

- `ours`: `clip-train train` as a user runs it (the command tunes glibc malloc,
  `train.tune_malloc`, clip_train/allocator.py);
- `ours_untuned`: the same with `train.tune_malloc=false`;
- `openclip`: open_clip_train as installed;
- `openclip_tuned`: open_clip_train with the same malloc settings through the environment
  (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), what an OpenCLIP user can set.

JSON lines on stdout: one per run (wall seconds, steps, median in-loop samples/s over the steps
after the first --skip) and a summary per pair with ratios of wall time (OpenCLIP / ours, > 1 =
ours faster) from the medians over rounds, each pair naming what differs (PAIRS); the first,
the headline, is like for like: both processes with the same malloc settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import time_to_quality as ttq  # noqa: E402  (bench/, beside this file)

from clip_train.allocator import MMAP_THRESHOLD_MAX, TRIM_THRESHOLD  # noqa: E402

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX),
    "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD),
}
SIDES = ("ours", "ours_untuned", "openclip", "openclip_tuned")
# (ours side, OpenCLIP side, what differs): the first is like for like
PAIRS = (
    ("ours", "openclip_tuned", "like for like: both with the same malloc settings"),
    ("ours", "openclip", "as each is run: ours tunes malloc itself, OpenCLIP runs as installed"),
    ("ours_untuned", "openclip", "neither tunes malloc"),
)


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def run_side(side: str, a, python: str, data: Path, steps: int, spe: int, work: Path, cfg):
    if side.startswith("ours"):
        args = copy.copy(a)
        args.ours = [*a.ours, *(["train.tune_malloc=false"] if side == "ours_untuned" else [])]
        return ttq.run_ours(args, data, a.seed, steps, work, tag=side, evaluate_after=False)
    env = MALLOC_ENV if side == "openclip_tuned" else None
    return ttq.run_openclip(
        a, python, data, a.seed, spe, work, cfg, tag=side, env=env, evaluate_after=False
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder with train/ (default: a synthetic set in --work)")
    p.add_argument("--synth-samples", type=int, default=10000)
    p.add_argument("--work", default="/tmp/clip-train-e2e")
    p.add_argument("--epochs", type=int, default=2, help="passes over the train shards")
    p.add_argument("--rounds", type=int, default=2, help="runs of every side, order rotated")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--skip", type=int, default=5, help="first steps left out of samples/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ours", nargs="*", default=[], help="extra clip-train overrides")
    p.add_argument("--openclip-python", help="python of the OpenCLIP venv")
    a = p.parse_args(argv)

    from clip_train.config import load_config

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data).resolve() if a.data else ttq.build_synth(work, a.synth_samples)
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", [f"data.train={data / 'train'}"])
    python = (
        a.openclip_python
        or (
            subprocess.run(
                ["bash", str(ROOT / "bench" / "openclip_env.sh")],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    )
    spe = ttq.openclip_steps_per_epoch(ttq.shard_counts(data / "train"), a.batch, a.workers)
    if spe == 0:
        raise SystemExit(f"{data / 'train'}: too few samples for batch {a.batch}")
    steps = spe * a.epochs
    common = {
        "bench": "end_to_end",
        "data": str(data),
        "steps": steps,
        "batch": a.batch,
        "workers": a.workers,
        "device": a.device,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
    }
    print(json.dumps(common), flush=True)
    wall: dict[str, list[float]] = {s: [] for s in a.sides}
    speed: dict[str, list[float]] = {s: [] for s in a.sides}
    for r in range(a.rounds):
        order = a.sides[r % len(a.sides) :] + a.sides[: r % len(a.sides)]
        for side in order:
            log(f"round {r + 1}/{a.rounds}: {side}, {steps} steps")
            res = run_side(side, a, python, data, steps, spe, work, cfg)
            sps = statistics.median(res["samples_per_s"][a.skip :])
            wall[side].append(res["wall_s"])
            speed[side].append(sps)
            row = {"round": r, "side": side, "steps": res["steps"], "wall_s": res["wall_s"]}
            row.update(median_samples_per_s=round(sps, 1), load=round(os.getloadavg()[0], 2))
            print(json.dumps(row), flush=True)
    med = statistics.median
    for ours, theirs, differs in PAIRS:
        if ours not in wall or theirs not in wall:
            continue
        summary = {
            "pair": f"{ours} vs {theirs}",
            "differs": differs,
            "wall_s": {ours: med(wall[ours]), theirs: med(wall[theirs])},
            "wall_ratio": round(med(wall[theirs]) / med(wall[ours]), 3),
            "samples_per_s": {
                ours: round(med(speed[ours]), 1),
                theirs: round(med(speed[theirs]), 1),
            },
            "samples_per_s_ratio": round(med(speed[ours]) / med(speed[theirs]), 3),
            "ratio_meaning": "OpenCLIP / ours wall time, ours / OpenCLIP in-loop samples/s; "
            "> 1 = ours faster",
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
