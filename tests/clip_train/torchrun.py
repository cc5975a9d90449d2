"""Run this checkout's code in real processes (torchrun, gloo on the CPU) from the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def checkout_env() -> dict:
    """Subprocess environment that imports this checkout's packages, not an installed copy.

    A script's own folder comes first on its sys.path, so without this the worker would import
    whatever clip_train the venv has installed (another checkout, under an editable install).
    """
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in path if p))


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
