"""Numbers for people: metrics rounded to 4 significant digits in log lines and summaries.

Files (metrics.jsonl, --results-file, a suite's task JSON) keep full precision; a person reading
a log or a terminal wants `acc1 0.8125`, not `0.8124999999999999`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DIGITS = 4


def round_floats(value: Any, digits: int = DIGITS) -> Any:
    """`value` with every float (also in dicts, lists, tuples) at `digits` significant digits."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}")
    if isinstance(value, Mapping):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def format_metrics(metrics: Mapping[str, Any], digits: int = DIGITS) -> str:
    """`acc1 0.8125, acc5 1, num_classes 36`: one log-line fragment for a metrics dict."""

    def show(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}g}"
        if isinstance(v, Mapping):
            return "(" + format_metrics(v, digits) + ")"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(show(x) for x in v) + "]"
        return str(v)

    return ", ".join(f"{k} {show(v)}" for k, v in metrics.items())
