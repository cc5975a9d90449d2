"""Fixtures for data_tools tests: small real shards written into tmp dirs."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools.shards import ShardWriter
from data_tools.synth import SynthConfig, write_synth


def jpeg_bytes(i: int, size: int = 16) -> bytes:
    """A tiny distinct JPEG per index."""
    img = Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


class CharTokenizer:
    """Deterministic stand-in tokenizer: one id per character, padded to 16 (picklable)."""

    context_length = 16

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [ord(c) % 1000 for c in t][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@pytest.fixture
def make_shards(tmp_path: Path) -> Callable[..., Path]:
    """Write `counts[j]` samples into shard j under a fresh dir; keys are `s{global index}`."""

    def make(counts: list[int], name: str = "shards", label: bool = False) -> Path:
        out = tmp_path / name
        idx = 0
        for j, n in enumerate(counts):
            with ShardWriter(out, f"part{j:02d}", samples_per_shard=max(n, 1)) as w:
                for _ in range(n):
                    sample = {
                        "__key__": f"s{idx:05d}",
                        "jpg": jpeg_bytes(idx),
                        "txt": f"caption number {idx}",
                        "json": {"i": idx},
                    }
                    if label:
                        sample["cls"] = idx % 3
                    w.write(sample)
                    idx += 1
        return out

    return make


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synth set shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, SmallSynth())
    return out


def SmallSynth(seed: int = 0) -> SynthConfig:  # noqa: N802 - reads as a preset
    return SynthConfig(
        seed=seed,
        train_samples=300,
        zeroshot_per_class=2,
        retrieval_samples=20,
        samples_per_shard=100,
    )


@pytest.fixture
def jpeg() -> Callable[..., bytes]:
    return jpeg_bytes


@pytest.fixture
def small_synth() -> Callable[..., SynthConfig]:
    return SmallSynth


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def _png(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf, name, data, kind=tarfile.REGTYPE):
    info = tarfile.TarInfo(name)
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture
def bad_shards(tmp_path, jpeg):
    d = tmp_path / "bad"
    with ShardWriter(d, "a", samples_per_shard=100) as w:
        good = lambda i: {"__key__": f"g{i}", "jpg": jpeg(i), "txt": f"caption {i}"}  # noqa: E731
        for i in range(8):
            w.write(good(i))
        w.write({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": "x"})
        w.write({"__key__": "truncjpg", "jpg": jpeg(1)[:40], "txt": "x"})
        w.write({"__key__": "notxt", "jpg": jpeg(2)})
        w.write({"__key__": "emptytxt", "jpg": jpeg(2), "txt": "  "})
        w.write({"__key__": "latin1", "jpg": jpeg(2), "txt": "caf\xe9".encode("latin-1")})
        w.write({"__key__": "noimage", "txt": "only text"})
        w.write({"__key__": "bomb", "png": _png(300, 300), "txt": "big"})
    with tarfile.open(d / "b-000000.tar", "w") as tf:
        _add(tf, "g100.jpg", jpeg(100))
        _add(tf, "g100.txt", b"fine")
        _add(tf, "../escape.jpg", jpeg(3))
        _add(tf, "/abs/path.txt", b"x")
        _add(tf, "link.jpg", b"", tarfile.SYMTYPE)
        _add(tf, "g101.jpg", jpeg(101))
        _add(tf, "g101.txt", b"fine too")
    # a shard cut in the middle of its third sample
    with ShardWriter(tmp_path / "c", "c", samples_per_shard=100) as w:
        for i in range(4):
            w.write({"__key__": f"t{i}", "jpg": jpeg(200 + i), "txt": f"t {i}"})
    full = (tmp_path / "c" / "c-000000.tar").read_bytes()
    cut = full.index(b"t2.txt") + 600
    (d / "c-000000.tar").write_bytes(full[:cut])
    return d
