"""The contrastive batch on a resume with another number of processes (clip_train/elastic.py);
the resume itself runs under torchrun in test_distributed_elastic.py."""

import pytest

from clip_train.elastic import keep_contrastive_batch, merged_budget, split_batch
from data_tools.errors import ConfigError


@pytest.mark.parametrize(
    "per_process, micro, want",
    [
        (8, 16, (8, 1)),  # 1 -> 2 processes, 16 x 1: the micro-batch halves
        (32, 16, (16, 2)),  # 2 -> 1: accumulation doubles, the micro-batch stays
        (24, 16, (12, 2)),  # 16 does not divide 24 rows: the largest that does, 12, twice
        (64, 48, (32, 2)),  # 48 x 1 on 4 -> 3: never above 48
        (7, 4, (1, 7)),
        (6, 6, (6, 1)),
    ],
)
def test_split_batch_keeps_rows_and_never_grows_the_micro_batch(per_process, micro, want):
    assert split_batch(per_process, micro) == want
    b, a = want
    assert b * a == per_process and b <= micro


def test_contrastive_batch_kept_changed_or_refused(make_cfg, tmp_path):
    cfg = make_cfg(tmp_path, tmp_path, "r", "train.batch_size=16", "train.accum_steps=3")
    kept, line = keep_contrastive_batch(cfg, (16, 3), saved_world=2, world=4)
    assert (kept.train.batch_size, kept.train.accum_steps) == (12, 2)  # 96 = 12 x 2 x 4
    assert (cfg.train.batch_size, cfg.train.accum_steps) == (16, 3)  # the caller's is untouched
    assert (
        "contrastive batch 96 kept as train.batch_size 16 -> 12 x train.accum_steps 3 -> 2" in line
    )
    given, line = keep_contrastive_batch(cfg, (8, 1), saved_world=2, world=4)
    assert given is cfg and "contrastive batch 16 -> 192" in line and "as given" in line
    with pytest.raises(ConfigError, match="train.batch_size and train.accum_steps") as err:
        keep_contrastive_batch(cfg, (16, 3), saved_world=1, world=5)
    assert "48" in str(err.value) and "\n" not in str(err.value)


def test_bad_sample_counts_go_to_rank_0_summed():
    states = [
        {"bad_samples": {"seen": 100, "bad": 2, "by_reason": {"decode": 2}, "first_keys": ["a"]}},
        {"bad_samples": {"seen": 90, "bad": 1, "by_reason": {"decode": 1, "no_caption": 0}}},
    ]
    assert merged_budget(states, 0) == {
        "seen": 190,
        "bad": 3,
        "by_reason": {"decode": 3, "no_caption": 0},
        "first_keys": ["a"],
    }
    assert merged_budget(states, 1) is None
