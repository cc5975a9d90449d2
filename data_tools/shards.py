"""Atomic, reproducible WebDataset shard writing.

A shard appears under its final name only once it is complete, so a reader (or a resumed
job) never sees half a tar, and the same samples always give the same bytes (fixed mtime,
owner and member order), so shards can be compared and cached by hash.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from types import TracebackType
from typing import Any

from data_tools.errors import DataError

log = logging.getLogger(__name__)

_MTIME = 0  # fixed so identical samples give identical tar bytes


def encode_field(key: str, ext: str, value: Any) -> bytes:
    """Encode one sample field to the bytes stored in the tar.

    JSON is written with sorted keys so equal dicts give equal bytes; ints (`cls`) as
    decimal text, as WebDataset readers expect.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if ext.endswith("json"):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    raise DataError(
        f"sample {key!r}: field {ext!r} has type {type(value).__name__}; "
        "give bytes, str, int (cls) or a dict (json)"
    )


class ShardWriter:
    """Write samples into numbered tar shards `{prefix}-{idx:06d}.tar`, each atomically.

    Numbering starts at `start_index` (a resumable builder writes one shard per writer).

    Use as a context manager. On a clean exit the last (partial) shard is finalised; on an
    exception inside the `with`, the shard in progress is deleted and earlier, complete
    shards are kept.
    """

    def __init__(
        self, out_dir: str | Path, prefix: str, samples_per_shard: int = 1000, start_index: int = 0
    ) -> None:
        if samples_per_shard < 1:
            raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.samples_per_shard = samples_per_shard
        self._shards: list[Path] = []
        self._shard_counts: list[int] = []
        self._num_samples = 0
        self._idx = start_index
        self._tmp: Path | None = None
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0
        self._closed = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- public ----------------------------------------------------------------------------
    @property
    def shards(self) -> list[Path]:
        """Final paths of the shards completed so far, in order."""
        return list(self._shards)

    @property
    def shard_counts(self) -> list[int]:
        """Samples in each completed shard, parallel to `shards`."""
        return list(self._shard_counts)

    @property
    def num_samples(self) -> int:
        """Samples written so far, including the shard in progress."""
        return self._num_samples

    def final_path(self, idx: int) -> Path:
        return self.out_dir / f"{self.prefix}-{idx:06d}.tar"

    def write(self, sample: dict[str, Any]) -> None:
        """Add one sample, e.g. `{"__key__": str, "jpg": bytes, "txt": str, "json": dict,
        "cls": int}`; a new shard starts every `samples_per_shard` samples."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key:
            raise DataError(
                f"sample key {key!r} is invalid: give a non-empty str without '.' as '__key__'"
            )
        fields = {
            ext: encode_field(key, ext, value)
            for ext, value in sample.items()
            if not ext.startswith("_")
        }
        if not fields:
            raise DataError(f"sample {key!r} has no fields besides '__key__'")
        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        for ext, data in fields.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            info.uname = info.gname = "clip-train"
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self._num_samples += 1
        if self._in_shard >= self.samples_per_shard:
            self._finish_shard()

    def close(self) -> None:
        """Finalise the shard in progress (if it holds any sample)."""
        if self._closed:
            return
        if self._tar is not None:
            self._finish_shard()
        self._closed = True

    def abort(self) -> None:
        """Drop the shard in progress; complete shards stay."""
        if self._closed:
            return
        self._closed = True
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                self._tar = None
                self._file = None
                if self._tmp is not None:
                    self._tmp.unlink(missing_ok=True)
                    log.info("removed partial shard %s", self._tmp)
                    self._tmp = None

    # -- internals -------------------------------------------------------------------------
    def _open_shard(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        final = self.final_path(self._idx)
        self._tmp = final.with_name(f".{final.name}.tmp")
        self._file = open(self._tmp, "wb")
        # Fixed owner/mtime/mode so the same samples give the same bytes. Plain tarfile
        # rather than webdataset's TarWriter: importing webdataset imports torch (seconds).
        self._tar = tarfile.open(fileobj=self._file, mode="w|", format=tarfile.PAX_FORMAT)
        self._in_shard = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self.final_path(self._idx)
        os.replace(self._tmp, final)
        self._shards.append(final)
        self._shard_counts.append(self._in_shard)
        log.debug("wrote %s (%d samples)", final, self._in_shard)
        self._tar = None
        self._file = None
        self._tmp = None
        self._idx += 1
        self._in_shard = 0
