"""Evaluation tasks on data specs: what the trainer, suites and `clip-eval` call.

A task takes an encoder and where the data is, reads it with the encoder's own preprocessing
(one ordered pass, no shuffling) and returns a flat dict of numbers. Data is any of:
- WebDataset shards (a directory of .tar, a brace pattern, a glob, a list): labels from `.cls`,
  captions from each sample's JSON "captions" or its `.txt`;
- a class folder `ROOT/<class>/<image>` (ImageNet val with synset folders, or any class tree);
- a flat folder of images plus `labels=FILE`;
- for retrieval, a CSV/TSV/JSONL table of image paths and captions.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from clip_eval._common import EvalDataError
from clip_eval.datasets import (
    FileLoader,
    ImageSet,
    caption_table,
    class_folder,
    flat_folder,
    folder_kind,
    is_table,
    split_classname_lines,
)
from clip_eval.encoder import Encoder
from clip_eval.image_pass import default_num_workers
from clip_eval.probe import DEFAULT_WEIGHT_DECAYS, extract_features, few_shot, linear_probe
from clip_eval.prompts import (
    DATASETS,
    DEFAULT_TEMPLATE,
    Template,
    resolve_classnames,
    resolve_templates,
)
from clip_eval.retrieval import evaluate_retrieval
from clip_eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot
from data_tools import imagenet
from data_tools.errors import ConfigError, DataError
from data_tools.fmt import format_metrics
from data_tools.loader import expand_shards, make_loader
from data_tools.tario import sample_key
from data_tools.urls import is_remote

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
DataSpec = PathLike | Sequence[PathLike]


def _spec_name(data: object) -> str:
    return str(data) if isinstance(data, (str, os.PathLike)) else ", ".join(map(str, data))  # type: ignore[arg-type]


def _data_dir(data: object, shards: list[str]) -> Path:
    """Where `classnames.txt`/`templates.txt` live by default: the spec's directory."""
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        return Path(data)
    return Path(shards[0]).parent


def _check_dataset(dataset: str | None) -> None:
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(
            f"dataset {dataset!r}: unknown (known: {', '.join(DATASETS)}; others take --classnames "
            "and --templates)"
        )


def _check_loader_args(batch_size: int, num_workers: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"num_workers must be an integer >= 0, got {num_workers!r}")


class _Labelled:
    """An ordered labelled image stream from shards or folders, with what is known of its
    classes."""

    def __init__(
        self,
        encoder: Encoder,
        data: DataSpec,
        *,
        classnames: Sequence[str] | PathLike | None,
        dataset: str | None,
        labels: PathLike | None,
        batch_size: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        _check_dataset(dataset)
        _check_loader_args(batch_size, num_workers)
        self.where = _spec_name(data)
        self.remap: torch.Tensor | None = None
        self.total: int | None = None
        kind = "flat-folder" if labels is not None else folder_kind(data)
        self.kind = kind or "shards"
        pin = device.type == "cuda"
        if kind is not None:
            folder = Path(data)  # type: ignore[arg-type]
            given = classnames
            if given is None and dataset is None and (folder / "classnames.txt").is_file():
                given = folder / "classnames.txt"
            names, source = resolve_classnames(given, None)
            if kind == "flat-folder":
                if labels is None:
                    raise DataError(
                        f"{folder} holds images but no class sub-folders: pass --labels FILE for a "
                        "flat folder"
                    )
                self.images: ImageSet | None = flat_folder(folder, labels, names, dataset, source)
            else:
                self.images = class_folder(folder, names, dataset, source)
            self.classnames: list[str] | None = self.images.classnames
            self.source = self.images.source
            self.default_dir = folder
            self.loader: Any = FileLoader(
                self.images, encoder.preprocess, batch_size, num_workers, pin
            )
            self.total = len(self.loader)
            return
        self.images = None
        shards = expand_shards(data)
        self.default_dir = _data_dir(data, shards)
        if dataset == "imagenet":
            names, self.source = resolve_classnames(classnames, imagenet.classnames())
            if classnames is None:
                self.source = "open_clip ImageNet names"
                self.remap = _synset_remap(self.default_dir / "classnames.txt")
        else:
            default_names = self.default_dir / "classnames.txt"
            # Probes do without class names; zero-shot says what is missing.
            names, self.source = resolve_classnames(
                classnames, default_names if default_names.is_file() else None
            )
            self.source = self.source if names is not None else str(default_names)
        self.classnames = split_classname_lines(names)[1] if names is not None else None
        self.loader = make_loader(
            shards,
            batch_size=batch_size,
            image_transform=encoder.preprocess,
            mode="epoch",
            num_workers=num_workers,
            with_label=True,
            pin_memory=pin,
        )

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            if self.remap is not None and "label" in batch:
                labels = torch.as_tensor(batch["label"]).long()
                if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.remap)):
                    raise EvalDataError(
                        f"a label is outside the {len(self.remap)} synsets of classnames.txt"
                    )
                batch["label"] = self.remap[labels]
            yield batch

    def close(self) -> None:
        self.loader.close()


