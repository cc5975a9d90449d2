"""The tiled contrastive loss (`loss.tiled`) against the full logits: memory, speed, largest batch.

    python bench/tiled_loss.py                       # all three parts, bench_tiny on the CPU
    python bench/tiled_loss.py --only speed --rounds 3
    python bench/tiled_loss.py --only largest --verify-batch 32768

Both sides are our own `build_loss("clip")`, with `tiled=False` and `tiled=True` (tiles of
--tile-size); no OpenCLIP side: OpenCLIP has no tiled loss (its full-logits loss is ours untiled,
tests/clip_train/test_tiled_loss.py). Memory is measured as bench/train_step.py measures it, by
its own worker: peak RSS (VmHWM) of a fresh subprocess per figure, after a warm-up call at 64.

1. memory: the loss alone (forward + backward on random unit features, embed dim 256) at
   --loss-batches, both sides, and the tiled side also at --tiled-batches (up to 100,000).
2. speed: in this process, alternated, medians: the loss alone at --batch (4096) over --rounds,
   then a full training step at --batch (bench_tiny, GradCache micro-batches of --micro) with each
   loss, --steps timed after one warm-up step each at one micro-batch.
3. largest: full tiled training steps at --mem-batch and twice that (micro-batches of --micro)
   give a + b x B (b at least the batch's own bytes, as in bench/train_step.py); the tiled loss
   alone adds d x B (its slope from part 1, counted on top of the step's, so the prediction errs
   towards fitting); largest B = (budget - a) / (b + d). A full step at a batch the full logits
   cannot reach is run to check the fit (--verify-batch; 100032 for the target of 100,000: ~40
   minutes on one CPU core, stopped as soon as it passes the budget). The batches are uint8
   pixels normalised per micro-batch, as the trainer holds them (`data.uint8_images`, its
   default); --float-images for float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import train_step as ts  # noqa: E402

GIB = ts.GIB


def _args_with(args, tiled: bool) -> argparse.Namespace:
    """A copy of `args` that train_step.measure reads as the tiled or the full loss."""
    return argparse.Namespace(**{**vars(args), "tiled": "true" if tiled else "false"})


def bench_memory(args, common: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"full": [], "tiled": []}
    for batch in args.loss_batches:
        for name in ("full", "tiled"):
            side = _args_with(args, name == "tiled")
            runs[name].append(ts.measure(side, "loss", batch, warmup_batch=64))
    for batch in args.tiled_batches:
        runs["tiled"].append(ts.measure(_args_with(args, True), "loss", batch, warmup_batch=64))
    full, tiled = runs["full"], runs["tiled"]
    c = (full[-1]["peak"] - full[0]["peak"]) / (full[-1]["batch"] ** 2 - full[0]["batch"] ** 2)
    _, d = ts._lstsq([[1.0, r["batch"]] for r in tiled], [r["peak"] for r in tiled])
    ts.emit(
        {
            "metric": "loss_peak_rss_gib",
            "memory": ts.memory_unit(args),
            "tile_size": args.tile_size,
            "full": {r["batch"]: round(r["peak"] / GIB, 3) for r in full},
            "tiled": {r["batch"]: round(r["peak"] / GIB, 3) for r in tiled},
            "full_bytes_per_sample_sq": round(c, 2),
            "tiled_bytes_per_sample": round(d, 1),
            "step_s": {
                f"{k} {r['batch']}": round(r["step_s"], 2) for k, v in runs.items() for r in v
            },
            "note": "the loss alone, forward + backward, fresh process per figure (VmHWM)",
        },
        common,
    )
    return runs


def _loss_seconds(loss_fn, feats: list[torch.Tensor]) -> float:
    leaves = [t.clone().requires_grad_() for t in feats] + [torch.tensor(14.3, requires_grad=True)]
    start = time.perf_counter()
    loss_fn(*leaves)["loss"].backward()
    return time.perf_counter() - start


def bench_speed(args, common: dict) -> None:
    from clip_train.losses import build_loss

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    feats = [
        F.normalize(torch.randn(args.batch, 256, generator=gen), dim=-1).to(device)
        for _ in range(2)
    ]
    losses = {
        "full": build_loss("clip", tiled=False),
        "tiled": build_loss("clip", tiled=True, tile_size=args.tile_size),
    }
    loss_s: dict[str, list[float]] = {k: [] for k in losses}
    for _ in range(args.rounds):
        for name, fn in losses.items():
            loss_s[name].append(_loss_seconds(fn, feats))
    ts.log("loss alone: " + ", ".join(f"{k} {[round(t, 3) for t in v]}" for k, v in loss_s.items()))

    torch.manual_seed(0)
    sides = {
        name: ts.Ours(
            args.preset,
            device,
            "fp32",
            micro=args.micro,
            loss=ts.loss_kwargs(_args_with(args, name == "tiled")),
        )
        for name in ("full", "tiled")
    }
    for side in sides.values():  # warm-up at one micro-batch: optimiser state, allocator
        side.step(*ts.make_batch(side.cfg, args.micro, 1, device))
    images, tokens = ts.make_batch(sides["full"].cfg, args.batch, 0, device)
    step_s: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.steps):
        for name, side in sides.items():
            start = time.perf_counter()
            side.step(images, tokens)
            step_s[name].append(time.perf_counter() - start)
            ts.log(f"step {i + 1}/{args.steps} {name}: {step_s[name][-1]:.1f}s")
    med = {k: statistics.median(v) for k, v in loss_s.items()}
    step = {k: statistics.median(v) for k, v in step_s.items()}
    ts.emit(
        {
            "metric": "tiled_time_ratio",
            "batch": args.batch,
            "tile_size": args.tile_size,
            "micro": args.micro,
            "loss_full_s": round(med["full"], 3),
            "loss_tiled_s": round(med["tiled"], 3),
            "loss_ratio": round(med["tiled"] / med["full"], 3),
            "step_full_s": round(step["full"], 2),
            "step_tiled_s": round(step["tiled"], 2),
            "step_ratio": round(step["tiled"] / step["full"], 3),
            "ratio_meaning": "tiled / full time; <= 1.1 is the target for the step",
            "loss_s": {k: [round(t, 3) for t in v] for k, v in loss_s.items()},
            "step_s": {k: [round(t, 2) for t in v] for k, v in step_s.items()},
        },
        common,
    )


def bench_largest(args, common: dict, loss_runs: dict[str, list[dict]]) -> None:
    tiled_args = _args_with(args, True)
    budget = args.budget_gib * GIB
    uint8 = not args.float_images
    runs = [
        ts.measure(tiled_args, "ours", n, micro=args.micro, warmup_batch=64, uint8_images=uint8)
        for n in (args.mem_batch, 2 * args.mem_batch)
    ]
    a, b = ts._lstsq([[1.0, r["batch"]] for r in runs], [r["peak"] for r in runs])
    # the batch itself (uint8 or fp32 images, int64 tokens) is a floor on b
    cfg = ts.our_config(args.preset)
    pixel_bytes = 1 if uint8 else 4
    floor = 3 * cfg.model.image.img_size**2 * pixel_bytes + cfg.model.text.context_length * 8
    if b < floor:
        a, b = a + (b - floor) * args.mem_batch, floor  # through the first point with slope `floor`
    tiled = loss_runs.get("tiled") or [
        ts.measure(tiled_args, "loss", n, warmup_batch=64) for n in args.tiled_batches
    ]
    _, d = ts._lstsq([[1.0, r["batch"]] for r in tiled], [r["peak"] for r in tiled])
    predicted = int((budget - a) / (b + d))
    ts.log(
        f"tiled step: {a / GIB:.3f} GiB + ({b / 1024:.1f} + {d / 1024:.2f}) KiB x B -> {predicted}"
    )
    verify = ts.measure(  # stopped as soon as its peak passes the budget: it did not fit
        tiled_args,
        "ours",
        args.verify_batch,
        micro=args.micro,
        warmup_batch=64,
        abort_above_gib=args.budget_gib,
        uint8_images=uint8,
    )
    ts.emit(
        {
            "metric": "largest_batch_tiled",
            "budget_gib": args.budget_gib,
            "memory": ts.memory_unit(args),
            "tile_size": args.tile_size,
            "micro": args.micro,
            "images": "uint8, normalised per micro-batch" if uint8 else "float32",
            "predicted": predicted,
            "fit": {
                "const_gib": round(a / GIB, 3),
                "step_per_sample_kib": round(b / 1024, 2),
                "loss_per_sample_kib": round(d / 1024, 3),
            },
            "verified_batch": args.verify_batch,
            "verified_peak_gib": round(verify["peak"] / GIB, 3),
            "verified_predicted_gib": round((a + (b + d) * args.verify_batch) / GIB, 3),
            "verified_fits": not verify["exceeded"],
            "verified_step_s": None if verify["exceeded"] else round(verify["step_s"], 1),
            "points": [ts._point(r) for r in runs + [verify]],
        },
        common,
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--only", choices=("memory", "speed", "largest"), action="append")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", choices=sorted(ts.PRESETS), default="bench_tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--loss-batches", type=_ints, default=[4096, 8192, 16384])
    p.add_argument("--tiled-batches", type=_ints, default=[32768, 100000])
    p.add_argument("--batch", type=int, default=4096, help="speed: contrastive batch")
    p.add_argument("--micro", type=int, default=64, help="GradCache micro-batch of the full steps")
    p.add_argument(
        "--rounds", type=int, default=5, help="speed: alternated calls of the loss alone"
    )
    p.add_argument("--steps", type=int, default=2, help="speed: timed full steps per side")
    p.add_argument("--mem-batch", type=int, default=512)
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--verify-batch", type=int, default=24576)
    p.add_argument(
        "--float-images",
        action="store_true",
        help="largest: float32 batches (before data.uint8_images) instead of the trainer's uint8",
    )
    args = p.parse_args(argv)
    args.precision = "fp32"
    only = set(args.only or ("memory", "speed", "largest"))
    torch.set_num_threads(args.threads)
    common = {
        "bench": "tiled_loss",
        "preset": args.preset,
        "device": args.device,
        "machine": ts.machine(torch.device(args.device)),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python bench/tiled_loss.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    loss_runs = bench_memory(args, common) if "memory" in only else {}
    if "speed" in only:
        bench_speed(args, common)
    if "largest" in only:
        bench_largest(args, common, loss_runs)


if __name__ == "__main__":
    main()
