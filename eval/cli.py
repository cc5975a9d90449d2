"""`clip-eval`: zero-shot classification, retrieval, linear probe, few-shot and suites.

    clip-eval zero-shot --model demo_out/runs/demo --data demo_out/data/zeroshot
    clip-eval zero-shot --model ViT-B-32 --pretrained ~/weights/vit_b32.bin --data imagenet/val \\
        --dataset imagenet
    clip-eval retrieval --model demo_out/runs/demo --data coco/captions_val.csv
    clip-eval probe --model demo_out/runs/demo --train pets/train --test pets/test
    clip-eval few-shot --model demo_out/runs/demo --data pets/test --n-way 5 --k-shot 1
    clip-eval suite --model demo_out/runs/demo --suite suite.yaml --output results/

`--model` is our run or export directory (loaded with `clip_train.load`), an open_clip
architecture name together with `--pretrained FILE` (a local weight file; nothing is downloaded),
or `local-dir:DIR` (an open_clip config and weight file, as `clip-train export` writes them).
Metrics go to stdout as JSON rounded to 4 significant digits, and at full precision atomically
to `--results-file` when given. Shared flags (-v, -q, --no-progress, --version), one-line errors
(exit 2) and the dispatch are those of every clip-* command (data_tools.cli_common).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from clip_eval._common import write_json_atomic
from clip_eval.cache import ENV_VAR, default_cache_dir
from clip_eval.encoder import Encoder, load_model_dir, load_open_clip
from data_tools.cli_common import add_option, add_subcommand, make_parser, run
from data_tools.errors import ConfigError, DataError
from data_tools.fmt import round_floats

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_EPILOGS = {
    "zero-shot": (
        "examples:\n"
        "  clip-eval zero-shot --model demo_out/runs/demo --data demo_out/data/zeroshot\n"
        "  clip-eval zero-shot --model ViT-B-32 --pretrained vit_b32.bin --data imagenet/val "
        "--dataset imagenet\n"
        "  clip-eval zero-shot --model demo_out/runs/demo --data imagenet/val_flat --labels "
        "val_labels.txt --dataset imagenet \\\n"
        "      --templates simple\n"
        "  clip-eval zero-shot --model demo_out/runs/demo --data pets/test --classnames pets.txt "
        "--templates pets_templates.txt\n"
        "--data is labelled shards, a class folder (ROOT/<class>/<image>; ImageNet synset folders "
        "map to the\n"
        "standard indices) or, with --labels, a flat folder of images. Class names and templates "
        "default to\n"
        "classnames.txt and templates.txt next to the shards or in the folder; templates hold one "
        "'{}'.\n"
        f"Classifiers are cached in --cache-dir (default ${ENV_VAR}/classifiers or "
        "~/.cache/clip-train/classifiers)."
    ),
    "retrieval": (
        "examples:\n"
        "  clip-eval retrieval --model demo_out/runs/demo --data demo_out/data/retrieval\n"
        "  clip-eval retrieval --model ViT-B-32 --pretrained vit_b32.bin --data "
        "coco/captions_val.csv\n"
        "  clip-eval retrieval --model demo_out/runs/demo --data flickr30k/test.jsonl \\\n"
        "      --image-column file"
        " --caption-column captions\n"
        'shards: captions from each sample\'s json "captions" list when present, else its .txt;\n'
        "tables (.csv/.tsv with a header, .jsonl): one row per caption, or a list of captions per "
        "row;\n"
        "image paths are relative to the table's folder"
    ),
    "probe": (
        "examples:\n"
        "  clip-eval probe --model demo_out/runs/demo --train pets/train --test pets/test\n"
        "  clip-eval probe --model ViT-B-32 --pretrained vit_b32.bin --train "
        "cifar/train-{0000..0009}.tar \\\n"
        "      --test cifar/test --weight-decays 1e-5,1e-4,1e-3 --val-fraction 0.1\n"
        "features are extracted once; logistic regression (L-BFGS) per weight decay on a seeded "
        "validation split,\n"
        "then refit on all of --train and scored on --test"
    ),
    "few-shot": (
        "examples:\n"
        "  clip-eval few-shot --model demo_out/runs/demo --data pets/test --n-way 5 --k-shot 1\n"
        "  clip-eval few-shot --model demo_out/runs/demo --data demo_out/data/zeroshot --n-way 5 "
        "--k-shot 5 --episodes 1000\n"
        "prototype classifier (nearest class mean of normalized features); mean accuracy +- 95% CI"
    ),
    "suite": (
        "examples:\n"
        "  clip-eval suite --model demo_out/runs/demo --suite suite.yaml --output eval_results/\n"
        "  clip-eval suite --model local-dir:exports/demo/open_clip --suite suite.yaml \\\n"
        "      --output eval_results/demo --results-file eval_results/demo.json\n"
        "writes <task name>.json per task and results.md; see docs/eval.md for the YAML format"
    ),
}


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="run/export directory, an open_clip architecture name with --pretrained, "
        "or local-dir:DIR (open_clip_config.json + weight file)",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="FILE",
        help="local open_clip weight file for --model NAME",
    )
    p.add_argument("-b", "--batch-size", type=int, default=128, help="images per batch")
    p.add_argument(
        "-j",
        "--num-workers",
        type=int,
        default=None,
        help="data loader worker processes (default: zero-shot min(4, CPUs/2), the other tasks 0)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when there is a GPU, "
        "else cpu; bf16 autocast on cuda)",
    )


def _add_results(p: argparse.ArgumentParser, aliases: Sequence[str] = ("--output",)) -> None:
    add_option(
        p,
        "--results-file",
        aliases=aliases,
        default=None,
        metavar="FILE.json",
        help="also write the metrics here (atomically, full precision)",
    )


def _add_classes(p: argparse.ArgumentParser, labels: str = "--labels") -> None:
    p.add_argument(
        "--dataset",
        choices=["imagenet"],
        default=None,
        help="imagenet: open_clip's 1000 class names (and templates)",
    )
    p.add_argument(
        "--classnames",
        default=None,
        metavar="FILE",
        help="class names, one per line ('name' or 'folder<TAB>name')",
    )
    if labels:
        p.add_argument(
            labels,
            default=None,
            metavar="FILE",
            help=(
                "labels of a flat image folder: one index per line in sorted filename order, or "
                "'filename,label' rows"
            ),
        )


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=(
            f"classifier cache (default ${ENV_VAR}/classifiers or ~/.cache/clip-train/classifiers)"
        ),
    )
    p.add_argument(
        "--no-cache", action="store_true", help="neither read nor write cached classifiers"
    )


def _subparser(
    sub: argparse._SubParsersAction, name: str, func, help: str, description: str
) -> argparse.ArgumentParser:
    return add_subcommand(
        sub, name, func, help=help, description=description, epilog=_EPILOGS[name]
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = make_parser(
        "clip-eval",
        "Evaluate a CLIP-style encoder: zero-shot classification, retrieval, probes, suites.",
        epilog=(
            "examples:\n"
            "  clip-eval zero-shot --model demo_out/runs/demo --data demo_out/data/zeroshot\n"
            "  clip-eval retrieval --model ViT-B-32 --pretrained vit_b32.bin "
            "--data demo_out/data/retrieval\n"
            "  clip-eval suite --model demo_out/runs/demo --suite suite.yaml --output "
            "eval_results/\n"
            "run 'clip-eval SUBCOMMAND --help' for its options"
        ),
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{zero-shot,retrieval,probe,few-shot,suite}"
    )

    zs = _subparser(
        sub,
        "zero-shot",
        _cmd_zero_shot,
        "zero-shot classification (acc1, acc5, mean per-class recall)",
        "Zero-shot classification: acc1, acc5, mean_per_class_recall.",
    )
    _add_model(zs)
    zs.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="labelled shards, a class folder, or a flat folder with --labels",
    )
    _add_classes(zs)
    zs.add_argument(
        "--templates",
        default=None,
        metavar="openai|simple|FILE",
        help=(
            "prompt templates: open_clip's OpenAI 80, its short 7, or a file with one '{}' per line"
        ),
    )
    zs.add_argument(
        "--per-class",
        action="store_true",
        help="also report each class's samples, recall and how often it is predicted",
    )
    _add_cache(zs)
    _add_results(zs)

    rt = _subparser(
        sub,
        "retrieval",
        _cmd_retrieval,
        "image<->text recall@1/5/10",
        "Zero-shot retrieval: image_retrieval_recall@k (text->image), text_retrieval_recall@k "
        "(image->text).",
    )
    _add_model(rt)
    rt.add_argument(
        "--data",
        required=True,
        metavar="DATA",
        help="caption shards, or a .csv/.tsv/.jsonl table of image paths and captions",
    )
    rt.add_argument(
        "--image-column",
        default=None,
        help="table column with the image path (default: image, filepath, ...)",
    )
    rt.add_argument(
        "--caption-column",
        default=None,
        help="table column with the caption(s) (default: captions, caption, text, title)",
    )
    _add_results(rt)

    pr = _subparser(
        sub,
        "probe",
        _cmd_probe,
        "linear probe on frozen image features",
        "Linear probe: lp_acc1, lp_acc5, lp_mean_per_class_recall on --test.",
    )
    _add_model(pr)
    pr.add_argument(
        "--train",
        required=True,
        metavar="DATA",
        help="labelled training data (shards or class folder)",
    )
    pr.add_argument(
        "--test", required=True, metavar="DATA", help="labelled test data with the same classes"
    )
    _add_classes(pr, labels="")
    pr.add_argument(
        "--train-labels",
        default=None,
        metavar="FILE",
        help="labels file when --train is a flat folder",
    )
    pr.add_argument(
        "--test-labels",
        default=None,
        metavar="FILE",
        help="labels file when --test is a flat folder",
    )
    pr.add_argument(
        "--weight-decays",
        default=None,
        metavar="LIST",
        help="comma-separated sweep (default 1e-6,1e-5,...,1e-1)",
    )
    pr.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="part of --train held out to pick the weight decay",
    )
    pr.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    pr.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    _add_results(pr)

    fs = _subparser(
        sub,
        "few-shot",
        _cmd_few_shot,
        "N-way K-shot episodes with a prototype classifier",
        "Few-shot: fewshot_acc and fewshot_acc_ci95 over seeded episodes.",
    )
    _add_model(fs)
    fs.add_argument(
        "--data", required=True, metavar="DATA", help="labelled shards or a class folder"
    )
    _add_classes(fs)
    fs.add_argument("--n-way", type=int, default=5, help="classes per episode")
    fs.add_argument("--k-shot", type=int, default=1, help="support images per class")
    fs.add_argument("--n-query", type=int, default=15, help="query images per class")
    fs.add_argument("--episodes", type=int, default=600, help="episodes")
    fs.add_argument("--seed", type=int, default=0, help="seed of the episode sampler")
    _add_results(fs)

    su = _subparser(
        sub,
        "suite",
        _cmd_suite,
        "several tasks from a YAML file",
        "Run a suite of evaluation tasks from YAML.",
    )
    _add_model(su)
    su.add_argument(
        "--suite",
        required=True,
        metavar="FILE.yaml",
        help="the suite (tasks: name, task, data, options)",
    )
    add_option(
        su,
        "--output",
        aliases=["--output-dir"],
        default=None,
        metavar="DIR",
        help="write <task>.json per task and results.md here",
    )
    _add_cache(su)
    # Not --output here: in a suite that spelling now names the results directory.
    _add_results(su, aliases=())
    return parser


def load_encoder(model: str, pretrained: str | None, device: str) -> Encoder:
    """Our run/export directory (`load_model_dir`), or an open_clip model from local files."""
    if pretrained is not None or model.startswith("local-dir:"):
        return load_open_clip(model, pretrained, device)
    if not os.path.exists(model):
        raise DataError(
            f"--model {model}: no such run or export directory "
            f"(for an open_clip architecture, also pass --pretrained FILE; for an open_clip "
            f"folder, local-dir:DIR)"
        )
    encoder = load_model_dir(model, device=device)
    encoder.name = model
    return encoder


def _check_data(option: str, data: str) -> None:
    """Fail on a mistyped data path before loading a possibly large model."""
    from clip_eval.datasets import folder_kind, is_table

    if is_table(data):
        if not Path(data).is_file():
            raise DataError(f"{option} {data}: no such caption table")
        return
    if Path(data).is_dir() and folder_kind(data) is not None:
        return
    from data_tools.loader import expand_shards

    expand_shards(data)


def _cache_dir(args: argparse.Namespace) -> Path | None:
    if args.no_cache:
        return None
    return Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()


def _weight_decays(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(
            f"--weight-decays {text}: expected comma-separated numbers, e.g. 1e-5,1e-4,1e-3"
        ) from exc
    if not values:
        raise ConfigError("--weight-decays: give at least one number")
    return values


def _device(args: argparse.Namespace) -> torch.device:
    """The checked --device (and loader sizes), before any data or model is read."""
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise DataError(f"--device {args.device}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(
            f"--device {args.device}: CUDA is not available on this machine (use --device cpu)"
        )
    if args.batch_size < 1 or (args.num_workers is not None and args.num_workers < 0):
        raise DataError("--batch-size must be >= 1 and --num-workers >= 0")
    return device


def _evaluate(
    args: argparse.Namespace, device: torch.device, task: Callable[[Encoder, dict], dict]
) -> int:
    """Load --model, run `task(encoder, loader options)`, write and print the metrics."""
    encoder = load_encoder(args.model, args.pretrained, str(device))
    opts = dict(batch_size=args.batch_size, device=device, progress=args.progress)
    if args.num_workers is not None:  # else each task's own default
        opts["num_workers"] = args.num_workers
    metrics = task(encoder, opts)
    if args.results_file:
        write_json_atomic(args.results_file, metrics, what="--results-file")
    print(json.dumps(round_floats(metrics), indent=2))
    return 0


def _cmd_zero_shot(args: argparse.Namespace) -> int:
    from clip_eval.tasks import zero_shot_task

    device = _device(args)
    _check_data("--data", args.data)
    return _evaluate(
        args,
        device,
        lambda encoder, opts: zero_shot_task(
            encoder,
            args.data,
            classnames=args.classnames,
            templates=args.templates,
            dataset=args.dataset,
            labels=args.labels,
            cache_dir=_cache_dir(args),
            per_class=args.per_class,
            **opts,
        ),
    )


def _cmd_retrieval(args: argparse.Namespace) -> int:
    from clip_eval.tasks import retrieval_task

    device = _device(args)
    _check_data("--data", args.data)
    return _evaluate(
        args,
        device,
        lambda encoder, opts: retrieval_task(
            encoder,
            args.data,
            image_column=args.image_column,
            caption_column=args.caption_column,
            **opts,
        ),
    )


def _cmd_probe(args: argparse.Namespace) -> int:
    from clip_eval.tasks import linear_probe_task

    device = _device(args)
    _check_data("--train", args.train)
    _check_data("--test", args.test)
    weight_decays = _weight_decays(args.weight_decays)
    extra = {"weight_decays": weight_decays} if weight_decays else {}
    return _evaluate(
        args,
        device,
        lambda encoder, opts: linear_probe_task(
            encoder,
            args.train,
            args.test,
            classnames=args.classnames,
            dataset=args.dataset,
            train_labels=args.train_labels,
            test_labels=args.test_labels,
            val_fraction=args.val_fraction,
            max_iter=args.max_iter,
            seed=args.seed,
            **extra,
            **opts,
        ),
    )


def _cmd_few_shot(args: argparse.Namespace) -> int:
    from clip_eval.tasks import few_shot_task

    device = _device(args)
    _check_data("--data", args.data)
    return _evaluate(
        args,
        device,
        lambda encoder, opts: few_shot_task(
            encoder,
            args.data,
            classnames=args.classnames,
            dataset=args.dataset,
            labels=args.labels,
            n_way=args.n_way,
            k_shot=args.k_shot,
            n_query=args.n_query,
            episodes=args.episodes,
            seed=args.seed,
            **opts,
        ),
    )


def _cmd_suite(args: argparse.Namespace) -> int:
    from clip_eval.suite import load_suite, run_suite

    device = _device(args)
    if args.output and args.output.endswith(".json"):
        raise ConfigError(
            f"--output {args.output}: a suite's --output is now its results "
            "directory (was --output-dir); write the metrics JSON with "
            "--results-file"
        )
    suite = load_suite(args.suite)
    if not args.no_cache and args.cache_dir is None and suite.cache_dir is not None:
        args.cache_dir = suite.cache_dir
    cache = None if args.no_cache else str(_cache_dir(args))
    # Suite tasks carry their own batch_size/num_workers; the command line's apply to the rest.
    defaults = {"batch_size": args.batch_size}
    if args.num_workers is not None:
        defaults["num_workers"] = args.num_workers
    tasks = tuple(dataclasses.replace(t, options={**defaults, **t.options}) for t in suite.tasks)
    suite = dataclasses.replace(suite, tasks=tasks, cache_dir=cache)
    return _evaluate(
        args,
        device,
        lambda encoder, opts: run_suite(
            encoder, suite, device, output_dir=args.output, progress=opts["progress"]
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-eval`; returns the exit status (2 for a user error)."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
