"""One dialect for clip-data, clip-train and clip-eval (data_tools.cli_common): shared flags on
every subcommand, old spellings as hidden aliases, --version, defaults in --help, one-line errors,
dated log lines, progress as log lines off a terminal and rounded metrics."""

import argparse
import contextlib
import json
import logging
import re
import sys

import pytest

from clip_eval import cli as eval_cli
from clip_train import cli as train_cli
from data_tools import cli as data_cli
from data_tools.cli_common import logging_to_stderr, version
from data_tools.errors import ClipTrainError
from data_tools.fmt import format_metrics, round_floats
from data_tools.progress import LineProgress, progress

CLIS = {"clip-data": data_cli, "clip-train": train_cli, "clip-eval": eval_cli}
SHARED = ["-v, --verbose", "-q, --quiet", "--no-progress", "--version"]


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


SUBCOMMANDS = [
    (prog, name) for prog, mod in CLIS.items() for name in _subparsers(mod.build_parser())
]


def _minimal_argv(prog, name):
    """The subcommand with a dummy value for each required option and positional."""
    sub = _subparsers(CLIS[prog].build_parser())[name]
    required = {flag for _, flag in sub.get_default("_required") or []}
    argv = [name]
    for action in sub._actions:
        if not action.option_strings and action.nargs not in ("*", "?", argparse.PARSER):
            argv.append("x")
        elif action.option_strings and (action.required or set(action.option_strings) & required):
            argv += [action.option_strings[-1], "x"]
    return argv


def test_every_cli_has_subcommands():
    assert {prog for prog, _ in SUBCOMMANDS} == set(CLIS) and len(SUBCOMMANDS) >= 18


@pytest.mark.parametrize("prog, name", SUBCOMMANDS)
def test_help_of_every_subcommand_lists_the_shared_flags(prog, name, capsys):
    with pytest.raises(SystemExit) as info:
        CLIS[prog].main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in SHARED), out


@pytest.mark.parametrize("prog, name", SUBCOMMANDS)
def test_shared_flags_parse_before_and_after_every_subcommand(prog, name):
    parser, argv = CLIS[prog].build_parser(), _minimal_argv(prog, name)
    args = parser.parse_args(argv)
    assert (args.verbose, args.quiet, args.no_progress) == (0, False, False)
    args = parser.parse_args([*argv, "-q", "--no-progress"])
    assert args.quiet and args.no_progress and args.verbose == 0
    args = parser.parse_args(["-v", *argv])
    assert args.verbose == 1 and not args.quiet
    args = parser.parse_args(["-q", *argv, "-vv"])  # the subcommand does not reset -q
    assert args.quiet and args.verbose == 2


@pytest.mark.parametrize("prog", CLIS)
def test_version(prog, capsys):
    for argv in (["--version"], [next(iter(_subparsers(CLIS[prog].build_parser()))), "--version"]):
        with pytest.raises(SystemExit) as info:
            CLIS[prog].main(argv)
        assert info.value.code == 0
        assert capsys.readouterr().out == f"{prog} {version()}\n"
    assert re.fullmatch(r"\d+\.\d+.*|unknown", version())


@pytest.mark.parametrize(
    "prog, argv, expected",
    [
        ("clip-data", ["synth", "--out", "d"], {"output": "d"}),
        (
            "clip-data",
            [
                "build",
                "t.csv",
                "--out",
                "d",
                "--image-col",
                "f",
                "--caption-col",
                "c",
                "--key-col",
                "k",
            ],
            {"output": "d", "image_column": "f", "caption_column": "c", "key_column": "k"},
        ),
        ("clip-data", ["reshard", "s", "--out", "d"], {"output": "d"}),
        ("clip-data", ["from-imagefolder", "r", "--out", "d"], {"output": "d"}),
        ("clip-train", ["export", "runs/a", "--out", "d"], {"output": "d"}),
        ("clip-train", ["embed", "runs/a", "--data", "s", "--out", "d"], {"output": "d"}),
        ("clip-train", ["report", "runs/a", "--out", "d"], {"output": "d"}),
        (
            "clip-eval",
            ["zero-shot", "--model", "m", "--data", "s", "--output", "r.json"],
            {"results_file": "r.json"},
        ),
        (
            "clip-eval",
            ["probe", "--model", "m", "--train", "a", "--test", "b", "--output", "r.json"],
            {"results_file": "r.json"},
        ),
        (
            "clip-eval",
            ["suite", "--model", "m", "--suite", "s.yaml", "--output-dir", "d"],
            {"output": "d"},
        ),
    ],
)
def test_old_spellings_still_parse_but_are_hidden(prog, argv, expected, capsys):
    args = CLIS[prog].build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected
    old = [flag for flag, _ in args._renamed]
    assert old and all(flag in argv for flag in old)
    with pytest.raises(SystemExit):
        CLIS[prog].main([argv[0], "--help"])
    help_text = capsys.readouterr().out
    for flag in old:
        assert not re.search(re.escape(flag) + r"(?![\w-])", help_text), flag


