"""The builders' inputs: what people have, listed as `Item`s for the write engine.

Four readers, told apart by `detect_input`: a folder of images with same-named `.txt`
captions (`folder_items`), a CSV/TSV/JSONL/parquet table of local image paths and captions
(`table_items`), a folder of WebDataset shards (`shard_items`, `shard_list_items`: read
header-only, their data loaded when encoded) and img2dataset's own record of a download
(`img2dataset_stats`). Listing reads no image; what is already wrong (a caption without an
image, a duplicate key) is counted in the `Listing`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_tools.errors import DataError
from data_tools.io import read_table
from data_tools.samples import IMAGE_FILE_EXTS
from data_tools.tario import ReadMode, iter_shard

log = logging.getLogger("data_tools.build")  # the name users filter the builders' log on

TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")
MAX_LISTED = 50  # bad samples kept by name in the summary and manifest


@dataclass
class Item:
    """One sample to build: a local image (+ caption) or a sample inside a source shard."""

    key: str
    source: str  # for messages: the file, table row or shard it came from
    image: str | None = None
    caption: str | None = None
    caption_path: str | None = None
    meta: dict[str, Any] | None = None
    label: int | None = None
    url: str | None = None
    refs: dict[str, tuple[int, int]] | None = None

    def ident(self) -> str:
        return f"{self.key}\t{self.image or self.url or ''}\t{self.label}"


@dataclass
class Listing:
    """Items found in an input, plus what was already wrong while listing them."""

    items: list[Item] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    bad: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def skip(self, reason: str, key: str, source: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.bad) < MAX_LISTED:
            self.bad.append({"key": key, "reason": reason, "source": source, "detail": detail})
        log.debug("skipping %r (%s): %s: %s", key, source, reason, detail)


# -- keys ------------------------------------------------------------------------------------
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(text: str) -> str:
    """A WebDataset-safe key: letters, digits, '_' and '-' only (no '.', no '/')."""
    return _KEY_BAD.sub("_", text).strip("_") or "_"


def _dedupe(items: list[Item], listing: Listing) -> list[Item]:
    seen: set[str] = set()
    out = []
    for it in items:
        if it.key in seen:
            listing.skip("duplicate_key", it.key, it.source, "another sample has this key")
            continue
        seen.add(it.key)
        out.append(it)
    return out


# -- inputs ----------------------------------------------------------------------------------
def detect_input(path: str | Path) -> str:
    """'table', 'img2dataset', 'shards' or 'folder' for an input path."""
    p = Path(path)
    if p.is_file():
        if p.suffix.lower() in TABLE_EXTS:
            return "table"
        raise DataError(
            f"{p}: not a table (give a {', '.join(TABLE_EXTS)} file, "
            "or a folder of images with .txt captions)"
        )
    if not p.is_dir():
        raise DataError(f"input not found: {p} (give a folder, a table or an img2dataset folder)")
    if any(p.glob("*.tar")):
        stats = any(p.glob("*_stats.json")) or any(p.glob("*.parquet"))
        return "img2dataset" if stats else "shards"
    return "folder"


def folder_items(root: str | Path) -> Listing:
    """Images under `root` (any depth) with their same-named `.txt` captions."""
    root = Path(root)
    listing = Listing(info={"kind": "folder", "path": str(root)})
    items: list[Item] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = set(filenames)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            stem, ext = os.path.splitext(name)
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if ext.lower() in IMAGE_FILE_EXTS:
                txt = stem + ".txt"
                items.append(
                    Item(
                        key=make_key(os.path.splitext(rel)[0]),
                        source=rel,
                        image=os.path.join(dirpath, name),
                        caption_path=os.path.join(dirpath, txt) if txt in names else None,
                        meta={"source": rel},
                    )
                )
            elif ext.lower() == ".txt" and not any(
                stem + e in names or stem + e.upper() in names for e in IMAGE_FILE_EXTS
            ):
                listing.skip(
                    "missing_image",
                    make_key(os.path.splitext(rel)[0]),
                    rel,
                    "a caption without an image of the same name",
                )
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_FILE_EXTS)}) under {root}")
    listing.items = _dedupe(items, listing)
    return listing


def _json_safe(v: Any) -> Any:
    if v is None or isinstance(v, (str, int, bool)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    return str(v)


def _pick_column(
    path: Path,
    columns: Sequence[str],
    given: str | None,
    options: Sequence[str],
    what: str,
    flag: str,
) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(
                f"{path}: no {what} column {given!r} (columns: "
                f"{', '.join(columns)}); pass {flag} with one of them"
            )
        return given
    for name in options:
        if name in columns:
            return name
    raise DataError(
        f"{path}: cannot tell which column holds the {what} (columns: "
        f"{', '.join(columns)}); pass {flag}"
    )


def table_items(
    path: str | Path,
    *,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    image_root: str | Path | None = None,
) -> Listing:
    """Rows of a CSV/TSV/JSONL/parquet table of local image paths and captions."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    listing = Listing(info={"kind": "table", "path": str(path)})
    items: list[Item] = []
    img_c = cap_c = None
    for i, (_, row) in enumerate(read_table(path)):
        if img_c is None:
            cols = list(row)
            img_c = _pick_column(path, cols, image_col, IMAGE_COLUMNS, "image path", "--image-col")
            cap_c = _pick_column(
                path, cols, caption_col, CAPTION_COLUMNS, "caption", "--caption-col"
            )
            if key_col is not None and key_col not in cols:
                raise DataError(f"{path}: no key column {key_col!r} (columns: {', '.join(cols)})")
            listing.info.update({"image_col": img_c, "caption_col": cap_c})
        where = f"{path.name} row {i + 1}"
        kv = row.get(key_col) if key_col else None
        key = make_key(str(kv)) if kv not in (None, "") else f"{i:09d}"
        value = row.get(img_c)
        if value is None or str(value).strip() == "":
            listing.skip("missing_image", key, where, f"empty {img_c!r}")
            continue
        value = str(value).strip()
        if re.match(r"^[a-z][a-z0-9+.-]*://", value, re.IGNORECASE):
            raise DataError(
                f"{where}: {img_c!r} is a URL ({value[:80]}); build takes local paths. "
                "Download with img2dataset, then `clip-data build <its output folder>`"
            )
        caption = row.get(cap_c)
        if isinstance(caption, float) and not math.isfinite(caption):
            caption = None  # pandas-written NaN
        extra = {str(k): _json_safe(v) for k, v in row.items() if k not in (img_c, cap_c)}
        items.append(
            Item(
                key=key,
                source=where,
                image=str(root / value) if not os.path.isabs(value) else value,
                caption=None if caption is None else str(caption),
                meta=extra or None,
            )
        )
    if img_c is None:
        raise DataError(f"{path}: the table has no rows")
    listing.items = _dedupe(items, listing)
    return listing


