"""`clip-data score`, `filter` and `dedup`: the curation subcommands (registered by data_tools.cli).

Only this module loads a model (through clip_eval's `load_encoder`, lazily, as eval's CLI
loads clip_train): the API below takes an encoder object, so data_tools stays import-free.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_tools.cli_common import add_subcommand, one_line
from data_tools.errors import ClipTrainError, DataError

log = logging.getLogger(__name__)


def model_id(args: argparse.Namespace) -> dict[str, Any]:
    """How the model was named: recorded in run.json, so a resume with another is refused."""
    pretrained = os.path.abspath(args.pretrained) if args.pretrained else None
    model = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
    return {"model": model, "pretrained": pretrained}


def _device(name: str | None) -> str:
    import torch

    if name is None:
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {name}: no CUDA device here; use --device cpu")
    return name


def load_model(model: str, pretrained: str | None, device: str) -> Any:
    """Any model clip-eval loads (run, export, open_clip + local weights), or one line why not."""
    from clip_eval.cli import load_encoder

    try:
        encoder = load_encoder(model, pretrained, device)
    except ClipTrainError as exc:
        text = one_line(exc)
        raise DataError(
            text if text.startswith("--") else f"--model {model}: cannot be loaded: {text}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a broken file raises anything; say so in one line
        raise DataError(
            f"--model {model}: cannot be loaded ({type(exc).__name__}: "
            f"{one_line(exc)}); give a run or export directory, or an open_clip "
            "architecture with --pretrained FILE"
        ) from None
    return encoder.to(device) if hasattr(encoder, "to") else encoder


def _cmd_score(args: argparse.Namespace) -> int:
    from data_tools.curate.score import _run_options, check_run, dist_info, score_shards
    from data_tools.urls import expand_shards

    if args.batch_size < 1 or args.num_workers < 0:
        raise DataError("--batch-size must be >= 1 and --num-workers >= 0")
    urls = expand_shards(args.shards)
    ident = model_id(args)
    check_run(Path(args.output), _run_options(ident, urls))  # before the model loads
    device = _device(args.device)
    encoder = load_model(args.model, args.pretrained, device)
    from clip_eval.text import trimmed_text_forward

    forward = None if args.no_trim_text else trimmed_text_forward(encoder)
    rank, _ = dist_info()
    info = score_shards(
        encoder,
        args.shards,
        args.output,
        model_id=ident,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        text_forward=forward,
        progress=args.progress and rank == 0,
    )
    if info is not None:
        print(
            f"scored {info['count']} samples of {len(info['shards'])} shards into "
            f"{args.output} (mean cosine {info['score_mean']:.4f}, dim {info['dim']})"
        )
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from data_tools.curate.filter import FilterOptions, filter_shards

    opts = FilterOptions(
        min_score=args.min_score,
        keep_fraction=args.keep_fraction,
        min_caption_words=args.min_caption_words,
        min_side=args.min_side,
    )
    opts.validate()
    rep = filter_shards(args.shards, args.scores, args.output, opts, progress=args.progress)
    c = rep["counts"]
    removed = ", ".join(f"{r} {c[r]}" for r in ("unscored", "caption_words", "min_side", "score"))
    thr = rep["score_threshold"]
    print(
        f"kept {c['kept']} of {c['input']} samples in {args.output} (removed: {removed}); "
        f"score threshold {'none' if thr is None else f'{thr:.4f}'}"
    )
    print(
        f"report: {args.output}/report.json, score_hist.png, lowest_kept.png, highest_removed.png"
    )
    return 0


def _eval_sets(args: argparse.Namespace, scores_model: Any) -> dict[str, Any]:
    from data_tools.curate.evalsets import embed_eval_set, kind

    specs = []
    for spec in args.eval or []:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        name = name or Path(path.rstrip("/")).name
        if not Path(path).exists() and not any(c in path for c in "{*"):
            raise DataError(f"--eval {spec}: no such path")
        specs.append((name, path, kind(path)))
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        raise DataError(f"--eval: two eval sets are named alike ({names}); use NAME=PATH")
    encoder = None
    device = _device(args.device)
    if any(k != "scores" for _, _, k in specs):
        if not isinstance(scores_model, dict) or "model" not in scores_model:
            raise DataError(
                f"--scores was made through the Python API with model "
                f"{scores_model!r}, which this command cannot load; give each "
                "--eval as a score directory made with that model"
            )
        encoder = load_model(scores_model["model"], scores_model.get("pretrained"), device)
    return {
        name: embed_eval_set(
            path,
            encoder,
            model_id=scores_model,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=device,
        )
        for name, path, _ in specs
    }


def _cmd_dedup(args: argparse.Namespace) -> int:
    from data_tools.curate.dedup import check_thresholds, dedup_shards
    from data_tools.curate.scoredir import read_scores

    check_thresholds(args.threshold, args.eval_threshold)
    scores_model = read_scores(args.scores, embeddings=False).model
    evals = _eval_sets(args, scores_model)
    rep = dedup_shards(
        args.shards,
        args.scores,
        args.output,
        threshold=args.threshold,
        eval_sets=evals,
        eval_threshold=args.eval_threshold,
        nprobe=args.nprobe,
        progress=args.progress,
    )
    c = rep["counts"]
    print(
        f"kept {c['kept']} of {c['input']} samples in {args.output}: removed {c['exact']} "
        f"exact and {c['near']} near duplicates (cosine >= {args.threshold}, "
        f"{rep['search']} search), {c['unscored']} unscored"
    )
    for name, n in c["contaminated"].items():
        print(f"  decontamination: {n} matched eval set {name} (cosine >= {args.eval_threshold})")
    print(f"report: {args.output}/report.json; every removed sample in {args.output}/removed.jsonl")
    return 0


def register(
    sub: argparse._SubParsersAction, output: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Add score, filter and dedup to `clip-data`'s subcommands."""

    def loader_flags(p: argparse.ArgumentParser, batch: int) -> None:
        p.add_argument("-b", "--batch-size", type=int, default=batch, help="samples per batch")
        p.add_argument(
            "-j",
            "--num-workers",
            type=int,
            default=2,
            help="loader processes decoding images (0: in this process)",
        )
        p.add_argument("--device", default=None, help="torch device (default: cuda if present)")

    p = add_subcommand(
        sub,
        "score",
        _cmd_score,
        help="image-text cosine of every sample, plus image/text embeddings",
        description="Encode every image and caption of SHARDS with any model clip-eval loads "
        "(a run, an export, or an open_clip architecture with --pretrained FILE). Writes "
        "OUTPUT/scores.npy, image_emb.npy, text_emb.npy (float16), keys.jsonl and info.json "
        "(last). Resumes where it stopped (per shard); under torchrun or accelerate launch "
        "each process scores its share of the shards.",
        epilog="example:\n  clip-data score data/synth/train --model demo_out/runs/demo "
        "--output data/scores\n  torchrun --nproc-per-node 4 -m data_tools score "
        "data/laion/train --model ViT-B-32 --pretrained vitb32.pt --output data/laion-scores",
    )
    p.add_argument("shards", metavar="SHARDS")
    p.add_argument("--model", required=True, help="run/export directory or open_clip architecture")
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="FILE",
        help="local open_clip weight file (with an architecture name)",
    )
    output(p)
    loader_flags(p, 256)
    p.add_argument(
        "--no-trim-text",
        action="store_true",
        help="run open_clip text towers over the full context (by default the "
        "padding after each batch's longest caption is skipped; ours always skip it)",
    )

    p = add_subcommand(
        sub,
        "filter",
        _cmd_filter,
        help="keep samples by CLIP score, caption words and image side",
        description="Writes OUTPUT/train-NNNNNN.tar (the kept samples of input shard N, "
        "byte for byte), report.json (counts by reason), score_hist.png and sheets of the "
        "lowest-scored kept and highest-scored removed pairs. Resumable; a rerun with other "
        "options into the same OUTPUT is refused.",
        epilog="example:\n  clip-data filter data/synth/train --scores data/scores "
        "--keep-fraction 0.3 --output data/filtered\n  clip-data filter data/laion/train "
        "--scores data/laion-scores --min-score 0.28 --min-caption-words 2 --min-side 128 "
        "--output data/laion-f",
    )
    p.add_argument("shards", metavar="SHARDS")
    p.add_argument("--scores", required=True, metavar="DIR", help="`clip-data score` output")
    output(p)
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--min-score", type=float, default=None, help="keep cosine >= X, in [-1, 1]")
    cut.add_argument(
        "--keep-fraction",
        type=float,
        default=None,
        help="keep the best-scored fraction F of the samples, in (0, 1]",
    )
    p.add_argument("--min-caption-words", type=int, default=0, help="fewer words: removed")
    p.add_argument(
        "--min-side", type=int, default=0, help="images whose shorter side is smaller (px): removed"
    )

    p = add_subcommand(
        sub,
        "dedup",
        _cmd_dedup,
        help="remove exact/near duplicates and eval-set look-alikes (decontamination)",
        description="Groups samples with equal image bytes or image-embedding cosine >= "
        "--threshold and keeps the best-scored of each group (then the lowest shard, key). "
        "With --eval, removes training samples whose image is within --eval-threshold of an "
        "image of that eval set (embedded with the model of --scores). Writes shards as "
        "`filter` does, report.json and removed.jsonl.",
        epilog="example:\n  clip-data dedup data/filtered --scores data/filtered-scores "
        "--output data/dedup --eval data/synth/zeroshot --eval data/synth/retrieval\n"
        "  clip-data dedup data/laion/train --scores data/laion-scores --output data/laion-d "
        "--eval in1k=imagenet/val --threshold 0.96",
    )
    p.add_argument("shards", metavar="SHARDS")
    p.add_argument("--scores", required=True, metavar="DIR", help="`clip-data score` output")
    output(p)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="near duplicates: image-embedding cosine at least this",
    )
    p.add_argument(
        "--eval",
        action="append",
        metavar="[NAME=]PATH",
        help="eval set to decontaminate against (shards, image folder, or a score "
        "directory); repeatable",
    )
    p.add_argument(
        "--eval-threshold",
        type=float,
        default=0.95,
        help="cosine to an eval image at which a training sample is removed",
    )
    p.add_argument(
        "--nprobe",
        type=int,
        default=3,
        help="above 50,000 samples: k-means cells each sample is compared in "
        "(more: slower, misses fewer near pairs)",
    )
    loader_flags(p, 256)
