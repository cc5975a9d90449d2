"""Two CPU processes (torchrun, gloo) give the loss and gradients of one process on the whole
batch."""

import sys
from pathlib import Path

import torch

from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CFG, batch  # noqa: E402
from torchrun import REPO, torchrun  # noqa: E402


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "grads.pt"
    torchrun(str(Path(__file__).parent / "dist_worker.py"), str(out))
    results = torch.load(out, weights_only=True)
    assert all(Path(r["clip_train"]).resolve().is_relative_to(REPO) for r in results), (
        f"the worker imported {results[0]['clip_train']}, not the checkout {REPO}"
    )

    torch.manual_seed(0)
    model = build_model(CFG)
    images, tokens = batch()
    losses = forward_backward(model, build_loss("clip"), images, tokens)
    reference = {n: p.grad for n, p in model.named_parameters()}
    assert len(results) == 3
    for result in results:
        assert result["world"] == 2
        torch.testing.assert_close(
            result["loss"], losses["loss"], rtol=1e-5, atol=1e-5, msg=str(result["variant"])
        )
        for name, grad in reference.items():
            torch.testing.assert_close(
                result["grads"][name],
                grad,
                rtol=1e-5,
                atol=1e-5,
                msg=lambda m: f"{result['variant']} {name}: {m}",
            )


def test_two_process_training_run_completes_epochs(synth_dir, tmp_path, tiny_overrides):
    """The real loop under torchrun: ranks stop each epoch together (no DDP hang), checkpoints
    once."""
    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={tmp_path}",
        "run.name=ddp",
        *tiny_overrides,
        "train.steps=9",
        "train.save_every=4",
        "eval.at_end=false",
        "export.at_end=false",
        "data.num_workers=1",
    ]
    torchrun("-m", "clip_train", "-q", "train", "--config", "configs/demo.yaml", *args)
    import json

    records = [
        json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == 9 and records[-1]["samples_seen"] == 9 * 16 * 2
    assert (
        records[-1]["epoch"] >= 1
    )  # 200 samples / (16 x 2) per step: the run crossed an epoch boundary
    ckpt = tmp_path / "ddp" / "checkpoints" / "step_9"
    assert (ckpt / "rank_0.json").is_file() and (ckpt / "rank_1.json").is_file()


def test_logged_loss_is_the_whole_batch_loss_with_local_loss(synth_dir, tmp_path, tiny_overrides):
    """loss.local_loss=true gives each process only its own rows of the loss; the logged loss is
    still the whole batch's: the same as the full loss that every process computes otherwise."""
    import json

    logged = {}
    for local in ("false", "true"):
        name = f"local_{local}"
        args = [
            f"data.train={synth_dir}/train",
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            *tiny_overrides,
            "train.steps=2",
            "train.log_every=1",
            f"loss.local_loss={local}",
            "eval.at_end=false",
            "export.at_end=false",
        ]
        torchrun("-m", "clip_train", "-q", "train", "--config", "configs/demo.yaml", *args)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logged[local] = [json.loads(line)["loss"] for line in lines]
    assert len(logged["true"]) == 2
    torch.testing.assert_close(logged["true"], logged["false"], rtol=1e-5, atol=1e-6)
