import io
import json

import numpy as np
import webdataset as wds
from PIL import Image

from data_tools.counts import count_samples
from data_tools.synth import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    ZEROSHOT_TEMPLATES,
    class_names,
    write_synth,
)
from data_tools.urls import expand_shards


def _read(split_dir):
    return list(wds.tarfile_samples([{"url": u} for u in expand_shards(split_dir)]))


def _bytes(d, split):
    return [open(p, "rb").read() for p in expand_shards(d / split)]


def test_same_seed_same_bytes_other_seed_differs(tmp_path, synth_dir, small_synth):
    write_synth(tmp_path / "again", small_synth(seed=0))
    write_synth(tmp_path / "other", small_synth(seed=1))
    for split in ("train", "zeroshot", "retrieval"):
        assert _bytes(tmp_path / "again", split) == _bytes(synth_dir, split)
        assert _bytes(tmp_path / "other", split) != _bytes(synth_dir, split)
    assert (tmp_path / "again" / "manifest.json").read_bytes() == (
        synth_dir / "manifest.json"
    ).read_bytes()


def test_manifest_counts_match_shards(synth_dir):
    m = json.loads((synth_dir / "manifest.json").read_text())
    assert m["counts"] == {"train": 300, "zeroshot": 72, "retrieval": 20}
    for split, n in m["counts"].items():
        assert count_samples(synth_dir / split) == n
    assert len(expand_shards(synth_dir / "train")) == 3
    assert m["classnames"] == class_names() and len(m["classnames"]) == 36
    assert m["templates"] == list(ZEROSHOT_TEMPLATES)


def test_held_out_combos_absent_from_train(synth_dir):
    m = json.loads((synth_dir / "manifest.json").read_text())
    held = {(h["kind"], h["colour"]) for h in m["held_out"]}
    assert len(held) == 6
    assert len({k for k, _ in held}) == 6 and len({c for _, c in held}) == 6
    train = _read(synth_dir / "train")
    combos = set()
    for s in train:
        a = json.loads(s["json"])
        combos.add((a["kind"], a["colour"]))
        cap = s["txt"].decode()
        assert a["colour"] in cap and a["kind"] in cap  # every caption names colour and kind
    assert not combos & held
    assert len(combos) == 30
    for cls in m["held_out_classes"]:
        assert not any(cls in s["txt"].decode() for s in train)


def test_zeroshot_labels_cover_all_classes(synth_dir):
    names = (synth_dir / "zeroshot" / "classnames.txt").read_text().splitlines()
    templates = (synth_dir / "zeroshot" / "templates.txt").read_text().splitlines()
    assert names == class_names()
    assert all("{}" in t for t in templates)
    samples = _read(synth_dir / "zeroshot")
    labels = [int(s["cls"]) for s in samples]
    assert sorted(set(labels)) == list(range(36))
    assert all(labels.count(c) == 2 for c in range(36))
    for s in samples:
        a = json.loads(s["json"])
        assert names[int(s["cls"])] == f"{a['colour']} {a['kind']}" == a["classname"]
    # zero-shot prompts are phrased unlike training captions
    train_text = " ".join(CAPTION_TEMPLATES)
    for t in templates:
        stem = t.replace("the {}.", "").strip()
        assert stem not in train_text


def test_retrieval_has_five_distinct_captions(synth_dir):
    for s in _read(synth_dir / "retrieval"):
        meta = json.loads(s["json"])
        caps = meta["captions"]
        assert len(caps) == 5 and len(set(caps)) == 5
        assert s["txt"].decode() == caps[0]
        assert all(meta["colour"] in c for c in caps)


def test_images_show_the_labelled_colour(synth_dir):
    for s in _read(synth_dir / "zeroshot"):
        a = json.loads(s["json"])
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
        x = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        bg = np.array(BACKGROUNDS[a["background"]], dtype=np.float32)
        fg = x[np.abs(x - bg).sum(1) > 120]
        assert len(fg) >= 70  # at least one ~12 px shape
        # the median shape pixel is the class colour, closer to it than to any other colour
        med = np.median(fg, axis=0)
        dists = {c: np.abs(med - np.array(rgb)).sum() for c, rgb in COLOURS.items()}
        assert min(dists, key=dists.get) == a["colour"], (s["__key__"], dists)
