"""The tar reader: agrees with tarfile on names and data, and on what is damaged."""

import io
import tarfile

import pytest

from data_tools.shards import ShardWriter
from data_tools.tario import FieldLoader, ReadMode, iter_shard


def _problems():
    seen = []
    return seen, lambda reason, key, url, detail: seen.append((reason, key))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_prefixes_and_dirs(tmp_path, fmt):
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "d" * 90  # ustar: prefix field
    names = [
        f"{long_dir}/k{'x' * 110 if fmt != tarfile.USTAR_FORMAT else ''}1.jpg",
        "plain.jpg",
        "plain.txt",
        "caf\u00e9.txt",
    ]
    p = tmp_path / "a.tar"
    with tarfile.open(p, "w", format=fmt) as tf:
        tf.addfile(_dir("somedir"))
        for i, n in enumerate(names):
            data = f"data {i}".encode() * (i + 1)
            info = tarfile.TarInfo(n)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(iter_shard(str(p)))
    assert [(s.key, sorted(s.fields)) for s in got] == [
        (names[0].rsplit(".", 1)[0], ["jpg"]),
        ("plain", ["jpg", "txt"]),
        ("caf\u00e9", ["txt"]),
    ]
    assert got[1].fields["txt"] == b"data 2" * 3
    lazy = list(iter_shard(str(p), mode=ReadMode(False)))
    assert all(not s.fields for s in lazy)
    loaded = FieldLoader().load(lazy[1])
    assert loaded.fields == got[1].fields


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_every_cut_point_keeps_complete_samples_only(tmp_path, jpeg):
    with ShardWriter(tmp_path, "s", 100) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "jpg": jpeg(i), "txt": f"t{i}"})
    full = (tmp_path / "s-000000.tar").read_bytes()
    ref = [s.key for s in iter_shard(str(tmp_path / "s-000000.tar"))]
    assert ref == ["k0", "k1", "k2", "k3"]
    with tarfile.open(tmp_path / "s-000000.tar") as tf:
        tf.getmembers()
        end = tf.offset  # where the end-of-archive block starts; the rest is padding
    cut_file = tmp_path / "cut.tar"
    for cut in [*range(512, end + 512, 97), end - 1, end, end + 511]:
        cut_file.write_bytes(full[:cut])
        problems, report = _problems()
        keys = [s.key for s in iter_shard(str(cut_file), on_problem=report)]
        assert keys == ref[: len(keys)]
        assert [r for r, _ in problems] == ["truncated_tar"], cut
        # the sample that was cut is named and never returned
        assert problems[0][1] not in keys
        lazy = [
            s.key
            for s in iter_shard(str(cut_file), mode=ReadMode(False), on_problem=lambda *a: None)
        ]
        assert lazy == keys  # header-only reading agrees (the loader's resume relies on it)


def test_not_a_tar_and_empty(tmp_path):
    for data in (b"", b"hello world" * 100):
        p = tmp_path / "x.tar"
        p.write_bytes(data)
        problems, report = _problems()
        assert list(iter_shard(str(p), on_problem=report)) == []
        assert [r for r, _ in problems] == ["unreadable_shard"]
    problems, report = _problems()
    assert list(iter_shard(str(tmp_path / "missing.tar"), on_problem=report)) == []
    assert problems == [("unreadable_shard", "")]
