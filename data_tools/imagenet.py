"""ImageNet-1k labelling: synset ids, their class indices, CLIP class names and templates.

Class indices follow the sorted WordNet synset ids (n01440764 = 0 ... n15075141 = 999): that
is the order of open_clip's `IMAGENET_CLASSNAMES` and of timm's synset list. Both lists ship
inside the timm and open_clip wheels and are read here as plain files, without importing either
package (that would import torch: seconds, for a few lists of names), so `clip-data
from-imagefolder` and `clip-eval` label a synset tree the same way, offline.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from data_tools.errors import DataError

_SYNSET = re.compile(r"n\d{8}")


def is_synset(name: str) -> bool:
    """Whether `name` looks like a WordNet synset id (n + 8 digits), as ImageNet folders are."""
    return bool(_SYNSET.fullmatch(name))


def _package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package} is not installed (pip install {package})")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


@functools.lru_cache(maxsize=1)
def synsets() -> tuple[str, ...]:
    """The 1000 synset ids in class-index order, from timm's `imagenet_synsets.txt`."""
    path = _package_file("timm", "data", "_info", "imagenet_synsets.txt")
    out = tuple(path.read_text().split())
    assert len(out) == 1000 and list(out) == sorted(out)
    return out


@functools.lru_cache(maxsize=1)
def _metadata() -> ModuleType:
    """open_clip's `zero_shot_metadata.py` (plain data), loaded as a module of its own."""
    path = _package_file("open_clip", "zero_shot_metadata.py")
    spec = importlib.util.spec_from_file_location("_clip_train_zero_shot_metadata", path)
    assert spec is not None and spec.loader is not None
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)
    return meta


def classnames() -> list[str]:
    """open_clip's 1000 CLIP class names, in class-index order."""
    return list(_metadata().IMAGENET_CLASSNAMES)


def templates() -> list[str]:
    """open_clip's 80 OpenAI ImageNet prompts, as `str.format` templates ("a photo of a {}.")."""
    return [t("{}") for t in _metadata().OPENAI_IMAGENET_TEMPLATES]


def synset_lemmas(wnids: Sequence[str]) -> dict[str, str]:
    """First lemma of each WordNet synset, from timm's `imagenet_synset_to_lemma.txt`."""
    path = _package_file("timm", "data", "_info", "imagenet_synset_to_lemma.txt")
    want = set(wnids)
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        wnid, _, lemmas = line.partition("\t")
        if wnid in want:
            out[wnid] = lemmas.split(",")[0].strip()
    return out


def label_folders(folders: Sequence[str]) -> dict[str, int] | None:
    """Each folder's ImageNet-1k class index when every folder is an ImageNet-1k synset, else
    None (a tree of other names, or of synsets outside ImageNet-1k, is labelled otherwise)."""
    if not folders or not all(is_synset(f) for f in folders):
        return None
    index = {s: i for i, s in enumerate(synsets())}
    if not all(f in index for f in folders):
        return None
    return {f: index[f] for f in folders}
