"""Zero-shot classification: a classifier from class-name prompts, then accuracy on labelled images.

The classifier is the CLIP recipe (and open_clip's `build_zero_shot_classifier`): for each class,
embed every template filled with the class name, L2-normalize each embedding, average, and
renormalize. Images are classified by cosine similarity to those class embeddings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from clip_eval._common import EvalDataError, inference, precision_name, progress_bar
from clip_eval.cache import cache_key, load_classifier, model_identity, save_classifier
from clip_eval.encoder import Encoder
from clip_eval.image_pass import CPU_CHUNK, image_features
from clip_eval.metrics import classification_metrics, per_class_counts
from clip_eval.prompts import Template
from clip_eval.text import encode_texts
from data_tools.errors import ConfigError

log = logging.getLogger(__name__)


def _prompt(template: Template, classname: str) -> str:
    if callable(template):
        return str(template(classname))
    if not isinstance(template, str) or "{}" not in template:
        raise ConfigError(
            f"template {template!r} has no '{{}}' placeholder for the class name; "
            f"write templates like 'a photo of a {{}}.' (CLIP_benchmark's '{{c}}' form must be "
            f"rewritten as '{{}}')"
        )
    try:
        return template.format(classname)
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(
            f"template {template!r} cannot be filled with one class name ({exc}); "
            f"use exactly one '{{}}' and double any other braces"
        ) from exc


def build_zero_shot_classifier(
    encoder: Encoder,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device,
    batch_size: int = 1024,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Tensor:
    """Class embeddings [D, C] (float32, unit columns) from prompts `template(classname)`.

    Templates are format strings with one `{}` or callables `classname -> prompt` (open_clip's
    `OPENAI_IMAGENET_TEMPLATES`); `batch_size` counts prompts per text-encoder call. Prompts
    are encoded longest first in batches of similar length over trimmed width (`clip_eval.text`),
    which gives open_clip's classifier to float rounding in a fraction of the time; sorted
    prompts waste little padding even in big batches, and fewer, larger calls were faster on a
    busy CPU (and are on a GPU). With `cache_dir` the result is stored there and reused for the
    same model, class names and templates.
    """
    if len(classnames) == 0:
        raise ConfigError("zero-shot classification needs at least one class name")
    if len(templates) == 0:
        raise ConfigError("zero-shot classification needs at least one template")
    device = torch.device(device)
    prompts = [_prompt(t, c) for c in classnames for t in templates]  # class-major; validates first
    num_templates = len(templates)

    key = None
    if cache_dir is not None:
        key = cache_key(
            model_identity(encoder), classnames, prompts, num_templates, precision_name(device)
        )
        cached = load_classifier(Path(cache_dir), key, shape=(0, len(classnames)))
        if cached is not None:
            return cached.to(device)

    started = time.perf_counter()
    with inference(encoder):
        features = encode_texts(
            encoder, prompts, device, batch_size, progress=progress, desc="classifier"
        )
    owner = torch.arange(len(classnames), device=device).repeat_interleave(num_templates)
    sums = torch.zeros(len(classnames), features.shape[1], device=device).index_add_(
        0, owner, features
    )
    classifier = F.normalize(sums / num_templates, dim=-1).T.contiguous()
    log.info(
        "zero-shot classifier: %d classes x %d templates in %.1fs",
        len(classnames),
        num_templates,
        time.perf_counter() - started,
    )
    if key is not None:
        meta = {
            "classes": str(len(classnames)),
            "templates": str(num_templates),
            "first_prompt": prompts[0][:200],
        }
        save_classifier(Path(cache_dir), key, classifier, meta)  # type: ignore[arg-type]
    return classifier


def evaluate_zero_shot(
    encoder: Encoder,
    batches: Iterable[dict],
    classifier: Tensor,
    device: str | torch.device,
    progress: bool = False,
    total: int | None = None,
    cpu_chunk: int | None = CPU_CHUNK,
    per_class: bool = False,
) -> dict:
    """Classify every image of `batches` (dicts with "image" and "label") against `classifier`.

    Returns acc1, acc5, mean_per_class_recall and num_samples; with `per_class` also
    "per_class", `clip_eval.metrics.per_class_counts` of the logits. The encoder must already be on
    `device`; it is put in eval mode for the pass and its modes are restored after. `total` is
    the number of batches, for the progress bar only. On the CPU each batch is encoded in chunks
    of `cpu_chunk` images on several threads (`clip_eval.image_pass`; None: whole batches on this
    thread); the logits equal the whole-batch ones to 1e-6.
    """
    device = torch.device(device)
    classifier = classifier.to(device=device, dtype=torch.float32)
    num_classes = classifier.shape[1]
    all_logits: list[Tensor] = []
    all_labels: list[Tensor] = []
    with inference(encoder), image_features(encoder, device, cpu_chunk) as encode:
        for batch in progress_bar(batches, progress, "zero-shot", total=total, unit="batch"):
            if "label" not in batch:
                raise EvalDataError(
                    "zero-shot batch has no 'label': the shards need a .cls entry per sample"
                )
            labels = torch.as_tensor(batch["label"]).long().reshape(-1)
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                i = int(bad.nonzero()[0])
                key = batch.get("key", [None] * len(labels))[i]
                raise EvalDataError(
                    f"sample {key!r} has label {int(labels[i])} but there are only {num_classes} "
                    "class names; "
                    f"check that the class names match the data"
                )
            features = F.normalize(encode(batch["image"]), dim=-1)
            all_logits.append((features @ classifier).cpu())
            all_labels.append(labels)
    if not all_logits:
        raise EvalDataError("zero-shot evaluation got no samples")
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics: dict = dict(classification_metrics(logits, labels))
    metrics["num_samples"] = int(labels.numel())
    if per_class:
        metrics["per_class"] = per_class_counts(logits, labels)
    return metrics
