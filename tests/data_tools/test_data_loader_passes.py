"""One set of workers for many passes: `make_loader(..., reuse=previous)` must give, pass after
pass, the batches that a fresh loader per epoch gives, without starting new workers."""

import pytest
import torch

from data_tools.loader import epoch_batches, make_loader
from data_tools.transforms import image_transform

T = image_transform(16, train=True)  # augmentation: its per-batch reseeding is part of the pass


def _loader(d, tok, epoch, mode="epoch", **kw):
    args = dict(
        batch_size=4,
        image_transform=T,
        tokenizer=tok,
        mode=mode,
        num_workers=2,
        shuffle_buffer=8,
        seed=3,
        epoch=epoch,
        drop_last=True,
    )
    if mode == "epoch":
        args["max_batches"] = min(
            epoch_batches(str(d), batch_size=4, world_size=1, num_workers=2, drop_last=True)
        )
    else:
        args["samples_per_epoch"] = 20
    return make_loader(d, **{**args, **kw})


def _batches(loader, stop=None):
    out = []
    for b in loader:
        out.append((b["key"], b["image"].clone(), b["text"].clone()))
        if stop is not None and len(out) == stop:
            break
    return out, loader.state_dict()


def _pids(loader):
    return [w.pid for w in loader.dataloader._iterator._workers]


def _same(a, b):
    (ba, sa), (bb, sb) = a, b
    assert sa == sb
    assert [k for k, _, _ in ba] == [k for k, _, _ in bb]
    for (_, ia, ta), (_, ib, tb) in zip(ba, bb):
        torch.testing.assert_close(ia, ib, rtol=0, atol=0)
        assert torch.equal(ta, tb)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_reused_workers_give_each_pass_as_a_fresh_loader(make_shards, char_tokenizer, mode):
    d = make_shards([9, 7, 8, 6, 5])
    fresh = []
    for epoch in range(3):
        loader = _loader(d, char_tokenizer, epoch, mode)
        fresh.append(_batches(loader))
        loader.close()
    assert fresh[0][0] and [k for k, _, _ in fresh[0][0]] != [k for k, _, _ in fresh[1][0]]

    loader = _loader(d, char_tokenizer, 0, mode)
    first = loader.dataloader
    _same(_batches(loader), fresh[0])
    pids = _pids(loader)
    for epoch in (1, 2):
        previous = loader
        loader = _loader(d, char_tokenizer, epoch, mode, reuse=previous)
        assert loader.dataloader is first
        _same(_batches(loader), fresh[epoch])
        assert _pids(loader) == pids  # the same processes: nothing was forked for the pass
        with pytest.raises(RuntimeError, match="handed to the next pass"):
            next(iter(previous))
    loader.close()


def test_a_pass_cut_short_or_resumed_hands_over_a_whole_next_pass(make_shards, char_tokenizer):
    d = make_shards([9, 7, 8, 6, 5])
    fresh1 = _batches(_loader(d, char_tokenizer, 1))
    # cut short: the workers still hold the rest of pass 0 when pass 1 begins
    loader = _loader(d, char_tokenizer, 0)
    _batches(loader, stop=1)
    loader = _loader(d, char_tokenizer, 1, reuse=loader)
    _same(_batches(loader), fresh1)
    loader.close()
    # resumed mid-pass: the first pass's plan is not a fresh one, the next pass's is
    _, state = _batches(_loader(d, char_tokenizer, 0), stop=3)  # worker 1 due next
    loader = _loader(d, char_tokenizer, 0, state=state)
    first = loader.dataloader
    _batches(loader)
    loader = _loader(d, char_tokenizer, 1, reuse=loader)
    assert loader.dataloader is first
    _same(_batches(loader), fresh1)
    loader.close()


def test_a_pass_that_differs_in_more_than_its_epoch_gets_new_workers(make_shards, char_tokenizer):
    d = make_shards([9, 7, 8, 6, 5])
    loader = _loader(d, char_tokenizer, 0)
    _batches(loader)
    old, old_workers = loader.dataloader, loader.dataloader._iterator._workers
    loader = _loader(d, char_tokenizer, 1, reuse=loader, shuffle_buffer=4)
    assert loader.dataloader is not old
    for w in old_workers:  # shut down, not left to garbage collection
        w.join(timeout=10)
        assert not w.is_alive()
    _same(_batches(loader), _batches(_loader(d, char_tokenizer, 1, shuffle_buffer=4)))
    # a state (resuming mid-pass) is never a continuation of the previous pass's workers
    _, state = _batches(_loader(d, char_tokenizer, 1), stop=1)
    before = _loader(d, char_tokenizer, 0)
    _batches(before)
    resumed = _loader(d, char_tokenizer, 1, reuse=before, state=state)
    assert resumed.dataloader is not None and before.dataloader is None
    loader.close()
    resumed.close()
