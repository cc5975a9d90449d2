"""`clip_train.report`: plots and summary from a synthetic metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from clip_train.report import eval_tasks, read_metrics, write_report
from data_tools.errors import ClipTrainError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train_lines(steps: int = 30, every: int = 10) -> list[dict[str, Any]]:
    lines = []
    for step in range(every, steps * every + 1, every):
        loss = 4.0 * math.exp(-step / 150) + 0.5
        line = {
            "step": step,
            "samples_seen": step * 256,
            "epoch": step // 100,
            "loss": loss,
            "loss_i2t": loss * 1.05,
            "loss_t2i": loss * 0.95,
            "lr": 5e-4 * min(1.0, step / 50),
            "logit_scale": 14.3 + step / 100,
            "samples_per_s": 1000.0 + step,
            "data_wait_frac": 0.02,
        }
        if step % 50 == 0:  # terms logged only now and then must still be picked up
            line.update(nonfinite_skipped=0, mfu=0.41)
        lines.append(line)
    return lines


def _eval_lines() -> list[dict[str, Any]]:
    return [
        {
            "step": s,
            "samples_seen": s * 256,
            "eval/zeroshot/acc1": s / 1000,
            "eval/zeroshot/acc5": s / 500,
            "eval/zeroshot/num_classes": 36,
            "eval/retrieval/image_retrieval_recall@1": s / 2000,
            "eval/retrieval/text_retrieval_recall@1": s / 1500,
        }
        for s in (100, 200, 300)
    ]


def _run(tmp_path: Path, lines: list[dict[str, Any]], name: str = "r1") -> Path:
    run = tmp_path / "runs" / name
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def test_plots_and_summary_with_eval(tmp_path: Path) -> None:
    lines = _train_lines()
    lines[10:10] = _eval_lines()[
        :1
    ]  # eval lines sit between training lines, as the trainer writes them
    lines += _eval_lines()[1:]
    run = _run(tmp_path, lines)
    written = write_report(run)

    names = [p.name for p in written]
    assert names == [
        "loss.png",
        "lr.png",
        "logit_scale.png",
        "throughput.png",
        "eval.png",
        "summary.md",
    ]
    assert all(p.parent == run / "report" for p in written)
    for path in written[:-1]:
        _assert_png(path)
    summary = (run / "report" / "summary.md").read_text()
    assert "## Last training values (step 300)" in summary
    assert (
        "| loss_i2t |" in summary
        and "| mfu | 0.41 |" in summary
        and "| samples_seen | 76,800 |" in summary
    )
    assert "### zeroshot" in summary and "### retrieval" in summary
    assert "| step | samples seen | acc1 | acc5 | num_classes |" in summary
    assert "| 300 | 76,800 | 0.3 | 0.6 | 36 |" in summary
    assert "![eval](eval.png)" in summary


def test_no_eval_panel_without_eval_lines(tmp_path: Path) -> None:
    run = _run(tmp_path, _train_lines())
    out = tmp_path / "elsewhere" / "rep"
    written = write_report(run, out_dir=out)
    assert [p.name for p in written] == [
        "loss.png",
        "lr.png",
        "logit_scale.png",
        "throughput.png",
        "summary.md",
    ]
    assert not (out / "eval.png").exists() and not (run / "report").exists()
    assert "No evaluation lines" in (out / "summary.md").read_text()
    assert not list(out.glob(".*tmp*")), "temp files must be renamed away"


def test_report_is_rewritten_in_place(tmp_path: Path) -> None:
    run = _run(tmp_path, _train_lines(steps=3))
    first = write_report(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_eval_lines()[0]) + "\n")
    second = write_report(run)
    assert [p.name for p in second] == [p.name for p in first[:-1]] + ["eval.png", "summary.md"]
    _assert_png(run / "report" / "eval.png")


def test_read_metrics_tolerates_a_torn_line_and_keeps_the_latest_step(tmp_path: Path) -> None:
    lines = _train_lines(steps=3)
    replay = dict(lines[1], loss=9.0)  # a resumed run that wrote step 20 again
    run = _run(tmp_path, lines + [replay] + _eval_lines()[:1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "loss": 1.')  # killed mid-write
    train, evals = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in train] == [10, 20, 30]
    assert train[1]["loss"] == 9.0
    assert eval_tasks(evals) == {
        "zeroshot": ["acc1", "acc5", "num_classes"],
        "retrieval": ["image_retrieval_recall@1", "text_retrieval_recall@1"],
    }
    assert len(write_report(run)) == 6


def test_single_log_line_still_plots(tmp_path: Path) -> None:
    run = _run(tmp_path, _train_lines(steps=1))
    for path in write_report(run)[:-1]:
        _assert_png(path)


def test_missing_run_dir(tmp_path: Path) -> None:
    missing = tmp_path / "runs" / "nope"
    with pytest.raises(ClipTrainError, match="run directory not found") as info:
        write_report(missing)
    assert str(missing) in str(info.value) and "\n" not in str(info.value)


def test_missing_metrics_file(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "fresh"
    run.mkdir(parents=True)
    with pytest.raises(ClipTrainError, match="no metrics file") as info:
        write_report(run)
    assert str(run / "metrics.jsonl") in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n", "not json\n"])
def test_empty_metrics_file(tmp_path: Path, content: str) -> None:
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(content)
    with pytest.raises(ClipTrainError, match="holds no metrics") as info:
        write_report(run)
    assert str(run / "metrics.jsonl") in str(info.value) and "\n" not in str(info.value)
    assert not (run / "report").exists()