def shard_items(root: str | Path) -> Listing:
    """Samples of the `.tar` shards in a folder (img2dataset output or our own), by header."""
    root = Path(root)
    shards = sorted(str(p) for p in root.glob("*.tar"))
    if not shards:
        raise DataError(f"no .tar shards in {root}")
    listing = shard_list_items(shards)
    listing.info["path"] = str(root)
    stats = img2dataset_stats(root)
    if stats:
        listing.info.update({"kind": "img2dataset", "img2dataset": stats})
    return listing


def shard_list_items(shards: Sequence[str]) -> Listing:
    """Samples of the given shards, read header-only; their data is loaded when encoded."""
    listing = Listing(info={"kind": "shards", "shards": len(shards)})

    def problem(reason: str, key: str, url: str, detail: str) -> None:
        if reason == "unreadable_shard":
            raise DataError(f"unreadable shard: {url} ({detail}; rebuild or remove it)")
        listing.skip(reason, key, os.path.basename(url), detail)

    items: list[Item] = []
    for url in shards:
        for s in iter_shard(url, mode=ReadMode(False), on_problem=problem):
            if not s.refs:  # read front to back: a gzip shard has no offsets to come back to
                raise DataError(
                    f"{url}: a compressed (.tar.gz) shard; build and reshard read "
                    "shards by offset: decompress it first (gunzip -k FILE)"
                )
            items.append(Item(key=s.key, source=os.path.basename(url), url=url, refs=dict(s.refs)))
    listing.items = _dedupe(items, listing)
    return listing


def img2dataset_stats(root: Path) -> dict[str, Any]:
    """Download outcome that img2dataset recorded: `*_stats.json`, and `*.parquet` errors."""
    out: Counter = Counter()
    for p in sorted(root.glob("*_stats.json")):
        try:
            s = json.loads(p.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable img2dataset stats file %s", p)
            continue
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            if isinstance(s.get(k), int):
                out[k] += s[k]
    errors: Counter = Counter()
    parquets = sorted(root.glob("*.parquet"))
    if parquets:
        try:
            import pyarrow.parquet as pq

            for p in parquets:
                t = pq.read_table(p)
                if "status" not in t.column_names:
                    continue
                for row in t.select(
                    [c for c in ("status", "error_message") if c in t.column_names]
                ).to_pylist():
                    out["parquet_rows"] += 1
                    if row.get("status") == "success":
                        out["parquet_success"] += 1
                    elif row.get("error_message"):
                        errors[str(row["error_message"])[:80]] += 1
        except ImportError:
            log.info("pyarrow not installed: img2dataset parquet files not read")
        except Exception as e:  # a damaged parquet only costs us the error summary
            log.warning("could not read img2dataset parquet files in %s: %s", root, e)
    info: dict[str, Any] = dict(out)
    if errors:
        info["top_errors"] = dict(errors.most_common(5))
    return info
