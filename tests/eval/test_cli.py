"""`clip-eval` subcommands end to end: folders, caches, probes, and one-line errors."""

import json

import pytest
import torch

from clip_eval.cli import main
from data_tools.fmt import round_floats

SUBCOMMANDS = ["zero-shot", "retrieval", "probe", "few-shot", "suite"]


@pytest.fixture
def weights(tiny_encoder, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), path)
    return path


@pytest.fixture
def tree(tmp_path, write_images):
    for i, name in enumerate(["cat", "dog", "car", "bus", "sun", "sea"]):
        write_images(tmp_path / "tree" / name, 3, seed=i)
    return tmp_path / "tree"


def _model(tiny_model_name, weights):
    return ["--model", tiny_model_name, "--pretrained", str(weights)]


def test_help_of_every_subcommand_has_an_example(capsys):
    for argv in [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert "clip-eval" in capsys.readouterr().out.split("examples:")[1]


def test_zero_shot_folder_and_cache(tiny_model_name, weights, tree, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {}\n")
    argv = [
        "zero-shot",
        *_model(tiny_model_name, weights),
        "--data",
        str(tree),
        "--templates",
        str(tmp_path / "t.txt"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "4",
    ]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["num_samples"] == 18 and first["num_classes"] == 6
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1  # reused, not rebuilt
    (tmp_path / "t.txt").write_text("a photo of a {}.\n")
    assert main(argv) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # other templates: a miss
    assert main(argv[:-4] + ["--no-cache"]) == 0


def test_zero_shot_per_class(tiny_model_name, weights, tree, tmp_path, capsys):
    argv = ["zero-shot", *_model(tiny_model_name, weights), "--data", str(tree), "--no-cache"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "per_class" not in plain
    assert main([*argv, "--per-class", "--results-file", str(tmp_path / "r.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    full = json.loads((tmp_path / "r.json").read_text())  # full precision; stdout is rounded
    rows = full.pop("per_class")
    assert {k: v for k, v in out.items() if k != "per_class"} == plain == round_floats(full)
    assert [r["class"] for r in rows] == [r["class"] for r in out["per_class"]]
    assert len(rows) == plain["num_classes"] == 6
    assert sum(r["samples"] for r in rows) == sum(r["predicted"] for r in rows) == 18
    hits = sum(r["recall"] * r["samples"] for r in rows if r["samples"])
    assert hits / 18 == pytest.approx(full["acc1"], abs=1e-12)
    present = [r["recall"] for r in rows if r["samples"]]
    assert sum(present) / len(present) == pytest.approx(full["mean_per_class_recall"], abs=1e-12)


def test_zero_shot_default_cache_dir_from_env(
    tiny_model_name, weights, tree, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("CLIP_TRAIN_CACHE", str(tmp_path / "env_cache"))
    assert main(["zero-shot", *_model(tiny_model_name, weights), "--data", str(tree)]) == 0
    assert list((tmp_path / "env_cache" / "classifiers").glob("*.safetensors"))


def test_probe_and_few_shot(tiny_model_name, weights, tree, tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert (
        main(
            [
                "probe",
                *_model(tiny_model_name, weights),
                "--train",
                str(tree),
                "--test",
                str(tree),
                "--weight-decays",
                "1e-3,1e-1",
                "--max-iter",
                "20",
                "--results-file",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert round_floats(json.loads(out.read_text())) == printed
    assert printed["weight_decay"] in (1e-3, 1e-1)
    assert (
        main(
            [
                "few-shot",
                *_model(tiny_model_name, weights),
                "--data",
                str(tree),
                "--n-way",
                "3",
                "--k-shot",
                "1",
                "--n-query",
                "2",
                "--episodes",
                "7",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["episodes"] == 7 and 0 <= printed["fewshot_acc"] <= 1


def test_retrieval_from_csv(tiny_model_name, weights, tmp_path, write_images, capsys):
    paths = write_images(tmp_path / "imgs", 5)
    rows = ["image,caption"] + [
        f"imgs/{p.name},caption {i} {j}" for i, p in enumerate(paths) for j in range(5)
    ]
    (tmp_path / "c.csv").write_text("\n".join(rows))
    assert (
        main(["retrieval", *_model(tiny_model_name, weights), "--data", str(tmp_path / "c.csv")])
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_images"] == 5 and printed["num_texts"] == 25


@pytest.mark.parametrize(
    "case, expected",
    [
        ("folder_not_in_classnames", "'sea'"),
        ("empty_dataset", "no images"),
        ("template_without_braces", "'a photo'"),
        ("caption_table_mismatch", "line 2: image 'imgs/none.png' not found"),
        ("missing_table", "no such caption table"),
        ("bad_suite_key", "tasks[0] (a).dataa: unknown key"),
        ("bad_weight_decays", "--weight-decays"),
        ("few_shot_too_few_classes", "only 6 have"),
    ],
)
def test_user_errors_are_one_line(case, expected, tiny_model_name, weights, tree, tmp_path, capsys):
    model = _model(tiny_model_name, weights)
    if case == "folder_not_in_classnames":
        (tmp_path / "names.txt").write_text("cat\ndog\ncar\nbus\nsun\n")
        argv = [
            "zero-shot",
            *model,
            "--data",
            str(tree),
            "--classnames",
            str(tmp_path / "names.txt"),
        ]
    elif case == "empty_dataset":
        (tmp_path / "empty" / "cat").mkdir(parents=True)
        argv = ["zero-shot", *model, "--data", str(tmp_path / "empty")]
    elif case == "template_without_braces":
        (tmp_path / "t.txt").write_text("a photo\n")
        argv = ["zero-shot", *model, "--data", str(tree), "--templates", str(tmp_path / "t.txt")]
    elif case == "caption_table_mismatch":
        (tmp_path / "c.csv").write_text("image,caption\nimgs/none.png,a cat\n")
        argv = ["retrieval", *model, "--data", str(tmp_path / "c.csv")]
    elif case == "missing_table":
        argv = ["retrieval", *model, "--data", str(tmp_path / "nope.jsonl")]
    elif case == "bad_suite_key":
        (tmp_path / "s.yaml").write_text("tasks:\n  - {name: a, task: retrieval, dataa: x}\n")
        argv = ["suite", *model, "--suite", str(tmp_path / "s.yaml")]
    elif case == "bad_weight_decays":
        argv = [
            "probe",
            *model,
            "--train",
            str(tree),
            "--test",
            str(tree),
            "--weight-decays",
            "1e-3,big",
        ]
    else:
        argv = [
            "few-shot",
            *model,
            "--data",
            str(tree),
            "--n-way",
            "7",
            "--k-shot",
            "1",
            "--n-query",
            "2",
        ]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], captured.err


def _floats(tree):
    if isinstance(tree, dict):
        return [f for v in tree.values() for f in _floats(v)]
    return [tree] if isinstance(tree, float) else []


def test_stdout_is_rounded_and_results_file_is_full_precision(
    tiny_model_name, weights, tree, tmp_path, capsys
):
    out = tmp_path / "zs.json"
    assert (
        main(
            [
                "zero-shot",
                *_model(tiny_model_name, weights),
                "--data",
                str(tree),
                "--results-file",
                str(out),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert all(f == float(f"{f:.4g}") for f in _floats(printed))
    full = json.loads(out.read_text())
    assert round_floats(full) == printed
    assert any(f != float(f"{f:.4g}") for f in _floats(full))  # 1/18 and co. are not 4 digits


@pytest.fixture
def local_dir(tiny_model_name, tiny_encoder, tmp_path):
    """An open_clip folder as `clip-train export` writes it (config + .safetensors weights)."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path / "open_clip"
    folder.mkdir()
    config = {"model_cfg": open_clip.get_model_config(tiny_model_name)}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in tiny_encoder.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def test_local_dir_needs_no_pretrained(tiny_model_name, weights, local_dir, tree, capsys):
    model = ["--model", f"local-dir:{local_dir}"]
    assert main(["zero-shot", *model, "--data", str(tree), "--no-cache"]) == 0
    from_dir = json.loads(capsys.readouterr().out)
    argv = ["zero-shot", *_model(tiny_model_name, weights), "--data", str(tree), "--no-cache"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == from_dir  # same weights, same numbers
    again = ["--pretrained", str(local_dir / "open_clip_model.safetensors")]  # repeating it is fine
    assert main(["zero-shot", *model, *again, "--data", str(tree)]) == 0
    assert json.loads(capsys.readouterr().out) == from_dir


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no_weights", "no weight file in"),
        ("other_pretrained", "loads its own weights"),
        ("no_config", "no open_clip_config.json in"),
    ],
)
def test_local_dir_errors_are_one_line(case, expected, local_dir, weights, tree, capsys):
    extra = []
    if case == "no_weights":
        (local_dir / "open_clip_model.safetensors").unlink()
    elif case == "other_pretrained":
        extra = ["--pretrained", str(weights)]
    else:
        (local_dir / "open_clip_config.json").unlink()
    model = ["--model", f"local-dir:{local_dir}"]
    assert main(["zero-shot", *model, *extra, "--data", str(tree)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_suite_output_is_a_directory_now(tiny_model_name, weights, tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("tasks: []\n")
    argv = ["suite", *_model(tiny_model_name, weights), "--suite", str(tmp_path / "s.yaml")]
    assert main([*argv, "--output", str(tmp_path / "all.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--results-file" in err


@pytest.mark.parametrize("gpu", [True, False])
def test_device_defaults_to_the_gpu_when_there_is_one(monkeypatch, gpu):
    import clip_eval.cli as cli

    class Loaded(Exception):
        pass

    def load(model, pretrained, device):
        raise Loaded(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(cli, "_check_data", lambda *a: None)
    monkeypatch.setattr(cli, "load_encoder", load)
    with pytest.raises(Loaded, match="cuda" if gpu else "cpu"):
        main(["zero-shot", "--model", "m", "--data", "d"])
