import itertools
import logging

import open_clip
import pytest
import torch

from data_tools.errors import DataError
from data_tools.loader import SKIP_REASONS, count_samples, make_loader
from data_tools.shards import ShardWriter
from data_tools.transforms import image_transform

T = image_transform(16)


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_batch_shapes_dtypes_and_keys(make_shards, char_tokenizer):
    d = make_shards([7, 6], label=True)
    batches = list(
        make_loader(
            d,
            batch_size=4,
            image_transform=T,
            tokenizer=char_tokenizer,
            with_label=True,
            with_json=True,
        )
    )
    assert [len(b["key"]) for b in batches] == [4, 4, 4, 1]  # batches span shards; partial kept
    b = batches[0]
    assert {k for k in b if not k.startswith("_")} == {
        "image",
        "key",
        "caption",
        "text",
        "label",
        "json",
    }
    assert b["_skipped"] == dict.fromkeys(SKIP_REASONS, 0) and b["_seen"] == 4
    assert b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32
    assert b["text"].shape == (4, 16) and b["text"].dtype == torch.long
    assert b["label"].dtype == torch.long and b["label"].tolist() == [0, 1, 2, 0]
    assert b["key"] == ["s00000", "s00001", "s00002", "s00003"]
    assert b["caption"][1] == "caption number 1" and b["json"][2] == {"i": 2}
    torch.testing.assert_close(b["text"], char_tokenizer(b["caption"]))
    assert _keys(batches) == [f"s{i:05d}" for i in range(13)]
    plain = next(iter(make_loader(d, batch_size=2, image_transform=T)))
    assert {k for k in plain if not k.startswith("_")} == {"image", "key", "caption"}


def test_drop_last(make_shards):
    d = make_shards([10])
    assert [
        len(b["key"]) for b in make_loader(d, batch_size=4, image_transform=T, drop_last=True)
    ] == [4, 4]


def test_open_clip_tokenizer_in_workers(make_shards):
    d = make_shards([5, 5])
    tok = open_clip.get_tokenizer("ViT-B-32")
    batches = list(make_loader(d, batch_size=5, image_transform=T, tokenizer=tok, num_workers=2))
    assert sorted(_keys(batches)) == [f"s{i:05d}" for i in range(10)]
    for b in batches:
        torch.testing.assert_close(b["text"], tok(b["caption"]))


@pytest.mark.parametrize(
    "counts", [[5, 9, 3, 7, 4, 6, 8, 2, 5], [11, 6, 9]], ids=["shard-split", "sample-split"]
)
@pytest.mark.parametrize("shuffle", [0, 16])
def test_epoch_each_sample_once_across_ranks_and_workers(make_shards, counts, shuffle):
    d = make_shards(counts)
    total = sum(counts)
    per_rank = []
    for rank in (0, 1):
        loader = make_loader(
            d,
            batch_size=3,
            image_transform=T,
            num_workers=2,
            rank=rank,
            world_size=2,
            shuffle_buffer=shuffle,
            seed=3,
            epoch=1,
        )
        assert loader.regime == ("shard-split" if len(counts) >= 4 else "sample-split")
        per_rank.append(_keys(loader))
        loader.close()
    got = per_rank[0] + per_rank[1]
    assert sorted(got) == [f"s{i:05d}" for i in range(total)]  # exactly once
    assert per_rank[0] and per_rank[1]


def test_shuffle_deterministic_per_seed_and_epoch(make_shards):
    d = make_shards([8, 8, 8, 8])

    def order(seed, epoch, workers=2):
        return _keys(
            make_loader(
                d,
                batch_size=4,
                image_transform=T,
                num_workers=workers,
                shuffle_buffer=10,
                seed=seed,
                epoch=epoch,
            )
        )

    a = order(0, 0)
    assert sorted(a) == [f"s{i:05d}" for i in range(32)]
    assert a != sorted(a)
    assert order(0, 0) == a
    assert order(0, 1) != a
    assert order(1, 0) != a
    assert order(0, 0, workers=0) == order(0, 0, workers=0)


def test_corrupt_image_is_skipped_and_logged(tmp_path, jpeg, char_tokenizer, caplog):
    with ShardWriter(tmp_path, "bad", samples_per_shard=100) as w:
        for i in range(6):
            sample = {"__key__": f"k{i}", "jpg": jpeg(i), "txt": f"c{i}"}
            if i == 2:
                sample["jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
            if i == 4:
                sample["jpg"] = jpeg(i)[:40]  # truncated
            if i == 5:
                del sample["txt"]  # no caption while a tokenizer is given
            w.write(sample)
    with caplog.at_level(logging.WARNING, logger="data_tools.loader"):
        keys = _keys(
            make_loader(tmp_path, batch_size=2, image_transform=T, tokenizer=char_tokenizer)
        )
    assert keys == ["k0", "k1", "k3"]
    text = caplog.text
    assert "'k2'" in text and "'k4'" in text and "'k5'" in text
    assert "skipped 3 bad samples of 6" in text


def test_resampled_is_endless_and_seeded(make_shards):
    d = make_shards([4, 4, 4])
    total = count_samples(d)
    assert total == 12

    def take(seed, n=40):
        loader = make_loader(
            d, batch_size=4, image_transform=T, mode="resampled", num_workers=2, seed=seed
        )
        keys = [k for b in itertools.islice(iter(loader), n // 4) for k in b["key"]]
        loader.close()
        return keys

    keys = take(0)
    assert len(keys) == 40 > total
    assert set(keys) <= {f"s{i:05d}" for i in range(12)}
    assert take(0) == keys


def test_bad_arguments(make_shards, tmp_path):
    d = make_shards([2])
    with pytest.raises(DataError, match="mode"):
        make_loader(d, batch_size=2, image_transform=T, mode="random")
    with pytest.raises(DataError, match="rank 2"):
        make_loader(d, batch_size=2, image_transform=T, rank=2, world_size=2)
    with pytest.raises(DataError, match="shard not found"):
        make_loader(tmp_path / "missing", batch_size=2, image_transform=T)
