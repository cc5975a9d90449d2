"""Time to quality: `clip-train train` against open_clip_train's own `main`, same data, same sizes.

    bash bench/openclip_env.sh                                   # once: the OpenCLIP venv
    .venv/bin/python bench/time_to_quality.py                    # synthetic set, 3 seeds
    .venv/bin/python bench/time_to_quality.py --data ../shared/data/icons --epochs 6 --seeds 0 1 2
    .venv/bin/python bench/time_to_quality.py --data DIR --equal-time   # also ours at OpenCLIP's
                                                                        # wall time
    .venv/bin/python bench/time_to_quality.py --data DIR --same-init    # one initial draw per seed
    .venv/bin/python bench/time_to_quality.py --data DIR --same-init --against ours \
        --ours optim.decay_rule=open_clip                          # an ablation of ours, paired

--data is a folder with train/, zeroshot/ (classnames.txt, templates.txt) and retrieval/ shards,
the layout `clip-data synth` writes (the default builds one in --work). Both trainers get:
- the model of `configs/bench_tiny.yaml` (OpenCLIP: an open_clip config of the same sizes, its
  own ViT and text tower; ours: the timm ViT tower and open_clip's text transformer);
- the same shards, batch, lr, warmup, cosine schedule, weight decay, AdamW betas/eps, seed,
  loader workers and fp32 on the CPU (`--device cuda` for both on a GPU: amp/bf16 is not used);
- the same number of optimizer steps: `--epochs` x `spe`, where spe is the smallest number of full
  batches any of open_clip_train's loader workers can give from its share of the shards, times
  the workers (its `--train-num-samples` is set to spe x batch, so its schedule and ours agree;
  with uneven shards a worker of OpenCLIP may wrap around within its epoch).
What differs, by design, is listed in the setup line: the trainers' own data orders (ours: epoch
mode, shards split by worker, a --shuffle-buffer sample buffer; OpenCLIP: its shard shuffle and
5000-sample buffer), our fused AdamW, and the weight-decay groups (open_clip_train decays the
position and token embeddings; `--against ours --ours optim.decay_rule=open_clip` measures that).

Both runs are evaluated by `clip-eval` on the held-out splits (zero-shot and retrieval). Prints a
side-by-side train-loss curve (means over --window steps) on stderr and JSON lines on stdout: one
per run, one per seed with ratios (ours / OpenCLIP; for losses < 1 is better, for metrics > 1),
and a summary with means over seeds. `--equal-time` also trains ours for as many steps as fit in
OpenCLIP's whole-process wall time of the same seed (its own schedule over those steps).

The summary also gives, per metric and per point of the loss curve, our mean minus OpenCLIP's
with Welch's 95% confidence interval over the seeds and a verdict (`ahead`, `behind`, or `level`
when the interval holds 0): open_clip_train's runs are not repeatable, so "no worse" is a claim
about means over seeds, not about one run. `--same-init` starts both trainers of a seed from the
same weights (open_clip's `CLIP` as it initialises under the seed; ours loads them through
`model.init_from=open_clip:FILE`, open_clip_train through `--pretrained FILE`): the initial draw,
which sets much of where a run ends, is then held still, and the summary's intervals pair the
runs by seed. `--summarize LOG [LOG ...]` trains nothing and prints that summary over the runs in
earlier invocations' stdout (more seeds, added later; a seed run by several invocations pairs by
the mean of its runs on each side).

`--against ours` changes the reference side from open_clip_train to our default (no `--ours`
overrides): each seed trains ours twice, as configured (side `ours`) and with the overrides (side
`ours_ablation`), and the summary gives the ablation minus the default. With `--same-init` both
start from the same weights and our stream is seeded, so the pair differs in the overrides alone
and the intervals are paired: one change at a time, several seeds, without open_clip_train's
unseeded stream in the spread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import openclip_sizes  # noqa: E402  (bench/, beside this file)


def log(msg: str) -> None:
    print(f"[ttq] {msg}", file=sys.stderr, flush=True)


def build_synth(work: Path, samples: int) -> Path:
    out = work / f"synth-{samples}"
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_tools",
                "synth",
                "--output",
                str(out),
                "--train-samples",
                str(samples),
                "-q",
            ],
            check=True,
            cwd=ROOT,
            stdout=sys.stderr,
        )
    return out


def shard_counts(train: Path) -> list[int]:
    """Samples per train shard, from tar headers (keys with a .txt member)."""
    counts = []
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            counts.append(sum(1 for m in tar.getmembers() if m.name.endswith(".txt")))
    return counts


def openclip_steps_per_epoch(counts: list[int], batch: int, workers: int) -> int:
    """Full batches per pass in open_clip_train's epoch mode: worker w reads shards w, w+W, ...,
    and drops its last partial batch; `with_epoch` caps every worker at the same number."""
    per_worker = [sum(counts[w::workers]) // batch for w in range(workers)]
    return min(per_worker) * workers


def _device_env(device: str) -> dict:
    """The same device and matmul precision for both trainers: open_clip_train turns TF32 on when it
    finds CUDA, clip-train keeps strict fp32, so TF32 is switched off for both."""
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def save_open_clip_dir(state: dict, cfg, local: Path) -> Path:
    """open_clip's weights of the bench sizes as an open_clip folder (`local-dir:`, clip-eval)."""
    import torch

    local.mkdir(parents=True, exist_ok=True)
    torch.save(state, local / "open_clip_pytorch_model.bin")
    (local / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": openclip_sizes(cfg), "preprocess_cfg": {}})
    )
    return local


