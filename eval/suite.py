"""Suites: several evaluation tasks from one YAML file, one JSON per task and a Markdown table.

    tasks:
      - {name: imagenet, task: zero-shot, data: /data/imagenet/val, dataset: imagenet}
      - {name: coco, task: retrieval, data: /data/coco/captions_val.csv}
      - {name: pets-probe, task: linear-probe, train: /data/pets/train, data: /data/pets/test}
      - {name: pets-5w1s, task: few-shot, data: /data/pets/test, n_way: 5, k_shot: 1}

The file is either that mapping (optionally with `defaults:` applied to every task and
`cache_dir:` for zero-shot classifiers) or the bare list of tasks. Paths are used as written
(relative ones from the working directory). Unknown keys fail at load time with one line.

The trainer calls, every `eval.every` steps on the main process:

    suite = load_suite(cfg.eval.suite)            # once, at start-up: bad files fail early
    results = run_suite(encoder, suite, device, output_dir=run_dir / f"eval/step_{step}")

`results` is `{task name: {metric: value}}`; `output_dir` (optional) receives `<name>.json` per
task and `results.md`, each written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from clip_eval._common import write_json_atomic
from clip_eval.encoder import Encoder
from clip_eval.tasks import few_shot_task, linear_probe_task, retrieval_task, zero_shot_task
from data_tools.errors import ConfigError
from data_tools.fmt import format_metrics
from data_tools.io import write_text_atomic

log = logging.getLogger(__name__)

_COMMON = {"name", "task", "data", "batch_size", "num_workers"}
_OPTIONS: dict[str, set[str]] = {
    "zero-shot": {"classnames", "templates", "dataset", "labels"},
    "retrieval": {"image_column", "caption_column"},
    "linear-probe": {
        "train",
        "classnames",
        "dataset",
        "train_labels",
        "test_labels",
        "weight_decays",
        "val_fraction",
        "seed",
        "max_iter",
    },
    "few-shot": {
        "classnames",
        "dataset",
        "labels",
        "n_way",
        "k_shot",
        "n_query",
        "episodes",
        "seed",
    },
}
_TOP_LEVEL = {"tasks", "defaults", "cache_dir"}
_INTS = {"batch_size", "num_workers", "n_way", "k_shot", "n_query", "episodes", "seed", "max_iter"}
_STRINGS = {
    "dataset",
    "labels",
    "train",
    "train_labels",
    "test_labels",
    "image_column",
    "caption_column",
}
_STRING_OR_LIST = {"classnames", "templates"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Columns of the Markdown table per task kind: (metric key, header).
_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "zero-shot": [
        ("acc1", "acc1"),
        ("acc5", "acc5"),
        ("mean_per_class_recall", "mean per-class recall"),
        ("num_samples", "images"),
        ("num_classes", "classes"),
    ],
    "retrieval": [
        (f"{d}_retrieval_recall@{k}", f"{'image' if d == 'image' else 'text'} R@{k}")
        for d in ("image", "text")
        for k in (1, 5, 10)
    ]
    + [("num_images", "images"), ("num_texts", "texts")],
    "linear-probe": [
        ("lp_acc1", "acc1"),
        ("lp_acc5", "acc5"),
        ("lp_mean_per_class_recall", "mean per-class recall"),
        ("weight_decay", "weight decay"),
        ("num_train", "train"),
        ("num_test", "test"),
    ],
    "few-shot": [
        ("fewshot_acc", "accuracy"),
        ("fewshot_acc_ci95", "95% CI +-"),
        ("n_way", "way"),
        ("k_shot", "shot"),
        ("n_query", "queries"),
        ("episodes", "episodes"),
    ],
}
_TITLES = {
    "zero-shot": "Zero-shot classification",
    "retrieval": "Retrieval",
    "linear-probe": "Linear probe",
    "few-shot": "Few-shot (prototypes)",
}


@dataclass(frozen=True)
class Task:
    """One entry of a suite: its name, kind, data and the options its task function takes."""

    name: str
    task: str
    data: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    """The tasks of a suite file, in file order, and where zero-shot classifiers are cached."""

    tasks: tuple[Task, ...]
    source: str = "<suite>"
    cache_dir: str | None = None


def _checked(key: str, value: Any, where: str) -> Any:
    """The option value with its type checked (and YAML's '1e-6' strings read as floats)."""
    if key in _INTS and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{where}: must be an integer, got {value!r}")
    if key in _STRINGS and not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, got {value!r}")
    if key in _STRING_OR_LIST and not (
        isinstance(value, str)
        or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
    ):
        raise ConfigError(
            f"{where}: must be a file path, a template set name or a non-empty list of strings"
        )
    if key == "val_fraction" or key == "weight_decays":
        values = value if key == "weight_decays" else [value]
        if key == "weight_decays" and (not isinstance(value, list) or not value):
            raise ConfigError(
                f"{where}: must be a non-empty list of numbers, e.g. [1.0e-4, 1.0e-3]"
            )
        try:
            floats = [float(v) for v in values if not isinstance(v, bool)]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: must hold numbers, got {value!r}") from exc
        if len(floats) != len(values):
            raise ConfigError(f"{where}: must hold numbers, got {value!r}")
        return floats if key == "weight_decays" else floats[0]
    return value


def _task(raw: Any, index: int, defaults: dict[str, Any], source: str) -> Task:
    where = f"{source}: tasks[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{where}: expected a mapping with name, task and data, got {type(raw).__name__}"
        )
    kind = raw.get("task")
    if kind not in _OPTIONS:
        raise ConfigError(f"{where}.task: {kind!r} is not one of {', '.join(_OPTIONS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"{where}.name: {name!r} must be a file-name-safe string (letters, digits, . _ -)"
        )
    merged = {k: v for k, v in defaults.items() if k in _COMMON | _OPTIONS[kind]}
    merged.update(raw)
    allowed = _COMMON | _OPTIONS[kind]
    for key in merged:
        if key not in allowed:
            raise ConfigError(
                f"{where} ({name}).{key}: unknown key for a {kind} task (known: "
                f"{', '.join(sorted(allowed))})"
            )
    data = merged.get("data")
    if not isinstance(data, str) or not data:
        raise ConfigError(
            f"{where} ({name}).data: required, the path of the data (shards, folder or table)"
        )
    if kind == "linear-probe" and not isinstance(merged.get("train"), str):
        raise ConfigError(
            f"{where} ({name}).train: required for a linear probe (its training data; data is the "
            "test set)"
        )
    options = {
        k: _checked(k, v, f"{where} ({name}).{k}")
        for k, v in merged.items()
        if k not in ("name", "task", "data")
    }
    return Task(name=name, task=kind, data=data, options=options)


