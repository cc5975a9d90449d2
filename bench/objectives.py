"""Which loss terms help: fixed-budget `clip-train train` runs of each objective, evaluated alike.

    .venv/bin/python bench/objectives.py                                  # synthetic set, 3 seeds
    .venv/bin/python bench/objectives.py --data ../shared/data/icons      # real icons
    .venv/bin/python bench/objectives.py --objectives clip clip+simclr --seeds 0

Every objective trains the same model (`--config`, the demo's sizes by default) on the same
shards for the same number of steps with the same seed and hyper-parameters; only `loss.*` (and
what a term needs: `model.text.dropout` for simcse) differs. Each run is then evaluated by
`clip-eval` on the held-out zero-shot and retrieval splits. The objectives are the terms of
docs/objectives.md, each beside `clip` at the weight in `OBJECTIVES` (siglip and margin alone,
as their papers train them).

Labels for `supcon`: `../shared/data/icons` carries `.cls` in its train split; the synthetic
set's train split does not, so a labelled copy is written beside it in --work with each sample's
"<colour> <kind>" class (the zero-shot split's class names) taken from its `.json`.

Cost: samples/s of each run (median of its logged windows) over clip's in the same seed; the
objectives of a seed run one after the other in an order rotated per seed, so a drift in machine
load does not always fall on the same term. The logged samples/s mean something only on a
machine that runs nothing else; `--no-eval --steps 40` gives that column alone, cheaply:

    .venv/bin/python bench/objectives.py --data ../shared/data/icons --steps 40 --no-eval --seeds 0

Prints one JSON line per run on stdout and, on stderr, a markdown table of means and standard
deviations over seeds (the one in docs/objectives.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from time_to_quality import build_synth, evaluate  # noqa: E402  (bench/, beside this file)

# objective -> the overrides that select it (a term's options are its defaults unless given)
OBJECTIVES: dict[str, list[str]] = {
    "clip": ["loss.name=clip"],
    "siglip": ["loss.terms=[{name: siglip}]"],
    "clip+simclr": ["loss.terms=[{name: clip}, {name: simclr, weight: 0.5}]"],
    "clip+moco": ["loss.terms=[{name: clip}, {name: moco, weight: 0.5}]"],
    "clip+simcse": [
        "loss.terms=[{name: clip}, {name: simcse, weight: 0.5}]",
        "model.text.dropout=0.1",
    ],
    "clip+supcon": ["loss.terms=[{name: clip}, {name: supcon, weight: 0.5}]"],
    "clip+byol": ["loss.terms=[{name: clip}, {name: byol, weight: 0.5}]"],
    "margin": ["loss.terms=[{name: margin}]"],
}
METRICS = {
    "final_loss": "final train loss",
    "acc1": "zero-shot top-1",
    "text_retrieval_recall@1": "i->t R@1",
    "image_retrieval_recall@1": "t->i R@1",
    "text_retrieval_recall@10": "i->t R@10",
    "image_retrieval_recall@10": "t->i R@10",
}


def log(msg: str) -> None:
    print(f"[objectives] {msg}", file=sys.stderr, flush=True)


def labelled_synth(data: Path) -> Path:
    """A copy of the synthetic set whose train samples carry `.cls` (for supcon)."""
    out = data.parent / f"{data.name}-labelled"
    if (out / "train").is_dir():
        return out
    classes = (data / "zeroshot" / "classnames.txt").read_text().splitlines()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    for shard in sorted((data / "train").glob("*.tar")):
        with tarfile.open(shard) as src, tarfile.open(tmp / "train" / shard.name, "w") as dst:
            for member in src.getmembers():
                payload = src.extractfile(member).read()
                dst.addfile(member, io.BytesIO(payload))
                if member.name.endswith(".json"):
                    fields = json.loads(payload)
                    label = classes.index(f"{fields['colour']} {fields['kind']}")
                    cls = tarfile.TarInfo(member.name[: -len(".json")] + ".cls")
                    body = str(label).encode()
                    cls.size, cls.mtime = len(body), member.mtime
                    dst.addfile(cls, io.BytesIO(body))
    for split in ("zeroshot", "retrieval"):
        (tmp / split).symlink_to((data / split).resolve())
    tmp.rename(out)
    return out


def train(a, data: Path, objective: str, seed: int) -> dict:
    name = f"{objective}-s{seed}"
    out = Path(a.work) / "runs" / data.name
    shutil.rmtree(out / name, ignore_errors=True)
    overrides = [
        f"data.train={data / 'train'}",
        f"data.num_workers={a.workers}",
        f"train.steps={a.steps}",
        f"train.batch_size={a.batch}",
        f"optim.warmup_steps={a.warmup}",
        f"train.seed={seed}",
        "train.log_every=10",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
        "run.progress=false",
        f"run.output_dir={out}",
        f"run.name={name}",
        *OBJECTIVES[objective],
    ]
    cmd = [sys.executable, "-m", "clip_train", "train", "--config", a.config, *overrides]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="" if a.device == "cpu" else "0")
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"{objective}, seed {seed}: clip-train failed:\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "data": data.name,
        "objective": objective,
        "seed": seed,
        "steps": rows[-1]["step"],
        "wall_s": round(wall, 1),
        "final_loss": round(statistics.fmean(r["loss"] for r in rows[-3:]), 4),
        "terms": {k: round(v, 4) for k, v in rows[-1].items() if k.startswith("loss/")},
        "samples_per_s": round(statistics.median(r["samples_per_s"] for r in rows[1:]), 1),
        **({} if a.no_eval else evaluate(["--model", str(out / name)], data, out / name, a.device)),
    }


def table(results: list[dict], objectives: list[str]) -> str:
    """Markdown: mean ± sd over seeds per objective, and samples/s relative to clip."""
    head = ["objective", *METRICS.values(), "samples/s vs clip"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    clip = {r["seed"]: r["samples_per_s"] for r in results if r["objective"] == "clip"}
    for objective in objectives:
        rows = [r for r in results if r["objective"] == objective]
        if not rows:
            continue
        cells = [f"`{objective}`"]
        for key in METRICS:
            values = [r[key] for r in rows if key in r]
            cells.append(_mean_sd(values, 2 if key == "final_loss" else 1))
        ratios = [r["samples_per_s"] / clip[r["seed"]] for r in rows if r["seed"] in clip]
        cells.append(_mean_sd(ratios, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_sd(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="train/, zeroshot/, retrieval/ (default: a synthetic set)")
    p.add_argument("--synth-samples", type=int, default=8000)
    p.add_argument("--work", default="/tmp/clip-train-objectives")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--no-eval",
        action="store_true",
        help="train only: short runs on a quiet machine for the samples/s column",
    )
    p.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSONL",
        help="print the table of earlier runs (this script's stdout) and exit",
    )
    a = p.parse_args(argv)
    if a.table_from:
        lines = [line for f in a.table_from for line in Path(f).read_text().splitlines()]
        rows = [json.loads(line) for line in lines if line.startswith("{")]
        # the synthetic set's labelled copy holds the same samples: one table
        runs = [
            {**r, "data": r["data"].removesuffix("-labelled")} for r in rows if "objective" in r
        ]
        for name in sorted({r["data"] for r in runs}):
            print(f"\n{name}\n" + table([r for r in runs if r["data"] == name], list(OBJECTIVES)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.data:
        data = Path(a.data).resolve()
    else:
        data = build_synth(work, a.synth_samples)
        if "clip+supcon" in a.objectives:
            data = labelled_synth(data)
    print(
        json.dumps(
            {
                "bench": "objectives",
                "data": str(data),
                "config": a.config,
                "steps": a.steps,
                "batch": a.batch,
                "warmup": a.warmup,
                "workers": a.workers,
                "device": a.device,
                "cpus": os.cpu_count(),
                "load_avg": os.getloadavg()[0],
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
            }
        ),
        flush=True,
    )
    results = []
    for i, seed in enumerate(a.seeds):
        k = i % len(a.objectives)
        for objective in a.objectives[k:] + a.objectives[:k]:
            log(f"seed {seed}: {objective}, {a.steps} steps")
            results.append(train(a, data, objective, seed))
            print(json.dumps(results[-1]), flush=True)
    log(f"load average at the end: {os.getloadavg()[0]:.1f}\n" + table(results, a.objectives))


if __name__ == "__main__":
    main()
