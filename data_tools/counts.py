"""Samples per shard at a cost that grows with the number of shards, not of samples.

Epoch mode needs every shard's sample count before step 1 (each rank must stop a pass after the
same number of batches). Counting tar headers reads ~64k samples/s: hours for LAION-400M, in
every process, at every start and resume. So a count comes from the first of:

1. our `manifest.json` (synth, build, reshard, from-imagefolder), beside the shards or one folder
   up, whose split lists the shard with its count: used when the shard still has the size the
   manifest recorded (older manifests without sizes: when the shard is not newer than it);
2. img2dataset's `NAME_stats.json` beside `NAME.tar` ("successes" is the number of samples it
   wrote into the tar; it writes the file after closing the tar): used when not older than the tar;
3. the count cache, `.clip-data-counts.json` in the shard folder, or under the user cache dir
   when that folder is not writable or holds a file of that name that is not ours; an entry is
   used only while the shard's size and mtime are those it was counted at;
4. the tar headers, counted once; the result goes into the cache.

Sidecar counts assume intact shards, as header counts do: a bad sample only makes a rank's pass
shorter, which `max_batches` and the trainer's end-of-pass agreement already absorb.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_tools.errors import DataError
from data_tools.urls import expand_shards, is_remote

log = logging.getLogger(__name__)

CACHE_NAME = ".clip-data-counts.json"
CACHE_FORMAT = "clip-train-counts/1"
_MTIME_SLACK_NS = 2_000_000_000  # coarse file-system clocks (FAT, some NFS): 2 s


def count_headers(url: str) -> int:
    """Samples in one local shard, from its tar headers (gzip shards are decompressed)."""
    from data_tools.tario import ReadMode, iter_shard

    def problem(reason: str, key: str, url: str, detail: str) -> None:
        if reason == "unreadable_shard":
            raise DataError(f"unreadable shard: {url} ({detail}; rebuild it)")

    return sum(1 for _ in iter_shard(url, mode=ReadMode(False), on_problem=problem))


def shard_sample_counts(shards: str | Path | Sequence[str | Path]) -> list[tuple[str, int]]:
    """(shard, samples) for every shard of a spec, in order: from sidecars, the count cache or,
    for shards with neither, the tar headers (once; then cached). Remote shards raise."""
    urls = expand_shards(shards)
    for u in urls:
        if is_remote(u):
            raise DataError(
                f"cannot count the samples of a remote shard: {u}; epoch mode needs every "
                "shard's count: use mode='resampled' with samples_per_epoch (clip-train: "
                "data.mode=resampled data.samples_per_epoch=N), or copy the shards locally"
            )
    by_folder: dict[Path, list[str]] = {}
    for u in urls:
        by_folder.setdefault(Path(os.path.abspath(u)).parent, []).append(u)
    counts: dict[str, int] = {}
    for folder, group in by_folder.items():
        counts.update(_folder_counts(folder, group))
    return [(u, counts[u]) for u in urls]


def count_samples(shards: str | Path | Sequence[str | Path]) -> int:
    """Total samples in a shard spec (see `shard_sample_counts`)."""
    return sum(n for _, n in shard_sample_counts(shards))


# -- one folder ------------------------------------------------------------------------------
def _stat(url: str) -> os.stat_result:
    try:
        return os.stat(url)
    except OSError as e:
        raise DataError(f"unreadable shard: {url} ({e.strerror}; check the path)") from e


def _folder_counts(folder: Path, urls: list[str]) -> dict[str, int]:
    stats = {u: _stat(u) for u in urls}
    listed = _manifest_counts(folder)
    out: dict[str, int] = {}
    rest: list[str] = []
    for u in urls:
        st = stats[u]
        m = listed.get(os.path.basename(u))
        if m is not None and m.fits(st):
            out[u] = m.samples
            continue
        n = _img2dataset_count(u, st)
        if n is not None:
            out[u] = n
        else:
            rest.append(u)
    if not rest:
        return out
    cached = _read_cache(folder)
    fresh: dict[str, dict[str, int]] = {}
    for u in rest:
        st, name = stats[u], os.path.basename(u)
        e = cached.get(name)
        if e is not None and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns:
            out[u] = int(e["samples"])
            continue
        out[u] = count_headers(u)
        fresh[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": out[u]}
    if fresh:
        log.info(
            "counted the samples of %d shards in %s from tar headers; cached", len(fresh), folder
        )
        _write_cache(folder, fresh)
    return out


class _Listed:
    """A count a manifest gives for a shard, and how to tell it still applies."""

    def __init__(self, samples: int, size: int | None, written_ns: int) -> None:
        self.samples, self.size, self.written_ns = samples, size, written_ns

    def fits(self, st: os.stat_result) -> bool:
        if self.size is not None:
            return st.st_size == self.size
        return st.st_mtime_ns <= self.written_ns + _MTIME_SLACK_NS


def _manifest_counts(folder: Path) -> dict[str, _Listed]:
    """Shard name -> count from a manifest.json in `folder` or its parent naming `folder`."""
    out: dict[str, _Listed] = {}
    here = folder.resolve()
    for path in (folder.parent / "manifest.json", folder / "manifest.json"):
        try:
            written = path.stat().st_mtime_ns
            manifest = json.loads(path.read_text(encoding="utf-8"))
            splits = manifest.get("splits") or {}
            for split in splits.values():
                if (path.parent / str(split.get("path", ""))).resolve() != here:
                    continue
                sizes = split.get("shard_bytes") or [None] * len(split["shards"])
                for name, n, size in zip(split["shards"], split["shard_counts"], sizes):
                    if isinstance(n, int) and (size is None or isinstance(size, int)):
                        out[str(name)] = _Listed(n, size, written)
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            continue  # no manifest, or not one of ours: nothing to use
    return out


def _img2dataset_count(url: str, st: os.stat_result) -> int | None:
    """img2dataset's "successes" for `NAME.tar` from `NAME_stats.json`, if it still applies."""
    if not url.endswith(".tar"):
        return None
    path = url[: -len(".tar")] + "_stats.json"
    try:
        if os.stat(path).st_mtime_ns + _MTIME_SLACK_NS < st.st_mtime_ns:
            return None  # the tar changed after img2dataset wrote its stats
        with open(path, encoding="utf-8") as f:
            n = json.load(f).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None


