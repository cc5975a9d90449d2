import json
import subprocess
import sys

import pytest

from data_tools.cli import build_parser, main


def test_synth_then_inspect(tmp_path, capsys):
    out = tmp_path / "synth"
    rc = main(
        [
            "synth",
            "--output",
            str(out),
            "--train-samples",
            "120",
            "--zeroshot-per-class",
            "1",
            "--retrieval-samples",
            "10",
            "--samples-per-shard",
            "50",
            "--seed",
            "3",
            "-q",
        ]
    )
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
    base = [
        "synth",
        "--output",
        str(out),
        "--zeroshot-per-class",
        "1",
        "--retrieval-samples",
        "5",
        "--samples-per-shard",
        "40",
        "-q",
    ]
    assert main([*base, "--train-samples", "100"]) == 0
    assert main([*base, "--train-samples", "50"]) == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == [
        "train-000000.tar",
        "train-000001.tar",
    ]


def test_missing_path_is_one_line_exit_2(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path / "nope")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: shard not found:") and str(tmp_path / "nope") in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_bad_config_value_is_one_line(tmp_path, capsys):
    assert main(["synth", "--output", str(tmp_path), "--train-samples", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: synth config train_samples=0") and err.count("\n") == 1


@pytest.mark.parametrize("cmd", ["synth", "inspect"])
def test_help_has_example(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    assert f"example:\n  clip-data {cmd}" in capsys.readouterr().out


def test_python_dash_m(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "data_tools", "inspect", str(tmp_path / "x.tar")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: shard not found")


@pytest.mark.parametrize("cmd", ["build", "from-imagefolder", "reshard", "validate"])
def test_builder_help_has_example(cmd, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([cmd, "--help"])
    assert f"example:\n  clip-data {cmd}" in capsys.readouterr().out


def test_validate_lists_bad_samples_and_exits_1(bad_shards, tmp_path, capsys):
    report = tmp_path / "bad.jsonl"
    rc = main(["validate", str(bad_shards), "--max-pixels", "40000", "--report", str(report), "-q"])
    assert rc == 1
    out = capsys.readouterr()
    assert "bad samples (" in out.out and "invalid:" in out.err
    rows = [json.loads(line) for line in report.read_text().splitlines()]
    got = {(r["key"], r["reason"]) for r in rows}
    assert got >= {
        ("corrupt", "decode"),
        ("truncjpg", "decode"),
        ("notxt", "missing_caption"),
        ("emptytxt", "empty_caption"),
        ("latin1", "bad_utf8"),
        ("noimage", "missing_image"),
        ("bomb", "too_large"),
        ("../escape", "unsafe_member"),
        ("t2", "truncated_tar"),
    }
    for key in ("corrupt", "truncjpg", "bomb", "t2"):
        assert f"  {key}  " in out.out


def test_inspect_histograms_duplicates_and_clean_validate(make_shards, jpeg, capsys):
    d = make_shards([4, 3])
    assert main(["validate", str(d), "-q"]) == 0
    assert "valid: 7 samples in 2 shards" in capsys.readouterr().out
    # the same key in two shards, found without decoding
    from data_tools.shards import ShardWriter

    with ShardWriter(d, "zdup", 10) as w:
        w.write({"__key__": "s00001", "jpg": jpeg(1), "txt": "again"})
    assert main(["inspect", str(d), "-q"]) == 0
    out = capsys.readouterr().out
    assert "caption length (chars):" in out and "image size (shorter side, px):" in out
    assert "  16-31" not in out and "  0-31" in out  # shorter side 16 px
    assert "problems: 1 bad samples (duplicate_key 1)" in out
    assert main(["inspect", str(d), "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["total"] == 8 and summary["problems"] == {"duplicate_key": 1}