def _synset_remap(path: Path) -> torch.Tensor | None:
    """Shard label -> ImageNet index, when the shards' classnames.txt lists synsets
    (from-imagefolder).

    A tree of only some synset folders is labelled 0..k-1 by folder order; its class-name file
    says which synset each label is, so labels are mapped back to the standard 1000 indices.
    """
    if not path.is_file():
        return None
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = [line.split("\t")[0].strip() for line in lines]
    if not keys or not all(imagenet.is_synset(k) for k in keys):
        return None
    index = {s: i for i, s in enumerate(imagenet.synsets())}
    unknown = [k for k in keys if k not in index]
    if unknown:
        raise DataError(
            f"{path}: {unknown[0]!r} is not an ImageNet-1k synset; this is not an ImageNet-1k "
            "shard set"
        )
    log.info("%s lists synsets: mapping shard labels to ImageNet-1k indices", path)
    return torch.tensor([index[k] for k in keys], dtype=torch.long)


def zero_shot_task(
    encoder: Encoder,
    data: DataSpec,
    *,
    classnames: Sequence[str] | PathLike | None = None,
    templates: Sequence[Template] | PathLike | None = None,
    dataset: str | None = None,
    labels: PathLike | None = None,
    batch_size: int = 128,
    num_workers: int | None = None,
    device: str | torch.device = "cpu",
    cache_dir: PathLike | None = None,
    progress: bool = False,
    per_class: bool = False,
) -> dict:
    """Zero-shot classification: acc1, acc5, mean_per_class_recall, num_samples, num_classes.

    `per_class` adds "per_class": one row per class name, in class order, with its `samples`,
    `recall` (None for a class with no samples) and `predicted` (how many images the model
    assigned to it), to see which classes a model collapses onto.

    `dataset="imagenet"` takes open_clip's ImageNet class names and the OpenAI 80 templates
    (`templates="simple"` for the short set). Otherwise `classnames`/`templates` are lists, files
    (one per line) or, for templates, 'openai'/'simple'; by default `classnames.txt` and
    `templates.txt` next to the shards or inside the folder (a folder without them uses its
    sub-folder names and 'a photo of a {}.'). `labels` is the labels file of a flat folder.
    With `cache_dir` the classifier is cached there. The encoder must be on `device`.
    `num_workers` decode images in parallel; None: `default_num_workers()`, min(4, CPUs // 2).
    """
    device = torch.device(device)
    num_workers = default_num_workers() if num_workers is None else num_workers
    stream = _Labelled(
        encoder,
        data,
        classnames=classnames,
        dataset=dataset,
        labels=labels,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
    )
    try:
        names = stream.classnames
        if names is None:
            raise DataError(
                f"{stream.where}: no class names: {stream.source} not found "
                "(pass --classnames FILE or --dataset imagenet, or put classnames.txt next to the "
                "shards)"
            )
        if templates is None and dataset == "imagenet":
            default: Sequence[Template] | PathLike = "openai"
        elif templates is None and (stream.default_dir / "templates.txt").is_file():
            default = stream.default_dir / "templates.txt"
        elif templates is None and stream.kind != "shards":
            log.warning(
                "%s: no templates given and no templates.txt; using %r",
                stream.where,
                DEFAULT_TEMPLATE,
            )
            default = [DEFAULT_TEMPLATE]
        else:
            default = stream.default_dir / "templates.txt"
        prompts, _ = resolve_templates(templates, default)
        classifier = build_zero_shot_classifier(
            encoder, names, prompts, device, cache_dir=cache_dir, progress=progress
        )
        try:
            metrics = evaluate_zero_shot(
                encoder,
                stream,
                classifier,
                device,
                progress=progress,
                total=stream.total,
                per_class=per_class,
            )
        except EvalDataError as exc:
            raise DataError(f"{stream.where}: {exc} (class names from {stream.source})") from exc
    finally:
        stream.close()
    metrics["num_classes"] = len(names)
    counts = metrics.pop("per_class", None)
    log.info("zero-shot on %s: %s", stream.where, format_metrics(metrics))
    if counts is not None:
        metrics["per_class"] = [
            {
                "class": name,
                "samples": n,
                "recall": hits / n if n else None,
                "predicted": guessed,
            }
            for name, n, hits, guessed in zip(
                names, counts["samples"], counts["correct"], counts["predicted"], strict=True
            )
        ]
    return metrics