def test_old_spelling_fills_a_required_option_and_logs_a_deprecation(tmp_path, capsys, caplog):
    # --out alone satisfies the required --output: the config error comes after parsing
    assert data_cli.main(["synth", "--out", str(tmp_path), "--train-samples", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: synth config train_samples=0")
    assert "--out is deprecated" in caplog.text and "use --output" in caplog.text
    with pytest.raises(SystemExit) as info:
        data_cli.main(["synth", "--train-samples", "5"])
    assert info.value.code == 2
    assert "required: --output" in capsys.readouterr().err


@pytest.mark.parametrize(
    "prog, name, shown",
    [
        ("clip-data", "synth", "(default: 20000)"),
        ("clip-data", "build", "(default: 1000)"),
        ("clip-train", "embed", "(default: 256)"),
        ("clip-train", "index", "(default: flat)"),
        ("clip-eval", "zero-shot", "(default: 128)"),
        ("clip-eval", "few-shot", "(default: 600)"),
    ],
)
def test_help_shows_defaults(prog, name, shown, capsys):
    with pytest.raises(SystemExit):
        CLIS[prog].main([name, "--help"])
    out = capsys.readouterr().out
    assert shown in out and "(default: None)" not in out and "(default: False)" not in out


def test_clip_train_folds_an_error_to_one_line_exit_2(monkeypatch, capsys):
    def broken(args):
        raise ClipTrainError("metrics.jsonl is empty:\n  run `clip-train train` first")

    monkeypatch.setattr(train_cli, "cmd_report", broken)
    assert train_cli.main(["report", "runs/none"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: metrics.jsonl is empty: run `clip-train train` first\n"


def test_clip_train_quiet_and_no_progress_reach_the_training_loop(monkeypatch, capsys):
    import clip_train.config
    import clip_train.train

    seen = []
    monkeypatch.setattr(clip_train.config, "load_config", lambda path, overrides: object())
    monkeypatch.setattr(clip_train.train, "train", lambda cfg, **kw: seen.append(kw) or {})
    for argv, bar in [([], True), (["--no-progress"], False), (["-q"], False)]:
        assert train_cli.main(["train", "--config", "c.yaml", "--json", *argv]) == 0
        assert seen.pop()["progress"] is bar
    capsys.readouterr()


@contextlib.contextmanager
def bare_root():
    """The root logger without pytest's capture handlers, as in a fresh `clip-*` process."""
    root = logging.getLogger()
    handlers, level = root.handlers, root.level
    root.handlers = []
    try:
        yield root
    finally:
        root.handlers, root.level = handlers, level


def test_log_lines_are_dated_through_tqdm_and_libraries_are_quiet(monkeypatch, capsys):
    with bare_root() as root:
        _check_log_lines(root, monkeypatch, capsys)


def _check_log_lines(bare_root, monkeypatch, capsys):
    import tqdm

    written = []
    real_write = tqdm.tqdm.write
    monkeypatch.setattr(
        tqdm.tqdm, "write", lambda s, file=None, **kw: (written.append(s), real_write(s, file=file))
    )
    ours, faiss = logging.getLogger("clip_eval.tasks"), logging.getLogger("faiss.loader")
    with logging_to_stderr(0):
        ours.info("zero-shot done")
        ours.debug("detail")
        faiss.info("Loading faiss with AVX2 support.")
        faiss.warning("faiss warns")
    err = capsys.readouterr().err.splitlines()
    date = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert re.fullmatch(date + r" INFO clip_eval\.tasks: zero-shot done", err[0]), err
    assert re.fullmatch(date + r" WARNING faiss\.loader: faiss warns", err[1]) and len(err) == 2
    assert written and "zero-shot done" in written[0]  # through tqdm.write: no glued bar lines
    with logging_to_stderr(1):
        ours.debug("detail")
        faiss.info("Loading faiss with AVX2 support.")
    assert len(capsys.readouterr().err.splitlines()) == 2
    with logging_to_stderr(-1):
        ours.info("hidden")
        ours.warning("shown")
    assert capsys.readouterr().err.count("\n") == 1
    assert bare_root.handlers == [] and logging.getLogger("clip_eval").level == logging.NOTSET


def test_off_a_terminal_progress_is_a_log_line_every_tenth(caplog):
    caplog.set_level(logging.INFO, logger="data_tools.progress")
    assert not sys.stderr.isatty()  # pytest captures it
    with progress(total=100, desc="build train", unit="img") as bar:
        assert isinstance(bar, LineProgress)
        for _ in range(100):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[0].startswith("build train: 10/100 img (10%), ")
    assert lines[-1].startswith("build train: 100/100 img (100%)")
    caplog.clear()
    assert list(progress(range(7), desc="shards", every=3)) == list(range(7))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "shards: 3/7 it (43%)",
        "shards: 6/7 it (86%)",
        "shards: 7/7 it (100%)",
    ]
    caplog.clear()
    with progress(total=5, enabled=False) as bar:
        bar.update(5)
    assert not caplog.records


def test_on_a_terminal_progress_is_a_tqdm_bar(monkeypatch):
    import tqdm

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress(total=3, desc="x")
    assert isinstance(bar, tqdm.tqdm)
    bar.close()


def test_metrics_are_rounded_for_people():
    metrics = {
        "acc1": 0.8124999999999999,
        "acc5": 1.0,
        "num_classes": 36,
        "per_k": {"r@1": 0.123456789},
        "curve": [0.333333333, 2],
    }
    assert format_metrics(metrics) == (
        "acc1 0.8125, acc5 1, num_classes 36, per_k (r@1 0.1235), curve [0.3333, 2]"
    )
    assert round_floats(metrics) == {
        "acc1": 0.8125,
        "acc5": 1.0,
        "num_classes": 36,
        "per_k": {"r@1": 0.1235},
        "curve": [0.3333, 2],
    }
    assert json.dumps(round_floats({"x": 1 / 3})) == '{"x": 0.3333}'
