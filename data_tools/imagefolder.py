"""`clip-data from-imagefolder`: a class-per-folder tree -> labelled eval shards.

    ROOT/<class>/<image>   ->   OUT/val-NNNNNN.tar (key.jpg + key.cls + key.json),
                                OUT/classnames.txt, OUT/templates.txt, OUT/manifest.json

This is the layout `clip-eval zero-shot --data OUT` reads. Labels index `classnames.txt`:

- folders that are all ImageNet-1k synsets (the "val layout", `n01440764/...`): labels are the
  standard ImageNet-1k indices (so a subset of classes keeps them), `classnames.txt` holds
  the 1000 CLIP class names and `templates.txt` the 80 CLIP ImageNet prompts, as open_clip
  ships them; `synsets.txt` lists the synsets in label order;
- other WordNet synsets (e.g. ImageNet-21k): sorted folder order, names from timm's synset
  lemmas;
- anything else: sorted folder order, names from the folder names ('_' -> ' '), or from
  `--classnames` (one per line, in sorted folder order); template "a photo of a {}.".
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from data_tools import imagenet
from data_tools.build_encode import EncodeOptions
from data_tools.build_inputs import Item, Listing, make_key
from data_tools.build_writer import write_split
from data_tools.errors import DataError
from data_tools.io import write_json_atomic, write_text_atomic
from data_tools.samples import IMAGE_FILE_EXTS

FORMAT = "clip-train-imagefolder/1"
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def classes_of(root: Path, classnames_file: str | Path | None) -> dict[str, Any]:
    """Folder -> label, class names and templates for a class-per-folder tree."""
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DataError(f"no class folders in {root} (expected ROOT/<class>/<image>)")
    kind = "folders"
    templates = list(DEFAULT_TEMPLATES)
    synsets_out: list[str] | None = None
    if all(imagenet.is_synset(f) for f in folders):
        in1k = imagenet.label_folders(folders)
        if in1k is not None:
            kind = "imagenet-1k"
            labels = in1k
            names, templates = imagenet.classnames(), imagenet.templates()
            synsets_out = list(imagenet.synsets())
        else:
            kind = "synsets"
            lemmas = imagenet.synset_lemmas(folders)
            labels = {f: i for i, f in enumerate(folders)}
            names = [lemmas.get(f, f) for f in folders]
            synsets_out = folders
    else:
        labels = {f: i for i, f in enumerate(folders)}
        names = [f.replace("_", " ") for f in folders]
    if classnames_file is not None:
        given = [
            ln.strip() for ln in Path(classnames_file).read_text("utf-8").splitlines() if ln.strip()
        ]
        if len(given) != len(names):
            raise DataError(
                f"{classnames_file}: {len(given)} class names for {len(names)} "
                f"classes ({'ImageNet-1k' if kind == 'imagenet-1k' else 'folders'}"
                "); give one name per line in label order"
            )
        names = given
    return {
        "kind": kind,
        "labels": labels,
        "names": names,
        "templates": templates,
        "synsets": synsets_out,
    }


def from_imagefolder(
    root: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    opts: EncodeOptions | None = None,
    prefix: str = "val",
    classnames_file: str | Path | None = None,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write labelled shards + classnames.txt + templates.txt; returns the manifest."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (expected ROOT/<class>/<image>)")
    opts = opts or EncodeOptions(require_caption=False, min_caption_len=0)
    opts.validate()
    classes = classes_of(root, classnames_file)
    listing = Listing(info={"kind": "imagefolder", "path": str(root)})
    items = []
    for folder, label in classes["labels"].items():
        for dirpath, dirnames, filenames in os.walk(root / folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                stem, ext = os.path.splitext(name)
                if name.startswith(".") or ext.lower() not in IMAGE_FILE_EXTS:
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                items.append(
                    Item(
                        key=make_key(os.path.splitext(rel)[0]),
                        source=rel,
                        image=os.path.join(dirpath, name),
                        label=label,
                        meta={
                            "label": label,
                            "classname": classes["names"][label],
                            "folder": folder,
                            "source": rel,
                        },
                    )
                )
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_FILE_EXTS)}) in the class folders of {root}")
    if shuffle:
        random.Random(f"clip-data:{seed}:imagefolder").shuffle(items)
    out = Path(out_dir)
    (out / "manifest.json").unlink(missing_ok=True)
    result = write_split(
        items,
        out,
        prefix,
        samples_per_shard=samples_per_shard,
        opts=opts,
        num_workers=num_workers,
        overwrite=overwrite,
        progress=progress,
        desc="from-imagefolder",
    )
    write_text_atomic(out / "classnames.txt", "\n".join(classes["names"]) + "\n")
    write_text_atomic(out / "templates.txt", "\n".join(classes["templates"]) + "\n")
    if classes["synsets"] is not None:
        write_text_atomic(out / "synsets.txt", "\n".join(classes["synsets"]) + "\n")
    manifest = {
        "format": FORMAT,
        "input": {"kind": "imagefolder", "path": str(root)},
        "classes": classes["kind"],
        "num_classes": len(classes["names"]),
        "folders": len(classes["labels"]),
        "counts": {prefix: result.written},
        "splits": {prefix: result.to_json(out)},
        "inputs": len(items),
        "written": result.written,
        "skipped": dict(result.skipped + listing.skipped),
        "bad_samples": result.bad,
        "resumed_shards": result.resumed_shards,
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
