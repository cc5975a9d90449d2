import json
import subprocess
import sys

import pytest

from data_tools.cli import build_parser, main


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(["synth", "--out", str(out), "--train-samples", "120", "--zeroshot-per-class", "1",
               "--retrieval-samples", "10", "--samples-per-shard", "50", "--seed", "3", "-q"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote 120 train, 36 zeroshot (36 classes), 10 retrieval samples" in printed
    assert "held out of train:" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["counts"]["train"] == 120

    assert main(["inspect", str(out / "train")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in lines[:3]] == ["50", "50", "20"]
    assert lines[3].split()[:2] == ["total", "120"]
    assert lines[4].startswith("captions: 120; length in chars min/mean/max")


def test_synth_rerun_smaller_removes_stale_shards(tmp_path, capsys):
    out = tmp_path / "s"
    base = ["synth", "--out", str(out), "--zeroshot-per-class", "1", "--retrieval-samples", "5",
            "--samples-per-shard", "40", "-q"]
    assert main([*base, "--train-samples", "100"]) == 0
    assert main([*base, "--train-samples", "50"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train-000000.tar", "train-000001.tar"]


def test_missing_path_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / "nope")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard not found:") and str(tmp_path / "nope") in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_value_is_one_line(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--train-samples", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: synth config train_samples=0") and err.count("\n") == 1


@pytest.mark.parametrize("cmd", ["synth", "inspect"])
def test_help_has_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert f"example:\n  clip-data {cmd}" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    r = subprocess.run([sys.executable, "-m", "data_tools", "inspect", str(tmp_path / "x.tar")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: shard not found")