# -- the cache -------------------------------------------------------------------------------
def user_cache_file(folder: Path) -> Path:
    """Where the counts of a folder we may not write into are cached."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(folder.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return base / "clip-train" / "shard-counts" / f"{digest[:24]}.json"


def _load(path: Path) -> dict[str, Any] | None:
    """The entries of a cache file of ours; None when absent, unreadable or not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
        return None
    shards = data.get("shards")
    return shards if isinstance(shards, dict) else None


def _read_cache(folder: Path) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for path in (user_cache_file(folder), folder / CACHE_NAME):  # the folder's own file wins
        got = _load(path) or {}
        entries.update(
            {
                k: v
                for k, v in got.items()
                if isinstance(v, dict) and isinstance(v.get("samples"), int)
            }
        )
    return entries


def _write_cache(folder: Path, fresh: dict[str, dict[str, int]]) -> None:
    """Merge `fresh` into the folder's cache file, or the user's if we may not write there.

    Never replaces a file we did not write: a `.clip-data-counts.json` that is not ours sends
    the cache to the user cache dir. Atomic, so concurrent ranks at worst redo a count."""
    from data_tools.io import write_json_atomic

    local = folder / CACHE_NAME
    targets = [user_cache_file(folder)]
    if os.access(folder, os.W_OK) and (not local.exists() or _load(local) is not None):
        targets.insert(0, local)
    for path in targets:
        entries = dict(_load(path) or {})
        entries.update(fresh)
        try:
            write_json_atomic(path, {"format": CACHE_FORMAT, "shards": entries})
            return
        except OSError as e:
            log.debug("cannot write the count cache %s: %s", path, e)
    log.warning(
        "could not cache shard counts for %s (tried %s); they will be counted again next time",
        folder,
        ", ".join(str(p) for p in targets),
    )
