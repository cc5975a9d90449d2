"""`clip-data`: make and check WebDataset shards.

    clip-data synth --out data/synth          # the embedded procedural dataset
    clip-data inspect data/synth/train        # samples per shard, caption lengths

Errors a user can fix print one line (`error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from data_tools.errors import ClipTrainError

log = logging.getLogger(__name__)


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_tools.synth import SynthConfig, write_synth

    cfg = SynthConfig(
        seed=args.seed,
        train_samples=args.train_samples,
        zeroshot_per_class=args.zeroshot_per_class,
        retrieval_samples=args.retrieval_samples,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
    )
    start = time.perf_counter()
    manifest = write_synth(args.out, cfg, progress=not args.quiet)
    took = time.perf_counter() - start
    counts = manifest["counts"]
    print(
        f"wrote {counts['train']} train, {counts['zeroshot']} zeroshot "
        f"({len(manifest['classnames'])} classes), {counts['retrieval']} retrieval samples "
        f"to {args.out} in {took:.1f}s"
    )
    print(f"held out of train: {', '.join(manifest['held_out_classes']) or 'none'}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from data_tools.inspect_shards import inspect_shards

    stats = inspect_shards(args.shards)
    width = max(len(s) for s, _ in stats.shards)
    for shard, n in stats.shards:
        print(f"{shard:<{width}}  {n:>8d}")
    print(f"{'total':<{width}}  {stats.total:>8d}  ({len(stats.shards)} shards)")
    if stats.chars is None:
        print("captions: none (no .txt members)")
    else:
        c, w = stats.chars, stats.words
        assert w is not None
        print(
            f"captions: {stats.with_caption}; length in chars min/mean/max "
            f"{c[0]}/{c[1]:.1f}/{c[2]}, in words {w[0]}/{w[1]:.1f}/{w[2]}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so docs and tests can read it)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="clip-data",
        description="Make and check WebDataset image-caption shards.",
        formatter_class=fmt,
        epilog="example:\n  clip-data synth --out data/synth\n  clip-data inspect data/synth/train",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="write the embedded procedural shapes dataset (no download)",
        description="Write train/, zeroshot/ and retrieval/ shards of coloured shapes with "
        "attribute captions, plus manifest.json. Same seed, same bytes.",
        formatter_class=fmt,
        epilog="example:\n  clip-data synth --out data/synth --seed 0 --train-samples 20000",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--zeroshot-per-class", type=int, default=20, help="images per class (36)")
    p.add_argument("--retrieval-samples", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser(
        "inspect",
        help="count samples per shard and measure caption lengths",
        description="SHARDS is a directory, a brace pattern, a glob, a file or a "
        "'::'-separated list of those.",
        formatter_class=fmt,
        epilog="example:\n  clip-data inspect data/synth/train\n"
        "  clip-data inspect 'data/synth/train/train-{000000..000004}.tar'",
    )
    p.add_argument("shards", metavar="SHARDS")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-data`; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except ClipTrainError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
