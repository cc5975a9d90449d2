"""Start-up cost O(shards): sample counts from sidecars and a cache, tar headers only once."""

import gzip
import itertools
import json
import os
from pathlib import Path

import pytest

from data_tools import counts as counts_mod
from data_tools.build import build
from data_tools.counts import CACHE_NAME, count_samples, shard_sample_counts, user_cache_file
from data_tools.errors import DataError
from data_tools.inspect_shards import inspect_shards
from data_tools.io import write_json_atomic
from data_tools.loader import epoch_batches, make_loader
from data_tools.reshard import reshard
from data_tools.shards import ShardWriter
from data_tools.transforms import ImageTransform


@pytest.fixture
def header_reads(monkeypatch):
    """Records every shard whose tar headers are counted."""
    seen = []
    real = counts_mod.count_headers

    def spy(url):
        seen.append(os.path.basename(url))
        return real(url)

    monkeypatch.setattr(counts_mod, "count_headers", spy)
    return seen


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


def _write(path: Path, n: int, jpeg, start: int = 0) -> Path:
    """One shard `path` of n samples (written atomically by ShardWriter, then renamed)."""
    with ShardWriter(path.parent, "tmp", samples_per_shard=n + 1) as w:
        for i in range(start, start + n):
            w.write({"__key__": f"k{i:05d}", "jpg": jpeg(i), "txt": f"caption {i}"})
    os.replace(w.shards[0], path)
    return path


def test_manifest_counts_are_used_without_opening_a_tar(synth_dir, header_reads):
    m = json.loads((synth_dir / "manifest.json").read_text())
    assert count_samples(synth_dir / "train") == m["counts"]["train"]
    assert header_reads == []
    assert not (synth_dir / "train" / CACHE_NAME).exists()


def test_manifest_count_wins_over_headers_while_the_size_matches(tmp_path, jpeg, header_reads):
    d = tmp_path / "d"
    a, b = _write(d / "a.tar", 5, jpeg), _write(d / "b.tar", 3, jpeg, 5)
    # a manifest (as build writes it, here one folder up) that claims other counts
    write_json_atomic(
        tmp_path / "manifest.json",
        {
            "splits": {
                "train": {
                    "path": "d",
                    "shards": ["a.tar", "b.tar"],
                    "shard_counts": [50, 30],
                    "shard_bytes": [a.stat().st_size, b.stat().st_size],
                }
            }
        },
    )
    assert [n for _, n in shard_sample_counts(d)] == [50, 30]
    assert header_reads == []
    _write(d / "b.tar", 4, jpeg, 5)  # rebuilt: its size no longer matches
    assert [n for _, n in shard_sample_counts(d)] == [50, 4]
    assert header_reads == ["b.tar"]


def test_manifest_without_sizes_is_trusted_only_for_older_shards(tmp_path, jpeg, header_reads):
    d = tmp_path / "d"
    a = _write(d / "a.tar", 5, jpeg)
    m = d / "manifest.json"  # an older manifest (no shard_bytes), written after the shard
    write_json_atomic(
        m, {"splits": {"s": {"path": ".", "shards": ["a.tar"], "shard_counts": [50]}}}
    )
    t = m.stat().st_mtime
    os.utime(a, (t - 60, t - 60))
    assert count_samples(d) == 50 and header_reads == []
    os.utime(a, (t + 60, t + 60))  # the shard was rewritten after the manifest
    assert count_samples(d) == 5 and header_reads == ["a.tar"]


def test_build_manifest_records_sizes(tmp_path, jpeg, header_reads):
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(7):
        (src / f"p{i}.jpg").write_bytes(jpeg(i))
        (src / f"p{i}.txt").write_text(f"photo {i}")
    m = build(src, tmp_path / "out", samples_per_shard=3)
    assert m["splits"]["train"]["shard_bytes"] == [
        (tmp_path / "out" / "train" / n).stat().st_size for n in m["splits"]["train"]["shards"]
    ]
    assert [n for _, n in shard_sample_counts(tmp_path / "out" / "train")] == [3, 3, 1]
    assert header_reads == []


def test_img2dataset_stats_give_the_count(tmp_path, jpeg, header_reads):
    d = tmp_path / "laion"
    tar = _write(d / "00000.tar", 4, jpeg)
    stats = d / "00000_stats.json"
    stats.write_text(
        json.dumps(
            {
                "count": 10,
                "successes": 9,
                "failed_to_download": 1,
                "failed_to_resize": 0,
                "duration": 1.0,
                "status_dict": {},
            }
        )
    )
    assert shard_sample_counts(d) == [(str(tar), 9)]  # the sidecar, not the 4 headers
    assert header_reads == []
    t = stats.stat().st_mtime
    os.utime(tar, (t + 60, t + 60))  # the tar changed after img2dataset wrote its stats
    assert shard_sample_counts(d) == [(str(tar), 4)]
    assert header_reads == ["00000.tar"]


