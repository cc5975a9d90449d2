"""OpenCLIP's side of bench/loader.py; runs in the bench venv (webdataset 0.2.86).

    python bench/_openclip_loader.py SHARDS --image-size 64 --workers 2 --batch-size 256 \
        --warmup 2 --batches 12

Prints one JSON line: {"samples_per_s": ..., "samples": ..., "seconds": ...}. Uses
`open_clip_train.data.get_wds_dataset` exactly as `python -m open_clip_train.main` does for
`--dataset-resampled` training, with open_clip's own train transform and tokenizer.
"""

from __future__ import annotations

import argparse
import json
import time

import open_clip
from open_clip_train.data import get_wds_dataset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--image-size", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    args = argparse.Namespace(
        train_data=a.shards,
        val_data=None,
        train_num_samples=10**7,
        dataset_resampled=True,
        seed=a.seed,
        batch_size=a.batch_size,
        world_size=1,
        workers=a.workers,
        train_data_upsampling_factors=None,
    )
    preprocess = open_clip.image_transform(a.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    data = get_wds_dataset(args, preprocess, True, epoch=0, tokenizer=tokenizer)
    it = iter(data.dataloader)
    for _ in range(a.warmup):
        next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(a.batches):
        images, texts = next(it)
        n += images.shape[0]
    took = time.perf_counter() - start
    assert images.shape[-1] == a.image_size and texts.ndim == 2
    print(json.dumps({"samples_per_s": n / took, "samples": n, "seconds": took}))


if __name__ == "__main__":
    main()
