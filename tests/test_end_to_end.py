"""The walking skeleton, end to end: synth -> train -> checkpoint -> eval -> export -> reload."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_resume import assert_same_tensors, kill_after_checkpoint
from safetensors.torch import load_file

import clip_train
from clip_train.config import load_config
from clip_train.train import train


def test_train_eval_export_reload(synth_dir, tmp_path, make_cfg):
    cfg = make_cfg(synth_dir, tmp_path, "e2e", "train.steps=6", "train.save_every=3")
    summary = train(cfg)
    run = tmp_path / "e2e"
    assert summary["steps"] == 6 and summary["samples_seen"] == 96
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    assert all(
        k in lines[0]
        for k in ("samples_seen", "lr", "logit_scale", "samples_per_s", "data_wait_frac")
    )
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_3", "step_6"]
    zs, rt = summary["eval"]["zeroshot"], summary["eval"]["retrieval"]
    assert 0 <= zs["acc1"] <= zs["acc5"] <= 1
    assert (
        rt["num_images"] == 40
        and 0 <= rt["image_retrieval_recall@1"] <= rt["image_retrieval_recall@5"] <= 1
    )
    assert json.loads((run / "eval_results.json").read_text()) == summary["eval"]

    # reload the export and the run dir: identical embeddings to the trained weights
    trained = load_file(str(run / "checkpoints" / "step_6" / "model.safetensors"))
    exported = clip_train.load(run / "export")
    from_run = clip_train.load(run)
    for name, tensor in exported.model.state_dict().items():
        if name in trained:
            assert torch.equal(tensor, trained[name]), name
    tokens = exported.tokenizer(["a photo of a red circle", "two blue squares"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported.encode_text(tokens), from_run.encode_text(tokens))
        assert torch.equal(exported.encode_image(images), from_run.encode_image(images))

    # clip-eval on the saved run reproduces the trainer's zero-shot numbers
    results = tmp_path / "zs.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_eval",
            "zero-shot",
            "--model",
            str(run / "export"),
            "--data",
            str(synth_dir / "zeroshot"),
            "--results-file",
            str(results),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(results.read_text())["acc1"] == pytest.approx(zs["acc1"])
    assert json.loads(proc.stdout)["acc1"] == pytest.approx(
        zs["acc1"], abs=5e-5
    )  # printed to 4 digits


def test_sigkill_then_resume_is_exact(synth_dir, tmp_path, make_cfg, tiny_overrides):
    """SIGKILL a training process mid-run, resume it: same weights as an uninterrupted run, bit for
    bit.

    Two loader workers and a shuffle buffer: the resumed run must continue each worker's stream,
    and the workers' round-robin, where the checkpoint left them (24 steps = 2 epochs + a bit)."""
    common = [
        "train.steps=28",
        "train.save_every=4",
        "train.keep_last=2",
        "eval.at_end=false",
        "export.at_end=false",
        "data.num_workers=2",
    ]
    train(make_cfg(synth_dir, tmp_path, "straight", *common))

    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={tmp_path}",
        "run.name=killed",
        *tiny_overrides,
        *common,
    ]
    ckpts = kill_after_checkpoint(args, tmp_path / "killed", step=8)
    assert not (ckpts / "step_28").exists()

    summary = train(load_config(tmp_path / "killed" / "config.yaml"), resume=True)
    assert summary["steps"] == 28
    assert_same_tensors(tmp_path / "straight" / "checkpoints" / "step_28", ckpts / "step_28")
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)), (
        "metrics.jsonl must not repeat the steps redone after resume"
    )


@pytest.mark.parametrize(
    "spec, words", [("/nonexistent/shards", ["/nonexistent/shards"]), ("EMPTY", ["EMPTY"])]
)
def test_bad_train_path_is_one_line(spec, words, tmp_path):
    if spec == "EMPTY":
        (tmp_path / "empty").mkdir()
        spec = words[0] = str(tmp_path / "empty")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_train",
            "train",
            "--config",
            "configs/demo.yaml",
            f"data.train={spec}",
            f"run.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert all(w in err for w in words)


def test_a_users_eval_py_does_not_break_training(synth_dir, tmp_path, tiny_overrides):
    """`python -m clip_train` puts the working directory first on sys.path; a user's eval.py there
    must not shadow our evaluation package (it is imported as clip_eval)."""
    (tmp_path / "eval.py").write_text("raise SystemExit('the user eval.py was imported')\n")
    root = Path(__file__).resolve().parents[1]
    args = [
        f"data.train={synth_dir}/train",
        f"data.zeroshot={synth_dir}/zeroshot",
        f"data.retrieval={synth_dir}/retrieval",
        f"run.output_dir={tmp_path}/runs",
        "run.name=cwd",
        *tiny_overrides,
        "train.steps=2",
        "export.at_end=false",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "clip_train",
            "-q",
            "train",
            "--config",
            str(root / "configs/demo.yaml"),
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "zero-shot:" in proc.stdout
