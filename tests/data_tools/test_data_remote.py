"""Remote shards (`pipe:`, `s3://`): resampled mode, exact resume; epoch mode says what to do."""

import itertools
import os
import stat

import pytest

from data_tools.errors import DataError
from data_tools.loader import epoch_batches, make_loader
from data_tools.tario import iter_shard
from data_tools.transforms import ImageTransform

KW = dict(
    batch_size=3,
    image_transform=ImageTransform(16, train=True),
    mode="resampled",
    shuffle_buffer=4,
    seed=2,
    max_batches=8,
)


def _keys(batches):
    return [b["key"] for b in batches]


def test_pipe_shards_resampled_and_resumed_exactly(make_shards):
    d = make_shards([6, 5, 7])
    spec = "::".join(f"pipe:cat {p}" for p in sorted(d.glob("*.tar")))
    local = list(make_loader(d, **KW))
    full = list(make_loader(spec, **KW))
    assert _keys(full) == _keys(local)  # the same draws, read through the pipe
    first = make_loader(spec, **KW)
    head = list(itertools.islice(iter(first), 3))
    rest = list(make_loader(spec, **KW, state=first.state_dict()))
    assert _keys(head + rest) == _keys(full)
    with pytest.raises(DataError, match="data.mode=resampled"):
        epoch_batches(spec, batch_size=3, world_size=1, num_workers=0, drop_last=False)


def test_s3_urls_are_read_with_the_aws_cli(make_shards, tmp_path, monkeypatch):
    d = make_shards([4])
    shard = next(d.glob("*.tar"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    aws = bin_dir / "aws"  # a stand-in: `aws s3 cp s3://bucket/NAME -` prints shards/NAME
    aws.write_text(
        f'#!/bin/sh\n[ "$1 $2 $4" = "s3 cp -" ] || exit 2\nexec cat "{d}/$(basename "$3")"\n'
    )
    aws.chmod(aws.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    got = [s.key for s in iter_shard(f"s3://bucket/{shard.name}")]
    assert got == [s.key for s in iter_shard(str(shard))]
    problems = []
    assert (
        list(iter_shard("s3://bucket/missing.tar", on_problem=lambda *a: problems.append(a[0])))
        == []
    )
    assert problems == ["truncated_tar"]  # a failed download is a bad shard, never a crash
