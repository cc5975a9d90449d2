"""Evaluation on `--device cuda` (bf16 autocast, pinned batches from decoding workers) agrees with
the CPU's fp32 results. Skipped without a GPU (CI has none)."""

import json

import pytest
import torch

from clip_eval.encoder import load_open_clip
from clip_eval.tasks import retrieval_task, zero_shot_task

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]


def test_zero_shot_and_retrieval_on_cuda_match_the_cpu(tiny_model_name, tmp_path, write_images):
    for c, name in enumerate(CLASSES):
        write_images(tmp_path / "zs" / name, 6, seed=c)
    paths = write_images(tmp_path / "images", 40, seed=99)
    table = tmp_path / "captions.jsonl"
    table.write_text(
        "\n".join(
            json.dumps({"image": f"images/{p.name}", "captions": [f"{CLASSES[i % 7]} number {i}"]})
            for i, p in enumerate(paths)
        )
    )
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        encoder = load_open_clip(tiny_model_name, None, device)
        zs = zero_shot_task(
            encoder, tmp_path / "zs", classnames=CLASSES, batch_size=8, num_workers=2, device=device
        )
        ret = retrieval_task(encoder, table, batch_size=8, num_workers=2, device=device)
        results[device] = {**zs, **ret}
    cpu, cuda = results["cpu"], results["cuda"]
    assert cuda["num_samples"] == cpu["num_samples"] == 42
    assert cuda["num_texts"] == cpu["num_texts"] == 40
    # bf16 may flip a near tie of this random model, never more than a few of 42 / 40
    for key in ("acc1", "acc5", "image_retrieval_recall@10", "text_retrieval_recall@10"):
        assert abs(cuda[key] - cpu[key]) <= 0.1, (key, cpu[key], cuda[key])
