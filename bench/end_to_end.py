"""End to end: `clip-train train` against open_clip_train's own `main`, whole processes, as run.

    bash bench/openclip_env.sh                                   # once: the OpenCLIP venv
    .venv/bin/python bench/end_to_end.py --data ../shared/data/icons --epochs 8 --rounds 2
    .venv/bin/python bench/end_to_end.py                         # the synthetic set

The set-up of bench/time_to_quality.py (its run functions: the bench_tiny sizes, the same shards,
batch, schedule, AdamW hyper-parameters, seed, loader workers, fp32, the same number of steps)
without its evaluation: what is timed is each training process from launch to exit (imports,
start-up, every step with its data loading and logging, the final checkpoint). The two sides run
alternately, first side swapped every round, so a drift in the machine's speed reaches both.
What differs by design (as in time_to_quality): our fused AdamW, trimmed text tower, loader and
data order.

JSON lines on stdout: one per run (wall seconds, steps, median in-loop samples/s after the first
--skip steps, the start-up and tail outside the loop) and a summary: the ratio of the median wall
times (OpenCLIP / ours, > 1 = ours faster) and of in-loop samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import time_to_quality as ttq  # noqa: E402  (bench/, beside this file)
from train_step import openclip_python  # noqa: E402

DIFFERS = (
    "by design: ours fused AdamW, trimmed text tower, our loader and data order; the same "
    "shards, sizes, hyper-parameters, workers and steps"
)


def log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def run_side(side: str, a, python: str, data: Path, steps: int, spe: int, work: Path, cfg):
    if side == "ours":
        return ttq.run_ours(a, data, a.seed, steps, work, evaluate_after=False)
    return ttq.run_openclip(a, python, data, a.seed, spe, work, cfg, evaluate_after=False)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder with train/ (default: a synthetic set in --work)")
    p.add_argument("--synth-samples", type=int, default=10000)
    p.add_argument("--work", default="/tmp/clip-train-e2e")
    p.add_argument("--epochs", type=int, default=8, help="passes over the train shards")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, first side swapped")
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
    python = openclip_python(a)  # bench/openclip_env.sh's venv unless --openclip-python
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
    wall: dict[str, list[float]] = {"ours": [], "openclip": []}
    speed: dict[str, list[float]] = {"ours": [], "openclip": []}
    for r in range(a.rounds):
        for side in ("ours", "openclip") if r % 2 == 0 else ("openclip", "ours"):
            log(f"round {r + 1}/{a.rounds}: {side}, {steps} steps")
            res = run_side(side, a, python, data, steps, spe, work, cfg)
            sps = res["samples_per_s"][a.skip :]
            in_loop = sum(a.batch / x for x in res["samples_per_s"])  # every logged step
            wall[side].append(res["wall_s"])
            speed[side].append(statistics.median(sps))
            row = {"round": r, "side": side, "steps": res["steps"], "wall_s": res["wall_s"]}
            row.update(
                median_samples_per_s=round(statistics.median(sps), 1),
                outside_loop_s=round(res["wall_s"] - in_loop, 1),
                load=round(os.getloadavg()[0], 2),
            )
            print(json.dumps(row), flush=True)
    med = statistics.median
    summary = {
        "summary": "end_to_end",
        "differs": DIFFERS,
        "wall_s": {k: med(v) for k, v in wall.items()},
        "wall_ratio": round(med(wall["openclip"]) / med(wall["ours"]), 3),
        "samples_per_s": {k: round(med(v), 1) for k, v in speed.items()},
        "samples_per_s_ratio": round(med(speed["ours"]) / med(speed["openclip"]), 3),
        "ratio_meaning": "OpenCLIP / ours wall time, ours / OpenCLIP in-loop samples/s; "
        "> 1 = ours faster",
        "steps": steps,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
