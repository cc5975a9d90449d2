"""One command-line dialect for `clip-data`, `clip-train` and `clip-eval`.

The three CLIs share their flags (-v/--verbose, -q/--quiet, --no-progress, --version, given
before or after the subcommand), their log format, the way a user error is shown (one line
`error: ...`, exit status 2) and the way a subcommand is dispatched, so what a user learns on
one works on the others. Spellings renamed for that still parse for one release as hidden
aliases that log a deprecation warning.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from data_tools.errors import ClipTrainError

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
# Loggers of this project; everything else (faiss, open_clip, PIL, ...) counts as a library.
OUR_LOGGERS = ("clip_train", "data_tools", "clip_eval")


def version() -> str:
    """The installed clip-train version ("unknown" when run from an uninstalled checkout)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("clip-train")
    except PackageNotFoundError:
        return "unknown"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples keep their line breaks; an option with a real default says it in --help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
            or "default" in text
            or isinstance(action, argparse._CountAction)
        ):
            return text
        return f"{text} (default: %(default)s)"


def _add_shared(parser: argparse.ArgumentParser, top: bool) -> None:
    # On a subcommand the defaults are SUPPRESS, so `clip-x -v cmd` is not reset by `cmd`'s
    # own default (argparse copies every attribute of the subcommand's namespace upwards).
    default = {} if top else {"default": argparse.SUPPRESS}
    group = parser.add_argument_group("shared options (any clip-* command, before or after it)")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0 if top else argparse.SUPPRESS,
        help="more log lines: our debug lines and the info lines of libraries "
        "(-vv: their debug lines too)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        **default,
        help="only warnings and errors on stderr, no progress",
    )
    group.add_argument(
        "--no-progress",
        action="store_true",
        **default,
        help="no progress bar (on a terminal) or progress log lines (elsewhere)",
    )
    group.add_argument(
        "--version",
        action="version",
        help="print the version and exit",
        version=f"{parser.prog.split()[0]} {version()}",
    )


def make_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser of a clip-* command, with the shared flags."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter
    )
    _add_shared(parser, top=True)
    return parser


def add_subcommand(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[..., int],
    *,
    help: str,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand that runs `func(args)` and accepts the shared flags."""
    p = sub.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=epilog,
        formatter_class=HelpFormatter,
    )
    _add_shared(p, top=False)
    p.set_defaults(func=func, _parser=p)
    return p


class _Renamed(argparse.Action):
    """An old spelling: stores like the new one and notes itself for a deprecation warning."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        renamed = list(getattr(namespace, "_renamed", []))
        namespace._renamed = renamed + [(option_string, self.new)]


def add_option(
    parser: argparse.ArgumentParser, *flags: str, aliases: Sequence[str] = (), **kwargs: Any
) -> argparse.Action:
    """`parser.add_argument(*flags, **kwargs)`, plus hidden old spellings (`aliases`) of it."""
    required = bool(kwargs.pop("required", False)) if aliases else False
    if required:
        kwargs["help"] = f"{kwargs.get('help') or ''} (required)".lstrip()
    action = parser.add_argument(*flags, **kwargs)
    for old in aliases:
        parser.add_argument(
            old,
            action=_Renamed,
            new=flags[-1],
            dest=action.dest,
            nargs=action.nargs,
            const=action.const,
            type=action.type,
            choices=action.choices,
            metavar=action.metavar,
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    if required:  # argparse would refuse the alias alone, so `run` checks after parsing
        checks = parser.get_default("_required") or []
        parser.set_defaults(_required=checks + [(action.dest, flags[-1])])
    return action


class _TqdmHandler(logging.Handler):
    """Writes through tqdm, so a log line under a live progress bar does not glue to it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)  # sys.stderr as it is now
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


def _levels(verbosity: int, main_process: bool) -> tuple[int, int]:
    if verbosity < 0 or not main_process:
        return logging.WARNING, logging.WARNING
    ours = logging.INFO if verbosity == 0 else logging.DEBUG
    libraries = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    return ours, libraries


@contextlib.contextmanager
def logging_to_stderr(verbosity: int = 0, main_process: bool = True) -> Iterator[None]:
    """Our INFO lines (DEBUG with -v) and library WARNINGs (INFO with -v) on stderr, dated.

    As with `logging.basicConfig`, a program that configured logging already (pytest, an
    application calling `main`) keeps its handlers; the levels set here are restored on exit.
    """
    root = logging.getLogger()
    ours, libraries = _levels(verbosity, main_process)
    loggers = [root, *(logging.getLogger(name) for name in OUR_LOGGERS)]
    saved = [(lg, lg.level) for lg in loggers]
    handler = None
    if not root.handlers:
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT, DATE_FORMAT))
        root.addHandler(handler)
    root.setLevel(libraries)
    for lg in loggers[1:]:
        lg.setLevel(ours)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        for lg, level in saved:
            lg.setLevel(level)


def one_line(exc: BaseException) -> str:
    """An error message folded to one line (the CLI prints it as `error: ...`)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def run(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
    *,
    main_process: bool = True,
    interrupted: str | None = None,
) -> int:
    """Parse `argv`, set up logging and run the chosen subcommand; returns the exit status.

    A `ClipTrainError` (bad input the user can fix) prints one line and returns 2;
    with `interrupted` set, Ctrl-C prints that line and returns 130.
    """
    args = parser.parse_args(argv)
    for dest, flag in getattr(args, "_required", ()):
        if getattr(args, dest, None) is None:
            args._parser.error(f"the following arguments are required: {flag}")
    args.progress = not (args.quiet or args.no_progress)
    with logging_to_stderr(-1 if args.quiet else args.verbose, main_process=main_process):
        for old, new in getattr(args, "_renamed", ()):
            log.warning("%s is deprecated and goes away in the next release: use %s", old, new)
        try:
            return int(args.func(args))
        except ClipTrainError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if interrupted is None:
                raise
            print(interrupted, file=sys.stderr)
            return 130
