import os
import shutil
import tempfile

# Tests run on the CPU with two threads at most: CI has 2 cores and the tests must not
# oversubscribe them when DataLoader workers are used.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Zero-shot classifier caches go to a throwaway directory, never the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="clip-train-test-cache-")
os.environ["CLIP_TRAIN_CACHE"] = _CACHE

import pytest  # noqa: E402
from smoke_config import TINY  # noqa: E402
from smoke_config import make_cfg as _make_cfg


def pytest_sessionfinish(session, exitstatus):
    """The throwaway cache goes with the run (one per run would pile up in the temp folder)."""
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A small synthetic dataset shared by the tests that train (read-only for them)."""
    from data_tools.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth")
    write_synth(
        out,
        SynthConfig(
            seed=0,
            train_samples=200,
            zeroshot_per_class=2,
            retrieval_samples=40,
            image_size=32,
            samples_per_shard=64,
        ),
    )
    return out


@pytest.fixture
def make_cfg():
    """make_cfg(synth_dir, run_root, name, *overrides) -> a tiny demo Config."""
    return _make_cfg


@pytest.fixture
def tiny_overrides():
    return list(TINY)