def retrieval_task(
    encoder: Encoder,
    data: DataSpec,
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    image_column: str | None = None,
    caption_column: str | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Image-text retrieval recall@1/5/10 (CLIP_benchmark names), num_images, num_texts.

    `data` is caption shards (JSON "captions" or `.txt`) or a CSV/TSV/JSONL table of image
    paths and captions (columns picked by name, or given). The encoder must be on `device`.
    """
    _check_loader_args(batch_size, num_workers)
    device = torch.device(device)
    where = _spec_name(data)
    loader: Any
    total = None
    if is_table(data):
        images = caption_table(data, image_column, caption_column)  # type: ignore[arg-type]
        loader = FileLoader(
            images, encoder.preprocess, batch_size, num_workers, device.type == "cuda"
        )
        total = len(loader)
    else:
        if image_column is not None or caption_column is not None:
            raise ConfigError(
                "image_column/caption_column apply to CSV/TSV/JSONL tables, not to shards"
            )
        shards = expand_shards(data)
        # Only ask for .json when the shards carry it: the loader skips samples lacking a requested
        # field.
        loader = make_loader(
            shards,
            batch_size=batch_size,
            image_transform=encoder.preprocess,
            mode="epoch",
            num_workers=num_workers,
            with_json=_has_json(shards[0]),
            pin_memory=device.type == "cuda",
        )
    try:
        metrics = evaluate_retrieval(encoder, loader, device, progress=progress, total=total)
    except EvalDataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    finally:
        loader.close()
    log.info("retrieval on %s: %s", where, format_metrics(metrics))
    return metrics


def _features(
    encoder: Encoder, data: DataSpec, device: torch.device, progress: bool, **opts: Any
) -> tuple[torch.Tensor, torch.Tensor, _Labelled]:
    stream = _Labelled(encoder, data, device=device, **opts)
    try:
        features, labels = extract_features(
            encoder, stream, device, progress=progress, total=stream.total
        )
    except EvalDataError as exc:
        raise DataError(f"{stream.where}: {exc}") from exc
    finally:
        stream.close()
    return features, labels, stream


def linear_probe_task(
    encoder: Encoder,
    train: DataSpec,
    test: DataSpec,
    *,
    classnames: Sequence[str] | PathLike | None = None,
    dataset: str | None = None,
    train_labels: PathLike | None = None,
    test_labels: PathLike | None = None,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Linear probe on frozen image features: lp_acc1, lp_acc5, lp_mean_per_class_recall, ...

    `train` and `test` are labelled shards or folders with the same classes; folder classes of
    the test set are matched to the training set's by name. See `clip_eval.probe.linear_probe`.
    """
    device = torch.device(device)
    opts = dict(dataset=dataset, batch_size=batch_size, num_workers=num_workers)
    train_x, train_y, stream = _features(
        encoder, train, device, progress, classnames=classnames, labels=train_labels, **opts
    )
    test_names = classnames
    if classnames is None and stream.images is not None and dataset is None:
        test_names = stream.images.class_keys  # match test folders to the training classes by name
    test_x, test_y, _ = _features(
        encoder, test, device, progress, classnames=test_names, labels=test_labels, **opts
    )
    num_classes = len(stream.classnames) if stream.classnames else None
    if num_classes is not None and int(max(train_y.max(), test_y.max())) >= num_classes:
        raise DataError(
            f"{_spec_name(test)}: a label is >= the {num_classes} classes of {stream.source}"
        )
    try:
        metrics = linear_probe(
            train_x,
            train_y,
            test_x,
            test_y,
            num_classes=num_classes,
            weight_decays=weight_decays,
            val_fraction=val_fraction,
            seed=seed,
            max_iter=max_iter,
            device=device,
        )
    except EvalDataError as exc:
        raise DataError(f"{_spec_name(train)}: {exc}") from exc
    log.info(
        "linear probe %s -> %s: %s", _spec_name(train), _spec_name(test), format_metrics(metrics)
    )
    return metrics


def few_shot_task(
    encoder: Encoder,
    data: DataSpec,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 15,
    episodes: int = 600,
    seed: int = 0,
    classnames: Sequence[str] | PathLike | None = None,
    dataset: str | None = None,
    labels: PathLike | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """N-way K-shot prototype episodes on frozen image features: fewshot_acc +- fewshot_acc_ci95."""
    device = torch.device(device)
    features, targets, stream = _features(
        encoder,
        data,
        device,
        progress,
        classnames=classnames,
        dataset=dataset,
        labels=labels,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    try:
        metrics = few_shot(
            features,
            targets,
            n_way=n_way,
            k_shot=k_shot,
            n_query=n_query,
            episodes=episodes,
            seed=seed,
        )
    except EvalDataError as exc:
        raise DataError(f"{stream.where}: {exc}") from exc
    log.info("few-shot on %s: %s", stream.where, format_metrics(metrics))
    return metrics


def _has_json(shard: str) -> bool:
    """Whether the first sample of a local shard has a .json member (remote shards: assume yes)."""
    if is_remote(shard):
        return True
    try:
        with tarfile.open(shard, "r:") as tf:
            first = None
            for info in tf:
                split = sample_key(info.name) if info.isreg() else None
                if split is None:
                    continue
                if first is None:
                    first = split[0]
                if split[0] != first:
                    return False
                if split[1] == "json":
                    return True
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"unreadable shard: {shard} ({exc}; rebuild it)") from exc
    return False


__all__ = ["few_shot_task", "linear_probe_task", "retrieval_task", "zero_shot_task"]
