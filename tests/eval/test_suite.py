"""Suites: YAML validation (one line naming the key), running every task, JSON + Markdown output."""

import json

import pytest

from clip_eval.cli import main
from clip_eval.suite import load_suite, run_suite
from clip_eval.tasks import few_shot_task, retrieval_task, zero_shot_task
from data_tools.errors import ConfigError
from data_tools.synth import SynthConfig, write_synth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite_synth")
    write_synth(
        out,
        SynthConfig(
            seed=2,
            train_samples=1,
            zeroshot_per_class=4,
            retrieval_samples=12,
            image_size=32,
            samples_per_shard=64,
        ),
    )
    return out


def _suite_yaml(synth, tmp_path, extra=""):
    path = tmp_path / "suite.yaml"
    path.write_text(f"""
defaults:
  batch_size: 32
cache_dir: {tmp_path / "cache"}
tasks:
  - name: shapes
    task: zero-shot
    data: {synth / "zeroshot"}
  - name: captions
    task: retrieval
    data: {synth / "retrieval"}
  - name: shapes-probe
    task: linear-probe
    train: {synth / "zeroshot"}
    data: {synth / "zeroshot"}
    weight_decays: [1e-3, 1.0e-2]
    max_iter: 50
  - name: shapes-3w1s
    task: few-shot
    data: {synth / "zeroshot"}
    n_way: 3
    k_shot: 1
    n_query: 2
    episodes: 10
{extra}""")
    return path


def test_run_suite_writes_json_and_markdown(tiny_encoder, synth, tmp_path):
    suite = load_suite(_suite_yaml(synth, tmp_path))
    assert [t.name for t in suite.tasks] == ["shapes", "captions", "shapes-probe", "shapes-3w1s"]
    assert suite.tasks[2].options["weight_decays"] == [
        1e-3,
        1e-2,
    ]  # YAML's '1e-3' string read as a number
    tiny_encoder.train()
    results = run_suite(tiny_encoder, suite, "cpu", output_dir=tmp_path / "out")
    assert tiny_encoder.training
    assert list(results) == ["shapes", "captions", "shapes-probe", "shapes-3w1s"]
    assert results["shapes"] == zero_shot_task(tiny_encoder, synth / "zeroshot", batch_size=32)
    assert results["captions"] == retrieval_task(tiny_encoder, synth / "retrieval")
    assert results["shapes-3w1s"] == few_shot_task(
        tiny_encoder, synth / "zeroshot", n_way=3, k_shot=1, n_query=2, episodes=10
    )
    for name, metrics in results.items():
        record = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert record["name"] == name and record["metrics"] == metrics
    assert json.loads((tmp_path / "out" / "shapes.json").read_text())["task"] == "zero-shot"
    md = (tmp_path / "out" / "results.md").read_text()
    for title in ("## Zero-shot classification", "## Retrieval", "## Linear probe", "## Few-shot"):
        assert title in md
    assert f"| shapes | `{synth / 'zeroshot'}` | {100 * results['shapes']['acc1']:.2f} |" in md
    assert list((tmp_path / "cache").glob("*.safetensors"))  # the suite's cache_dir was used
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_bare_list_and_no_output_dir(tiny_encoder, synth, tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text(f"- {{name: r, task: retrieval, data: {synth / 'retrieval'}}}\n")
    suite = load_suite(path)
    assert suite.cache_dir is None
    assert set(run_suite(tiny_encoder, suite, "cpu")) == {"r"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["list.yaml"]


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "tasks: [{name: a, task: zero-shot, data: x, templaets: openai}]",
            r"tasks\[0\] \(a\)\.templaets: unknown key",
        ),
        ("tasks: [{name: a, task: retrieval, data: x, n_way: 5}]", r"\(a\)\.n_way: unknown key"),
        ("tasks: [{name: a, task: classify, data: x}]", r"tasks\[0\]\.task: 'classify'"),
        ("tasks: [{name: a, task: retrieval}]", r"\(a\)\.data: required"),
        ("tasks: [{name: a/b, task: retrieval, data: x}]", r"tasks\[0\]\.name"),
        (
            "tasks: [{name: a, task: retrieval, data: x}, {name: a, task: retrieval, data: y}]",
            "'a' appears twice",
        ),
        ("tasks: [{name: a, task: linear-probe, data: x}]", r"\(a\)\.train: required"),
        (
            "tasks: [{name: a, task: few-shot, data: x, k_shot: one}]",
            r"\(a\)\.k_shot: must be an integer",
        ),
        (
            "tasks: [{name: a, task: linear-probe, train: t, data: x, weight_decays: [a]}]",
            r"weight_decays: must hold numbers",
        ),
        ("taks: []", "unknown key 'taks'"),
        (
            "defaults: {batch_sise: 3}\ntasks: [{name: a, task: retrieval, data: x}]",
            r"defaults\.batch_sise",
        ),
        ("tasks: []", "non-empty list"),
        ("tasks: [{name: a, task: retrieval, data: x}\n", "line"),
    ],
)
def test_bad_suite_is_one_line_naming_the_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_suite(path)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


def test_cli_suite(tiny_model_name, tiny_encoder, synth, tmp_path, capsys):
    import torch

    weights = tmp_path / "tiny.pt"
    torch.save(tiny_encoder.model.state_dict(), weights)
    suite = _suite_yaml(synth, tmp_path)
    out = tmp_path / "res"
    assert (
        main(
            [
                "suite",
                "--model",
                tiny_model_name,
                "--pretrained",
                str(weights),
                "--suite",
                str(suite),
                "--output",
                str(out),
                "--cache-dir",
                str(tmp_path / "cli_cache"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"shapes", "captions", "shapes-probe", "shapes-3w1s"}
    assert (
        json.loads((out / "captions.json").read_text())["model"] == f"{tiny_model_name} ({weights})"
    )
    assert (out / "results.md").is_file()
    assert (
        list((tmp_path / "cli_cache").glob("*.safetensors")) and not (tmp_path / "cache").exists()
    )
