"""Loader throughput: ours vs `open_clip_train.data.get_wds_dataset`, same shards, same run.

    bash bench/openclip_env.sh                       # once: the OpenCLIP venv (webdataset 0.2.86)
    .venv/bin/python bench/loader.py                 # 64 and 224 px, 2 workers, batch 256
    .venv/bin/python bench/loader.py --sizes 64 --rounds 5 --profile
    .venv/bin/python bench/loader.py --skip-openclip --second-view   # + SimCLR's second view
    .venv/bin/python bench/loader.py --uint8         # + ours sending uint8 pixels (the trainer's)

Builds shards of 256 px JPEGs with captions with `clip-data synth --image-size 256` (once, in
--data), then for each round and image size times both pipelines from the same shards to
model-ready batches (float image tensor [B,3,S,S] normalised + [B,77] tokens from open_clip's
tokenizer, training augmentation: random resized crop 90-100%), alternating ours and OpenCLIP's.
Both run resampled (endless) with a shuffle buffer, `--workers` DataLoader workers and
`--warmup` batches discarded before the clock starts. OpenCLIP's side runs as a subprocess in
its own venv because open_clip_train needs webdataset<=0.2.86 (see bench/openclip_env.sh).

Prints one JSON line per (round, size) and a summary line per size with medians:
{"bench": "loader", "image_size": 64, "ours": ..., "openclip": ..., "ratio": ...} (samples/s;
ratio = ours / OpenCLIP, > 1 means we are faster; the summary's ratio is the median of the
per-round ratios). `--profile` runs our worker pipeline
in-process under cProfile for one size and prints where the time goes. `--second-view` also
times ours with `image_views=2` (the SimCLR view a simclr term asks for: decoded once, augmented
twice) and reports "ours_2views" and "second_view_cost" = ours / ours_2views (how many times
slower the loader is with the second view; in the summary, the median of the per-round ratios).
`--uint8` also times ours with `uint8_images=True`, what `clip-train train` runs by default
(`data.uint8_images`): the batch as uint8 pixels, normalised later per micro-batch in the step,
so not model-ready: "ours_uint8", "uint8_speedup" = ours_uint8 / ours and "ratio_uint8" =
ours_uint8 / OpenCLIP (what differs: the loader leaves normalisation to the training step).
"""

from __future__ import annotations

import argparse
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


