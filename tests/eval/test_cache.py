"""The classifier cache: a second build reuses the file; other templates, names or weights miss."""

import open_clip
import pytest
import torch

import clip_eval.zero_shot as zero_shot_module
from clip_eval.cache import default_cache_dir, model_identity
from clip_eval.encoder import load_open_clip
from clip_eval.zero_shot import build_zero_shot_classifier

NAMES = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}.", "a {}"]


@pytest.fixture
def count_encodes(monkeypatch):
    calls = []
    real = zero_shot_module.encode_texts

    def spy(*args, **kwargs):
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(zero_shot_module, "encode_texts", spy)
    return calls


def test_second_build_reuses_cache_and_changes_miss(tiny_encoder, tmp_path, count_encodes):
    first = build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and count_encodes == [6]
    second = build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    assert count_encodes == [6]  # no text encoding the second time
    assert torch.equal(first, second)

    build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES + ["{}"], "cpu", cache_dir=tmp_path)
    build_zero_shot_classifier(tiny_encoder, NAMES[::-1], TEMPLATES, "cpu", cache_dir=tmp_path)
    callables = open_clip.SIMPLE_IMAGENET_TEMPLATES[:2]
    build_zero_shot_classifier(tiny_encoder, NAMES, callables, "cpu", cache_dir=tmp_path)
    build_zero_shot_classifier(tiny_encoder, NAMES, callables, "cpu", cache_dir=tmp_path)
    assert count_encodes == [6, 9, 6, 6]
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_changed_weights_miss(tiny_encoder, tmp_path, count_encodes):
    build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    with torch.no_grad():
        tiny_encoder.model.token_embedding.weight[0, 0] += 1.0
    build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    assert count_encodes == [6, 6]


def test_weight_file_identity(tiny_model_name, tiny_encoder, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    a = load_open_clip(tiny_model_name, path, "cpu")
    b = load_open_clip(tiny_model_name, path, "cpu")
    assert model_identity(a) == model_identity(b) and str(path) in model_identity(a)
    # without a file the weights themselves are hashed: same weights, same identity
    assert model_identity(tiny_encoder).startswith("sha:")
    assert model_identity(tiny_encoder) == model_identity(tiny_encoder)


def test_corrupt_cache_file_is_rebuilt(tiny_encoder, tmp_path, count_encodes):
    want = build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.safetensors")
    entry.write_bytes(b"not safetensors")
    got = build_zero_shot_classifier(tiny_encoder, NAMES, TEMPLATES, "cpu", cache_dir=tmp_path)
    assert count_encodes == [6, 6]
    torch.testing.assert_close(got, want)


def test_default_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "classifiers"
    monkeypatch.delenv("CLIP_TRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "clip-train" / "classifiers"
