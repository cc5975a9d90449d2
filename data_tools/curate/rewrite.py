"""Copy the kept samples of each input shard into one output shard, resumably.

Output shard i holds the kept samples of input shard i, byte for byte and in order (so
sizes shrink, and a shard with none left is an empty tar: the next step, e.g. dedup after
filter with the same scores, finds shard i at index i; `clip-data reshard` evens them out).
`curate_state.json` records the run's
fingerprint (inputs + decisions) and the shards done; a rerun with the same fingerprint skips
them, one with another is refused, and shards we did not write are never replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_tools.errors import DataError
from data_tools.io import write_bytes_atomic, write_json_atomic
from data_tools.shards import ShardWriter
from data_tools.tario import iter_shard

STATE = "curate_state.json"
PREFIX = "train"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prepare_output(out: Path, fp: str, command: str) -> dict[str, Any]:
    """The state of a resumable run in `out`, or one line refusing a foreign/other run."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--output {out} exists and is not a directory; choose another --output")
    path = out / STATE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except ValueError:
            raise DataError(f"{path} is not valid JSON; choose another --output") from None
        if state.get("fingerprint") != fp:
            raise DataError(
                f"--output {out} holds an interrupted `clip-data "
                f"{state.get('command', command)}` run with other inputs or options; "
                "resume it with the same ones, or choose another --output"
            )
        return state
    if out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"--output {out} is not empty and holds no {STATE}: choose an empty or "
            "new directory (we never replace files we did not write)"
        )
    return {"command": command, "fingerprint": fp, "done": {}}


def rewrite(
    urls: list[str],
    out: Path,
    state: dict[str, Any],
    keep: Callable[[int, str], bool],
    *,
    progress: Any = None,
) -> dict[str, int]:
    """Write the samples with `keep(shard_index, key)` of every shard not done yet.

    Returns {output shard name: samples} for all shards (done earlier or now).
    """
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(f".{PREFIX}-*.tar.tmp"):  # a killed run's shard in progress: ours
        tmp.unlink()
    done: dict[str, int] = state["done"]
    write_json_atomic(out / STATE, state)
    for i, url in enumerate(urls):
        if str(i) in done:
            continue
        n = 0
        with ShardWriter(out, PREFIX, samples_per_shard=2**62, start_index=i) as writer:
            for s in iter_shard(url):
                if keep(i, s.key):
                    writer.write({"__key__": s.key, **s.fields})
                    n += 1
        if n == 0:  # an empty shard keeps shard i at index i for the next step
            empty = io.BytesIO()
            tarfile.open(fileobj=empty, mode="w", format=tarfile.PAX_FORMAT).close()
            write_bytes_atomic(out / f"{PREFIX}-{i:06d}.tar", empty.getvalue())
        done[str(i)] = n
        write_json_atomic(out / STATE, state)
        if progress is not None:
            progress.update(1)
    return {
        f"{PREFIX}-{int(i):06d}.tar": n for i, n in sorted(done.items(), key=lambda kv: int(kv[0]))
    }


def our_shards(out: Path) -> list[Path]:
    pat = re.compile(rf"{PREFIX}-\d{{6}}\.tar")
    return sorted(p for p in out.glob(f"{PREFIX}-*.tar") if pat.fullmatch(p.name))