def test_shards_without_sidecar_are_counted_once_and_cached(tmp_path, jpeg, header_reads):
    d = tmp_path / "d"
    for j, n in enumerate([5, 2, 7]):
        _write(d / f"s{j}.tar", n, jpeg, 10 * j)
    assert count_samples(d) == 14
    assert sorted(header_reads) == ["s0.tar", "s1.tar", "s2.tar"]
    cache = json.loads((d / CACHE_NAME).read_text())
    assert cache["format"] == "clip-train-counts/1" and cache["shards"]["s1.tar"]["samples"] == 2
    header_reads.clear()
    assert [n for _, n in shard_sample_counts(d)] == [5, 2, 7]
    assert epoch_batches(d, batch_size=2, world_size=1, num_workers=0, drop_last=False) == [7]
    assert header_reads == []

    _write(d / "s1.tar", 3, jpeg, 10)  # a changed shard: new size and mtime
    assert [n for _, n in shard_sample_counts(d)] == [5, 3, 7]
    assert header_reads == ["s1.tar"]
    # Same size, new mtime (rewritten in place): counted again, never trusted stale.
    header_reads.clear()
    st = (d / "s0.tar").stat()
    os.utime(d / "s0.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert [n for _, n in shard_sample_counts(d)] == [5, 3, 7]
    assert header_reads == ["s0.tar"]


def test_cache_never_replaces_a_user_file(tmp_path, jpeg, header_reads, user_cache):
    d = tmp_path / "d"
    _write(d / "a.tar", 3, jpeg)
    (d / CACHE_NAME).write_text("my notes\n")
    assert count_samples(d) == 3
    assert (d / CACHE_NAME).read_text() == "my notes\n"
    assert json.loads(user_cache_file(d).read_text())["shards"]["a.tar"]["samples"] == 3
    assert str(user_cache_file(d)).startswith(str(user_cache))
    header_reads.clear()
    assert count_samples(d) == 3 and header_reads == []


def test_unwritable_folder_caches_under_the_user_cache_dir(
    tmp_path, jpeg, header_reads, monkeypatch
):
    d = tmp_path / "ro"
    _write(d / "a.tar", 6, jpeg)
    real = os.access
    monkeypatch.setattr(counts_mod.os, "access", lambda p, m: False if Path(p) == d else real(p, m))
    assert count_samples(d) == 6
    assert not (d / CACHE_NAME).exists() and user_cache_file(d).is_file()
    header_reads.clear()
    assert count_samples(d) == 6 and header_reads == []


def test_remote_shards_in_epoch_mode_point_to_resampled():
    with pytest.raises(DataError, match="mode=resampled"):
        epoch_batches(
            "pipe:cat /data/{000..009}.tar",
            batch_size=2,
            world_size=1,
            num_workers=0,
            drop_last=False,
        )


def test_exact_resume_with_cached_counts(make_shards, header_reads):
    d = make_shards([7, 5, 9, 4])
    kw = dict(
        batch_size=3,
        image_transform=ImageTransform(16, train=True),
        shuffle_buffer=5,
        seed=3,
        num_workers=2,
    )
    full = list(make_loader(d, **kw))
    first = make_loader(d, **kw)
    assert first.num_batches == len(full)  # counted from headers once, then from the cache
    head = list(itertools.islice(iter(first), 4))
    state = first.state_dict()
    first.close()
    header_reads.clear()
    resumed = make_loader(d, **kw, state=state)
    assert resumed.num_batches == len(full) and header_reads == []
    rest = list(resumed)
    assert [b["key"] for b in head + rest] == [b["key"] for b in full]


def test_gzip_shards_load_inspect_and_count(tmp_path, jpeg):
    plain = _write(tmp_path / "plain" / "a.tar", 5, jpeg)
    _write(tmp_path / "plain" / "b.tar", 4, jpeg, 5)
    gz = tmp_path / "gz"
    gz.mkdir()
    for name in ("a", "b"):
        data = (tmp_path / "plain" / f"{name}.tar").read_bytes()
        (gz / f"{name}.tar.gz").write_bytes(gzip.compress(data))
    assert [n for _, n in shard_sample_counts(gz)] == [5, 4]
    kw = dict(
        batch_size=2,
        image_transform=ImageTransform(16, train=True),
        shuffle_buffer=3,
        seed=1,
        num_workers=2,
    )
    want = list(make_loader(plain.parent, **kw))
    got = list(make_loader(gz, **kw))
    assert [b["key"] for b in got] == [b["key"] for b in want]
    loader = make_loader(gz, **kw)
    it = iter(loader)
    head = list(itertools.islice(it, 2))
    rest = list(make_loader(gz, **kw, state=loader.state_dict()))
    loader.close()
    assert [b["key"] for b in head + rest] == [b["key"] for b in want]
    stats = inspect_shards(gz, decode=True)
    assert stats.total == 9 and not stats.bad
    with pytest.raises(DataError, match="decompress it first"):
        reshard(gz, tmp_path / "out")  # reads by offset: refused with what to do
