"""Plots and a Markdown summary of a run, from its `metrics.jsonl` alone.

    clip-train report runs/my_run               # -> runs/my_run/report/*.png + summary.md
    clip-train report runs/my_run --out /tmp/r

The report reads nothing but the metrics file, so it works on a run that is still training, was
killed, or was copied off the cluster without its checkpoints. Figures are drawn on matplotlib's
Agg canvas directly (no pyplot): no display is needed and no global backend is switched.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from data_tools.errors import ClipTrainError
from data_tools.io import write_bytes_atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REPORT_DIR = "report"
EVAL_PREFIX = "eval/"
# Rates and fractions read wrong on an axis that starts at the data's minimum.
_FROM_ZERO = ("samples/s", "data-wait fraction", "MFU")
_ORDER = (
    "step",
    "samples_seen",
    "epoch",
    "loss",
    "lr",
    "logit_scale",
    "samples_per_s",
    "data_wait_frac",
)

Record = dict[str, Any]


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> tuple[list[Record], list[Record]]:
    """Training and evaluation records of a metrics file, one per step, sorted by step.

    A line cut short by a crash is skipped with a warning rather than failing the report. When a
    step appears twice (a resumed run whose file was not truncated), the later line wins: it is
    the one the surviving weights descend from.
    """
    if not path.is_file():
        raise ClipTrainError(f"no metrics file at {path}; is this a clip-train run directory?")
    train: dict[int, Record] = {}
    evals: dict[int, Record] = {}
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning(
                    "%s:%d is not valid JSON (a line cut short by a crash?); skipped", path, lineno
                )
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                log.warning("%s:%d has no numeric 'step'; skipped", path, lineno)
                continue
            step = int(rec["step"])
            if any(k.startswith(EVAL_PREFIX) for k in rec):
                evals[step] = {**evals.get(step, {}), **rec}
            if "loss" in rec:
                train[step] = rec
    if not train and not evals:
        raise ClipTrainError(
            f"{path} holds no metrics (empty or unreadable); train for at least "
            f"train.log_every steps first"
        )
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def _number(value: Any) -> float | None:
    """A plottable float, or None for strings, lists and missing values (NaN/inf stay: they are
    data)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _series(records: Sequence[Record], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for rec in records:
        y = _number(rec.get(key))
        if y is not None:
            xs.append(float(rec["step"]))
            ys.append(y)
    return xs, ys


def _keys(records: Iterable[Record]) -> list[str]:
    """Numeric keys in first-seen order, so plots and tables list them as the trainer wrote them."""
    seen: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if _number(value) is not None:
                seen.setdefault(key, None)
    return list(seen)


def eval_tasks(records: Sequence[Record]) -> dict[str, list[str]]:
    """{task: [metric, ...]} from keys `eval/<task>/<metric>`."""
    tasks: dict[str, list[str]] = defaultdict(list)
    for key in _keys(records):
        if key.startswith(EVAL_PREFIX):
            task, _, metric = key[len(EVAL_PREFIX) :].partition("/")
            if metric and metric not in tasks[task]:
                tasks[task].append(metric)
    return dict(tasks)


# ---------------------------------------------------------------- writing


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)  # attach the raster canvas explicitly: PNG output, never a GUI
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomic(path, buf.getvalue())
    return path


def _panels(n: int, title: str, max_cols: int = 3) -> tuple[Figure, list[Any]]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    fig.suptitle(title)
    return fig, axes


def _line_plot(
    path: Path,
    title: str,
    records: Sequence[Record],
    panels: Sequence[tuple[str, Sequence[str]]],
    panel_titles: bool = False,
) -> Path | None:
    """One figure; each panel (label, keys) draws one line per key that has data.

    Sparse series get markers: a run with one log line or one evaluation would otherwise draw
    an invisible zero-length line.
    """
    drawn = [(label, [k for k in keys if _series(records, k)[0]]) for label, keys in panels]
    drawn = [(label, keys) for label, keys in drawn if keys]
    if not drawn:
        return None
    fig, axes = _panels(len(drawn), title)
    for ax, (label, keys) in zip(axes, drawn):
        for key in keys:
            xs, ys = _series(records, key)
            ax.plot(
                xs,
                ys,
                label=key.rsplit("/", 1)[-1],
                marker="o" if len(xs) <= 20 else None,
                markersize=4,
            )
        ax.set_xlabel("step")
        if panel_titles:
            ax.set_title(label)
        else:
            ax.set_ylabel(label)
        if label in _FROM_ZERO:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if len(keys) > 1 or panel_titles:
            ax.legend(fontsize="small")
    return _save(fig, path)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or (
        math.isfinite(value) and value == int(value) and abs(value) >= 1000
    ):
        return f"{int(value):,}"
    return f"{value:.4g}"


