"""Files in and out: atomic writes and reading tables of rows.

Every file clip-train publishes (shards' manifests, checkpoints' pointers, eval results,
exports, reports, caches) goes through `atomic_path`, so a reader, a resumed job or a sync
job sees either the old file or the whole new one, never half of it. Both shard builders and
evaluation read CSV/TSV/JSONL/parquet tables through `read_table`, so they accept the same
files and fail with the same messages.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_tools.errors import DataError


def file_mode() -> int:
    """The mode a plain `open()` would give a new file (0644 under the usual umask 022).

    mkstemp and safetensors create 0600 files, which other users of a shared cluster directory
    cannot read; everything we publish gets this mode instead.
    """
    try:  # read, not set: changing the process umask even briefly races with other threads
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def share_tree(root: str | Path) -> None:
    """Give every file under `root` (and `root` itself, if a file) the mode of `file_mode()`."""
    root, mode = Path(root), file_mode()
    for path in [root] if root.is_file() else (p for p in root.rglob("*") if p.is_file()):
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(path: str | Path, what: str | None = None) -> Iterator[Path]:
    """A temporary path next to `path` to write to; renamed onto `path` when the block ends.

    For writers that want a file name (safetensors, faiss, ONNX). If the block raises, the
    temporary file is removed and `path` is untouched. With `what` (a flag name such as
    "--output"), a folder that cannot be written is a one-line `DataError` naming it.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        if what is None:
            raise
        raise DataError(f"{what} {path}: cannot write there ({e.strerror or e})") from e
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())  # mkstemp and safetensors make 0600
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes, what: str | None = None) -> None:
    """Write `data` so `path` holds either the old or the whole new content."""
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: str | Path, text: str, what: str | None = None) -> None:
    """Write `text` (UTF-8) so `path` holds either the old or the whole new content."""
    write_bytes_atomic(path, text.encode("utf-8"), what)


def write_json_atomic(path: str | Path, obj: Any, what: str | None = None) -> None:
    """Write `obj` as indented JSON atomically (manifests, metadata)."""
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n", what)


def read_table(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV/TSV with a header, a JSON-lines file (.jsonl or .json) or
    a parquet file (row number); streamed, so a table larger than memory is fine."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".parquet":
        yield from enumerate(_parquet_rows(path), 1)
        return
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if ext in (".jsonl", ".json"):
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise DataError(
                            f"{path} line {n}: invalid JSON ({e}); write one object per line"
                        ) from e
                    if not isinstance(row, dict):
                        raise DataError(f"{path} line {n}: expected a JSON object per line")
                    yield n, row
                return
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            for row in reader:
                if None in row:
                    raise DataError(
                        f"{path} line {reader.line_num}: more fields than the header has"
                    )
                yield reader.line_num, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); save the table as UTF-8") from e
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    for batch in table.to_batches(max_chunksize=4096):
        yield from batch.to_pylist()