def initial_weights(cfg, seed: int, work: Path) -> Path:
    """open_clip's `CLIP` of the bench sizes as it initialises under `seed`, saved for both
    trainers (`--same-init`): the draw of the initial weights is the largest source of spread
    between runs, and with it held still a seed pairs the two trainers' runs."""
    import open_clip
    import torch

    from data_tools.io import atomic_path

    torch.manual_seed(seed)
    model = open_clip.CLIP(**openclip_sizes(cfg))
    path = work / f"init-s{seed}.pt"
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def run_openclip(
    a,
    python: str,
    data: Path,
    seed: int,
    steps_per_epoch: int,
    out: Path,
    cfg,
    tag: str = "openclip",
    env: dict[str, str] | None = None,
    evaluate_after: bool = True,
    init: Path | None = None,
) -> dict:
    """open_clip_train's `main` on `data`; `env` is added to its environment; `init`, an open_clip
    state dict, is its starting point (`--pretrained`); the result has its wall time, per-step
    losses and samples/s and (unless not `evaluate_after`) metrics."""
    name = f"{tag}-s{seed}"
    shutil.rmtree(out / name, ignore_errors=True)
    config = out / "ttq_bench_tiny.json"
    config.write_text(json.dumps(openclip_sizes(cfg)))
    shards = "::".join(str(p) for p in sorted((data / "train").glob("*.tar")))
    args = [
        "--train-data",
        shards,
        "--dataset-type",
        "webdataset",
        "--train-num-samples",
        str(steps_per_epoch * a.batch),
        "--epochs",
        str(a.epochs),
        "--batch-size",
        str(a.batch),
        "--lr",
        str(a.lr),
        "--wd",
        str(a.wd),
        "--warmup",
        str(a.warmup),
        "--beta1",
        "0.9",
        "--beta2",
        "0.999",
        "--eps",
        "1e-8",
        "--workers",
        str(a.workers),
        "--seed",
        str(seed),
        "--model",
        "ttq_bench_tiny",
        "--precision",
        "fp32",
        "--device",
        a.device,
        "--logs",
        str(out),
        "--name",
        name,
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        str(a.epochs),
        "--zeroshot-frequency",
        "0",
        *(["--pretrained", str(init)] if init else []),
    ]
    start = time.perf_counter()
    r = subprocess.run(
        [python, str(ROOT / "bench" / "_openclip_train.py"), str(config), "--", *args],
        capture_output=True,
        text=True,
        cwd=out,
        env={**_device_env(a.device), **(env or {})},
    )
    wall = time.perf_counter() - start
    logfile = out / name / "out.log"
    if r.returncode != 0 or not logfile.is_file():
        raise SystemExit(f"open_clip_train failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    log_text = logfile.read_text()
    if init and str(init) not in log_text:  # open_clip logs the file it loads weights from
        raise SystemExit(f"open_clip_train did not say it loaded {init}: see {logfile}")
    losses = [float(x) for x in re.findall(r"Contrastive_loss: ([-+0-9.eE]+|nan|inf) ", log_text)]
    speeds = [float(x) for x in re.findall(r" ([0-9.]+)/s/gpu", log_text)]
    result = {"side": tag, "seed": seed, "steps": len(losses), "wall_s": round(wall, 1)}
    result.update(losses=losses, samples_per_s=speeds)
    if not evaluate_after:
        return result
    ckpt = out / name / "checkpoints" / f"epoch_{a.epochs}.pt"
    # The checkpoint as an open_clip local directory for clip-eval (weights only, no optimizer).
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    local = save_open_clip_dir(state, cfg, out / name / "open_clip")
    model = ["--model", f"local-dir:{local}"]  # clip-eval finds the weight file as open_clip does
    return {**result, **evaluate(model, data, out / name, a.device)}


def run_ours(
    a,
    data: Path,
    seed: int,
    steps: int,
    out: Path,
    tag: str = "ours",
    env: dict[str, str] | None = None,
    evaluate_after: bool = True,
    init: Path | None = None,
    extra: list[str] | None = None,
) -> dict:
    """`clip-train train` on `data` (overrides `extra` added, by default `a.ours`); as
    `run_openclip` (`init` through `model.init_from=open_clip:FILE`)."""
    name = f"{tag}-s{seed}"
    shutil.rmtree(out / name, ignore_errors=True)
    overrides = [
        f"data.train={data / 'train'}",
        f"train.steps={steps}",
        f"train.batch_size={a.batch}",
        f"optim.lr={a.lr}",
        f"optim.weight_decay={a.wd}",
        f"optim.warmup_steps={a.warmup}",
        "optim.beta1=0.9",
        "optim.beta2=0.999",
        "optim.eps=1e-8",
        f"data.num_workers={a.workers}",
        f"data.shuffle_buffer={a.shuffle_buffer}",
        f"train.seed={seed}",
        "train.log_every=1",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
        "run.progress=false",
        f"run.output_dir={out}",
        f"run.name={name}",
        *([f"model.init_from=open_clip:{init}"] if init else []),
        *(a.ours if extra is None else extra),
    ]
    env = {**_device_env(a.device), **(env or {})}
    start = time.perf_counter()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_train",
            "train",
            "--config",
            str(ROOT / "configs" / "bench_tiny.yaml"),
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    wall = time.perf_counter() - start
    if r.returncode != 0:
        raise SystemExit(f"clip-train failed (rc {r.returncode}):\n{r.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows]
    result = {"side": tag, "seed": seed, "steps": len(losses), "wall_s": round(wall, 1)}
    result.update(losses=losses, samples_per_s=[row["samples_per_s"] for row in rows])
    if not evaluate_after:
        return result
    return {**result, **evaluate(["--model", str(out / name)], data, out / name, a.device)}


def evaluate(model: list[str], data: Path, where: Path, device: str) -> dict:
    """clip-eval's zero-shot and retrieval metrics on the held-out splits, in percent."""
    metrics = {}
    for task, split in (("zero-shot", "zeroshot"), ("retrieval", "retrieval")):
        if not (data / split).is_dir():
            continue
        result = where / f"eval_{split}.json"
        cmd = [
            sys.executable,
            "-m",
            "clip_eval",
            task,
            *model,
            "--data",
            str(data / split),
            "--device",
            device,
            "--no-progress",
            "--results-file",
            str(result),
        ]
        if task == "zero-shot":
            cmd.append("--no-cache")
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise SystemExit(f"clip-eval failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
        found = json.loads(result.read_text())
        found = found.get("metrics", found)
        for k, v in found.items():
            if isinstance(v, float):
                metrics[k] = round(100 * v, 2) if v <= 1 else v
    return metrics


def curve(losses: list[float], window: int) -> list[float]:
    return [
        round(statistics.fmean(losses[i : i + window]), 3) for i in range(0, len(losses), window)
    ]


KEYS = [
    "final_loss",
    "wall_s",
    "acc1",
    "acc5",
    "mean_per_class_recall",
    "image_retrieval_recall@1",
    "image_retrieval_recall@5",
    "image_retrieval_recall@10",
    "text_retrieval_recall@1",
    "text_retrieval_recall@5",
    "text_retrieval_recall@10",
]
LOWER_IS_BETTER = {"final_loss", "wall_s"}


def difference(
    ours: list[float], theirs: list[float], lower_is_better: bool, paired: bool = False
) -> dict:
    """Mean of ours minus mean of OpenCLIP's over seeds, with a 95% confidence interval (scipy),
    and a verdict: `ahead` or `behind` when the interval excludes 0, else `level`.

    Welch's interval by default: with their own initial weights a seed does not pair two runs
    (each trainer draws its own, and open_clip_train's data order is not repeatable). `paired`
    (both started from the same weights, `--same-init`, runs in seed order): the t interval of
    the per-seed differences.
    """
    import warnings

    from scipy.stats import ttest_ind, ttest_rel

    diff = statistics.fmean(ours) - statistics.fmean(theirs)
    row: dict = {"diff": round(diff, 4), "ci95": None, "verdict": None}
    spread = (
        statistics.pstdev(o - t for o, t in zip(ours, theirs))
        if paired
        else statistics.pstdev(ours) or statistics.pstdev(theirs)
    )
    if len(ours) > 1 and len(theirs) > 1:
        lo = hi = diff  # no spread: every seed differs by the same amount (often 0)
        if spread:
            with warnings.catch_warnings():  # a side whose runs agree to rounding: still a CI
                warnings.simplefilter("ignore", RuntimeWarning)
                test = (
                    ttest_rel(ours, theirs) if paired else ttest_ind(ours, theirs, equal_var=False)
                )
                lo, hi = test.confidence_interval(0.95)
        better, worse = (hi < 0, lo > 0) if lower_is_better else (lo > 0, hi < 0)
        row["ci95"] = [round(float(lo), 4), round(float(hi), 4)]
        row["verdict"] = "ahead" if better else "behind" if worse else "level"
    return row


def per_seed(runs: list[dict], points: int) -> list[dict]:
    """One row per seed, in seed order: the mean of the seed's runs per metric and loss-curve point.
    Runs of one start from several invocations (`--summarize` over them) then pair as one: the
    stream of open_clip_train differs between invocations, so their mean estimates it better."""
    rows = []
    for seed in sorted({r["seed"] for r in runs}):
        rs = [r for r in runs if r["seed"] == seed]
        row = {
            "seed": seed,
            "steps": rs[0]["steps"] if all(r["steps"] == rs[0]["steps"] for r in rs) else None,
        }
        row.update({k: statistics.fmean(r[k] for r in rs) for k in KEYS if all(k in r for r in rs)})
        row["loss_curve"] = [
            statistics.fmean(c) for c in zip(*(r["loss_curve"][:points] for r in rs))
        ]
        rows.append(row)
    return rows


def summarize(runs: list[dict], steps: int, window: int, reference: str = "openclip") -> dict:
    """Means over seeds per side, ratios to the `reference` side's (OpenCLIP's, or our default's
    for `--against ours`), and each other side's difference from it (`difference`) per metric and
    per point of the loss curve up to `steps`."""
    sides: dict[str, list[dict]] = {}
    for r in runs:
        sides.setdefault(r["side"], []).append(r)
    out: dict = {
        "summary": "time_to_quality",
        "seeds": sorted({r["seed"] for r in runs}),
        "steps": steps,
    }
    points = -(-steps // window)
    # Means over seeds (a seed run more than once counts once), as the paired differences take them.
    by_seed = {side: per_seed(rs, points) for side, rs in sides.items()}
    for side, rows in by_seed.items():
        out[side] = {
            k: round(statistics.fmean(r[k] for r in rows), 4)
            for k in KEYS
            if all(k in r for r in rows)
        }
        out[side]["runs"] = len(sides[side])
        out[side]["loss_curve"] = [
            round(statistics.fmean(c), 3) for c in zip(*(r["loss_curve"] for r in rows))
        ]
    for side in [s for s in sides if s != reference and reference in sides]:
        ours, theirs = sides[side], sides[reference]
        # Runs from the same initial weights pair by seed (`--same-init`).
        paired = {r["seed"] for r in ours} == {r["seed"] for r in theirs} and all(
            r.get("init") == "shared" for r in ours + theirs
        )
        if paired:
            ours, theirs = by_seed[side], by_seed[reference]
        out[f"{side}_minus_{reference}_paired"] = paired
        out[f"{side}_ratio"] = {
            k: round(out[side][k] / out[reference][k], 3)
            for k in KEYS
            if out[side].get(k) and out[reference].get(k)
        }
        out[f"{side}_minus_{reference}"] = {
            k: difference(
                [r[k] for r in ours], [r[k] for r in theirs], k in LOWER_IS_BETTER, paired
            )
            for k in KEYS
            if k in out[side] and k in out[reference] and k != "wall_s"
        }
        if all(r["steps"] == steps for r in ours):  # same schedule: the curves compare
            out[f"{side}_minus_{reference}"]["loss_curve"] = [
                difference(list(o), list(t), True, paired)
                for o, t in zip(
                    zip(*(r["loss_curve"][:points] for r in ours)),
                    zip(*(r["loss_curve"][:points] for r in theirs)),
                )
            ]
        for k, d in out[f"{side}_minus_{reference}"].items():
            for i, row in enumerate(d if k == "loss_curve" else [d]):
                what = f"loss, steps to {min(steps, (i + 1) * window)}" if k == "loss_curve" else k
                ci = "[{:+.3f}, {:+.3f}]".format(*row["ci95"]) if row["ci95"] else ""
                verdict = row["verdict"] or "one run"
                verdict += " (paired)" if paired and row["ci95"] else ""
                log(f"{side} - {reference}: {what:32s} {row['diff']:+8.3f} {ci:20s} {verdict}")
    return out


def summarize_logs(paths: list[str]) -> dict:
    """`summarize` over the per-run JSON lines of earlier runs' stdout (several seeds' logs)."""
    runs, steps, reference = [], None, "openclip"
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if not line.startswith("{"):
                continue
            row = json.loads(line)
            if row.get("bench") == "time_to_quality":
                if steps not in (None, row["steps"]):
                    raise SystemExit(f"{path}: {row['steps']} steps, other logs {steps}")
                steps = row["steps"]
                reference = row.get("against", reference)
            elif "side" in row:
                runs.append(row)
    if not runs or steps is None:
        raise SystemExit(f"no time_to_quality runs in {' '.join(paths)}")
    return summarize(runs, steps, runs[0].get("window", 20), reference)


def compare(ours: dict, theirs: dict, keys: list[str]) -> dict:
    """Per metric: both sides' values (named by their `side`) and the ratio of the first's."""
    row = {}
    for k in keys:
        if k in ours and k in theirs:
            row[k] = {
                ours["side"]: ours[k],
                theirs["side"]: theirs[k],
                "ratio": round(ours[k] / theirs[k], 3) if theirs[k] else None,
            }
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        help="folder with train/, zeroshot/, retrieval/ (default: a synthetic set in --work)",
    )
    p.add_argument("--synth-samples", type=int, default=10000)
    p.add_argument("--work", default="/tmp/clip-train-ttq")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--epochs", type=int, default=6, help="passes over the train shards (both trainers)"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="ours (data.shuffle_buffer)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--window", type=int, default=20, help="steps per point of the printed loss curves"
    )
    p.add_argument(
        "--equal-time", action="store_true", help="also train ours for OpenCLIP's wall time"
    )
    p.add_argument(
        "--same-init",
        action="store_true",
        help="start both trainers from the same weights per seed (open_clip's init; pairs runs)",
    )
    p.add_argument("--ours", nargs="*", default=[], help="extra clip-train overrides (an ablation)")
    p.add_argument(
        "--against",
        choices=["openclip", "ours"],
        default="openclip",
        help="the reference side: open_clip_train, or ours without the --ours overrides",
    )
    p.add_argument(
        "--openclip-python", help="python of the OpenCLIP venv (default: bench/openclip_env.sh)"
    )
    p.add_argument(
        "--summarize",
        nargs="+",
        metavar="LOG",
        help="train nothing: summarize the JSON lines of earlier runs (their stdout)",
    )
    a = p.parse_args(argv)
    if a.summarize:
        print(json.dumps(summarize_logs(a.summarize)), flush=True)
        return
    if a.against == "ours" and not a.ours:
        p.error("--against ours compares ours with and without --ours overrides: give some")
    if a.against == "ours" and a.equal_time:
        p.error("--equal-time is OpenCLIP's wall time: not with --against ours")

    from clip_train.config import load_config

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = Path(a.data).resolve() if a.data else build_synth(work, a.synth_samples)
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", [f"data.train={data / 'train'}"])
    python = a.openclip_python
    if a.against == "openclip" and not python:
        python = (
            subprocess.run(
                ["bash", str(ROOT / "bench" / "openclip_env.sh")],
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    counts = shard_counts(data / "train")
    spe = openclip_steps_per_epoch(counts, a.batch, a.workers)
    steps = spe * a.epochs
    if spe == 0:
        raise SystemExit(
            f"{data / 'train'}: too few samples for batch {a.batch} x {a.workers} workers"
        )
    print(
        json.dumps(
            {
                "bench": "time_to_quality",
                "data": str(data),
                "train_samples": sum(counts),
                "shards": len(counts),
                "steps": steps,
                "steps_per_epoch": spe,
                "batch": a.batch,
                "lr": a.lr,
                "wd": a.wd,
                "warmup": a.warmup,
                "workers": a.workers,
                "device": a.device,
                "ours_overrides": a.ours,
                "ours_shuffle_buffer": a.shuffle_buffer,
                "init": "shared (open_clip's, per seed)" if a.same_init else "each trainer's own",
                "against": a.against,
                "differs": "data order (ours: epoch mode, shuffle buffer above; "
                "OpenCLIP: shard shuffle, "
                "5000 buffer); ours fused AdamW; OpenCLIP decays the position and token embeddings"
                if a.against == "openclip"
                else "the ours_overrides alone (same seeded stream; same start with --same-init)",
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "date": time.strftime("%Y-%m-%d"),
            }
        ),
        flush=True,
    )
    runs: list[dict] = []  # one row per run, as printed
    rows = []
    for seed in a.seeds:
        # alternate which side runs first so machine load drifts do not favour one
        test, ref = ("ours_ablation", "ours") if a.against == "ours" else ("ours", "openclip")
        order = (test, ref) if seed % 2 == 0 else (ref, test)
        res = {}
        init = initial_weights(cfg, seed, work) if a.same_init else None
        for side in order:
            log(f"seed {seed}: {side}, {steps} steps")
            res[side] = (
                run_openclip(a, python, data, seed, spe, work, cfg, init=init)
                if side == "openclip"
                else run_ours(
                    a,
                    data,
                    seed,
                    steps,
                    work,
                    tag=side,
                    init=init,
                    extra=[] if side == ref else None,
                )
            )
        if a.equal_time:
            eq_steps = int(steps * res["openclip"]["wall_s"] / res["ours"]["wall_s"])
            log(f"seed {seed}: ours at OpenCLIP's wall time, {eq_steps} steps")
            res["ours_equal_time"] = run_ours(
                a, data, seed, eq_steps, work, tag="ours_equal_time", init=init
            )
        for r in res.values():
            r["init"] = "shared" if init else "own"
            w = min(a.window, len(r["losses"]))
            r["final_loss"] = round(statistics.fmean(r["losses"][-w:]), 4)
            runs.append(
                {
                    **{k: v for k, v in r.items() if k not in ("losses", "samples_per_s")},
                    "median_samples_per_s": round(statistics.median(r["samples_per_s"]), 1),
                    "window": a.window,
                    "loss_curve": curve(r["losses"], a.window),
                }
            )
            print(json.dumps(runs[-1]), flush=True)
        rows.append(res)
        n = min(len(res[test]["losses"]), len(res[ref]["losses"]))
        log(
            f"seed {seed}: train loss by step (mean over {a.window} steps)\n"
            + "\n".join(
                f"  step {i + a.window:5d}  {test} {o:.3f}  {ref} {c:.3f}"
                for i, o, c in zip(
                    range(0, n, a.window),
                    curve(res[test]["losses"][:n], a.window),
                    curve(res[ref]["losses"][:n], a.window),
                )
            )
        )
        print(
            json.dumps(
                {
                    "seed": seed,
                    "equal_steps": compare(res[test], res[ref], KEYS),
                    **(
                        {"equal_time": compare(res["ours_equal_time"], res["openclip"], KEYS)}
                        if a.equal_time
                        else {}
                    ),
                }
            ),
            flush=True,
        )

    print(json.dumps(summarize(runs, steps, a.window, ref)), flush=True)
    if any(math.isnan(v) for r in rows for s in r.values() for v in s["losses"]):
        raise SystemExit("a run produced a NaN loss")


if __name__ == "__main__":
    main()
