"""`clip-eval`: zero-shot classification and retrieval of a trained or open_clip model.

    clip-eval zero-shot --model runs/demo --data demo_out/data/zeroshot
    clip-eval retrieval --model ViT-B-32 --pretrained ~/weights/vit_b32.pt --data coco/{000..004}.tar

`--model` is our run or export directory (loaded with `clip_train.load`), or an open_clip
architecture name together with `--pretrained FILE` (a local weight file; nothing is downloaded).
Metrics go to stdout as JSON, and atomically to `--output` when given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from data_tools.errors import ClipTrainError, DataError
from eval.encoder import Encoder, load_open_clip
from eval.tasks import retrieval_task, zero_shot_task

logger = logging.getLogger(__name__)

_EPILOGS = {
    "zero-shot": (
        "examples:\n"
        "  clip-eval zero-shot --model runs/demo --data demo_out/data/zeroshot\n"
        "  clip-eval zero-shot --model ViT-B-32 --pretrained vit_b32.pt --data imagenet_val/ \\\n"
        "      --classnames imagenet_classes.txt --templates imagenet_templates.txt --output in1k.json\n"
        "class names and templates default to classnames.txt and templates.txt next to the shards;\n"
        "templates hold one '{}' for the class name, e.g. 'a photo of a {}.'"
    ),
    "retrieval": (
        "examples:\n"
        "  clip-eval retrieval --model runs/demo --data demo_out/data/retrieval\n"
        "  clip-eval retrieval --model ViT-B-32 --pretrained vit_b32.pt --data 'coco/val-{000000..000004}.tar'\n"
        "captions come from each sample's json \"captions\" list when present, else its .txt"
    ),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run/export directory, or an open_clip architecture name with --pretrained")
    p.add_argument("--pretrained", default=None, metavar="FILE", help="local open_clip weight file for --model NAME")
    p.add_argument("--data", required=True, metavar="SHARDS", help="shard directory, brace pattern, glob or file")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader worker processes (default 0)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the metrics here (atomically)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="clip-eval",
        description="Evaluate a CLIP-style encoder: zero-shot classification or image-text retrieval.",
        epilog=(
            "examples:\n"
            "  clip-eval zero-shot --model runs/demo --data demo_out/data/zeroshot\n"
            "  clip-eval retrieval --model ViT-B-32 --pretrained vit_b32.pt --data demo_out/data/retrieval\n"
            "run 'clip-eval SUBCOMMAND --help' for its options"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{zero-shot,retrieval}")
    zs = sub.add_parser(
        "zero-shot",
        help="zero-shot classification accuracy on labelled shards",
        description="Zero-shot classification: acc1, acc5, mean per-class recall.",
        epilog=_EPILOGS["zero-shot"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(zs)
    zs.add_argument("--classnames", default=None, metavar="FILE", help="class names, one per line (default: DATA/classnames.txt)")
    zs.add_argument("--templates", default=None, metavar="FILE", help="prompt templates with '{}', one per line (default: DATA/templates.txt)")
    rt = sub.add_parser(
        "retrieval",
        help="image<->text recall@1/5/10 on caption shards",
        description="Zero-shot retrieval: image_retrieval_recall@k (text->image), text_retrieval_recall@k (image->text).",
        epilog=_EPILOGS["retrieval"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common(rt)
    return parser


def load_encoder(model: str, pretrained: str | None, device: str) -> Encoder:
    """Our run/export directory via `clip_train.load`, or an open_clip architecture + local file."""
    if pretrained is not None:
        return load_open_clip(model, pretrained, device)
    if not os.path.exists(model):
        raise DataError(
            f"--model {model}: no such run or export directory "
            f"(for an open_clip architecture, also pass --pretrained FILE)"
        )
    import clip_train  # only here: eval knows nothing of training except how to load its output

    return clip_train.load(model, device=device)


def _write_json_atomic(path: str, obj: dict) -> None:
    """Temp file in the same directory, then `os.replace`: readers see old or whole new content."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise DataError(f"--output {path}: cannot write there ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run(args: argparse.Namespace) -> dict:
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise DataError(f"--device {args.device}: not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.batch_size < 1 or args.num_workers < 0:
        raise DataError("--batch-size must be >= 1 and --num-workers >= 0")
    # Resolve the data before loading a possibly large model, so a typo fails fast.
    from data_tools.loader import expand_shards

    expand_shards(args.data)
    encoder = load_encoder(args.model, args.pretrained, str(device))
    opts = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device)
    if args.command == "zero-shot":
        return zero_shot_task(encoder, args.data, classnames=args.classnames, templates=args.templates, **opts)
    return retrieval_task(encoder, args.data, **opts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-eval`; returns the exit status (2 for a user error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        metrics = _run(args)
        if args.output:
            _write_json_atomic(args.output, metrics)
    except ClipTrainError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