def parse_suite(raw: Any, source: str = "<suite>") -> Suite:
    """A `Suite` from already-parsed YAML (a list of tasks, or a mapping with `tasks:`)."""
    if isinstance(raw, list):
        raw = {"tasks": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a suite is a list of tasks or a mapping with 'tasks:'")
    for key in raw:
        if key not in _TOP_LEVEL:
            raise ConfigError(
                f"{source}: unknown key {key!r} (known: {', '.join(sorted(_TOP_LEVEL))})"
            )
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults must be a mapping of task options")
    every_option = _COMMON | set().union(*_OPTIONS.values())
    for key in defaults:
        if key not in every_option - {"name", "task", "data"}:
            raise ConfigError(
                f"{source}: defaults.{key}: unknown key (known: {', '.join(sorted(every_option))})"
            )
    items = raw.get("tasks")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{source}: tasks must be a non-empty list")
    tasks = tuple(_task(item, i, defaults, source) for i, item in enumerate(items))
    seen: set[str] = set()
    for t in tasks:
        if t.name in seen:
            raise ConfigError(
                f"{source}: task name {t.name!r} appears twice; names are file names and must "
                "differ"
            )
        seen.add(t.name)
    cache_dir = raw.get("cache_dir")
    if cache_dir is not None and not isinstance(cache_dir, str):
        raise ConfigError(f"{source}: cache_dir must be a path")
    return Suite(tasks=tasks, source=source, cache_dir=cache_dir)


def load_suite(path: str | os.PathLike) -> Suite:
    """Read and validate a suite YAML file; every mistake is one `ConfigError` line naming the
    key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"suite file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read suite {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}{at}: {problem}") from exc
    return parse_suite(raw, str(path))


def _runner(task: Task, cache_dir: str | None) -> Callable[..., dict]:
    opts = dict(task.options)
    if task.task == "zero-shot":
        return lambda enc, dev, progress: zero_shot_task(
            enc, task.data, device=dev, cache_dir=cache_dir, progress=progress, **opts
        )
    if task.task == "retrieval":
        return lambda enc, dev, progress: retrieval_task(
            enc, task.data, device=dev, progress=progress, **opts
        )
    if task.task == "linear-probe":
        train = opts.pop("train")
        return lambda enc, dev, progress: linear_probe_task(
            enc, train, task.data, device=dev, progress=progress, **opts
        )
    return lambda enc, dev, progress: few_shot_task(
        enc, task.data, device=dev, progress=progress, **opts
    )


def _cell(value: Any, key: str) -> str:
    if value is None:
        return ""
    if key.startswith(("num_", "n_", "k_")) or key == "episodes":
        return str(int(value))
    if key == "weight_decay":
        return f"{value:g}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{100 * value:.2f}"
    return str(value)


def results_markdown(suite: Suite, results: dict[str, dict]) -> str:
    """One Markdown table per task kind; fractions shown as percentages with two decimals."""
    lines = [f"# Evaluation results ({Path(suite.source).name})", ""]
    for kind, columns in _COLUMNS.items():
        tasks = [t for t in suite.tasks if t.task == kind and t.name in results]
        if not tasks:
            continue
        lines += [
            f"## {_TITLES[kind]}",
            "",
            "| task | data | " + " | ".join(h for _, h in columns) + " |",
            "|---|---|" + "---:|" * len(columns),
        ]
        for t in tasks:
            cells = [_cell(results[t.name].get(key), key) for key, _ in columns]
            lines.append(f"| {t.name} | `{t.data}` | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Accuracies and recalls in %; metric keys as in CLIP_benchmark (see the per-task JSON "
        "files)."
    )
    return "\n".join(lines) + "\n"


def run_suite(
    encoder: Encoder,
    suite: Suite,
    device: str | torch.device,
    output_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Run every task of `suite` with one encoder (already on `device`); `{task name: metrics}`.

    With `output_dir`, writes `<task name>.json` ({name, task, data, model, metrics, seconds})
    after each task and `results.md` at the end, atomically. The encoder's train/eval modes are
    restored after each task, so the trainer can call this mid-run.
    """
    results: dict[str, dict] = {}
    model = getattr(encoder, "name", None)
    for task in suite.tasks:
        started = time.perf_counter()
        log.info("suite %s: running %s (%s on %s)", suite.source, task.name, task.task, task.data)
        metrics = _runner(task, suite.cache_dir)(encoder, device, progress)
        seconds = time.perf_counter() - started
        results[task.name] = metrics
        log.info(
            "suite %s: %s done in %.1fs: %s",
            suite.source,
            task.name,
            seconds,
            format_metrics(metrics),
        )
        if output_dir is not None:
            record = {
                "name": task.name,
                "task": task.task,
                "data": task.data,
                "model": model,
                "options": task.options,
                "metrics": metrics,
                "seconds": round(seconds, 3),
            }
            write_json_atomic(Path(output_dir) / f"{task.name}.json", record, what="--output")
    if output_dir is not None:
        write_text_atomic(
            Path(output_dir) / "results.md", results_markdown(suite, results), what="--output"
        )
    return results
