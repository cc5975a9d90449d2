"""Shard builders: what people have -> clean, resumable WebDataset shards.

Inputs (`detect_input` tells them apart):

- a folder of images with same-named `.txt` captions (`cat.jpg` + `cat.txt`, any depth);
- a table of local image paths + captions: CSV, TSV, JSONL or parquet, column names
  configurable, every other column kept in the sample's `.json`;
- shards: an img2dataset output folder (`00000.tar` + `00000.parquet` + `00000_stats.json`)
  or any folder of WebDataset `.tar` files, re-sharded through the same filters (or, for
  img2dataset, `reuse`d as is: counted and checked against its stats, nothing copied).

All of them become `Item`s, which one engine (`write_split`) encodes in parallel and writes:
items are dealt to shards by position (shard i holds items [i*n, (i+1)*n) minus the bad
ones), each shard is written to a temporary name and renamed when complete, and
`.clip-data-build.json` in the output folder records the completed shards, so a rerun with the
same inputs and options skips them (a resumable build) and a rerun with different ones is
refused unless `overwrite`.

Bad inputs are skipped and counted per reason, never half-written: missing_caption,
empty_caption, caption_too_short, caption_too_long, bad_utf8, missing_image, decode,
too_large (over `max_pixels`, e.g. decompression bombs), duplicate_key, unsafe_member,
truncated_tar.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_tools.errors import DataError
from data_tools.images import encode_image
from data_tools.io import read_table, write_json_atomic
from data_tools.samples import IMAGE_FIELDS, IMAGE_FILE_EXTS, BadSample, check_sample
from data_tools.shards import ShardWriter
from data_tools.tario import FieldLoader, RawSample, ReadMode, iter_shard

log = logging.getLogger(__name__)

BUILD_STATE = ".clip-data-build.json"
BUILD_FORMAT = "clip-train-build/1"
TABLE_EXTS = (".csv", ".tsv", ".jsonl", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename", "img")
CAPTION_COLUMNS = ("caption", "text", "title", "txt")
_MAX_LISTED = 50  # bad samples kept by name in the summary and manifest


@dataclass(frozen=True)
class EncodeOptions:
    """How each sample is checked and encoded; every field maps to a `clip-data` flag."""

    max_side: int | None = None
    jpeg_quality: int = 95
    max_pixels: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
    require_caption: bool = True
    min_caption_len: int = 1
    max_caption_len: int | None = None

    def validate(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise DataError(f"--max-side {self.max_side} is too small (>= 8)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality {self.jpeg_quality} is not in 1-100")
        if self.max_pixels < 1:
            raise DataError(f"--max-pixels {self.max_pixels} must be >= 1")
        if self.max_caption_len is not None and self.max_caption_len < self.min_caption_len:
            raise DataError(f"--max-caption-len {self.max_caption_len} < --min-caption-len "
                            f"{self.min_caption_len}")


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
        if len(self.bad) < _MAX_LISTED:
            self.bad.append({"key": key, "reason": reason, "source": source, "detail": detail})
        log.debug("skipping %r (%s): %s: %s", key, source, reason, detail)


@dataclass
class SplitResult:
    """What `write_split` left in one output folder."""

    path: Path
    prefix: str
    shards: list[str]
    shard_counts: list[int]
    written: int
    skipped: Counter
    bad: list[dict[str, str]]
    resumed_shards: int
    inputs: int

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "path": os.path.relpath(self.path, root),
            "samples": self.written,
            "shards": self.shards,
            "shard_counts": self.shard_counts,
            # sizes let readers trust the counts without opening a tar (data_tools.counts)
            "shard_bytes": [os.path.getsize(self.path / n) for n in self.shards],
            "skipped": dict(self.skipped),
        }


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
        raise DataError(f"{p}: not a table (give a {', '.join(TABLE_EXTS)} file, "
                        "or a folder of images with .txt captions)")
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
                items.append(Item(
                    key=make_key(os.path.splitext(rel)[0]),
                    source=rel,
                    image=os.path.join(dirpath, name),
                    caption_path=os.path.join(dirpath, txt) if txt in names else None,
                    meta={"source": rel},
                ))
            elif ext.lower() == ".txt" and not any(
                stem + e in names or stem + e.upper() in names for e in IMAGE_FILE_EXTS
            ):
                listing.skip("missing_image", make_key(os.path.splitext(rel)[0]), rel,
                             "a caption without an image of the same name")
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


def _pick_column(path: Path, columns: Sequence[str], given: str | None, options: Sequence[str],
                 what: str, flag: str) -> str:
    if given is not None:
        if given not in columns:
            raise DataError(f"{path}: no {what} column {given!r} (columns: "
                            f"{', '.join(columns)}); pass {flag} with one of them")
        return given
    for name in options:
        if name in columns:
            return name
    raise DataError(f"{path}: cannot tell which column holds the {what} (columns: "
                    f"{', '.join(columns)}); pass {flag}")


def table_items(path: str | Path, *, image_col: str | None = None,
                caption_col: str | None = None, key_col: str | None = None,
                image_root: str | Path | None = None) -> Listing:
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
            cap_c = _pick_column(path, cols, caption_col, CAPTION_COLUMNS, "caption",
                                 "--caption-col")
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
        items.append(Item(
            key=key,
            source=where,
            image=str(root / value) if not os.path.isabs(value) else value,
            caption=None if caption is None else str(caption),
            meta=extra or None,
        ))
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
                raise DataError(f"{url}: a compressed (.tar.gz) shard; build and reshard read "
                                "shards by offset: decompress it first (gunzip -k FILE)")
            items.append(Item(key=s.key, source=os.path.basename(url), url=url,
                              refs=dict(s.refs)))
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
                for row in t.select([c for c in ("status", "error_message")
                                     if c in t.column_names]).to_pylist():
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


# -- encoding (in worker processes) ----------------------------------------------------------
_OPTS: EncodeOptions | None = None
_FIELDS: FieldLoader | None = None


def _init_worker(opts: EncodeOptions) -> None:
    global _OPTS, _FIELDS
    _OPTS, _FIELDS = opts, FieldLoader()


def _caption(raw: bytes | str | None, opts: EncodeOptions) -> str | None:
    """The checked caption, or `BadSample` (reason and why)."""
    row, bad = check_sample({} if raw is None else {"txt": raw}, image=False,
                            caption="yes" if opts.require_caption else "present",
                            min_caption_len=opts.min_caption_len,
                            max_caption_len=opts.max_caption_len)
    if bad:
        raise BadSample(*bad[0])
    return row.get("caption")


def encode_item(item: Item, opts: EncodeOptions | None = None,
                fields: FieldLoader | None = None) -> tuple[dict[str, Any] | None, str, str]:
    """(sample, "", "") for a good item, (None, reason, detail) for a bad one."""
    opts = opts or _OPTS or EncodeOptions()
    try:
        extra: dict[str, Any] = {}
        if item.url is not None:
            loader = fields or _FIELDS or FieldLoader()
            raw = loader.load(RawSample(item.key, item.url, {}, dict(item.refs or {})))
            data = dict(raw.fields)
            img_field = next((e for e in IMAGE_FIELDS if e in data), None)
            image = data.pop(img_field) if img_field else None
            caption = _caption(data.pop("txt", None), opts)
            extra = data  # json, cls and anything else travel as they are
        else:
            image = None
            if item.image is not None:
                try:
                    with open(item.image, "rb") as f:
                        image = f.read()
                except OSError as e:
                    raise BadSample("missing_image",
                                    f"cannot read {item.image} ({e.strerror})") from e
            raw_cap: bytes | str | None = item.caption
            if raw_cap is None and item.caption_path is not None:
                try:
                    with open(item.caption_path, "rb") as f:
                        raw_cap = f.read()
                except OSError as e:
                    raise BadSample("missing_caption",
                                    f"cannot read {item.caption_path}") from e
            caption = _caption(raw_cap, opts)
        if image is None:
            raise BadSample("missing_image", "no image")
        data_out, ext, _ = encode_image(image, max_side=opts.max_side,
                                        jpeg_quality=opts.jpeg_quality, max_pixels=opts.max_pixels)
    except BadSample as e:
        return None, e.reason, str(e)
    sample: dict[str, Any] = {"__key__": item.key, ext: data_out}
    if caption is not None:
        sample["txt"] = caption
    if item.label is not None:
        sample["cls"] = item.label
    sample.update(extra)
    if item.meta:
        if "json" in sample:  # a source shard's json, plus what the listing knows
            try:
                sample["json"] = {**json.loads(sample["json"]), **item.meta}
            except ValueError:
                pass
        else:
            sample["json"] = item.meta
    return sample, "", ""


def _encode_in_worker(item: Item) -> tuple[dict[str, Any] | None, str, str]:
    return encode_item(item)


# -- the engine --------------------------------------------------------------------------------
def _fingerprint(items: Sequence[Item], prefix: str, per_shard: int, opts: EncodeOptions) -> str:
    h = hashlib.sha1()
    h.update(json.dumps([BUILD_FORMAT, prefix, per_shard, asdict(opts)]).encode())
    for it in items:
        h.update(it.ident().encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()


def _our_shards(out: Path, prefix: str) -> list[Path]:
    pat = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    return sorted(p for p in out.glob(f"{prefix}-*.tar") if pat.fullmatch(p.name))


def write_split(
    items: Sequence[Item],
    out_dir: str | Path,
    prefix: str,
    *,
    samples_per_shard: int,
    opts: EncodeOptions,
    num_workers: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    desc: str | None = None,
) -> SplitResult:
    """Encode `items` into `out_dir/{prefix}-NNNNNN.tar`, resumably (see module docstring)."""
    from data_tools.progress import progress as progress_bar

    if samples_per_shard < 1:
        raise DataError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory (choose another --output)")
    out.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(items) // samples_per_shard)
    fp = _fingerprint(items, prefix, samples_per_shard, opts)
    state_path = out / BUILD_STATE
    state: dict[str, Any] | None = None
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except ValueError:
            state = None
    existing = _our_shards(out, prefix)
    if state is not None and state.get("fingerprint") != fp:
        if not overwrite:
            raise DataError(
                f"{out} holds shards of a different build (inputs or options changed); "
                "pass --overwrite to replace them, or choose another --output"
            )
        state = None
    if state is None:
        if existing and not overwrite:
            raise DataError(f"{out} already holds {prefix}-*.tar shards that this build did not "
                            "make; pass --overwrite to replace them, or choose another --output")
        for p in existing:
            p.unlink()
        state = {"format": BUILD_FORMAT, "fingerprint": fp, "shards": {}}
    for tmp in out.glob(f".{prefix}-*.tar.tmp"):  # left by a killed run
        tmp.unlink()
    done: dict[str, Any] = state["shards"]
    writer = ShardWriter(out, prefix, 1)

    def complete(i: int) -> bool:
        d = done.get(str(i))
        return d is not None and (d["samples"] == 0 or writer.final_path(i).is_file())

    todo = [i for i in range(n_shards) if not complete(i)]
    resumed = n_shards - len(todo)
    if resumed:
        log.info("%s: %d of %d shards already complete, resuming", out, resumed, n_shards)
    work = [(i, items[i * samples_per_shard:(i + 1) * samples_per_shard]) for i in todo]
    flat = (it for _, chunk in work for it in chunk)
    n_work = sum(len(c) for _, c in work)
    pool = None
    if num_workers > 0 and n_work:
        pool = mp.get_context("spawn").Pool(num_workers, initializer=_init_worker,
                                            initargs=(opts,))
        results: Iterator[tuple[dict[str, Any] | None, str, str]] = pool.imap(
            _encode_in_worker, flat, chunksize=4)
    else:
        fields = FieldLoader()
        results = (encode_item(it, opts, fields) for it in flat)
    try:
        with progress_bar(total=len(items), initial=len(items) - n_work, unit="img",
                          enabled=progress, desc=desc or prefix) as bar:
            for i, chunk in work:
                skipped: Counter = Counter()
                bad: list[dict[str, str]] = []
                with ShardWriter(out, prefix, samples_per_shard=len(chunk) + 1,
                                 start_index=i) as w:
                    for it in chunk:
                        sample, reason, detail = next(results)
                        bar.update(1)
                        if sample is None:
                            skipped[reason] += 1
                            if len(bad) < _MAX_LISTED:
                                bad.append({"key": it.key, "reason": reason,
                                            "source": it.source, "detail": detail})
                            continue
                        w.write(sample)
                done[str(i)] = {"samples": w.num_samples, "skipped": dict(skipped), "bad": bad}
                write_json_atomic(state_path, state)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    for p in _our_shards(out, prefix):  # from an earlier, larger build of the same inputs
        if int(p.stem.rsplit("-", 1)[1]) >= n_shards:
            p.unlink()
    shards, counts, skipped_all, bad_all = [], [], Counter(), []
    for i in range(n_shards):
        d = done[str(i)]
        skipped_all.update(d["skipped"])
        bad_all.extend(d["bad"][: max(0, _MAX_LISTED - len(bad_all))])
        if d["samples"]:
            shards.append(writer.final_path(i).name)
            counts.append(d["samples"])
    return SplitResult(out, prefix, shards, counts, sum(counts), skipped_all, bad_all, resumed,
                       len(items))


# -- build: the `clip-data build` command --------------------------------------------------------
def split_val(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Items whose seeded key hash falls under `fraction` go to val: stable when inputs grow."""
    if fraction <= 0:
        return items, []
    train, val = [], []
    for it in items:
        h = hashlib.sha1(f"{seed}:{it.key}".encode()).digest()
        (val if int.from_bytes(h[:8], "big") / 2**64 < fraction else train).append(it)
    return train, val


