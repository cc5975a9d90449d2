"""Run this checkout's code in real processes (torchrun, gloo on the CPU) from the tests."""

from __future__ import annotations

import subprocess
import sys

from checkout_env import REPO, checkout_env  # noqa: F401  (tests/, on sys.path)


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node NPROC ARGS...` from the repository root; the test
    fails with the end of its stderr unless every process exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + ["--nproc_per_node", str(nproc), *args],
        capture_output=True,
        text=True,
        env=checkout_env(),
        cwd=REPO,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
