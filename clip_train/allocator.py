"""glibc malloc settings for a training process: keep freed memory instead of returning it.

A CPU training step allocates and frees the same activation and gradient buffers (MiBs each)
every step. glibc serves such sizes from mmap at first and later from the heap, but trims the
heap's free top back to the kernel, so the next step page-faults the same memory in again and
zeroes it: ~37,000 minor faults per `bench_tiny` step at batch 128. With the mmap threshold
fixed at its maximum and the trim threshold at 1 GiB, freed buffers are reused from the heap
(~6,000 faults a step) and the end-to-end samples/s on a 2-core CPU rose 15%
(docs/benchmarks.md, "End to end"). Numerics are unchanged; only where memory comes from.

It is a process-wide setting, so library code never calls this: the `clip-train` command does,
unless `train.tune_malloc=false` or the user already tuned malloc through the environment
(`MALLOC_*_`, `GLIBC_TUNABLES`). Written here because no library exposes `mallopt`; other C
libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)  # glibc's cap: 32 MiB on 64-bit
TRIM_THRESHOLD = 1 << 30


def user_tuned_malloc(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment already sets glibc malloc parameters (those win)."""
    env = os.environ if environ is None else environ
    return "GLIBC_TUNABLES" in env or any(k.startswith("MALLOC_") and k.endswith("_") for k in env)


def tune_malloc(
    mmap_threshold: int = MMAP_THRESHOLD_MAX, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Fix glibc's mmap threshold and raise its trim threshold for this process; True if set.

    Does nothing (False) off Linux/glibc or when the environment tunes malloc already.
    """
    if not sys.platform.startswith("linux") or user_tuned_malloc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    done = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and done
    if done:
        log.info(
            "malloc: mmap threshold %d MiB, trim threshold %d MiB (train.tune_malloc)",
            mmap_threshold >> 20,
            trim_threshold >> 20,
        )
    return done
