"""A pass continued on another layout (`data_tools.redeal`): what the old ranks took is found
from their states alone, and every sample they left is dealt to exactly one new worker."""

import itertools
import json
import random

import pytest
import torch

from data_tools.errors import DataError
from data_tools.loader import make_loader
from data_tools.read_plan import buffer_shuffle
from data_tools.redeal import buffer_leftover
from data_tools.shards import ShardWriter
from data_tools.tario import ReadMode, iter_shard
from data_tools.transforms import ImageTransform

AUG = ImageTransform(16, train=True)
CORRUPT = b"\xff\xd8\xff\xe0 not a jpeg"


@pytest.mark.parametrize("size", [1, 2, 7, 50])
@pytest.mark.parametrize("n", [0, 1, 6, 40, 300])
def test_buffer_leftover_is_buffer_shuffle(n, size):
    for taken in sorted({0, 1, n // 3, n - size - 1, n - size, n - size + 1, n - 2, n}):
        if not 0 <= taken <= n:
            continue
        out = list(buffer_shuffle(range(n), size, random.Random(f"t{n}:{size}")))
        assert sorted(out) == list(range(n))
        took = set(out[:taken])
        cut, left = buffer_leftover(n, taken, size, random.Random(f"t{n}:{size}"))
        assert all(0 <= x < cut for x in left)
        assert set(left.tolist()) | set(range(cut, n)) == set(range(n)) - took, (taken, cut)


def _shards(root, counts, corrupt=(), jpeg=None):
    """Shards of `counts[j]` samples, keys s00000 ... in order; indices in `corrupt` hold a
    JPEG that does not decode."""
    i = 0
    for j, n in enumerate(counts):
        with ShardWriter(root, f"part{j:02d}", samples_per_shard=max(n, 1)) as w:
            for _ in range(n):
                image = CORRUPT if i in corrupt else jpeg(i)
                w.write({"__key__": f"s{i:05d}", "jpg": image, "txt": f"caption {i}"})
                i += 1
    return {f"s{k:05d}" for k in range(i)}


def _kw(**over):
    kw = dict(batch_size=3, image_transform=AUG, shuffle_buffer=7, seed=5, epoch=2)
    kw.update(over)
    return kw


def _old_run(d, world, workers, take, **kw):
    """Each of `world` ranks takes `take` batches: their states, and every key they took (the
    keys in their batches and the bad keys those batches report)."""
    states, taken = [], []
    for r in range(world):
        loader = make_loader(d, rank=r, world_size=world, num_workers=workers, **_kw(**kw))
        for b in itertools.islice(iter(loader), take):
            taken += b["key"] + [k.split(" ")[0] for k in b["_bad_keys"]]
        states.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint holds it
        loader.close()
    return states, taken


def _keys(loader, runs):
    urls = loader.plan.shards
    keys = []
    for shard, a, b in runs:
        keys += [s.key for s in iter_shard(urls[shard], mode=ReadMode(False))][a:b]
    return keys


CASES = {  # shard counts, old (world, workers, batches taken), new (world, workers), corrupt
    "1->2": ([7, 5, 9, 4, 6, 11, 3], (1, 1, 4), (2, 1), {3, 20}),
    "2->1": ([7, 5, 9, 4, 6, 11, 3], (2, 1, 3), (1, 1), {3, 20, 44}),
    "2x2->3x1": ([7, 5, 9, 4, 6, 11, 3, 8], (2, 2, 3), (3, 1), {0, 30}),
    "4x2->1x2": ([7, 5, 9, 4, 6, 11, 3, 8, 5], (4, 2, 2), (1, 2), {12, 26}),
    "sample-split 2x2->1x1": ([23, 20], (2, 2, 2), (1, 1), {5, 13}),
    "sample-split 1->3x2": ([50], (1, 1, 5), (3, 2), {9}),
}


@pytest.mark.parametrize("case", CASES)
def test_the_rest_is_what_the_old_ranks_left(tmp_path, jpeg, case):
    counts, (world, workers, take), (new_world, new_workers), corrupt = CASES[case]
    every = _shards(tmp_path / "d", counts, corrupt, jpeg)
    states, taken = _old_run(tmp_path / "d", world, workers, take)
    bad = {f"s{i:05d}" for i in corrupt}
    assert len(taken) == len(set(taken)) and set(taken) & bad  # a bad sample was taken too
    rest = []
    for r in range(new_world):
        loader = make_loader(
            tmp_path / "d",
            **_kw(batch_size=2),
            rank=r,
            world_size=new_world,
            num_workers=new_workers,
            state=states,
        )
        assert len(loader.plan.rest) == max(1, new_workers)
        for runs in loader.plan.rest:
            rest += _keys(loader, runs)
    assert len(rest) == len(set(rest))
    assert set(rest).isdisjoint(taken)
    assert set(rest) | set(taken) == every


def _clean(tmp_path, jpeg, counts):
    return _shards(tmp_path / "d", counts, (), jpeg)


def _drain(d, world, workers, states, **kw):
    keys, per_rank = [], []
    for r in range(world):
        loader = make_loader(d, rank=r, world_size=world, num_workers=workers, state=states, **kw)
        batches = list(loader)
        per_rank.append(len(batches))
        assert loader.num_batches == len(batches)
        keys += [k for b in batches for k in b["key"]]
        loader.close()
    return keys, per_rank


@pytest.mark.parametrize(
    "counts, old, new",
    [
        ([12, 12, 12, 12], (1, 1, 4), (2, 1)),  # 48 - 12 = 36 left: 9 batches of 2 per rank
        ([12, 12, 12, 12], (2, 1, 3), (1, 1)),
        ([7, 5, 9, 4, 6, 11, 3, 8], (2, 2, 3), (3, 2)),
        ([40], (2, 2, 2), (1, 0)),  # sample-split
    ],
)
def test_the_rest_is_trained_once_on_the_new_layout(tmp_path, jpeg, caplog, counts, old, new):
    every = _clean(tmp_path, jpeg, counts)
    world, workers, take = old
    kw = _kw(batch_size=3, drop_last=True)
    states, taken = _old_run(tmp_path / "d", world, workers, take, drop_last=True)
    caplog.set_level("INFO", logger="data_tools")
    kw["batch_size"] = 2
    rest, per_rank = _drain(tmp_path / "d", *new, states, **kw)
    assert "no sample is read twice" in caplog.text
    left = len(every) - len(taken)
    full = left // (2 * new[0])  # the whole batches every new rank can make
    assert per_rank == [full] * new[0]
    keys = taken + rest
    assert len(keys) == len(set(keys))  # no sample twice
    assert len(every - set(keys)) == left - full * 2 * new[0]  # only the spare < 1 batch a rank
    if counts[0] == 12:
        assert set(keys) == every


def test_a_redealt_pass_resumes_and_is_redealt_again(tmp_path, jpeg):
    every = _clean(tmp_path, jpeg, [9, 7, 12, 5, 10, 6, 11, 4])
    d = tmp_path / "d"
    states, taken = _old_run(d, 2, 1, 2, drop_last=True)  # 2 ranks x 2 batches x 3 = 12 taken
    kw = _kw(batch_size=2, drop_last=True, world_size=3, num_workers=2)
    # on 3 processes x 2 workers each rank takes 2 batches and saves its state
    wholes, heads, states3 = [], [], []
    for r in range(3):
        with_state = dict(kw, rank=r, state=states)
        wholes.append(list(make_loader(d, **with_state)))
        loader = make_loader(d, **with_state)
        heads.append(list(itertools.islice(iter(loader), 2)))
        states3.append(json.loads(json.dumps(loader.state_dict())))
        loader.close()
        assert len(states3[r]["rest"]) == 1
    # the same layout resumes a re-dealt pass exactly
    for r in range(3):
        tail = list(make_loader(d, **dict(kw, rank=r, state=states3)))
        assert [b["key"] for b in heads[r] + tail] == [b["key"] for b in wholes[r]]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(heads[r] + tail, wholes[r]))
    # and another layout deals out what the 3 left
    mid = [k for head in heads for b in head for k in b["key"]]
    rest, per_rank = _drain(d, 1, 0, states3, **_kw(batch_size=4, drop_last=True))
    keys = taken + mid + rest
    assert len(keys) == len(set(keys))
    left = len(every) - len(taken) - len(mid)
    assert per_rank == [left // 4] and len(every - set(keys)) == left % 4


def test_resampled_pass_keeps_its_length_with_new_streams(tmp_path, jpeg):
    _clean(tmp_path, jpeg, [10, 10, 10])
    kw = dict(mode="resampled", samples_per_epoch=48)  # 48 / (3 x 2) = 8 batches per rank
    states, taken = _old_run(tmp_path / "d", 2, 1, 3, **kw)
    new = make_loader(tmp_path / "d", **_kw(batch_size=6, **kw), rank=0, state=states)
    batches = list(new)
    assert new.num_batches == 8  # 48 / 6: the pass is 8 steps long, 3 were done
    assert len(batches) == 8 - 3
    assert batches[0]["key"][:3] != taken[:3]  # new seeds: not rank 0's stream again
    assert new.state_dict()["rest"][0]["world_size"] == 2


def test_same_layout_list_is_the_exact_resume(tmp_path, jpeg):
    _clean(tmp_path, jpeg, [7, 5, 9, 4])
    full = [
        list(make_loader(tmp_path / "d", **_kw(), rank=r, world_size=2, num_workers=2))
        for r in (0, 1)
    ]
    states, _ = _old_run(tmp_path / "d", 2, 2, 2)
    for r in (0, 1):
        rest = list(
            make_loader(tmp_path / "d", **_kw(), rank=r, world_size=2, num_workers=2, state=states)
        )
        assert [b["key"] for b in full[r][2:]] == [b["key"] for b in rest]
        assert all(torch.equal(x["image"], y["image"]) for x, y in zip(full[r][2:], rest))


def test_bad_state_lists_are_refused_in_one_line(tmp_path, jpeg):
    _clean(tmp_path, jpeg, [6, 6, 6])
    states, _ = _old_run(tmp_path / "d", 2, 1, 1)
    d = tmp_path / "d"
    with pytest.raises(DataError, match="world_size differs .* every rank's state"):
        make_loader(d, **_kw(), state=states[0])
    with pytest.raises(DataError, match=r"every rank it was saved on \(2\), in rank order"):
        make_loader(d, **_kw(), state=states[1:])
    with pytest.raises(DataError, match="seed differs"):
        make_loader(d, **_kw(seed=6), state=states)
    with pytest.raises(DataError, match="epoch differs"):
        make_loader(d, **_kw(epoch=3), state=states)
