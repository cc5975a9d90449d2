"""Turn a user's shard spec (dir, brace pattern, glob, file, `::` list) into shard paths.

One function so that training, eval and `clip-data inspect` accept exactly the same specs
and fail the same way, before any worker starts, with the path that is wrong.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from braceexpand import braceexpand

from data_tools.errors import DataError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # what a directory spec picks up
_HINT = "check the path or run `clip-data synth`/`clip-data build` first"
_REMOTE = re.compile(r"^([a-z][a-z0-9+.-]*://|pipe:)", re.IGNORECASE)


def is_remote(url: str) -> bool:
    """True for `s3://`, `https://`, `pipe:` ... specs, which are read by webdataset's gopen."""
    return bool(_REMOTE.match(url))


def _expand_one(part: str) -> list[str]:
    if is_remote(part):
        return list(braceexpand(part))
    path = Path(os.path.expanduser(part))
    if path.is_dir():
        found = sorted(
            str(p) for p in path.iterdir() if p.name.endswith(SHARD_SUFFIXES) and p.is_file()
        )
        if not found:
            raise DataError(f"no .tar shards in directory: {part} (nor .tar.gz; {_HINT})")
        return found
    if "{" in part and "}" in part:
        out = list(braceexpand(os.path.expanduser(part)))
        missing = [item for item in out if not Path(item).is_file()]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}{more} (from {part}; {_HINT})")
        return out
    if glob.has_magic(part):
        found = sorted(p for p in glob.glob(os.path.expanduser(part)) if Path(p).is_file())
        if not found:
            raise DataError(f"no shards match: {part} ({_HINT})")
        return found
    if path.is_file():
        return [str(path)]
    raise DataError(f"shard not found: {part} ({_HINT})")


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[str]:
    """Expand a shard spec into a list of shard paths, in a stable order.

    Accepts a directory (its `*.tar`, `*.tar.gz` and `*.tgz`, sorted), a brace pattern
    (`train-{000000..000009}.tar`), a glob, a single file, a `::`-separated string of those,
    or a list of any of them.
    Remote URLs (`s3://`, `pipe:`) are brace-expanded and passed through unchecked.
    """
    if isinstance(spec, (str, Path)):
        parts = [p for p in str(spec).split("::") if p.strip()]
    else:
        parts = []
        for item in spec:
            parts.extend(p for p in str(item).split("::") if p.strip())
    if not parts:
        raise DataError(
            f"no shards given: {spec!r} (pass a directory, pattern or list of .tar files)"
        )
    out: list[str] = []
    for part in parts:
        out.extend(_expand_one(part.strip()))
    if not out:
        raise DataError(f"no shards found for: {spec!r} ({_HINT})")
    return out
