"""The environment of the training processes the tests start (torchrun's, and the single runs
compared with them): this checkout's code, one thread each, and the CPU (gloo), also on a
machine with a GPU.

A script's own folder comes first on its sys.path, so without PYTHONPATH a worker would import
whatever clip_train the venv has installed (another checkout, under an editable install). The
multi-process tests check gloo's arithmetic; on a GPU machine their processes would otherwise
share its one GPU, which NCCL refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout_env() -> dict:
    path = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(p for p in path if p),
        CUDA_VISIBLE_DEVICES="",
    )
