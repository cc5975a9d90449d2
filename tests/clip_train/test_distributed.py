"""Two CPU processes (torchrun, gloo) give the loss and gradients of one process on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CFG, batch  # noqa: E402


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "grads.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(Path(__file__).parent / "dist_worker.py"), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(out, weights_only=True)

    torch.manual_seed(0)
    model = build_model(CFG)
    images, tokens = batch()
    losses = forward_backward(model, build_loss("clip"), images, tokens)
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert len(results) == 3
    for result in results:
        assert result["world"] == 2
        torch.testing.assert_close(result["loss"], losses["loss"], rtol=1e-5, atol=1e-5, msg=str(result["variant"]))
        for name, grad in reference.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{result['variant']} {name}: {m}")
