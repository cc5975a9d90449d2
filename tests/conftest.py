import os

# Tests run on the CPU with two threads at most: CI has 2 cores and the tests must not
# oversubscribe them when DataLoader workers are used.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

# Overrides that shrink configs/demo.yaml to a model and batch that train in a fraction of a second.
TINY = ["model.embed_dim=32", "model.image.img_size=32", "model.image.patch_size=8", "model.image.width=48",
        "model.image.depth=2", "model.image.heads=2", "model.text.context_length=32", "model.text.width=48",
        "model.text.heads=2", "model.text.layers=2", "train.batch_size=16", "train.log_every=2",
        "data.num_workers=0", "data.shuffle_buffer=50", "optim.warmup_steps=2", "run.progress=false",
        "eval.batch_size=64"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset shared by the tests that train (read-only for them)."""
    from data_tools.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth")
    write_synth(out, SynthConfig(seed=0, train_samples=200, zeroshot_per_class=2, retrieval_samples=40,
                                 image_size=32, samples_per_shard=64))
    return out


def _make_cfg(synth_dir, run_root, name, *extra):
    from clip_train.config import load_config

    return load_config("configs/demo.yaml", [
        f"data.train={synth_dir}/train", f"data.zeroshot={synth_dir}/zeroshot",
        f"data.retrieval={synth_dir}/retrieval", f"run.output_dir={run_root}", f"run.name={name}", *TINY, *extra])


@pytest.fixture
def make_cfg():
    """make_cfg(synth_dir, run_root, name, *overrides) -> a tiny demo Config."""
    return _make_cfg


@pytest.fixture
def tiny_overrides():
    return list(TINY)