def build_shards(data: Path, samples: int, per_shard: int, image_size: int) -> str:
    """Shards via the `clip-data` CLI; reused when the manifest says they match."""
    manifest = data / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if (
            m.get("counts", {}).get("train") == samples
            and m.get("image_size") == image_size
            and m.get("config", {}).get("samples_per_shard") == per_shard
        ):
            return _pattern(data, m)
    cmd = [
        sys.executable,
        "-m",
        "data_tools",
        "synth",
        "--output",
        str(data),
        "--train-samples",
        str(samples),
        "--zeroshot-per-class",
        "1",
        "--retrieval-samples",
        "1",
        "--image-size",
        str(image_size),
        "--samples-per-shard",
        str(per_shard),
        "-q",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return _pattern(data, json.loads(manifest.read_text()))


def _pattern(data: Path, manifest: dict) -> str:
    n = len(manifest["splits"]["train"]["shards"])
    return f"{data}/train/train-{{000000..{n - 1:06d}}}.tar"


def ours(
    shards: str,
    size: int,
    workers: int,
    batch_size: int,
    warmup: int,
    batches: int,
    shuffle: int,
    seed: int,
    image_views: int = 1,
    uint8_images: bool = False,
) -> float:
    import open_clip
    import torch

    from data_tools.loader import make_loader
    from data_tools.transforms import ImageTransform

    loader = make_loader(
        shards,
        batch_size=batch_size,
        image_transform=ImageTransform(size, train=True),
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
        mode="resampled",
        num_workers=workers,
        shuffle_buffer=shuffle,
        seed=seed,
        image_views=image_views,
        uint8_images=uint8_images,
    )
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["image"].shape[0]
    took = time.perf_counter() - start
    assert b["image"].shape[-1] == size and b["text"].shape[1] == 77
    assert ("image_2" in b) == (image_views == 2)
    assert b["image"].dtype == (torch.uint8 if uint8_images else torch.float32)
    loader.close()
    return n / took


def openclip(
    python: str,
    shards: str,
    size: int,
    workers: int,
    batch_size: int,
    warmup: int,
    batches: int,
    seed: int,
) -> float:
    cmd = [
        python,
        str(ROOT / "bench" / "_openclip_loader.py"),
        shards,
        "--image-size",
        str(size),
        "--workers",
        str(workers),
        "--batch-size",
        str(batch_size),
        "--warmup",
        str(warmup),
        "--batches",
        str(batches),
        "--seed",
        str(seed),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        raise SystemExit(f"OpenCLIP side failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["samples_per_s"])


def profile(shards: str, size: int, batch_size: int, batches: int) -> None:
    """Our worker pipeline in this process (num_workers=0) under cProfile."""
    import cProfile
    import pstats

    import open_clip
    import torch

    from data_tools.loader import make_loader
    from data_tools.transforms import ImageTransform

    torch.set_num_threads(1)
    loader = make_loader(
        shards,
        batch_size=batch_size,
        image_transform=ImageTransform(size, train=True),
        tokenizer=open_clip.get_tokenizer("ViT-B-32"),
        mode="resampled",
        shuffle_buffer=1000,
        max_batches=batches,
    )
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    n = sum(b["image"].shape[0] for b in loader)
    prof.disable()
    took = time.perf_counter() - start
    print(
        f"# profile: {n} samples at {size}px in one process: {n / took:.0f} samples/s "
        f"(under cProfile)",
        file=sys.stderr,
    )
    pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)


def per_round(got: dict[str, list[float]], x: str, y: str) -> list[float]:
    """Side x's samples/s over side y's, round by round: each pair ran back to back, so their
    median is the figure least moved by other load on the machine."""
    return [p / q for p, q in zip(got[x], got[y])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        default="/tmp/clip-train-bench-loader",
        help="where the shards are built (reused when they match)",
    )
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--samples-per-shard", type=int, default=250)
    ap.add_argument("--source-size", type=int, default=256, help="JPEG side in the shards")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    ap.add_argument("--batches", type=int, default=16, help="batches timed per measurement")
    ap.add_argument(
        "--shuffle-buffer",
        type=int,
        default=5000,
        help="ours; OpenCLIP's is fixed at 5000 (1000 before the first sample)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--openclip-python",
        default=None,
        help="python of the OpenCLIP venv (default: made by bench/openclip_env.sh)",
    )
    ap.add_argument("--skip-openclip", action="store_true")
    ap.add_argument(
        "--second-view",
        action="store_true",
        help="also time ours with image_views=2 (SimCLR's second augmented view)",
    )
    ap.add_argument(
        "--uint8",
        action="store_true",
        help="also time ours with uint8_images=True (the trainer's default; normalised later)",
    )
    ap.add_argument("--profile", action="store_true", help="also profile ours at --sizes[0]")
    a = ap.parse_args()

    shards = build_shards(Path(a.data), a.samples, a.samples_per_shard, a.source_size)
    py = a.openclip_python
    if py is None and not a.skip_openclip:
        env_sh = ROOT / "bench" / "openclip_env.sh"
        py = (
            subprocess.run(["bash", str(env_sh)], check=True, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    info = {
        "bench": "loader-setup",
        "shards": shards,
        "samples": a.samples,
        "source_px": a.source_size,
        "workers": a.workers,
        "batch_size": a.batch_size,
        "batches_timed": a.batches,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(info), flush=True)
    sides = ("ours", "openclip", "ours_2views", "ours_uint8")
    results: dict[int, dict[str, list[float]]] = {s: {k: [] for k in sides} for s in a.sizes}
    for r in range(a.rounds):
        for size in a.sizes:
            row = {"bench": "loader", "round": r, "image_size": size}
            order = ["ours", "openclip"] + (["ours_2views"] if a.second_view else [])
            order += ["ours_uint8"] if a.uint8 else []
            for side in order if r % 2 == 0 else reversed(order):  # alternate who goes first
                if side.startswith("ours"):
                    row[side] = ours(
                        shards,
                        size,
                        a.workers,
                        a.batch_size,
                        a.warmup,
                        a.batches,
                        a.shuffle_buffer,
                        r,
                        image_views=2 if side == "ours_2views" else 1,
                        uint8_images=side == "ours_uint8",
                    )
                elif not a.skip_openclip:
                    row["openclip"] = openclip(
                        py, shards, size, a.workers, a.batch_size, a.warmup, a.batches, r
                    )
            for k in sides:
                if k in row:
                    results[size][k].append(row[k])
                    row[k] = round(row[k], 1)
            if "openclip" in row:
                row["ratio"] = round(row["ours"] / row["openclip"], 2)
            if "ours_2views" in row:
                row["second_view_cost"] = round(row["ours"] / row["ours_2views"], 2)
            if "ours_uint8" in row:
                row["uint8_speedup"] = round(row["ours_uint8"] / row["ours"], 2)
                if "openclip" in row:
                    row["ratio_uint8"] = round(row["ours_uint8"] / row["openclip"], 2)
            print(json.dumps(row), flush=True)
    for size in a.sizes:
        if not results[size]["ours"]:
            continue
        got = results[size]
        o = statistics.median(got["ours"])
        row = {
            "bench": "loader-summary",
            "image_size": size,
            "rounds": a.rounds,
            "ours": round(o, 1),
        }
        if got["openclip"]:
            c = statistics.median(got["openclip"])
            ratios = per_round(got, "ours", "openclip")
            row.update(
                {
                    "openclip": round(c, 1),
                    "ratio": round(statistics.median(ratios), 2),
                    "ratio_min": round(min(ratios), 2),
                }
            )
        if got["ours_2views"]:
            two = statistics.median(got["ours_2views"])
            costs = per_round(got, "ours", "ours_2views")
            row.update(
                {
                    "ours_2views": round(two, 1),
                    "second_view_cost": round(statistics.median(costs), 2),  # per-round pairs
                    "second_view_cost_max": round(max(costs), 2),
                }
            )
        if got["ours_uint8"]:
            row["ours_uint8"] = round(statistics.median(got["ours_uint8"]), 1)
            row["uint8_speedup"] = round(statistics.median(per_round(got, "ours_uint8", "ours")), 2)
            if got["openclip"]:
                row["ratio_uint8"] = round(
                    statistics.median(per_round(got, "ours_uint8", "openclip")), 2
                )
        print(json.dumps(row), flush=True)
    if a.profile:
        profile(shards, a.sizes[0], a.batch_size, 8)


if __name__ == "__main__":
    main()
