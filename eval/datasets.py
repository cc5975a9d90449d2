"""Evaluation data that is not in shards: image folders and caption tables, read directly.

- Class folders: `ROOT/<class>/<image>` (ImageNet val with synset sub-folders, or any class tree).
  ImageNet synsets map to their standard index (sorted synset order); other folder names are
  looked up in the class names (`name`, or `name` with spaces for underscores, or an explicit
  `folder<TAB>name` line), or, without class names, become them in sorted order.
- Flat folders: `ROOT/<image>` plus a labels file: one integer per line in sorted filename
  order, or `filename,label` rows (label an index, a synset or a class name).
- Caption tables: CSV/TSV with a header, or JSONL, of image paths (relative to the table) and
  captions; several rows for one image, or a list of captions, give several captions per image.

Every problem is a `DataError` naming the file and line or folder and saying what to do.
Batches are the same dicts the shard loader yields ("image", "key", "label", "json").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from data_tools import imagenet
from data_tools.errors import DataError
from data_tools.io import read_table
from data_tools.samples import IMAGE_FILE_EXTS, BadSample, is_image_file, open_image

log = logging.getLogger(__name__)

TABLE_EXTENSIONS = (".csv", ".tsv", ".jsonl", ".json")
_IMAGE_COLUMNS = ("image", "filepath", "image_path", "file", "path", "filename")
_CAPTION_COLUMNS = ("captions", "caption", "text", "title")


def is_table(data: object) -> bool:
    """Whether `data` names a caption table (by extension) rather than shards."""
    return isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() in TABLE_EXTENSIONS


def folder_kind(data: object) -> str | None:
    """'class-folder' or 'flat-folder' for a directory of images, None for shards or anything else.

    A directory holding `.tar` files is a shard directory, never an image folder.
    """
    if not isinstance(data, (str, os.PathLike)):
        return None
    root = Path(data)
    if not root.is_dir() or any(root.glob("*.tar")):
        return None
    if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return "class-folder"
    if any(is_image_file(p) for p in root.iterdir()):
        return "flat-folder"
    return None


@dataclass
class ImageSet:
    """Image files with labels (classification) or captions (retrieval), plus class names."""

    root: Path
    paths: list[Path]
    labels: list[int] | None = None
    captions: list[list[str]] | None = None
    classnames: list[str] | None = None
    class_keys: list[str] | None = None  # what names each class in the data (folder, synset)
    source: str = ""  # where the class names came from, for messages

    def __len__(self) -> int:
        return len(self.paths)


def split_classname_lines(lines: Sequence[str]) -> tuple[list[str], list[str]]:
    """(keys, names) from class-name lines, where a line is `name` or `folder<TAB>name`."""
    keys, names = [], []
    for line in lines:
        key, sep, name = line.partition("\t")
        keys.append(key.strip())
        names.append(name.strip() if sep else key.strip())
    return keys, names


def _images_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}") from exc


def _class_index(
    folders: Sequence[str], classnames: list[str] | None, in1k: bool, source: str, root: Path
) -> tuple[dict[str, int], list[str], list[str], str]:
    """Folder name -> class index, the class names to prompt with, the class keys, their source."""
    if in1k:
        synsets = imagenet.synsets()
        index = {s: i for i, s in enumerate(synsets)}
        names = imagenet.classnames() if classnames is None else classnames
        if len(names) != len(synsets):
            raise DataError(
                f"{source} has {len(names)} class names; ImageNet folders need all 1000 in synset "
                "order"
            )
        for folder in folders:
            if folder not in index:
                raise DataError(
                    f"class folder {folder!r} ({root / folder}) is not an ImageNet-1k synset; "
                    "remove it, or evaluate the tree with --classnames FILE instead of --dataset "
                    "imagenet"
                )
        source = source if classnames is not None else "open_clip ImageNet names"
        return {f: index[f] for f in folders}, names, list(synsets), source
    if classnames is None:
        names = [f.replace("_", " ") for f in folders]  # folders are sorted: index = sorted order
        return {f: i for i, f in enumerate(folders)}, names, list(folders), "the folder names"
    keys, names = split_classname_lines(classnames)
    lookup: dict[str, int] = {}
    for i, key in enumerate(keys):
        lookup.setdefault(key, i)
    for i, key in enumerate(keys):
        lookup.setdefault(key.replace(" ", "_"), i)
    mapping = {}
    for folder in folders:
        i = lookup.get(folder)
        if i is None:
            raise DataError(
                f"class folder {folder!r} ({root / folder}) is not in the class names from "
                f"{source}; "
                f"add a line '{folder}' (or '{folder}<TAB>display name') there, or remove the "
                "folder"
            )
        mapping[folder] = i
    return mapping, names, keys, source


def class_folder(
    root: str | os.PathLike,
    classnames: list[str] | None = None,
    dataset: str | None = None,
    source: str = "",
) -> ImageSet:
    """A class tree `root/<class>/<image>`: every image with its class index."""
    root = Path(root)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"{root} has no class sub-folders (for a flat folder of images pass --labels FILE)"
        )
    in1k = dataset == "imagenet"
    if dataset is None and classnames is None and imagenet.label_folders(folders) is not None:
        log.info("%s: synset folders, using ImageNet-1k class indices and names", root)
        in1k = True
    mapping, names, keys, source = _class_index(folders, classnames, in1k, source, root)
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        files = _images_in(root / folder)
        paths.extend(files)
        labels.extend([mapping[folder]] * len(files))
    if not paths:
        raise DataError(
            f"{root}: no images in its {len(folders)} class folders (extensions: "
            f"{', '.join(IMAGE_FILE_EXTS)})"
        )
    return ImageSet(root, paths, labels=labels, classnames=names, class_keys=keys, source=source)


def _parse_label(value: str, lookup: dict[str, int], where: str) -> int:
    value = value.strip()
    try:
        return int(value)
    except ValueError:
        pass
    first = value.split()[0] if value.split() else value  # Kaggle-style "n01751748 x y x y"
    for candidate in (value, first):
        if candidate in lookup:
            return lookup[candidate]
    raise DataError(
        f"{where}: label {value!r} is neither an integer nor a known class (synset or class name)"
    )


def flat_folder(
    root: str | os.PathLike,
    labels_file: str | os.PathLike,
    classnames: list[str] | None = None,
    dataset: str | None = None,
    source: str = "",
) -> ImageSet:
    """Images directly in `root` with labels from `labels_file` (see the module docstring)."""
    root, labels_file = Path(root), Path(labels_file)
    if not root.is_dir():
        raise DataError(f"--data {root}: not a directory")
    paths = _images_in(root)
    if not paths:
        raise DataError(f"{root}: no image files (extensions: {', '.join(IMAGE_FILE_EXTS)})")
    if not labels_file.is_file():
        raise DataError(f"--labels {labels_file}: no such file")
    if dataset == "imagenet":
        names = imagenet.classnames() if classnames is None else classnames
        keys = list(imagenet.synsets())
        source = source if classnames is not None else "open_clip ImageNet names"
    elif classnames is None:
        raise DataError(
            f"{root} is a flat folder: pass --classnames FILE (or --dataset imagenet) to name its "
            "labels"
        )
    else:
        keys, names = split_classname_lines(classnames)
    lookup = {k: i for i, k in enumerate(keys)} | {
        n: i for i, n in enumerate(names) if n not in keys
    }
    lines = labels_file.read_text(encoding="utf-8").splitlines()
    rows = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise DataError(f"--labels {labels_file} is empty")
    delimiter = "\t" if "\t" in rows[0][1] else "," if "," in rows[0][1] else None
    labels: list[int]
    if delimiter is None:  # one label per line, in sorted filename order
        if len(rows) != len(paths):
            raise DataError(
                f"--labels {labels_file} has {len(rows)} labels but {root} has {len(paths)} "
                "images; "
                f"one label per image in sorted filename order is needed (or 'filename,label' rows)"
            )
        labels = [_parse_label(line, lookup, f"{labels_file} line {n}") for n, line in rows]
    else:
        by_name: dict[str, int] = {}
        for n, line in rows:
            name, _, value = (part.strip() for part in line.partition(delimiter))
            try:
                label = _parse_label(value, lookup, f"{labels_file} line {n}")
            except DataError:
                if n == rows[0][0]:
                    continue  # a header row
                raise
            by_name[name] = label
        labels = []
        for path in paths:
            label = by_name.pop(path.name, None)
            label = by_name.pop(path.stem, None) if label is None else label
            if label is None:
                raise DataError(
                    f"--labels {labels_file} has no row for image {path.name} (rows are "
                    "'filename,label')"
                )
            labels.append(label)
        if by_name:
            extra = next(iter(by_name))
            raise DataError(
                f"--labels {labels_file} names {extra!r}, which is not an image in {root}"
            )
    for path, label in zip(paths, labels):
        if not 0 <= label < len(names):
            raise DataError(
                f"--labels {labels_file}: image {path.name} has label {label}, outside [0, "
                f"{len(names)})"
            )
    return ImageSet(
        root,
        paths,
        labels=labels,
        classnames=names,
        class_keys=keys,
        source=source or str(labels_file),
    )


def _pick_column(
    columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, table: Path
) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(
                f"{table}: no {what} column {wanted!r} (columns: {', '.join(columns) or 'none'})"
            )
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"{table}: no {what} column among {', '.join(candidates)} (columns: "
        f"{', '.join(columns) or 'none'}); "
        f"name it with --{what}-column"
    )


def caption_table(
    table: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None
) -> ImageSet:
    """Images and their captions from a CSV/TSV/JSONL table; rows of one image are merged."""
    table = Path(table)
    if not table.is_file():
        raise DataError(f"--data {table}: no such caption table")
    images: dict[Path, list[str]] = {}
    image_key = caption_key = None
    for n, row in read_table(table):
        if image_key is None:
            columns = list(row)
            image_key = _pick_column(columns, image_column, _IMAGE_COLUMNS, "image", table)
            caption_key = _pick_column(columns, caption_column, _CAPTION_COLUMNS, "caption", table)
        value, captions = row.get(image_key), row.get(caption_key)  # type: ignore[arg-type]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{table} line {n}: empty or missing {image_key!r}")
        if isinstance(captions, str):
            captions = [captions]
        if (
            not isinstance(captions, list)
            or not captions
            or not all(isinstance(c, str) and c.strip() for c in captions)
        ):
            raise DataError(
                f"{table} line {n}: {caption_key!r} must be a non-empty caption or list of captions"
            )
        path = Path(value).expanduser()
        path = path if path.is_absolute() else table.parent / path
        if path not in images:
            if not path.is_file():
                raise DataError(
                    f"{table} line {n}: image {value!r} not found ({path}); paths are relative to "
                    "the table's folder"
                )
            images[path] = []
        images[path].extend(captions)
    if not images:
        raise DataError(f"{table} has no rows: retrieval needs images with captions")
    return ImageSet(table.parent, list(images), captions=list(images.values()), source=str(table))


class _Files(Dataset):
    """Decoded, preprocessed images of an `ImageSet`; a failure comes back as an error string."""

    def __init__(self, images: ImageSet, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.images.paths[i]
        key = os.path.relpath(path, self.images.root)
        item: dict[str, Any] = {"key": key}
        try:
            with open_image(path, Image.MAX_IMAGE_PIXELS or 2**62) as img:
                item["image"] = self.transform(img)
        except (BadSample, OSError, ValueError, SyntaxError) as exc:
            item["error"] = (
                f"cannot read image {path}: {' '.join(str(exc).split())}; fix or remove the file"
            )
            return item
        if self.images.labels is not None:
            item["label"] = self.images.labels[i]
        if self.images.captions is not None:
            item["json"] = {"captions": self.images.captions[i]}
        return item


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    errors = [item["error"] for item in items if "error" in item]
    if errors:
        return {"error": errors[0]}
    batch: dict[str, Any] = {
        "image": torch.stack([item["image"] for item in items]),
        "key": [item["key"] for item in items],
    }
    if "label" in items[0]:
        batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
    if "json" in items[0]:
        batch["json"] = [item["json"] for item in items]
    return batch


class FileLoader:
    """Ordered batches of an `ImageSet`; an unreadable image stops the pass with a `DataError`."""

    def __init__(
        self,
        images: ImageSet,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        self.images = images
        self.loader = DataLoader(
            _Files(images, transform),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=pin_memory,
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if "error" in batch:
                raise DataError(batch["error"])
            yield batch

    def close(self) -> None:
        """Nothing to release (workers end with the iterator); here to match `ShardLoader`."""