def build(
    input_path: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 1000,
    opts: EncodeOptions | None = None,
    shuffle: bool = False,
    seed: int = 0,
    val_fraction: float = 0.0,
    num_workers: int = 0,
    image_col: str | None = None,
    caption_col: str | None = None,
    key_col: str | None = None,
    image_root: str | Path | None = None,
    reuse: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Build `out_dir/train/` (and `out_dir/val/`) shards from any supported input; returns
    the manifest, also written to `out_dir/manifest.json` (last, so it marks completion)."""
    opts = opts or EncodeOptions()
    opts.validate()
    if not 0 <= val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must be in [0, 1)")
    kind = detect_input(input_path)
    out = Path(out_dir)
    if kind == "table":
        listing = table_items(input_path, image_col=image_col, caption_col=caption_col,
                              key_col=key_col, image_root=image_root)
    elif kind == "folder":
        listing = folder_items(input_path)
    else:
        listing = shard_items(input_path)
    if reuse:
        return _reuse(listing, input_path, out)
    train, val = split_val(listing.items, val_fraction, seed)
    if shuffle:
        random.Random(f"clip-data:{seed}:train").shuffle(train)
        random.Random(f"clip-data:{seed}:val").shuffle(val)
    (out / "manifest.json").unlink(missing_ok=True)
    splits = {}
    for name, its in (("train", train), ("val", val)):
        if not its:
            continue
        splits[name] = write_split(its, out / name, name, samples_per_shard=samples_per_shard,
                                   opts=opts, num_workers=num_workers, overwrite=overwrite,
                                   progress=progress, desc=f"build {name}")
    skipped = Counter(listing.skipped)
    bad = list(listing.bad)
    for r in splits.values():
        skipped.update(r.skipped)
        bad.extend(r.bad[: max(0, _MAX_LISTED - len(bad))])
    manifest = {
        "format": BUILD_FORMAT,
        "input": {**listing.info, "path": str(input_path), "kind": listing.info.get("kind", kind)},
        "options": {**asdict(opts), "samples_per_shard": samples_per_shard, "shuffle": shuffle,
                    "seed": seed, "val_fraction": val_fraction},
        "counts": {name: r.written for name, r in splits.items()},
        "splits": {name: r.to_json(out) for name, r in splits.items()},
        "inputs": len(listing.items) + sum(listing.skipped.values()),
        "written": sum(r.written for r in splits.values()),
        "skipped": dict(skipped),
        "bad_samples": bad,
        "resumed_shards": sum(r.resumed_shards for r in splits.values()),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _reuse(listing: Listing, input_path: str | Path, out: Path) -> dict[str, Any]:
    """img2dataset shards used where they are: count, compare with its stats, no copy."""
    if listing.info.get("kind") not in ("img2dataset", "shards"):
        raise DataError("--reuse applies to an img2dataset (or shards) folder; "
                        f"{input_path} is a {listing.info.get('kind')}")
    counts: Counter = Counter(it.url for it in listing.items)
    stats = listing.info.get("img2dataset", {})
    n = len(listing.items)
    if stats.get("successes") is not None and stats["successes"] != n:
        log.warning("img2dataset stats say %d successes but the shards hold %d samples",
                    stats["successes"], n)
    src = Path(input_path).resolve()
    manifest = {
        "format": BUILD_FORMAT,
        "input": {**listing.info, "path": str(input_path)},
        "reused": True,
        "counts": {"train": n},
        "splits": {"train": {"path": str(src), "samples": n,
                             "shards": [os.path.basename(u) for u in counts],
                             "shard_counts": list(counts.values())}},
        "inputs": n + sum(listing.skipped.values()),
        "written": 0,
        "skipped": dict(listing.skipped),
        "bad_samples": list(listing.bad),
        "resumed_shards": 0,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
