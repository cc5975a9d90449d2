"""Zero-shot image-text retrieval: embed every image and every caption, then recall@k both ways.

Each image may have several captions (COCO and Flickr have five): they come from the sample's
JSON `"captions"` list when present, else the single `.txt` caption.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_eval._common import EvalDataError, autocast, inference, progress_bar
from clip_eval.encoder import Encoder
from clip_eval.metrics import retrieval_metrics
from clip_eval.text import encode_texts

log = logging.getLogger(__name__)


def _captions_of(batch: dict, index: int) -> list[str]:
    """The captions of sample `index` of a batch: JSON "captions" if present, else the .txt."""
    meta = batch["json"][index] if "json" in batch else None
    if isinstance(meta, dict) and "captions" in meta:
        captions = meta["captions"]
        if (
            not isinstance(captions, list)
            or not captions
            or not all(isinstance(c, str) for c in captions)
        ):
            key = batch.get("key", [None] * (index + 1))[index]
            raise EvalDataError(
                f"sample {key!r}: json 'captions' must be a non-empty list of strings"
            )
        return captions
    if "caption" not in batch:
        raise EvalDataError(
            "retrieval batch has neither json 'captions' nor 'caption': the shards need a .txt "
            "entry"
        )
    return [batch["caption"][index]]


def evaluate_retrieval(
    encoder: Encoder,
    batches: Iterable[dict],
    device: str | torch.device,
    batch_size: int = 1024,
    ks: Sequence[int] = (1, 5, 10),
    progress: bool = False,
    total: int | None = None,
) -> dict[str, float]:
    """Text->image and image->text recall@k over all samples of `batches`.

    Returns `image_retrieval_recall@k`, `text_retrieval_recall@k` (CLIP_benchmark names),
    num_images and num_texts. `batch_size` counts captions per text-encoder call (captions are
    encoded in batches of similar length, see `clip_eval.text`). The encoder must already be on
    `device`; its train/eval modes are restored afterwards. `total` (batches) feeds the bar.
    """
    device = torch.device(device)
    image_features: list[Tensor] = []
    texts: list[str] = []
    text_to_image: list[int] = []
    num_images = 0
    with inference(encoder):
        for batch in progress_bar(batches, progress, "images", total=total, unit="batch"):
            images = batch["image"].to(device, non_blocking=True)
            with autocast(device):
                features = encoder.encode_image(images)
            image_features.append(F.normalize(features.float(), dim=-1))
            for i in range(images.shape[0]):
                captions = _captions_of(batch, i)
                texts.extend(captions)
                text_to_image.extend([num_images + i] * len(captions))
            num_images += images.shape[0]
        if num_images == 0:
            raise EvalDataError("retrieval evaluation got no samples")
        text_features = encode_texts(
            encoder, texts, device, batch_size, progress=progress, desc="captions"
        )
    log.info("retrieval: %d images, %d texts", num_images, len(texts))
    metrics: dict[str, float] = dict(
        retrieval_metrics(
            torch.cat(image_features), text_features, torch.tensor(text_to_image), ks=ks
        )
    )
    metrics["num_images"] = num_images
    metrics["num_texts"] = len(texts)
    return metrics