def _summary(
    run_dir: Path,
    source: Path,
    train: Sequence[Record],
    evals: Sequence[Record],
    plots: Sequence[Path],
) -> str:
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"Source: `{source}` ({len(train)} training lines, {len(evals)} evaluation lines).",
        "",
    ]
    if train:
        last: dict[str, Any] = {}
        for rec in train:  # the latest value of every key, also of terms logged only now and then
            last.update({k: v for k, v in rec.items() if not k.startswith(EVAL_PREFIX)})
        keys = [k for k in _ORDER if k in last] + sorted(k for k in last if k not in _ORDER)
        lines += [
            f"## Last training values (step {_fmt(train[-1]['step'])})",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {k} | {_fmt(last[k])} |" for k in keys]
        lines.append("")
    tasks = eval_tasks(evals)
    if tasks:
        lines += ["## Evaluation", ""]
        for task, metrics in tasks.items():
            rows = [r for r in evals if any(f"{EVAL_PREFIX}{task}/{m}" in r for m in metrics)]
            lines += [
                f"### {task}",
                "",
                "| step | samples seen | " + " | ".join(metrics) + " |",
                "|---|---|" + "---|" * len(metrics),
            ]
            for rec in rows:
                cells = [_fmt(rec.get(f"{EVAL_PREFIX}{task}/{m}", "")) for m in metrics]
                lines.append(
                    f"| {_fmt(rec['step'])} | {_fmt(rec.get('samples_seen', ''))} | "
                    + " | ".join(cells)
                    + " |"
                )
            lines.append("")
    else:
        lines += ["No evaluation lines in the metrics file.", ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def write_report(
    run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write PNG plots and `summary.md` for a run; returns the paths written (summary last).

    Plots: loss.png (every `loss*` term), lr.png, logit_scale.png, throughput.png (samples/s,
    data-wait fraction, MFU when logged) and eval.png (one panel per task) when evaluation lines
    exist. A figure whose keys never appear is not written. Output goes to `<run_dir>/report/`
    unless `out_dir` is given.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ClipTrainError(f"run directory not found: {run_dir}")
    source = run_dir / METRICS_FILE
    train, evals = read_metrics(source)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)

    train_keys = _keys(train)
    loss_keys = [k for k in train_keys if k.startswith("loss")]
    throughput = [
        ("samples/s", ["samples_per_s"]),
        ("data-wait fraction", ["data_wait_frac"]),
        ("MFU", ["mfu"]),
    ]
    name = run_dir.name
    candidates = [
        _line_plot(out / "loss.png", f"{name}: loss", train, [("loss", loss_keys)]),
        _line_plot(out / "lr.png", f"{name}: learning rate", train, [("lr", ["lr"])]),
        _line_plot(
            out / "logit_scale.png",
            f"{name}: logit scale",
            train,
            [("exp(logit_scale)", ["logit_scale"])],
        ),
        _line_plot(out / "throughput.png", f"{name}: throughput", train, throughput),
    ]
    tasks = eval_tasks(evals)
    # Counts (num_classes, num_images) are context for the table, not curves to compare with
    # recalls.
    eval_panels = [
        (task, [f"{EVAL_PREFIX}{task}/{m}" for m in metrics if not m.startswith("num_")])
        for task, metrics in tasks.items()
    ]
    if eval_panels:
        candidates.append(
            _line_plot(
                out / "eval.png", f"{name}: evaluation", evals, eval_panels, panel_titles=True
            )
        )
    plots = [p for p in candidates if p is not None]

    summary = out / "summary.md"
    write_bytes_atomic(summary, _summary(run_dir, source, train, evals, plots).encode())
    log.info("report for %s: %d plots and %s", run_dir, len(plots), summary)
    return [*plots, summary]
