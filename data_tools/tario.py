"""Reading tar shards member by member, safely, with or without the member data.

One reader for the loader, `inspect`/`validate` and `reshard`, so they agree on what a sample
is and on what is wrong with a shard:

- a sample is a run of consecutive members sharing a key (the member name up to the first
  '.' of its last path component; the rest, lower-cased, is the field), as in WebDataset;
- members with an absolute path, a `..` component, or that are not regular files (links,
  devices) are rejected and reported (`unsafe_member`), never returned;
- a shard that ends before its end-of-archive blocks, or whose last member runs past the end
  of the file, is truncated: the samples before the cut are returned, the one that was cut is
  dropped and reported (`truncated_tar`).

Local shards can be read header-only (`read_data=False`): member data is skipped with a seek
and each field records where its bytes are, so a resumed loader can step over samples it has
already used without reading them, and load the few it still needs later (`load_fields`).
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from data_tools.urls import is_remote, sample_key

log = logging.getLogger(__name__)

# Called for a problem in a shard: (reason, sample key, url, detail).
Problem = Callable[[str, str, str, str], None]

_END_BLOCKS = 2 * tarfile.BLOCKSIZE  # a complete tar ends with two zero blocks


@dataclass
class RawSample:
    """One sample as stored: field -> bytes, or field -> (offset, size) when read header-only."""

    key: str
    url: str
    fields: dict[str, bytes] = field(default_factory=dict)
    refs: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def loaded(self) -> bool:
        return not self.refs or len(self.fields) == len(self.refs)

    def exts(self) -> list[str]:
        return list(self.refs or self.fields)


def unsafe_member_name(name: str) -> bool:
    """True for a member name that could escape the directory it is read into."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.replace("\\", "/").split("/")


class ReadMode:
    """A switch shared by a chain of readers: flip `read_data` to go from skipping to reading."""

    def __init__(self, read_data: bool = True) -> None:
        self.read_data = read_data


def iter_shard(
    url: str,
    *,
    mode: ReadMode | None = None,
    on_problem: Problem | None = None,
) -> Iterator[RawSample]:
    """Samples of one shard, in order. Problems go to `on_problem` and never raise.

    An unreadable file (missing, not a tar) is reported as `unreadable_shard` and yields
    nothing. Remote shards (`pipe:`, `s3://` ...) are streamed and always read with data.
    """
    mode = mode or ReadMode(True)
    report = on_problem or _log_problem
    if is_remote(url):
        yield from _iter_stream(url, report)
        return
    try:
        f = open(url, "rb")
    except OSError as e:
        report("unreadable_shard", "", url, f"{type(e).__name__}: {e}")
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as e:
            report("unreadable_shard", "", url, f"not a tar file ({e})")
            return
        pending: RawSample | None = None
        truncated = ""
        try:
            while True:
                info = tf.next()
                if info is None:
                    break
                tf.members = []  # keep memory flat on big shards
                name = info.name
                if info.isdir():
                    continue
                split = sample_key(name)
                if not info.isreg() or unsafe_member_name(name):
                    what = "a link or special file" if not info.isreg() else "an unsafe path"
                    report("unsafe_member", split[0] if split else name, url,
                           f"member {name!r} is {what}; rejected")
                    continue
                if split is None or os.path.basename(name).startswith("__"):
                    continue
                key, ext = split[0], split[1].lower()
                if info.offset_data + info.size > size:
                    if pending is not None and pending.key != key:
                        yield pending  # complete: the cut member starts the next sample
                    pending = RawSample(key, url)
                    truncated = f"member {name!r} runs past the end of the file"
                    break
                if pending is not None and (pending.key != key or ext in pending.refs):
                    yield pending
                    pending = None
                if pending is None:
                    pending = RawSample(key, url)
                pending.refs[ext] = (info.offset_data, info.size)
                if mode.read_data:
                    f.seek(info.offset_data)
                    pending.fields[ext] = f.read(info.size)
            if not truncated and size < tf.offset + _END_BLOCKS:
                truncated = "the file ends before the tar end-of-archive blocks"
        except (tarfile.TarError, OSError) as e:
            truncated = f"{type(e).__name__}: {e}"
        if truncated:
            key = pending.key if pending is not None else ""
            report("truncated_tar", key, url, f"shard is truncated ({truncated}); "
                   "the last sample is dropped")
        elif pending is not None:
            yield pending


def _iter_stream(url: str, report: Problem) -> Iterator[RawSample]:
    import webdataset as wds

    pending: RawSample | None = None
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:  # gopen raises whatever the transport raises
        report("unreadable_shard", "", url, f"{type(e).__name__}: {e}")
        return
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                name = info.name
                if info.isdir():
                    continue
                split = sample_key(name)
                if not info.isreg() or unsafe_member_name(name):
                    report("unsafe_member", split[0] if split else name, url,
                           f"member {name!r} rejected")
                    continue
                if split is None or os.path.basename(name).startswith("__"):
                    continue
                key, ext = split[0], split[1].lower()
                if pending is not None and (pending.key != key or ext in pending.fields):
                    yield pending
                    pending = None
                if pending is None:
                    pending = RawSample(key, url)
                fobj = tf.extractfile(info)
                data = fobj.read() if fobj is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                pending.fields[ext] = data
    except (tarfile.TarError, OSError) as e:
        report("truncated_tar", pending.key if pending else "", url,
               f"shard is truncated or unreadable ({type(e).__name__}: {e})")
        return
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()
    if pending is not None:
        yield pending


class FieldLoader:
    """Loads the data of header-only samples, keeping the last few shard files open."""

    def __init__(self, max_open: int = 8) -> None:
        self.max_open = max_open
        self._files: dict[str, object] = {}

    def load(self, sample: RawSample) -> RawSample:
        if sample.loaded:
            return sample
        f = self._files.pop(sample.url, None)
        if f is None:
            f = open(sample.url, "rb")
            if len(self._files) >= self.max_open:
                old = next(iter(self._files))
                self._files.pop(old).close()  # type: ignore[attr-defined]
        self._files[sample.url] = f  # most recently used last
        for ext, (offset, size) in sample.refs.items():
            if ext not in sample.fields:
                f.seek(offset)  # type: ignore[attr-defined]
                sample.fields[ext] = f.read(size)  # type: ignore[attr-defined]
        return sample

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()


def _log_problem(reason: str, key: str, url: str, detail: str) -> None:
    log.warning("%s: sample %r in %s: %s", reason, key, url, detail)
