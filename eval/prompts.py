"""Class names and prompt templates: ImageNet's (from open_clip), or read from files.

ImageNet-1k synsets, class indices and class names come from `data_tools.imagenet`, the one
place that labels ImageNet for the shard builders and for evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from data_tools.errors import ConfigError, DataError

Template = str | Callable[[str], str]
PathLike = str | os.PathLike

TEMPLATE_SETS = ("openai", "simple")
DATASETS = ("imagenet",)
DEFAULT_TEMPLATE = "a photo of a {}."


def template_set(name: str) -> list[Template]:
    """open_clip's OpenAI 80 ImageNet templates ('openai') or its short set of 7 ('simple')."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    if name == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    if name == "simple":
        return list(SIMPLE_IMAGENET_TEMPLATES)
    raise ConfigError(
        f"templates {name!r}: unknown template set (use {' or '.join(TEMPLATE_SETS)}, or a file)"
    )


def read_lines(path: PathLike, option: str) -> list[str]:
    """Non-blank lines of a UTF-8 text file (class names, templates), surrounding space removed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path.name} not found: {path} (pass {option} FILE, or put it next to the data)"
        )
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"cannot read {path}: {exc} (it must be UTF-8 text, one entry per line)"
        ) from exc
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{path} is empty; it needs one entry per line")
    return lines


def resolve_templates(
    value: Sequence[Template] | PathLike | None, default: Sequence[Template] | PathLike
) -> tuple[list[Template], str]:
    """Templates from a list, a set name ('openai'/'simple'), a file, or `default`; plus their
    source."""
    if value is None:
        value = default
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if text in TEMPLATE_SETS and not os.path.exists(text):
            return template_set(text), f"{text} templates"
        return read_lines(text, "--templates"), text
    return list(value), "the given templates"


def resolve_classnames(
    value: Sequence[str] | PathLike | None, default: Sequence[str] | PathLike | None
) -> tuple[list[str] | None, str]:
    """Class names from a list or a file, else from `default` (a list, a file or None)."""
    if value is None:
        value = default
    if value is None:
        return None, "the folder names"
    if isinstance(value, (str, os.PathLike)):
        return read_lines(value, "--classnames"), os.fspath(value)
    return list(value), "the given class names"
