"""Bad samples: skipped, counted per reason with their keys, bounded by a budget."""

from collections import Counter

import pytest

from data_tools.errors import DataError
from data_tools.loader import SKIP_REASONS, BadSampleBudget, make_loader
from data_tools.transforms import ImageTransform

T = ImageTransform(16)


def test_bad_samples_are_skipped_counted_and_named(bad_shards, char_tokenizer):
    batches = list(
        make_loader(
            bad_shards,
            batch_size=4,
            image_transform=T,
            tokenizer=char_tokenizer,
            max_pixels=200 * 200,
        )
    )
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"g{i}" for i in range(8)] + ["g100", "g101", "t0", "t1"]
    skipped = Counter()
    for b in batches:
        assert set(b["_skipped"]) == set(SKIP_REASONS)
        skipped.update(b["_skipped"])
    assert +skipped == {
        "decode": 2,
        "missing_caption": 1,
        "empty_caption": 1,
        "bad_utf8": 1,
        "missing_image": 1,
        "too_large": 1,
        "unsafe_member": 3,
        "truncated_tar": 1,
    }
    assert sum(b["_seen"] for b in batches) == len(keys) + sum(skipped.values())
    named = " ".join(k for b in batches for k in b["_bad_keys"])
    for key in (
        "corrupt (decode)",
        "truncjpg (decode)",
        "notxt (missing_caption)",
        "emptytxt (empty_caption)",
        "latin1 (bad_utf8)",
        "bomb (too_large)",
        "../escape (unsafe_member)",
        "t2 (truncated_tar)",
    ):
        assert key in named


def test_budget_stops_with_one_line(bad_shards, char_tokenizer):
    budget = BadSampleBudget(0.2, min_samples=5, shards=str(bad_shards))
    with pytest.raises(DataError) as e:
        for b in make_loader(
            bad_shards,
            batch_size=4,
            image_transform=T,
            tokenizer=char_tokenizer,
            max_pixels=200 * 200,
        ):
            budget.update(b)
    msg = str(e.value)
    assert "samples bad" in msg and "> data.max_bad_fraction=0.2" in msg
    assert "first bad keys: corrupt (decode)" in msg
    assert f"run `clip-data validate {bad_shards}`" in msg and "\n" not in msg
    # a generous bound lets the pass finish; the budget's counts survive a checkpoint
    ok = BadSampleBudget(0.9, min_samples=5)
    for b in make_loader(bad_shards, batch_size=4, image_transform=T, tokenizer=char_tokenizer):
        ok.update(b)
    again = BadSampleBudget(0.9)
    again.load_state_dict(ok.state_dict())
    assert (again.seen, again.bad) == (ok.seen, ok.bad) and 0.4 < ok.fraction < 0.6


def test_budget_needs_a_sane_bound():
    with pytest.raises(DataError, match="must be in"):
        BadSampleBudget(1.5)


@pytest.mark.parametrize("num_workers,max_batches", [(0, None), (0, 3), (2, 2)])
def test_dropped_tail_counts_toward_the_budget(
    tmp_path, jpeg, char_tokenizer, num_workers, max_batches
):
    """drop_last drops each worker's partial tail; its bad samples still count, also when the
    pass ends at max_batches (as the trainer's does), and a resume after the last batch does
    not count them twice."""
    from data_tools.shards import ShardWriter

    for shard in ("a", "b"):  # 10 samples each, the last 3 corrupt
        with ShardWriter(tmp_path / "tail", shard, samples_per_shard=100) as w:
            for i in range(10):
                w.write(
                    {
                        "__key__": f"{shard}{i}",
                        "txt": f"caption {i}",
                        "jpg": b"\xff\xd8 not a jpeg" if i >= 7 else jpeg(i),
                    }
                )

    def loader(**kw):
        return make_loader(
            tmp_path / "tail",
            batch_size=4,
            image_transform=T,
            tokenizer=char_tokenizer,
            drop_last=True,
            num_workers=num_workers,
            max_batches=max_batches,
            **kw,
        )

    budget = BadSampleBudget(0.9)
    first = loader(budget=budget)
    keys = [k for b in first for k in b["key"]]
    # one worker: 14 good samples, 3 batches and a tail of 2 good + 3 bad; two workers
    # (a shard each): 7 good, 1 batch and a tail of 3 good + 3 bad each
    assert len(keys) == (12 if num_workers == 0 else 8)
    assert (budget.seen, budget.bad) == (20, 6)
    again = BadSampleBudget(0.9)
    assert list(loader(budget=again, state=first.state_dict())) == []
    assert (again.seen, again.bad) == (0, 0)
