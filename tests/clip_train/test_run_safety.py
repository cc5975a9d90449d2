"""Nothing of the user's is lost: reruns refuse to restart a run, exports refuse foreign
directories, and what we publish is readable by others (0644 under umask 022)."""

import os
import stat

import pytest

from clip_train.cli import main as cli_main
from clip_train.export import export_model, load_model
from clip_train.train import train
from data_tools.errors import ClipTrainError, ConfigError


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _args(synth_dir, root, *extra):
    from smoke_config import TINY

    return [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.train={synth_dir}/train",
        "data.zeroshot=null",
        "data.retrieval=null",
        f"run.output_dir={root}",
        "run.name=r",
        *TINY,
        "eval.at_end=false",
        *extra,
    ]


def test_rerun_refuses_then_overwrite_removes_only_our_outputs(synth_dir, tmp_path, capsys):
    run = tmp_path / "r"
    assert cli_main(_args(synth_dir, tmp_path, "train.steps=4", "train.save_every=2")) == 0
    (run / "notes.txt").write_text("mine")
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()

    # a rerun with fewer steps must not touch the run
    assert cli_main(_args(synth_dir, tmp_path, "train.steps=2")) == 2
    err = capsys.readouterr().err
    assert (
        "already holds a run" in err
        and "--overwrite" in err
        and "resume" in err
        and len(err.splitlines()) == 1
    )
    assert (run / "metrics.jsonl").read_text() == metrics
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"

    assert cli_main(_args(synth_dir, tmp_path, "train.steps=2", "--resume", "--overwrite")) == 2
    assert cli_main(_args(synth_dir, tmp_path, "train.steps=2", "--overwrite")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_2"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # log_every=2: step 2 only
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "export" / "config.json").is_file()  # re-exported


def test_resume_flag_continues_an_existing_run(synth_dir, tmp_path, make_cfg):
    train(
        make_cfg(
            synth_dir, tmp_path, "r", "train.steps=2", "eval.at_end=false", "export.at_end=false"
        )
    )
    cfg = make_cfg(
        synth_dir, tmp_path, "r", "train.steps=4", "eval.at_end=false", "export.at_end=false"
    )
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    assert train(cfg, resume=True)["steps"] == 4


def test_export_refuses_a_foreign_directory_and_replaces_its_own(synth_dir, tmp_path, make_cfg):
    train(
        make_cfg(
            synth_dir, tmp_path, "r", "train.steps=2", "eval.at_end=false", "export.at_end=false"
        )
    )
    model = load_model(tmp_path / "r")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ClipTrainError, match="not a clip-train export"):
        export_model(model, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert not any(
        p.name.startswith(".") for p in tmp_path.iterdir()
    )  # nothing half-written beside it

    out = export_model(model, tmp_path / "exp")
    export_model(model, out)  # an export of ours is replaced
    (tmp_path / "empty").mkdir()
    export_model(model, tmp_path / "empty")


def test_published_files_are_readable_by_others(synth_dir, tmp_path, make_cfg):
    old = os.umask(0o022)
    try:
        train(make_cfg(synth_dir, tmp_path, "r", "train.steps=2", "eval.at_end=false"))
    finally:
        os.umask(old)
    run = tmp_path / "r"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files) and any(
        "checkpoints" in p.parts for p in files
    )
    assert {str(p.relative_to(run)): oct(_mode(p)) for p in files if _mode(p) != 0o644} == {}


@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.lr=-1", ["optim.lr", "> 0"]),
        ("model.image.timm_name=vit_nonexistent", ["vit_nonexistent", "not a timm model"]),
        ("model.image.timm_name=resnet50", ["resnet50", "VisionTransformer"]),
        ("optim.lrr=1e-3", ["optim.lrr", "did you mean 'optim.lr'"]),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(synth_dir, tmp_path, capsys, override, words):
    assert cli_main(_args(synth_dir, tmp_path, "train.steps=2", override)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "r").exists()


def test_resume_that_changes_the_architecture_is_refused(synth_dir, tmp_path, capsys):
    assert cli_main(_args(synth_dir, tmp_path, "train.steps=2", "export.at_end=false")) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    capsys.readouterr()
    assert cli_main(["resume", str(tmp_path / "r"), "train.steps=4", "model.embed_dim=64"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.embed_dim (32 in the checkpoint, 64 now)" in err, (
        err
    )
    assert (tmp_path / "r" / "config.yaml").read_text() == saved  # nothing rewritten
    assert (
        cli_main(["resume", str(tmp_path / "r"), "train.steps=4", "model.lock_text=true"]) == 2
    )  # optimizer groups
    assert (
        cli_main(["resume", str(tmp_path / "r"), "train.steps=4", "model.text.trim_padding=false"])
        == 0
    )


@pytest.mark.parametrize(
    "args,words", [(["--text", "  "], "--text is empty"), (["--text", "a", "-k", "0"], "-k 0")]
)
def test_search_rejects_empty_query_and_k_below_one(tmp_path, capsys, args, words):
    assert cli_main(["search", str(tmp_path), *args]) == 2
    assert words in capsys.readouterr().err
