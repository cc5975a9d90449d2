"""`clip-data score` samples/s against a plain open_clip encode loop, same model and data.

    python bench/score.py                     # 2,000 samples of 256 px JPEGs, 3 rounds
    python bench/score.py --samples 4000 --rounds 5 --device cuda

Model: an open_clip ViT of configs/bench_tiny.yaml's sizes (64 px, patch 8, width 192, depth 6;
text width 256, 4 layers) with open_clip's usual 77-token context, random weights, written as
an open_clip folder and loaded by both sides as `local-dir:DIR`.
- ours: `data_tools.curate.score.score_shards` as `clip-data score` runs it: our loader
  (decode + resize in `--workers` DataLoader workers), clip_eval's trimmed text forward, and
  everything score writes (per-shard parts, merged float16 arrays).
- plain: the loop a user writes: read each tar with `tarfile`, PIL-decode, open_clip's
  preprocess and tokenizer, batches of the same size, `encode_image` / `encode_text`, cosine;
  decoding in a torch DataLoader with the same number of workers.
Both sides are timed without model loading, back to back per round in rotating order; the
scores must agree (checked to 1e-4). Prints one JSON line per round and a summary line.
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

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TarPairs(torch.utils.data.IterableDataset):
    """(image tensor, caption) of every sample, shards split over DataLoader workers."""

    def __init__(self, shards: list[str], preprocess) -> None:
        self.shards, self.preprocess = shards, preprocess

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard in mine:
            fields: dict = {}
            with tarfile.open(shard) as tar:
                for m in tar:
                    key, ext = m.name.split(".", 1)
                    fields.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, f in fields.items():
                img = Image.open(io.BytesIO(f["jpg"])).convert("RGB")
                yield key, self.preprocess(img), f["txt"].decode()


def plain_loop(model_name: str, shards: list[str], batch: int, workers: int, device: str):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name, device=device)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()

    def run() -> tuple[float, dict]:
        start = time.perf_counter()
        out = {}
        loader = torch.utils.data.DataLoader(
            TarPairs(shards, preprocess), batch_size=batch, num_workers=workers
        )
        with torch.no_grad():
            for keys, images, captions in loader:
                a = model.encode_image(images.to(device), normalize=True)
                b = model.encode_text(tokenizer(list(captions)).to(device), normalize=True)
                for k, s in zip(keys, (a * b).sum(-1).tolist()):
                    out[k] = s
        return time.perf_counter() - start, out

    return run


def ours(model_name: str, shards: list[str], batch: int, workers: int, device: str, tmp: Path):
    from clip_eval.text import trimmed_text_forward
    from data_tools.curate.cli import load_model
    from data_tools.curate.score import score_shards

    encoder = load_model(model_name, None, device)
    forward = trimmed_text_forward(encoder)

    def run() -> tuple[float, dict]:
        out_dir = tmp / "scores"
        shutil.rmtree(out_dir, ignore_errors=True)
        start = time.perf_counter()
        score_shards(
            encoder,
            shards,
            out_dir,
            model_id=model_name,
            batch_size=batch,
            num_workers=workers,
            device=device,
            text_forward=forward,
        )
        took = time.perf_counter() - start
        keys = [json.loads(line)["key"] for line in (out_dir / "keys.jsonl").open()]
        return took, dict(zip(keys, np.load(out_dir / "scores.npy").tolist()))

    return run


BENCH_TINY = {
    "embed_dim": 256,
    "vision_cfg": {
        "image_size": 64,
        "layers": 6,
        "width": 192,
        "head_width": 64,
        "patch_size": 8,
        "mlp_ratio": 4.0,
    },
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def open_clip_folder(folder: Path) -> Path:
    """An open_clip `local-dir:` folder holding a random model of the bench_tiny sizes."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": BENCH_TINY,
                "preprocess_cfg": {
                    "size": 64,
                    "mean": list(open_clip.OPENAI_DATASET_MEAN),
                    "std": list(open_clip.OPENAI_DATASET_STD),
                },
            }
        )
    )
    torch.manual_seed(0)
    model = open_clip.CLIP(**BENCH_TINY)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        from data_tools.synth import SynthConfig, write_synth
        from data_tools.urls import expand_shards

        write_synth(
            tmp / "data",
            SynthConfig(
                train_samples=a.samples,
                zeroshot_per_class=1,
                retrieval_samples=10,
                image_size=a.image_size,
                samples_per_shard=max(1, a.samples // 8),
            ),
        )
        shards = expand_shards(str(tmp / "data" / "train"))
        name = f"local-dir:{open_clip_folder(tmp / 'model')}"
        sides = {
            "ours": ours(name, shards, a.batch_size, a.workers, a.device, tmp),
            "plain": plain_loop(name, shards, a.batch_size, a.workers, a.device),
        }
        for side in sides.values():  # warm-up: page cache, worker start-up paths, kernels
            side()
        rates: dict[str, list[float]] = {"ours": [], "plain": []}
        for r in range(a.rounds):
            got = {}
            for name_ in ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]:
                took, scores = sides[name_]()
                rates[name_].append(len(scores) / took)
                got[name_] = scores
            diff = max(abs(got["ours"][k] - got["plain"][k]) for k in got["plain"])
            assert got["ours"].keys() == got["plain"].keys() and diff < 1e-4, diff
            print(
                json.dumps(
                    {
                        "round": r,
                        "ours": round(rates["ours"][-1], 1),
                        "plain": round(rates["plain"][-1], 1),
                        "ratio": round(rates["ours"][-1] / rates["plain"][-1], 2),
                        "max_score_diff": diff,
                    }
                ),
                flush=True,
            )
        ratios = [o / p_ for o, p_ in zip(rates["ours"], rates["plain"])]
        print(
            json.dumps(
                {
                    "summary": True,
                    "samples": len(scores),
                    "device": a.device,
                    "ours_samples_per_s": round(float(np.median(rates["ours"])), 1),
                    "plain_samples_per_s": round(float(np.median(rates["plain"])), 1),
                    "ratio_median": round(float(np.median(ratios)), 2),
                    "ratio_worst": round(min(ratios), 2),
                    "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                }
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
