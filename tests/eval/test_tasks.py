"""Tasks and the CLI end to end on a tiny synthetic set with a tiny open_clip model."""

import json
import tarfile

import pytest
import torch

from clip_eval.cli import main
from clip_eval.tasks import retrieval_task, zero_shot_task
from data_tools.errors import ConfigError, DataError
from data_tools.fmt import round_floats
from data_tools.synth import SynthConfig, class_names, write_synth

NUM_ZS_PER_CLASS, NUM_RETRIEVAL = 2, 20


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cfg = SynthConfig(
        seed=0,
        train_samples=1,
        zeroshot_per_class=NUM_ZS_PER_CLASS,
        retrieval_samples=NUM_RETRIEVAL,
        image_size=32,
        samples_per_shard=16,
    )
    write_synth(out, cfg)
    return out


def _count_captions(shard_dir) -> int:
    total = 0
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for member in tf:
                if member.name.endswith(".json"):
                    total += len(json.load(tf.extractfile(member))["captions"])
    return total


def _check_unit_interval(metrics, prefixes):
    values = {k: v for k, v in metrics.items() if k.startswith(prefixes)}
    assert values
    assert all(0.0 <= v <= 1.0 for v in values.values()), values


def test_zero_shot_task_defaults_from_data_dir(tiny_encoder, synth_dir):
    m = zero_shot_task(tiny_encoder, synth_dir / "zeroshot", batch_size=16)
    num_classes = len(class_names())
    assert m["num_samples"] == NUM_ZS_PER_CLASS * num_classes
    assert m["num_classes"] == num_classes
    _check_unit_interval(m, ("acc", "mean_per_class"))
    assert m["acc1"] <= m["acc5"]


def test_zero_shot_task_explicit_lists_and_files_agree(tiny_encoder, synth_dir, tmp_path):
    data = str(synth_dir / "zeroshot" / "zeroshot-{000000..000004}.tar")
    names = class_names()
    templates = ["a photo of a {}.", "a {} shape"]
    from_lists = zero_shot_task(tiny_encoder, data, classnames=names, templates=templates)
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    (tmp_path / "templates.txt").write_text("\n".join(templates))
    from_files = zero_shot_task(
        tiny_encoder,
        data,
        classnames=tmp_path / "names.txt",
        templates=str(tmp_path / "templates.txt"),
    )
    assert from_lists == from_files


def test_zero_shot_task_errors(tiny_encoder, synth_dir, tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        zero_shot_task(tiny_encoder, synth_dir / "zeroshot", classnames=tmp_path / "nope.txt")
    # retrieval shards have no classnames.txt next to them
    with pytest.raises(DataError, match="classnames.txt"):
        zero_shot_task(tiny_encoder, synth_dir / "retrieval")
    with pytest.raises(DataError, match="only 3 class names"):
        zero_shot_task(tiny_encoder, synth_dir / "zeroshot", classnames=["a", "b", "c"])
    with pytest.raises(ConfigError, match="a photo"):
        zero_shot_task(tiny_encoder, synth_dir / "zeroshot", templates=["a photo"])
    # no sample carries a .cls label: every one is skipped and nothing is left
    with pytest.raises(DataError, match="no samples"):
        zero_shot_task(tiny_encoder, synth_dir / "retrieval", classnames=["a"], templates=["{}"])


def test_empty_shard_is_an_error(tiny_encoder, tmp_path):
    with tarfile.open(tmp_path / "empty-000000.tar", "w"):
        pass
    with pytest.raises(DataError, match="no samples"):
        retrieval_task(tiny_encoder, tmp_path)


def test_retrieval_task_counts(tiny_encoder, synth_dir):
    m = retrieval_task(tiny_encoder, synth_dir / "retrieval", batch_size=8)
    assert m["num_images"] == NUM_RETRIEVAL
    assert m["num_texts"] == _count_captions(synth_dir / "retrieval")
    assert m["num_texts"] > m["num_images"]
    _check_unit_interval(m, ("image_retrieval", "text_retrieval"))
    assert sorted(k for k in m if "@" in k) == sorted(
        f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)
    )


def test_tasks_restore_training_mode(tiny_encoder, synth_dir):
    tiny_encoder.train()
    retrieval_task(tiny_encoder, synth_dir / "retrieval")
    assert tiny_encoder.training and all(m.training for m in tiny_encoder.modules())


# ---------------------------------------------------------------- CLI


@pytest.fixture
def tiny_weights(tiny_encoder, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    return path


def test_cli_zero_shot_with_open_clip_weights(
    tiny_model_name, tiny_encoder, tiny_weights, synth_dir, tmp_path, capsys
):
    out = tmp_path / "res" / "zs.json"
    data = synth_dir / "zeroshot"
    rc = main(
        [
            "zero-shot",
            "--model",
            tiny_model_name,
            "--pretrained",
            str(tiny_weights),
            "--data",
            str(data),
            "--batch-size",
            "32",
            "--results-file",
            str(out),
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)  # rounded for people; the file is exact
    # the CLI reloaded the saved weights: same numbers as the in-memory encoder
    assert json.loads(out.read_text()) == zero_shot_task(tiny_encoder, data, batch_size=32)
    assert printed == round_floats(json.loads(out.read_text()))
    assert not list(out.parent.glob(".*.tmp"))


def test_cli_retrieval(tiny_model_name, tiny_weights, synth_dir, capsys):
    rc = main(
        [
            "retrieval",
            "--model",
            tiny_model_name,
            "--pretrained",
            str(tiny_weights),
            "--data",
            str(synth_dir / "retrieval"),
        ]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_images"] == NUM_RETRIEVAL


@pytest.mark.parametrize(
    "case",
    ["missing_data", "missing_weights", "unknown_model", "bad_weights", "bad_template", "hf_hub"],
)
def test_cli_user_errors_exit_2_with_one_line(
    case, tiny_model_name, tiny_weights, synth_dir, tmp_path, capsys
):
    data = str(synth_dir / "zeroshot")
    args = [
        "zero-shot",
        "--model",
        tiny_model_name,
        "--pretrained",
        str(tiny_weights),
        "--data",
        data,
    ]
    if case == "missing_data":
        args[-1] = str(tmp_path / "no_such_dir")
    elif case == "missing_weights":
        args[4] = str(tmp_path / "missing.pt")
    elif case == "unknown_model":
        args = ["zero-shot", "--model", "not-a-model", "--data", data]
    elif case == "bad_weights":
        torch.save({"visual.nothing": torch.zeros(1)}, tmp_path / "bad.pt")
        args[4] = str(tmp_path / "bad.pt")
    elif case == "bad_template":
        (tmp_path / "t.txt").write_text("no placeholder here\n")
        args += ["--templates", str(tmp_path / "t.txt")]
    elif case == "hf_hub":
        args[2] = "hf-hub:someone/model"
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err


def test_cli_help_has_examples(capsys):
    for argv in (["--help"], ["zero-shot", "--help"], ["retrieval", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "clip-eval" in capsys.readouterr().out.split("examples:")[1]


def test_worker_count_does_not_change_results(tiny_encoder, synth_dir):
    one = zero_shot_task(tiny_encoder, synth_dir / "zeroshot", batch_size=16, num_workers=0)
    two = zero_shot_task(tiny_encoder, synth_dir / "zeroshot", batch_size=16, num_workers=2)
    assert one == pytest.approx(two)
