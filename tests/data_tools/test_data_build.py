"""Builders on small generated inputs, bad inputs included: build, from-imagefolder, reshard."""

import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_tools import build_writer as writer_mod
from data_tools.build import EncodeOptions, build
from data_tools.cli import main
from data_tools.counts import shard_sample_counts
from data_tools.errors import DataError
from data_tools.imagefolder import from_imagefolder
from data_tools.loader import make_loader
from data_tools.reshard import reshard
from data_tools.tario import iter_shard
from data_tools.transforms import ImageTransform


def _img(path: Path, w=40, h=30, colour=(200, 10, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path, format=fmt)


def _samples(shard_dir):
    out = {}
    for p in sorted(Path(shard_dir).glob("*.tar")):
        for s in iter_shard(str(p)):
            out[s.key] = s.fields
    return out


@pytest.fixture
def photo_folder(tmp_path):
    d = tmp_path / "photos"
    for i in range(6):
        _img(d / f"img{i}.jpg", 300 + i, 200, (i * 40, 10, 10))
        (d / f"img{i}.txt").write_text(f"a red thing number {i}")
    _img(d / "sub" / "p.png", 40, 50, fmt="PNG")
    (d / "sub" / "p.txt").write_text("a png in a sub folder")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (d / "broken.txt").write_text("caption of a broken image")
    _img(d / "nocap.jpg")
    (d / "orphan.txt").write_text("a caption without an image")
    _img(d / "latin.jpg")
    (d / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    _img(d / "empty.jpg")
    (d / "empty.txt").write_text("   ")
    _img(d / "huge.png", 400, 400, fmt="PNG")  # a "bomb" under --max-pixels 100000
    (d / "huge.txt").write_text("far too many pixels")
    return d


def test_build_folder_with_bad_inputs(photo_folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "build",
            str(photo_folder),
            "--out",
            str(out),
            "--samples-per-shard",
            "3",
            "--max-side",
            "256",
            "--max-pixels",
            "100000",
            "-q",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 7 samples in 3 shards" in printed
    assert "skipped 6 of 13:" in printed
    for reason in (
        "decode 1",
        "missing_caption 1",
        "missing_image 1",
        "bad_utf8 1",
        "empty_caption 1",
        "too_large 1",
    ):
        assert reason in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 7}
    assert {b["key"] for b in manifest["bad_samples"]} == {
        "broken",
        "nocap",
        "orphan",
        "latin",
        "empty",
        "huge",
    }
    samples = _samples(out / "train")
    assert set(samples) == {f"img{i}" for i in range(6)} | {"sub_p"}
    big = Image.open(io.BytesIO(samples["img5"]["jpg"]))
    assert max(big.size) == 256 and abs(big.size[0] / big.size[1] - 305 / 200) < 0.02
    assert "png" in samples["sub_p"]  # small PNG kept byte for byte
    assert samples["sub_p"]["png"] == (photo_folder / "sub" / "p.png").read_bytes()
    assert samples["img2"]["txt"] == b"a red thing number 2"
    assert json.loads(samples["sub_p"]["json"]) == {"source": "sub/p.png"}
    assert not [p for p in (out / "train").iterdir() if p.name.endswith(".tmp")]
    keys = [
        k
        for b in make_loader(out / "train", batch_size=4, image_transform=ImageTransform(16))
        for k in b["key"]
    ]
    assert sorted(keys) == sorted(samples)


def test_caption_length_filters_split_and_shuffle(photo_folder, tmp_path):
    opts = EncodeOptions(min_caption_len=20, max_caption_len=21)
    m = build(
        photo_folder,
        tmp_path / "a",
        opts=opts,
        val_fraction=0.4,
        seed=1,
        shuffle=True,
        samples_per_shard=2,
    )
    assert m["skipped"]["caption_too_short"] == 1  # "far too many pixels"
    assert m["skipped"]["caption_too_long"] == 1  # "caption of a broken image" is checked first
    assert set(m["counts"]) == {"train", "val"}
    train, val = _samples(tmp_path / "a" / "train"), _samples(tmp_path / "a" / "val")
    assert not set(train) & set(val) and len(train) + len(val) == m["written"]
    again = build(
        photo_folder,
        tmp_path / "b",
        opts=opts,
        val_fraction=0.4,
        seed=1,
        shuffle=True,
        samples_per_shard=2,
    )
    assert again["splits"] == m["splits"]  # deterministic for a seed
    for split in ("train", "val"):
        for p in (tmp_path / "a" / split).glob("*.tar"):
            assert p.read_bytes() == (tmp_path / "b" / split / p.name).read_bytes()


def _table_rows(d: Path):
    rows = []
    for i in range(5):
        _img(d / "imgs" / f"t{i}.jpg", 64, 48, (i * 40, 0, 0))
        rows.append(
            {
                "filepath": f"imgs/t{i}.jpg",
                "title": f"title number {i}",
                "score": i,
                "who": f"user{i}",
            }
        )
    rows.append({"filepath": "imgs/missing.jpg", "title": "gone", "score": 0, "who": ""})
    rows.append({"filepath": "imgs/t0.jpg", "title": "", "score": 0, "who": ""})
    return rows


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_build_from_tables(tmp_path, fmt):
    rows = _table_rows(tmp_path)
    table = tmp_path / f"pairs.{fmt}"
    if fmt in ("csv", "tsv"):
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    m = build(table, tmp_path / "out", caption_col="title", key_col="who")
    assert m["written"] == 5 and m["skipped"] == {"missing_image": 1, "empty_caption": 1}
    assert m["input"]["image_col"] == "filepath"  # found among the usual names
    s = _samples(tmp_path / "out" / "train")
    assert set(s) == {f"user{i}" for i in range(5)}
    assert s["user3"]["txt"] == b"title number 3"
    extra = json.loads(s["user3"]["json"])
    assert str(extra["score"]) == "3" and "filepath" not in extra and "title" not in extra


def test_table_errors_are_one_line(tmp_path, capsys):
    t = tmp_path / "t.csv"
    t.write_text("path,caption\nhttp://example.com/a.jpg,hello\n")
    assert main(["build", str(t), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "is a URL" in err and "img2dataset" in err and err.count("\n") == 1
    t.write_text("a,b\nx,y\n")
    assert main(["build", str(t), "--out", str(tmp_path / "o"), "-q", "--image-col", "img"]) == 2
    assert "no image path column 'img' (columns: a, b)" in capsys.readouterr().err
    j = tmp_path / "t.jsonl"
    j.write_text('{"image": "a.jpg", "caption": "x"}\n{broken\n')
    with pytest.raises(DataError, match="t.jsonl line 2: invalid JSON"):
        build(j, tmp_path / "o2")


def _add(tf, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def img2dataset_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "i2d"
    d.mkdir()
    for s in range(2):
        rows = []
        with tarfile.open(d / f"{s:05d}.tar", "w") as tf:
            for i in range(3):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                Image.new("RGB", (320, 200), (i * 60, 0, 0)).save(buf, "JPEG")
                _add(tf, f"{key}.jpg", buf.getvalue())
                _add(tf, f"{key}.txt", f"caption {key}".encode())
                _add(tf, f"{key}.json", json.dumps({"url": f"http://x/{key}"}).encode())
                rows.append({"key": key, "status": "success", "error_message": None})
        rows.append(
            {"key": "gone", "status": "failed_to_download", "error_message": "HTTP Error 404"}
        )
        pq.write_table(pa.Table.from_pylist(rows), d / f"{s:05d}.parquet")
        (d / f"{s:05d}_stats.json").write_text(
            json.dumps({"count": 4, "successes": 3, "failed_to_download": 1, "failed_to_resize": 0})
        )
    return d


def test_build_from_img2dataset_resharded_and_reused(img2dataset_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "build",
                str(img2dataset_dir),
                "--out",
                str(out),
                "--max-side",
                "160",
                "--samples-per-shard",
                "4",
                "-q",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wrote 6 samples in 2 shards" in printed
    assert "img2dataset: 6 of 8 downloaded (2 failed to download" in printed
    assert "2 x HTTP Error 404" in printed
    s = _samples(out / "train")
    assert Image.open(io.BytesIO(s["000010002"]["jpg"])).size == (160, 100)
    assert json.loads(s["000010002"]["json"]) == {"url": "http://x/000010002"}
    assert main(["build", str(img2dataset_dir), "--out", str(tmp_path / "r"), "--reuse", "-q"]) == 0
    assert "reused 6 samples in 2 shards" in capsys.readouterr().out
    m = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert m["splits"]["train"]["shard_counts"] == [3, 3]
    assert not list((tmp_path / "r").glob("*.tar"))


def test_build_is_resumable_and_never_half_written(photo_folder, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    build(photo_folder, ref, samples_per_shard=2)
    out = tmp_path / "out"
    real = writer_mod.encode_item
    calls = {"n": 0}

    def dies_on_seventh(item, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed in the middle of shard 3
        return real(item, *a, **k)

    monkeypatch.setattr(writer_mod, "encode_item", dies_on_seventh)
    with pytest.raises(KeyboardInterrupt):
        build(photo_folder, out, samples_per_shard=2)
    left = sorted(p.name for p in (out / "train").iterdir())
    # shards 0-2 are complete (shard 0 holds only bad samples: no file), no temp file
    assert left == [".clip-data-build.json", "train-000001.tar", "train-000002.tar"]
    for name in left[1:]:
        assert (out / "train" / name).read_bytes() == (ref / "train" / name).read_bytes()
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(writer_mod, "encode_item", real)
    m = build(photo_folder, out, samples_per_shard=2)
    assert m["resumed_shards"] == 3
    for p in (ref / "train").glob("*.tar"):
        assert p.read_bytes() == (out / "train" / p.name).read_bytes()
    # other options into the same folder: refused, unless --overwrite
    with pytest.raises(DataError, match="different build"):
        build(photo_folder, out, samples_per_shard=3)
    m = build(photo_folder, out, samples_per_shard=3, overwrite=True)
    assert m["resumed_shards"] == 0 and m["written"] == 8  # huge.png is fine by default
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == m["splits"]["train"]["shards"]
    assert "train-000005.tar" in [p.name for p in (ref / "train").glob("*.tar")]  # 2 per shard
    assert not (out / "train" / "train-000005.tar").exists()  # stale shard of the old build


def test_parallel_encoding_gives_the_same_shards(photo_folder, tmp_path):
    build(photo_folder, tmp_path / "a", samples_per_shard=3, opts=EncodeOptions(max_side=128))
    build(
        photo_folder,
        tmp_path / "b",
        samples_per_shard=3,
        opts=EncodeOptions(max_side=128),
        num_workers=2,
    )
    a = sorted((tmp_path / "a" / "train").glob("*.tar"))
    assert a and [p.read_bytes() for p in a] == [
        (tmp_path / "b" / "train" / p.name).read_bytes() for p in a
    ]


def test_from_imagefolder_imagenet_synsets(tmp_path):
    root = tmp_path / "val"
    for wnid in ("n01443537", "n01440764"):  # goldfish (1), tench (0)
        for i in range(2):
            _img(root / wnid / f"ILSVRC2012_val_{i:08d}.JPEG")
    (root / "n01440764" / "notes.md").write_text("not an image")
    m = from_imagefolder(root, tmp_path / "out", samples_per_shard=3)
    assert m["classes"] == "imagenet-1k" and m["num_classes"] == 1000 and m["written"] == 4
    names = (tmp_path / "out" / "classnames.txt").read_text().splitlines()
    assert names[:2] == ["tench", "goldfish"] and len(names) == 1000
    templates = (tmp_path / "out" / "templates.txt").read_text().splitlines()
    assert len(templates) == 80 and all("{}" in t for t in templates)
    labels = {}
    for b in make_loader(
        tmp_path / "out",
        batch_size=4,
        image_transform=ImageTransform(16),
        with_label=True,
        with_json=True,
    ):
        labels.update({j["folder"]: lab for j, lab in zip(b["json"], b["label"].tolist())})
    assert labels == {"n01440764": 0, "n01443537": 1}


def test_from_imagefolder_plain_folders_and_classnames(tmp_path, capsys):
    root = tmp_path / "tree"
    for c in ("red_car", "blue_bus"):
        _img(root / c / "a.png", fmt="PNG")
    assert main(["from-imagefolder", str(root), "--out", str(tmp_path / "o"), "-q"]) == 0
    assert "classes: 2 (folders" in capsys.readouterr().out
    assert (tmp_path / "o" / "classnames.txt").read_text() == "blue bus\nred car\n"
    assert (tmp_path / "o" / "templates.txt").read_text() == "a photo of a {}.\n"
    names = tmp_path / "names.txt"
    names.write_text("only one\n")
    assert (
        main(
            [
                "from-imagefolder",
                str(root),
                "--out",
                str(tmp_path / "o2"),
                "--classnames",
                str(names),
                "-q",
            ]
        )
        == 2
    )
    assert "1 class names for 2 classes" in capsys.readouterr().err


def test_reshard_resizes_and_keeps_fields(make_shards, tmp_path, capsys):
    src = make_shards([5, 4], label=True)
    assert (
        main(
            [
                "reshard",
                str(src),
                "--out",
                str(tmp_path / "rs"),
                "--samples-per-shard",
                "4",
                "--max-side",
                "8",
                "--prefix",
                "train",
                "-q",
            ]
        )
        == 0
    )
    assert "wrote 9 samples in 3 shards" in capsys.readouterr().out
    assert [n for _, n in shard_sample_counts(tmp_path / "rs")] == [4, 4, 1]
    s = _samples(tmp_path / "rs")
    assert Image.open(io.BytesIO(s["s00003"]["jpg"])).size == (8, 8)
    assert s["s00003"]["cls"] == b"0" and json.loads(s["s00003"]["json"]) == {"i": 3}
    assert s["s00003"]["txt"] == b"caption number 3"
    with pytest.raises(DataError, match="where the input shards are"):
        reshard(src, src)
