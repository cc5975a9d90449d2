import json
from pathlib import Path

import pytest
import webdataset as wds

from data_tools.counts import count_samples, shard_sample_counts
from data_tools.errors import DataError
from data_tools.io import write_json_atomic, write_text_atomic
from data_tools.shards import ShardWriter


def _samples(jpeg, n):
    return [
        {
            "__key__": f"k{i:03d}",
            "jpg": jpeg(i),
            "txt": f"caption {i}",
            "json": {"i": i, "b": [1]},
            "cls": i % 4,
        }
        for i in range(n)
    ]


def _write(out: Path, samples, per_shard=10) -> ShardWriter:
    with ShardWriter(out, "train", samples_per_shard=per_shard) as w:
        for s in samples:
            w.write(s)
    return w


def test_names_counts_and_contents(tmp_path, jpeg):
    w = _write(tmp_path / "a", _samples(jpeg, 25))
    assert [p.name for p in w.shards] == [f"train-00000{i}.tar" for i in range(3)]
    assert w.shard_counts == [10, 10, 5] and w.num_samples == 25
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in w.shards]
    assert [n for _, n in shard_sample_counts(tmp_path / "a")] == [10, 10, 5]
    assert count_samples(tmp_path / "a") == 25

    got = list(wds.tarfile_samples([{"url": str(p)} for p in w.shards]))
    assert [s["__key__"] for s in got] == [f"k{i:03d}" for i in range(25)]
    assert got[7]["txt"] == b"caption 7"
    assert json.loads(got[7]["json"]) == {"i": 7, "b": [1]}
    assert got[7]["cls"] == b"3"
    assert got[7]["jpg"] == jpeg(7)


def test_same_input_gives_identical_bytes(tmp_path, jpeg):
    a = _write(tmp_path / "a", _samples(jpeg, 15))
    b = _write(tmp_path / "b", _samples(jpeg, 15))
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in b.shards]
    # json key order must not matter either
    c = _write(
        tmp_path / "c",
        [{**s, "json": dict(reversed(list(s["json"].items())))} for s in _samples(jpeg, 15)],
    )
    assert [p.read_bytes() for p in a.shards] == [p.read_bytes() for p in c.shards]


def test_exception_leaves_no_partial_shard(tmp_path, jpeg):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, "train", samples_per_shard=10) as w:
            for i, s in enumerate(_samples(jpeg, 15)):
                if i == 13:
                    raise RuntimeError("boom")
                w.write(s)
    # the first, complete shard stays; nothing of the second, no temp files
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]
    assert count_samples(out) == 10


def test_exception_in_first_shard_leaves_nothing(tmp_path, jpeg):
    out = tmp_path / "y"
    with pytest.raises(KeyError):
        with ShardWriter(out, "p", samples_per_shard=100) as w:
            w.write(_samples(jpeg, 1)[0])
            raise KeyError("stop")
    assert list(out.iterdir()) == []


def test_bad_keys_and_values_are_data_errors(tmp_path):
    with ShardWriter(tmp_path, "p") as w:
        with pytest.raises(DataError, match="key"):
            w.write({"__key__": "a.b", "txt": "x"})
        with pytest.raises(DataError, match="float"):
            w.write({"__key__": "a", "txt": 1.5})


def test_atomic_helpers(tmp_path):
    write_json_atomic(tmp_path / "sub" / "m.json", {"a": 1, "ü": [2]})
    write_text_atomic(tmp_path / "t.txt", "hello\n")
    write_text_atomic(tmp_path / "t.txt", "again\n")
    assert json.loads((tmp_path / "sub" / "m.json").read_text()) == {"a": 1, "ü": [2]}
    assert (tmp_path / "t.txt").read_text() == "again\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub", "t.txt"]
