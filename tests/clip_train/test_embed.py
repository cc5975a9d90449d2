"""embed -> index -> search through the CLI, checked against brute-force cosine similarity."""

import json

import numpy as np
import pytest
import torch

import clip_train
from clip_train.cli import main
from clip_train.export import export_model
from clip_train.model import build_model

pytest.importorskip("faiss")


@pytest.fixture
def exported(tiny_model_cfg, tmp_path):
    torch.manual_seed(0)
    return export_model(build_model(tiny_model_cfg), tmp_path / "export")


def test_embed_index_search(exported, synth_dir, tmp_path, capsys):
    emb = tmp_path / "emb"
    assert (
        main(
            [
                "-q",
                "embed",
                str(exported),
                "--data",
                str(synth_dir / "retrieval"),
                "--out",
                str(emb),
                "--batch-size",
                "16",
            ]
        )
        == 0
    )
    images = np.load(emb / "image_embeddings.npy")
    texts = np.load(emb / "text_embeddings.npy")
    meta = [json.loads(line) for line in (emb / "metadata.jsonl").read_text().splitlines()]
    assert images.shape == texts.shape == (40, 32) and len(meta) == 40
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1, atol=1e-5)

    # the stored embeddings are the model's
    encoder = clip_train.load(exported)
    np.testing.assert_allclose(
        encoder.embed_texts([meta[3]["caption"]])[0].numpy(), texts[3], atol=1e-5
    )

    for kind in ("flat", "ivf"):
        assert main(["-q", "index", str(emb), "--kind", kind]) == 0
    capsys.readouterr()
    query = meta[5]["caption"]
    assert main(["-q", "search", str(emb), "--text", query, "-k", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = np.argsort(-(images @ encoder.embed_texts([query])[0].numpy()), kind="stable")[:3]
    # the last index written (ivf over 40 points has a single list) is exact here
    assert [h["key"] for h in hits] == [meta[i]["key"] for i in expected]
    assert hits[0]["score"] == pytest.approx(
        float(images[expected[0]] @ encoder.embed_texts([query])[0].numpy()), abs=1e-5
    )


def test_search_errors_are_one_line(tmp_path, capsys):
    assert main(["-q", "search", str(tmp_path), "--text", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "clip-train embed" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("gpu", [True, False])
def test_embed_device_defaults_to_the_gpu_when_there_is_one(monkeypatch, gpu):
    class Loaded(Exception):
        pass

    def load(path, device="cpu"):
        raise Loaded(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(clip_train, "load", load)
    with pytest.raises(Loaded, match="cuda" if gpu else "cpu"):
        main(["embed", "m", "--data", "d", "--out", "o"])
