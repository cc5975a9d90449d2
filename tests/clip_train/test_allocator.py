"""clip_train.allocator: the clip-train command keeps freed memory (glibc), nothing else does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clip_train.allocator import user_tuned_malloc

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")

# Buffers of 20 MiB allocated with glibc's malloc, written and freed, five times: page faults per
# round after the first say whether freed memory went back to the kernel. (glibc's defaults serve
# such a buffer from mmap every time; torch's own allocations follow the same thresholds.)
ROUNDS = """
import ctypes, json, resource, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "tune":
    from clip_train.allocator import tune_malloc
    assert tune_malloc()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(20 << 20) for _ in range(3)]
    for b in buffers:
        ctypes.memset(b, 1, 20 << 20)
    for b in buffers:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _faults(mode: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@glibc
def test_tuned_process_reuses_freed_memory_untuned_faults_it_in_again():
    pages = 3 * (20 << 20) // 4096
    tuned, untuned = _faults("tune"), _faults("plain")
    assert tuned[0] >= pages // 2 and untuned[0] >= pages // 2  # fresh memory either way
    assert sum(tuned[1:]) < pages // 10  # later rounds reuse it
    assert min(untuned[1:]) > pages // 2  # glibc's defaults return it and fault it in again


def test_environment_settings_win():
    assert not user_tuned_malloc({"PATH": "/bin"})
    assert user_tuned_malloc({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert user_tuned_malloc({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not user_tuned_malloc({"MALLOC_CHECK": "1"})  # not a malloc parameter (no trailing _)


@glibc
def test_tune_malloc_leaves_a_user_setting_alone():
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="0")
    script = "from clip_train.allocator import tune_malloc; print(tune_malloc())"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("tune", [True, False])
def test_train_command_tunes_malloc_unless_told_not(monkeypatch, tmp_path, tune):
    import clip_train.allocator
    import clip_train.train
    from clip_train.cli import _run
    from clip_train.config import load_config

    calls = []
    monkeypatch.setattr(clip_train.allocator, "tune_malloc", lambda: calls.append("tuned"))
    monkeypatch.setattr(clip_train.train, "train", lambda cfg, **_: calls.append("train") or {})
    cfg = load_config(None, [f"data.train={tmp_path}", f"train.tune_malloc={str(tune).lower()}"])
    assert _run(cfg, resume=False, as_json=True) == 0
    assert calls == (["tuned", "train"] if tune else ["train"])
