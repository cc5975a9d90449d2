"""Engine features through the real loop on a tiny model: precision, skipping, trackers, MFU,
locks."""

import json

import pytest
import torch
from safetensors.torch import load_file

import clip_train.train as train_module
from clip_train.train import TrainingDiverged, train

QUIET = ("eval.at_end=false", "export.at_end=false")


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_bf16_accumulated_run_with_tensorboard_and_mfu(synth_dir, tmp_path, make_cfg):
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "bf16",
        *QUIET,
        "train.steps=4",
        "train.mixed_precision=bf16",
        "train.accum_steps=2",
        "train.batch_size=8",
        "train.grad_checkpointing=true",
        "optim.grad_clip=1.0",
        "run.trackers=[tensorboard]",
        "train.peak_flops=1e12",
    )
    summary = train(cfg)
    records = _metrics(tmp_path / "bf16")
    assert summary["samples_seen"] == 4 * 16  # contrastive batch = 8 x 2 micro-batches
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert all(0 < r["mfu"] < 1 for r in records)
    assert list((tmp_path / "bf16").rglob("events.out.tfevents.*"))


def test_logged_lr_is_the_lr_of_the_logged_step(synth_dir, tmp_path, make_cfg):
    """Step k (1-based) runs at lr x k / warmup during warmup, as open_clip_train's `cosine_lr`
    sets it and logs it; the record of step k shows that lr, not the next step's."""
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "lr",
        *QUIET,
        "train.steps=3",
        "train.log_every=1",
        "optim.lr=1e-3",
        "optim.warmup_steps=10",
    )
    train(cfg)
    assert [r["lr"] for r in _metrics(tmp_path / "lr")] == pytest.approx([1e-4, 2e-4, 3e-4])


