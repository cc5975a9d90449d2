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
already used without reading them, and load the few it still needs later (`FieldLoader`).
Gzip-compressed shards (`.tar.gz`, as webdataset reads them) have no such offsets: they are
always decompressed and read front to back, as remote shards are.
"""

from __future__ import annotations

import logging
import os
import shlex
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from data_tools.urls import is_remote

log = logging.getLogger(__name__)

# Called for a problem in a shard: (reason, sample key, url, detail).
Problem = Callable[[str, str, str, str], None]


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


def sample_key(member_name: str) -> tuple[str, str] | None:
    """Split a tar member name into (sample key, extension) the way webdataset groups them.

    The key is everything up to the first '.' of the last path component.
    """
    head, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def unsafe_member_name(name: str) -> bool:
    """True for a member name that could escape the directory it is read into."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in name.replace("\\", "/").split("/")


class ReadMode:
    """A switch shared by a chain of readers: flip `read_data` to go from skipping to reading."""

    def __init__(self, read_data: bool = True) -> None:
        self.read_data = read_data


class _DamagedTar(Exception):
    """A header that is not a tar header (bad checksum or number field)."""


_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)
_GZIP_MAGIC = b"\x1f\x8b"
_REGULAR = (b"0", b"\0", b"7")
_DIRECTORY = b"5"


def _number(field: bytes, where: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _DamagedTar(f"bad number field in the header at byte {where}") from None


def _pax(payload: bytes) -> dict[str, str]:
    """PAX extended header records: b"%d key=value\n" ..."""
    out, i = {}, 0
    while i < len(payload):
        sp = payload.find(b" ", i)
        if sp < 0:
            break
        try:
            length = int(payload[i:sp])
        except ValueError:
            break
        key, _, value = payload[sp + 1 : i + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        i += max(length, 1)
    return out


def _headers(f: BinaryIO, file_size: int) -> Iterator[tuple[str, bytes, int, int]]:
    """(name, type flag, data offset, data size) of each member, reading headers only.

    Our own parser rather than `tarfile`: it is several times faster (a shard of small
    images has three members per sample), and it never builds a member list. Handles
    ustar prefixes, PAX `path`/`size` records and GNU long names. Raises `EOFError` when
    the file ends before its end-of-archive block, `_DamagedTar` on a damaged header.
    """
    pos = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        f.seek(pos)
        hdr = f.read(tarfile.BLOCKSIZE)
        if len(hdr) < tarfile.BLOCKSIZE:
            raise EOFError
        if hdr == _ZERO_BLOCK:
            return
        if _number(hdr[148:156], pos) != sum(hdr) - sum(hdr[148:156]) + 256:
            raise _DamagedTar(f"bad header checksum at byte {pos}")
        size = _number(hdr[124:136], pos)
        kind = hdr[156:157]
        data = pos + tarfile.BLOCKSIZE
        if kind in (b"x", b"g", b"L", b"K"):  # metadata for the next member
            if data + size > file_size:
                raise EOFError
            f.seek(data)
            payload = f.read(size)
            if kind == b"x":
                pax = _pax(payload)
            elif kind == b"L":
                long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            pos = data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            continue
        raw = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                raw = prefix + b"/" + raw
        name = raw.decode("utf-8", "surrogateescape")
        if long_name is not None:
            name, long_name = long_name, None
        if pax:
            name = pax.get("path", name)
            if "size" in pax:
                size = int(pax["size"])
            pax = {}
        pos = data + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        yield name, kind, data, size


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
        if f.read(2) == _GZIP_MAGIC:  # a .tar.gz shard: no offsets to seek to, stream it
            f.seek(0)
            yield from _iter_tar_stream(f, url, report)
            return
        size = os.fstat(f.fileno()).st_size
        pending: RawSample | None = None
        truncated = ""
        members = 0
        try:
            for name, kind, offset, length in _headers(f, size):
                members += 1
                if kind == _DIRECTORY:
                    continue
                split = sample_key(name)
                if kind not in _REGULAR or unsafe_member_name(name):
                    what = "a link or special file" if kind not in _REGULAR else "an unsafe path"
                    report(
                        "unsafe_member",
                        split[0] if split else name,
                        url,
                        f"member {name!r} is {what}; rejected",
                    )
                    continue
                if split is None or os.path.basename(name).startswith("__"):
                    continue
                key, ext = split[0], split[1].lower()
                if offset + length > size:
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
                pending.refs[ext] = (offset, length)
                if mode.read_data:
                    f.seek(offset)
                    pending.fields[ext] = f.read(length)
        except EOFError:
            if members == 0:
                report("unreadable_shard", "", url, "empty or not a tar file")
                return
            truncated = "the file ends before the tar end-of-archive blocks"
        except (_DamagedTar, OSError) as e:
            if members == 0:
                report("unreadable_shard", "", url, f"not a tar file ({e})")
                return
            truncated = str(e)
        if truncated:
            key = pending.key if pending is not None else ""
            report(
                "truncated_tar",
                key,
                url,
                f"shard is truncated or damaged ({truncated}); the last sample is dropped",
            )
        elif pending is not None:
            yield pending


def gopen_url(url: str) -> str:
    """What to hand webdataset's `gopen` for a remote shard.

    gopen (webdataset 1.x) has no `s3://` handler; those are read with the AWS CLI, as
    DataComp's training script does (`AWS_ENDPOINT_URL` etc. work as usual)."""
    if url[:5].lower() == "s3://":
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    return url


def _iter_stream(url: str, report: Problem) -> Iterator[RawSample]:
    import webdataset as wds

    try:
        stream = wds.gopen(gopen_url(url), "rb")
    except Exception as e:  # gopen raises whatever the transport raises
        report("unreadable_shard", "", url, f"{type(e).__name__}: {e}")
        return
    yield from _iter_tar_stream(stream, url, report)


def _iter_tar_stream(stream: BinaryIO, url: str, report: Problem) -> Iterator[RawSample]:
    """Samples of a tar read front to back (remote or gzip-compressed), always with data."""
    pending: RawSample | None = None
    problem = ""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tf:
            for info in tf:
                name = info.name
                if info.isdir():
                    continue
                split = sample_key(name)
                if not info.isreg() or unsafe_member_name(name):
                    report(
                        "unsafe_member",
                        split[0] if split else name,
                        url,
                        f"member {name!r} rejected",
                    )
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
    except (tarfile.TarError, OSError, EOFError) as e:
        problem = f"{type(e).__name__}: {e}"
    finally:
        try:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        except Exception as e:  # a `pipe:` command that failed says so (exit status) on close
            problem = problem or f"{type(e).__name__}: {e}"
    if problem:
        report(
            "truncated_tar",
            pending.key if pending else "",
            url,
            f"shard is truncated or unreadable ({problem})",
        )
        return
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
