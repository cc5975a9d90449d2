"""Fixtures for data_tools tests: small real shards written into tmp dirs."""

from __future__ import annotations

import io
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
                    sample = {"__key__": f"s{idx:05d}", "jpg": jpeg_bytes(idx),
                              "txt": f"caption number {idx}", "json": {"i": idx}}
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
    return SynthConfig(seed=seed, train_samples=300, zeroshot_per_class=2, retrieval_samples=20,
                       samples_per_shard=100)


@pytest.fixture
def jpeg() -> Callable[..., bytes]:
    return jpeg_bytes


@pytest.fixture
def small_synth() -> Callable[..., SynthConfig]:
    return SmallSynth


@pytest.fixture
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()