# A skipped first step advances the schedule before any optimizer step: no PyTorch order warning.
@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step:UserWarning")
def test_nonfinite_steps_are_skipped_then_stop(synth_dir, tmp_path, make_cfg, monkeypatch):
    real = train_module.forward_backward
    calls = {"n": 0}
    step_losses = []

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        losses = real(model, *args, **kwargs)
        step_losses.append(losses["loss"].item())
        if calls["n"] in (2, 3):  # two bad steps, then healthy again
            next(model.parameters()).grad.fill_(float("nan"))
        return losses

    monkeypatch.setattr(train_module, "forward_backward", poisoned)
    cfg = make_cfg(synth_dir, tmp_path, "skip", *QUIET, "train.steps=4", "train.max_nonfinite=3")
    summary = train(cfg)
    assert summary["nonfinite_skipped"] == 2
    weights = load_file(str(tmp_path / "skip" / "checkpoints" / "step_4" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = _metrics(tmp_path / "skip")
    assert records[-1]["nonfinite_skipped"] == 2
    # log_every=2: each window holds one finite step (1, then 4); its mean is that step's loss
    assert [r["step"] for r in records] == [2, 4]
    assert [r["loss"] for r in records] == pytest.approx([step_losses[0], step_losses[3]], rel=1e-6)

    calls["n"] = 0
    monkeypatch.setattr(
        train_module,
        "forward_backward",
        lambda model, *a, **k: (
            real(model, *a, **k),
            next(model.parameters()).grad.fill_(float("inf")),
        )[0],
    )
    cfg = make_cfg(
        synth_dir, tmp_path, "diverge", *QUIET, "train.steps=10", "train.max_nonfinite=3"
    )
    with pytest.raises(TrainingDiverged, match="3 steps in a row"):
        train(cfg)


def test_locked_image_tower_does_not_change(synth_dir, tmp_path, make_cfg):
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "lit",
        *QUIET,
        "train.steps=2",
        "model.lock_image=true",
        "train.save_every=1",
        "train.keep_last=5",
    )
    train(cfg)
    first = load_file(str(tmp_path / "lit" / "checkpoints" / "step_1" / "model.safetensors"))
    last = load_file(str(tmp_path / "lit" / "checkpoints" / "step_2" / "model.safetensors"))
    trunk = [k for k in first if k.startswith("visual.trunk.")]
    assert trunk and all(torch.equal(first[k], last[k]) for k in trunk)
    assert not torch.equal(first["visual.head.proj.weight"], last["visual.head.proj.weight"])
    assert not torch.equal(first["text.text_projection"], last["text.text_projection"])


def test_fp16_on_cpu_is_a_config_error(synth_dir, tmp_path, make_cfg):
    from data_tools.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("fp16 is valid with a GPU")
    with pytest.raises(ConfigError, match="fp16"):
        train(make_cfg(synth_dir, tmp_path, "fp16", *QUIET, "train.mixed_precision=fp16"))


def test_more_processes_than_gpus_is_one_line(synth_dir, tmp_path, make_cfg, monkeypatch):
    """Two processes on a node with one GPU stop before training (NCCL would refuse them)."""
    from data_tools.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="2 processes on this node but 1 GPU") as info:
        train(make_cfg(synth_dir, tmp_path, "two", *QUIET, "train.steps=1"))
    assert "\n" not in str(info.value) and not (tmp_path / "two" / "checkpoints").exists()


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_turns_on_cudnns_deterministic_kernels(
    synth_dir, tmp_path, make_cfg, monkeypatch, deterministic
):
    """The GPU check is tests/clip_train/test_objective.py's simclr resume, bit for bit on a GPU
    only with these kernels (an H100 run differed in 57 of 72 tensors without them)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    overrides = (*QUIET, "train.steps=1", f"train.deterministic={str(deterministic).lower()}")
    train(make_cfg(synth_dir, tmp_path, "det", *overrides))
    assert torch.backends.cudnn.deterministic is deterministic
    assert torch.backends.cudnn.benchmark is not deterministic


@pytest.mark.slow
def test_compiled_model_trains_and_saves_plain_names(synth_dir, tmp_path, make_cfg):
    """torch.compile in place: the loop runs and checkpoints keep the uncompiled parameter names."""
    summary = train(
        make_cfg(synth_dir, tmp_path, "compiled", *QUIET, "train.steps=2", "train.compile=true")
    )
    weights = load_file(str(tmp_path / "compiled" / "checkpoints" / "step_2" / "model.safetensors"))
    assert summary["steps"] == 2 and "logit_scale" in weights
    assert not any("_orig_mod" in k for k in weights)


def test_wandb_offline_logs_without_network(synth_dir, tmp_path, make_cfg, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(make_cfg(synth_dir, tmp_path, "wb", *QUIET, "train.steps=2", "run.trackers=[wandb]"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_eval_suite_every_n_steps(synth_dir, tmp_path, make_cfg):
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"tasks:\n  - {{name: shapes, task: zero-shot, data: {synth_dir}/zeroshot}}\n")
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "evals",
        "train.steps=4",
        "eval.every=2",
        f"eval.suite={suite}",
        "data.retrieval=null",
        "export.at_end=false",
    )
    summary = train(cfg)
    evals = [r for r in _metrics(tmp_path / "evals") if "eval/shapes/acc1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["eval/zeroshot/acc1"] <= 1 for r in evals)
    assert summary["eval"]["shapes"]["acc1"] == summary["eval"]["zeroshot"]["acc1"]
    assert (tmp_path / "evals" / "eval" / "step_2" / "shapes.json").is_file()
    assert (tmp_path / "evals" / "eval" / "step_4" / "results.md").is_file()


def test_bad_suite_fails_before_training(synth_dir, tmp_path, make_cfg):
    from data_tools.errors import ConfigError

    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - {name: x, task: zero-shot, data: /x, colour: red}\n")
    with pytest.raises(ConfigError, match="colour"):
        train(make_cfg(synth_dir, tmp_path, "bad", "train.steps=2", f"eval.suite={suite}"))
    assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize(
    "name,flops",
    [
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 Foo", None),
        ("L4", None),
    ],
)
def test_peak_flops_match_device_names_exactly(name, flops):
    from clip_train.throughput import peak_flops_for

    assert peak_flops_for(name) == flops


def test_off_a_terminal_steps_are_log_lines_not_bar_redraws(
    synth_dir, tmp_path, make_cfg, caplog, capsys
):
    import logging

    from clip_train.train import train

    with caplog.at_level(logging.INFO, logger="clip_train"):
        train(
            make_cfg(
                synth_dir,
                tmp_path,
                "logs",
                "train.steps=4",
                "train.log_every=2",
                "eval.at_end=false",
                "export.at_end=false",
                "run.progress=true",
            )
        )
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split()[1] for line in lines] == ["2/4", "4/4"] and "samples/s" in lines[0]
    assert "\r" not in capsys.readouterr().err  # pytest's stderr is no terminal: no tqdm bar


def test_bad_samples_in_the_dropped_tail_count(synth_dir, tmp_path, make_cfg):
    """The last 3 samples (corrupt) fall in the tail that drop_last drops: still counted."""
    import io
    import tarfile

    data = tmp_path / "dirty"
    data.mkdir()
    shards = sorted((synth_dir / "train").glob("*.tar"))
    for shard in shards:
        with tarfile.open(shard) as src, tarfile.open(data / shard.name, "w") as dst:
            members = src.getmembers()
            jpgs = [m.name for m in members if m.name.endswith(".jpg")]
            bad = set(jpgs[-3:]) if shard == shards[-1] else set()
            for member in members:
                payload = src.extractfile(member).read()
                if member.name in bad:
                    payload = b"\xff\xd8 not a JPEG"
                member.size = len(payload)
                dst.addfile(member, io.BytesIO(payload))
    # 197 good samples in shard order: 12 batches of 16, then a dropped tail of 5 good + 3 bad
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "tail",
        *QUIET,
        f"data.train={data}",
        "train.steps=12",
        "data.shuffle_buffer=0",
    )
    train(cfg)
    rank = json.loads((tmp_path / "tail" / "checkpoints" / "step_12" / "rank_0.json").read_text())
    assert (rank["bad_samples"]["seen"], rank["bad_samples"]["bad"]) == (200, 3)


def test_uint8_images_train_exactly_as_float_images(synth_dir, tmp_path, make_cfg):
    """data.uint8_images (the default) sends pixels and normalises each micro-batch in the step:
    the run is the float32 one, loss for loss and weight for weight."""
    runs = {}
    for flag in ("true", "false"):
        name = f"uint8_{flag}"
        cfg = make_cfg(
            synth_dir,
            tmp_path,
            name,
            *QUIET,
            "train.steps=3",
            "train.batch_size=8",
            "train.accum_steps=2",
            f"data.uint8_images={flag}",
        )
        train(cfg)
        weights = load_file(str(tmp_path / name / "checkpoints" / "step_3" / "model.safetensors"))
        runs[flag] = ([r["loss"] for r in _metrics(tmp_path / name)], weights)
    assert runs["true"][0] == runs["false"][0]
    assert runs["true"][1].keys() == runs["false"][1].keys()
    assert all(torch.equal(runs["true"][1][k], runs["false"][1][k]) for k in runs["true"][1])
