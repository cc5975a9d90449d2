"""Trainer contracts: exact resume from `state_dict`, equal batch counts, max_batches, mixing."""

import itertools
import json
from collections import Counter

import pytest
import torch

from data_tools.errors import DataError
from data_tools.loader import epoch_batches, make_loader
from data_tools.transforms import ImageTransform

AUG = ImageTransform(16, train=True)  # random crops: resume must restore the augmentation RNG


def _kw(**over):
    kw = dict(batch_size=3, image_transform=AUG, shuffle_buffer=7, seed=5, epoch=2)
    kw.update(over)
    return kw


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"])
        if "text" in x:
            assert torch.equal(x["text"], y["text"])


def _take(loader, n=None):
    it = iter(loader)
    return list(it if n is None else itertools.islice(it, n))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("mode", ["epoch", "resampled", "epoch-sample-split"])
def test_resume_yields_exactly_the_remaining_batches(make_shards, char_tokenizer, workers, mode):
    d = make_shards([7, 5, 9, 4, 6] if mode != "epoch-sample-split" else [31])
    mode = mode.split("-")[0]
    kw = _kw(num_workers=workers, mode=mode, tokenizer=char_tokenizer)
    if mode == "resampled":
        kw["max_batches"] = 14
    full = _take(make_loader(d, **kw))
    assert len(full) >= 11
    for k in (0, 1, 4, len(full) - 1, len(full)):
        first = make_loader(d, **kw)
        it = iter(first)
        head = list(itertools.islice(it, k))
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
        assert state["batches"] == k
        first.close()
        rest = _take(make_loader(d, **kw, state=state))
        _same(head + rest, full)


def test_resume_skips_without_decoding(make_shards):
    calls = []

    class Counting:  # a generic transform (no fast path): one call per decoded sample
        def __init__(self):
            self.inner = ImageTransform(16, train=True)

        def reseed(self, seed):
            self.inner.reseed(seed)

        def __call__(self, img):
            calls.append(1)
            return self.inner(img)

    t = Counting()
    d = make_shards([10, 10])
    kw = _kw(image_transform=t)
    full = _take(make_loader(d, **kw))
    loader = make_loader(d, **kw)
    it = iter(loader)
    head = list(itertools.islice(it, 4))
    state = loader.state_dict()
    calls.clear()
    rest = _take(make_loader(d, **kw, state=state))
    assert len(calls) == sum(len(b["key"]) for b in rest) == 20 - 12
    _same(head + rest, full)


def test_resume_from_other_config_names_the_field(make_shards):
    d = make_shards([6, 6])
    loader = make_loader(d, **_kw())
    next(iter(loader))
    state = loader.state_dict()
    for change, field in [
        ({"seed": 6}, "seed"),
        ({"batch_size": 4}, "batch_size"),
        ({"num_workers": 2}, "num_workers"),
        ({"epoch": 3}, "epoch"),
        ({"mode": "resampled"}, "mode"),
    ]:
        with pytest.raises(DataError, match=f"{field} differs"):
            make_loader(d, **_kw(**change), state=state)
    with pytest.raises(DataError, match="shards differs"):
        make_loader(make_shards([6, 5], name="other"), **_kw(), state=state)
    with pytest.raises(DataError, match="not a clip-train-loader"):
        make_loader(d, **_kw(), state={"batches": 1})


@pytest.mark.parametrize("counts", [[5, 9, 3, 7, 4, 6, 8, 2, 5], [11, 6, 9]])
@pytest.mark.parametrize("drop_last", [False, True])
def test_epoch_batches_is_exact(make_shards, counts, drop_last):
    d = make_shards(counts)
    want = epoch_batches(d, batch_size=2, world_size=2, num_workers=2, drop_last=drop_last)
    got = []
    for rank in (0, 1):
        loader = make_loader(
            d,
            batch_size=2,
            image_transform=AUG,
            num_workers=2,
            rank=rank,
            world_size=2,
            drop_last=drop_last,
            shuffle_buffer=4,
            seed=rank,
        )
        got.append(len(_take(loader)))
        assert loader.num_batches == want[rank]
        loader.close()
    assert got == want


def test_max_batches_equalises_ranks(make_shards):
    d = make_shards([9, 2, 9, 2])
    per_rank = epoch_batches(d, batch_size=2, world_size=2, num_workers=1, drop_last=False)
    assert per_rank[0] != per_rank[1]
    n = min(per_rank)
    lens = [
        len(
            _take(
                make_loader(
                    d, batch_size=2, image_transform=AUG, rank=r, world_size=2, max_batches=n
                )
            )
        )
        for r in (0, 1)
    ]
    assert lens == [n, n]
    # max_batches counts batches before a resume state too
    loader = make_loader(d, batch_size=2, image_transform=AUG, max_batches=5)
    it = iter(loader)
    list(itertools.islice(it, 3))
    rest = _take(
        make_loader(d, batch_size=2, image_transform=AUG, max_batches=5, state=loader.state_dict())
    )
    assert len(rest) == 2


def test_mixing_specs_and_samples_per_epoch(make_shards):
    a = make_shards([20, 20], name="a")
    b = make_shards([20, 20], name="b")
    kw = dict(
        batch_size=10,
        image_transform=ImageTransform(16),
        mode="resampled",
        samples_per_epoch=95,
        world_size=2,
    )
    loader = make_loader(f"{a}::{b}", weights=[3, 1], **kw)
    assert loader.num_batches == 5  # ceil(95 / (10 * 2)) per rank
    batches = _take(loader)
    assert len(batches) == 5
    pairs = _take(make_loader([(a, 3.0), (b, 1.0)], **kw))
    _same(batches, pairs)  # the same sources, however they are written

    with pytest.raises(DataError, match="resampled"):
        make_loader(f"{a}::{b}", weights=[1, 1], batch_size=2, image_transform=AUG)
    with pytest.raises(DataError, match="2 weights for 1 sources"):
        make_loader(str(a), weights=[1, 1], batch_size=2, image_transform=AUG, mode="resampled")
    with pytest.raises(DataError, match="positive sum"):
        make_loader([(a, 0.0), (b, 0.0)], batch_size=2, image_transform=AUG, mode="resampled")


def test_mixing_proportions(tmp_path, jpeg):
    from data_tools.shards import ShardWriter

    for name in ("a", "b"):
        with ShardWriter(tmp_path / name, name, samples_per_shard=10) as w:
            for i in range(20):
                w.write({"__key__": f"{name}{i}", "jpg": jpeg(i), "txt": name})
    loader = make_loader(
        [(tmp_path / "a", 0.8), (tmp_path / "b", 0.2)],
        batch_size=50,
        image_transform=ImageTransform(8),
        mode="resampled",
        max_batches=40,
        num_workers=2,
        seed=1,
    )
    n = Counter(k[0] for b in loader for k in b["key"])
    assert n["a"] + n["b"] == 2000
    assert 0.76 < n["a"] / 2000 < 0.84
