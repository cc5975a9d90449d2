"""score -> filter -> dedup on a small synthetic set with injected duplicates, leaks and
mismatched captions; resume, refusals, threshold checks, and score under torchrun."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkout_env import checkout_env  # tests/, on sys.path

from data_tools.cli import main
from data_tools.curate import dedup as dd
from data_tools.curate.evalsets import embed_eval_set
from data_tools.curate.filter import FilterOptions, filter_shards
from data_tools.curate.inject import dirty_copy
from data_tools.curate.score import score_shards
from data_tools.errors import DataError
from data_tools.synth import SynthConfig, write_synth

pytest.importorskip("faiss")
REPO = Path(__file__).resolve().parents[2]


class PixelEncoder(torch.nn.Module):
    """An encoder whose image embedding is the centred 16x16 picture: look-alikes score ~1.

    A random tiny ViT maps all synthetic images to nearly one direction, so duplicate
    detection is tested with embeddings that keep images apart. Text: a hashed bag of words.
    """

    @staticmethod
    def preprocess(img):
        x = torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32)), np.float32) / 255)
        return x.permute(2, 0, 1).contiguous()

    @staticmethod
    def tokenizer(texts):
        out = torch.zeros(len(texts), 8, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1 + sum(map(ord, w)) % 60 for w in t.split()][:8]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_image(self, images, normalize=False):
        x = images.flatten(1)
        x = x - x.mean(1, keepdim=True)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        x = F.one_hot(tokens, 3072).float().sum(1)
        x[:, 0] = 0
        x = x + 1e-3
        return F.normalize(x, dim=-1) if normalize else x


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    write_synth(
        root / "synth",
        SynthConfig(
            seed=0,
            train_samples=120,
            zeroshot_per_class=1,
            retrieval_samples=20,
            image_size=32,
            samples_per_shard=40,
        ),
    )
    injected = dirty_copy(
        root / "synth" / "train",
        root / "dirty",
        exact=0.05,
        near=0.05,
        mismatched=0.1,
        eval_sets=[str(root / "synth" / "zeroshot")],
        leaks=5,
        samples_per_shard=40,
    )
    return root, injected


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig
    from clip_train.export import export_model
    from clip_train.model import build_model

    cfg = ModelConfig(
        embed_dim=32,
        image=ImageTowerConfig(
            timm_name="vit_base_patch16_224", img_size=32, patch_size=8, width=48, depth=2, heads=2
        ),
        text=TextTowerConfig(context_length=16, width=48, heads=2, layers=2),
    )
    torch.manual_seed(0)
    return export_model(build_model(cfg), tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def cli_scores(data, export, tmp_path_factory):
    root, _ = data
    out = tmp_path_factory.mktemp("s") / "scores"
    assert (
        main(
            [
                "-q",
                "score",
                str(root / "dirty"),
                "--model",
                str(export),
                "--output",
                str(out),
                "-b",
                "16",
                "-j",
                "2",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def pixel_scores(data, tmp_path_factory):
    root, _ = data
    out = tmp_path_factory.mktemp("p") / "scores"
    score_shards(PixelEncoder(), root / "dirty", out, model_id="pixels", batch_size=16)
    return out


def _arrays(out: Path):
    keys = [json.loads(line) for line in (out / "keys.jsonl").read_text().splitlines()]
    return keys, np.load(out / "scores.npy"), np.load(out / "image_emb.npy")


def test_score_is_the_models_cosine(data, export, cli_scores):
    import io

    from PIL import Image

    import clip_train
    from data_tools.tario import iter_shard

    keys, score, image = _arrays(cli_scores)
    assert len(keys) == 137 and image.dtype == np.float16 and image.shape == (137, 32)
    enc = clip_train.load(export)
    shard = sorted((data[0] / "dirty").glob("*.tar"))[keys[5]["shard"]]
    s = next(s for s in iter_shard(str(shard)) if s.key == keys[5]["key"])
    img = enc.preprocess(Image.open(io.BytesIO(s.fields["jpg"])).convert("RGB"))[None]
    with torch.no_grad():
        a = enc.encode_image(img, normalize=True)
        b = enc.encode_text(enc.tokenizer([s.fields["txt"].decode()]), normalize=True)
    assert float((a * b).sum()) == pytest.approx(float(score[5]), abs=1e-4)
    np.testing.assert_allclose(image[5], a[0].numpy(), atol=2e-3)


def test_score_resumes_where_it_stopped(data, export, cli_scores, tmp_path):
    import shutil

    out = tmp_path / "scores"
    shutil.copytree(cli_scores, out)
    # An interrupted run: shard 2 unscored, nothing merged yet.
    for name in (
        "info.json",
        "scores.npy",
        "image_emb.npy",
        "text_emb.npy",
        "keys.jsonl",
        "parts/000002.npz",
    ):
        (out / name).unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert (
        main(
            [
                "-q",
                "score",
                str(data[0] / "dirty"),
                "--model",
                str(export),
                "--output",
                str(out),
                "-b",
                "16",
            ]
        )
        == 0
    )
    after = {p.name: p.stat().st_mtime_ns for p in (out / "parts").iterdir()}
    assert {k: after[k] for k in before} == before and "000002.npz" in after
    k1, s1, _ = _arrays(cli_scores)
    k2, s2, _ = _arrays(out)
    assert k1 == k2
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_score_refuses_other_options_and_bad_models(data, export, cli_scores, tmp_path, capsys):
    import shutil

    out = tmp_path / "scores"
    shutil.copytree(cli_scores, out)
    (out / "info.json").unlink()
    listing = sorted(p.name for p in out.rglob("*"))
    # resumed with another model / another shard set
    assert (
        main(
            [
                "score",
                str(data[0] / "dirty"),
                "--model",
                "ViT-B-32",
                "--pretrained",
                str(export / "model.safetensors"),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "score",
                str(data[0] / "synth" / "train"),
                "--model",
                str(export),
                "--output",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("error: ") for e in err)
    assert "interrupted score run of --model" in err[0] and "another shard set" in err[1]
    assert sorted(p.name for p in out.rglob("*")) == listing
    # a model that cannot be loaded: one line, nothing written
    fresh = tmp_path / "fresh"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    for model in (str(tmp_path / "no-such-run"), str(broken)):
        assert (
            main(["score", str(data[0] / "dirty"), "--model", model, "--output", str(fresh)]) == 2
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --model {model}")
    assert not fresh.exists()


def test_filter_keeps_the_best_and_reports(data, cli_scores, tmp_path):
    root, _ = data
    out = tmp_path / "f"
    assert (
        main(
            [
                "-q",
                "filter",
                str(root / "dirty"),
                "--scores",
                str(cli_scores),
                "--keep-fraction",
                "0.5",
                "--min-caption-words",
                "9",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads((out / "report.json").read_text())
    c = rep["counts"]
    assert c["input"] == 137 and c["kept"] + c["caption_words"] + c["score"] == 137
    keys, score, _ = _arrays(cli_scores)
    assert c["kept"] <= 69 and c["caption_words"] > 0  # top 50% by score, then >= 9 words
    kept = {s.key for p in sorted(out.glob("train-*.tar")) for s in _iter(p)}
    assert len(kept) == c["kept"]
    kept_scores = [score[i] for i, k in enumerate(keys) if k["key"] in kept]
    assert min(kept_scores) >= rep["score_threshold"]
    for name in ("score_hist.png", "lowest_kept.png", "highest_removed.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert rep["lowest_kept"][0]["score"] <= rep["lowest_kept"][-1]["score"]
    assert rep["highest_removed"][0]["score"] <= rep["score_threshold"]

    # --min-score: exactly the samples at or above it
    out2 = tmp_path / "f2"
    thr = float(np.median(score))
    assert (
        main(
            [
                "-q",
                "filter",
                str(root / "dirty"),
                "--scores",
                str(cli_scores),
                "--min-score",
                str(thr),
                "--output",
                str(out2),
            ]
        )
        == 0
    )
    kept2 = {s.key for p in sorted(out2.glob("train-*.tar")) for s in _iter(p)}
    assert kept2 == {k["key"] for k, s in zip(keys, score) if s >= thr}


def _iter(path):
    from data_tools.tario import iter_shard

    return list(iter_shard(str(path)))


def test_filter_resumes_and_refuses_other_options(data, cli_scores, tmp_path, monkeypatch, capsys):
    from data_tools.curate import rewrite as rw

    root, _ = data
    out = tmp_path / "f"
    args = [
        "-q",
        "filter",
        str(root / "dirty"),
        "--scores",
        str(cli_scores),
        "--keep-fraction",
        "0.7",
        "--output",
        str(out),
    ]
    real = rw.ShardWriter
    calls = []

    class Dying(real):  # the third shard's writer is killed mid-shard
        def write(self, sample):
            calls.append(1)
            if self._idx == 2 and self._in_shard == 3:
                raise KeyboardInterrupt
            super().write(sample)

    monkeypatch.setattr(rw, "ShardWriter", Dying)
    with pytest.raises(KeyboardInterrupt):
        main(args)
    monkeypatch.setattr(rw, "ShardWriter", real)
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar"]
    assert not list(out.glob(".*tmp")) and not (out / "report.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done} == done
    clean = tmp_path / "clean"
    assert main(args[:-1] + [str(clean)]) == 0
    for p in clean.glob("*.tar"):
        assert p.read_bytes() == (out / p.name).read_bytes()
    capsys.readouterr()
    assert main(args[:6] + ["0.5", "--output", str(out)]) == 2
    assert "other inputs or options" in capsys.readouterr().err


def test_filter_refuses_scores_of_other_shards(data, cli_scores, tmp_path, capsys):
    root, _ = data
    other = tmp_path / "other"  # same shard names, other keys
    dirty_copy(
        root / "synth" / "train",
        other,
        exact=0.1,
        near=0.0,
        mismatched=0.0,
        samples_per_shard=40,
        seed=3,
    )
    for shards in (root / "synth" / "train", other):
        assert (
            main(
                [
                    "filter",
                    str(shards),
                    "--scores",
                    str(cli_scores),
                    "--min-score",
                    "0",
                    "--output",
                    str(tmp_path / "out"),
                ]
            )
            == 2
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "other shards" in err[0] and "keys do not match" in err[1], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (["filter", "--min-score", "1.5"], "in [-1, 1]"),
        (["filter", "--keep-fraction", "0"], "(0, 1]"),
        (["filter", "--keep-fraction", "1.2"], "(0, 1]"),
        (["filter", "--min-side", "-1"], "0 or more"),
        (["dedup", "--threshold", "1.5"], "(0, 1]"),
        (["dedup", "--eval-threshold", "0"], "(0, 1]"),
    ],
)
def test_thresholds_are_checked_first(flags, words, tmp_path, capsys):
    cmd, *rest = flags
    assert (
        main(
            [
                cmd,
                str(tmp_path / "none"),
                "--scores",
                str(tmp_path / "none"),
                "--output",
                str(tmp_path / "out"),
                *rest,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_dedup_finds_injected_duplicates_and_leaks(data, pixel_scores, tmp_path):
    root, injected = data
    evals = {"zeroshot": embed_eval_set(root / "synth" / "zeroshot", PixelEncoder(), batch_size=32)}
    rep = dd.dedup_shards(
        root / "dirty",
        pixel_scores,
        tmp_path / "d",
        threshold=0.97,
        eval_sets=evals,
        eval_threshold=0.99,
    )
    removed = [
        json.loads(line) for line in (tmp_path / "d" / "removed.jsonl").read_text().splitlines()
    ]
    by = {r["key"]: r for r in removed}
    keys, score, _ = _arrays(pixel_scores)
    score_of = {k["key"]: s for k, s in zip(keys, score)}
    for key in injected["exact"]:
        twin = key[: -len("_dup")]
        gone = key if key in by else twin
        assert by[gone]["reason"] == "exact"
        other = twin if gone == key else key
        assert score_of[other] >= score_of[gone]  # the better scored stays
    for key in injected["near"]:
        twin = key[: -len("_near")]
        gone = by.get(key) or by[twin]
        assert gone["reason"] == "near" and gone["kept"]["key"] in (key, twin)
    assert {k for k, r in by.items() if r["reason"] == "contaminated"} == set(injected["leaked"])
    assert all(r["eval_set"] == "zeroshot" for r in removed if r["reason"] == "contaminated")
    c = rep["counts"]
    assert c["exact"] == len(injected["exact"]) and c["contaminated"] == {"zeroshot": 5}
    assert c["kept"] == 137 - len(removed)
    # the same run again (same output) is a no-op resume; another threshold is refused
    assert (
        dd.dedup_shards(
            root / "dirty",
            pixel_scores,
            tmp_path / "d",
            threshold=0.97,
            eval_sets=evals,
            eval_threshold=0.99,
        )["counts"]
        == c
    )
    with pytest.raises(DataError, match="other inputs or options"):
        dd.dedup_shards(root / "dirty", pixel_scores, tmp_path / "d", threshold=0.9)


def test_dedup_cli_decontaminates_against_a_score_dir(data, pixel_scores, tmp_path, capsys):
    root, _ = data
    from data_tools.shards import ShardWriter
    from data_tools.tario import iter_shard

    # Eval images as a score directory: the zero-shot images, captioned so `score` reads them.
    with ShardWriter(tmp_path / "zs", "zs", 1000) as writer:
        for url in sorted((root / "synth" / "zeroshot").glob("*.tar")):
            for s in iter_shard(str(url)):
                writer.write({"__key__": s.key, "jpg": s.fields["jpg"], "txt": "a shape"})
    zs = tmp_path / "zs-scores"
    score_shards(PixelEncoder(), tmp_path / "zs", zs, model_id="pixels", batch_size=32)
    assert (
        main(
            [
                "dedup",
                str(root / "dirty"),
                "--scores",
                str(pixel_scores),
                "--output",
                str(tmp_path / "d"),
                "--eval",
                f"zs={zs}",
                "--threshold",
                "0.999",
                "--eval-threshold",
                "0.999",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "5 matched eval set zs" in out


def test_near_pairs_and_deterministic_choice():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    near = base[:50] + 0.01 * rng.normal(size=(50, 32)).astype(np.float32)
    emb = np.concatenate([base, near])
    flat = dd.near_pairs(emb, 0.95)
    cells = dd.near_pairs(emb, 0.95, flat_max=1000)
    want = {(i, 3000 + i) for i in range(50)}
    assert set(map(tuple, flat.tolist())) == want
    assert set(map(tuple, cells.tolist())) == want
    score = rng.random(len(emb))
    order = [(0, f"k{i:05d}") for i in range(len(emb))]
    labels = dd.groups(len(emb), flat)
    kept = dd.choose_kept(labels, score, order, np.ones(len(emb), bool))
    for i in range(50):
        assert kept[i] == kept[3000 + i] == (i if score[i] >= score[3000 + i] else 3000 + i)
    # ties: the lower (shard, key) stays, whatever the input order
    tie = dd.choose_kept(
        np.array([0, 0]), np.array([0.5, 0.5]), [(1, "a"), (0, "z")], np.ones(2, bool)
    )
    assert tie.tolist() == [1, 1]


def test_score_under_torchrun_matches_one_process(data, export, cli_scores, tmp_path):
    env = checkout_env()
    out = tmp_path / "scores2"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "data_tools",
            "-q",
            "score",
            str(data[0] / "dirty"),
            "--model",
            str(export),
            "--output",
            str(out),
            "-b",
            "16",
            "-j",
            "0",
            "--device",
            "cpu",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    k1, s1, e1 = _arrays(cli_scores)
    k2, s2, e2 = _arrays(out)
    assert k1 == k2
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    np.testing.assert_allclose(e1.astype(np.float32), e2.astype(np.float32), atol=2e-3)


def test_trimmed_open_clip_text_tower_gives_the_same_scores(data, tmp_path, caplog):
    import logging

    import open_clip

    from clip_eval.encoder import load_open_clip
    from clip_eval.text import trimmed_text_forward

    name = "cliptrain-curate-tiny"
    if name not in open_clip.list_models():
        cfg = tmp_path / f"{name}.json"
        cfg.write_text(
            json.dumps(
                {
                    "embed_dim": 32,
                    "vision_cfg": {
                        "image_size": 32,
                        "layers": 1,
                        "width": 32,
                        "head_width": 16,
                        "patch_size": 8,
                    },
                    "text_cfg": {
                        "context_length": 77,
                        "vocab_size": 49408,
                        "width": 32,
                        "heads": 2,
                        "layers": 1,
                    },
                }
            )
        )
        open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    enc = load_open_clip(name, None, "cpu")
    shards = sorted((data[0] / "dirty").glob("*.tar"))[:1]
    with caplog.at_level(logging.INFO, logger="data_tools"):
        score_shards(
            enc,
            shards,
            tmp_path / "trim",
            model_id=name,
            batch_size=16,
            text_forward=trimmed_text_forward(enc),
        )
    assert "trimmed to each batch's longest caption" in caplog.text
    score_shards(enc, shards, tmp_path / "full", model_id=name, batch_size=16)
    np.testing.assert_allclose(
        np.load(tmp_path / "trim" / "scores.npy"),
        np.load(tmp_path / "full" / "scores.npy"),
        atol=1e-5,
    )


def test_filter_then_dedup_share_one_score_run(data, pixel_scores, tmp_path):
    root, _ = data
    rep = filter_shards(
        root / "dirty", pixel_scores, tmp_path / "f", FilterOptions(keep_fraction=0.3)
    )
    assert len(list((tmp_path / "f").glob("train-*.tar"))) == 4  # empty ones too: index i = i
    got = dd.dedup_shards(tmp_path / "f", pixel_scores, tmp_path / "d", threshold=0.97)
    c = got["counts"]
    assert c["input"] == rep["counts"]["kept"] and c["unscored"] == 0
    assert c["kept"] + c["exact"] + c["near"] == c["input"]  # only samples still there count
