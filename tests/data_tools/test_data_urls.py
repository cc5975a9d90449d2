import pytest

from data_tools.errors import DataError
from data_tools.urls import expand_shards


@pytest.fixture
def shard_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for i in range(4):
        (d / f"train-{i:06d}.tar").write_bytes(b"")
    (d / "notes.txt").write_text("not a shard")
    return d


def test_directory_sorted_tars_only(shard_dir):
    assert expand_shards(shard_dir) == [str(shard_dir / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(shard_dir)) == expand_shards(shard_dir)


def test_brace_glob_file_and_lists(shard_dir):
    names = [str(shard_dir / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(f"{shard_dir}/train-{{000001..000002}}.tar") == names[1:3]
    assert expand_shards(f"{shard_dir}/train-00000[13].tar") == [names[1], names[3]]
    assert expand_shards(names[2]) == [names[2]]
    assert expand_shards(f"{names[3]}::{shard_dir}/train-{{000000..000001}}.tar") == [
        names[3],
        names[0],
        names[1],
    ]
    assert expand_shards([names[1], shard_dir]) == [names[1], *names]


def test_missing_path_names_it(tmp_path, shard_dir):
    missing = tmp_path / "nope" / "train-000000.tar"
    with pytest.raises(DataError, match="shard not found: .*nope/train-000000.tar"):
        expand_shards(missing)
    with pytest.raises(DataError, match="train-000004.tar and 5 more"):
        expand_shards(f"{shard_dir}/train-{{000000..000009}}.tar")
    with pytest.raises(DataError, match="no shards match"):
        expand_shards(f"{tmp_path}/*.tar")
    with pytest.raises(DataError, match="nope"):
        expand_shards([shard_dir, missing])


def test_empty_dir_and_empty_list(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no .tar shards in directory: {tmp_path / 'empty'}"):
        expand_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="no shards given"):
        expand_shards([])
    with pytest.raises(DataError, match="no shards given"):
        expand_shards("")


def test_remote_urls_pass_through():
    assert expand_shards("pipe:cat /x/a-{0..1}.tar") == [
        "pipe:cat /x/a-0.tar",
        "pipe:cat /x/a-1.tar",
    ]
