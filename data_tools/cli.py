"""`clip-data`: make and check WebDataset shards.

    clip-data synth --output data/synth                  # the embedded procedural dataset
    clip-data build photos/ --output data/mine           # images + same-named .txt captions
    clip-data build pairs.parquet --output data/mine     # a CSV/TSV/JSONL/parquet table
    clip-data build img2dataset_out/ --output data/mine  # img2dataset output, re-sharded
    clip-data from-imagefolder imagenet/val --output data/in1k-val
    clip-data inspect data/mine/train                    # counts, histograms, problems
    clip-data validate data/mine/train                   # + decode every image; exit 1 if bad
    clip-data reshard data/mine/train --output data/mine256 --max-side 256
    clip-data score data/mine/train --model RUN --output data/scores   # curation: docs/curation.md
    clip-data filter data/mine/train --scores data/scores --keep-fraction 0.3 --output data/f
    clip-data dedup data/f --scores data/f-scores --eval data/synth/zeroshot --output data/d

Errors a user can fix print one line (`error: ...`) and exit with status 2; `validate` exits
with status 1 when it finds bad samples. Shared flags (-v, -q, --no-progress, --version) and
the dispatch are those of every clip-* command (data_tools.cli_common).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from data_tools.cli_common import add_option, add_subcommand, make_parser, run

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
    manifest = write_synth(args.output, cfg, progress=args.progress)
    took = time.perf_counter() - start
    counts = manifest["counts"]
    print(
        f"wrote {counts['train']} train, {counts['zeroshot']} zeroshot "
        f"({len(manifest['classnames'])} classes), {counts['retrieval']} retrieval samples "
        f"to {args.output} in {took:.1f}s"
    )
    print(f"held out of train: {', '.join(manifest['held_out_classes']) or 'none'}")
    return 0


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _print_build_summary(manifest: dict, out: str, took: float, what: str = "wrote") -> None:
    splits = manifest["splits"]
    parts = ", ".join(f"{name} {info['samples']}" for name, info in splits.items())
    n_shards = sum(len(info["shards"]) for info in splits.values())
    print(
        f"{what} {manifest['written']} samples in {_n(n_shards, 'shard')} to {out} ({parts}) "
        f"in {took:.1f}s"
    )
    skipped = manifest.get("skipped") or {}
    if skipped:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items(), key=lambda kv: -kv[1]))
        print(f"skipped {sum(skipped.values())} of {manifest['inputs']}: {reasons}")
        for b in manifest.get("bad_samples", [])[:5]:
            print(f"  {b['key']} ({b['reason']}) {b['source']}: {b['detail']}")
        if len(manifest.get("bad_samples", [])) > 5:
            print(
                f"  ... the first {len(manifest['bad_samples'])} are listed in {out}/manifest.json"
            )
    else:
        print(f"skipped 0 of {manifest['inputs']}")
    if manifest.get("resumed_shards"):
        print(f"resumed: {manifest['resumed_shards']} shards were already complete")


def _encode_opts(args: argparse.Namespace, **over):
    from data_tools.build import EncodeOptions

    kw = dict(max_side=args.max_side, jpeg_quality=args.jpeg_quality)
    if args.max_pixels is not None:
        kw["max_pixels"] = args.max_pixels
    kw.update(over)
    return EncodeOptions(**kw)


def _cmd_build(args: argparse.Namespace) -> int:
    from data_tools.build import build

    opts = _encode_opts(
        args, min_caption_len=args.min_caption_len, max_caption_len=args.max_caption_len
    )
    start = time.perf_counter()
    manifest = build(
        args.input,
        args.output,
        samples_per_shard=args.samples_per_shard,
        opts=opts,
        shuffle=args.shuffle,
        seed=args.seed,
        val_fraction=args.val_fraction,
        num_workers=args.num_workers,
        image_col=args.image_column,
        caption_col=args.caption_column,
        key_col=args.key_column,
        image_root=args.image_root,
        reuse=args.reuse,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    took = time.perf_counter() - start
    kind = manifest["input"]["kind"]
    if manifest.get("reused"):
        train = manifest["splits"]["train"]
        print(
            f"reused {train['samples']} samples in {len(train['shards'])} shards of {kind} "
            f"output {train['path']} as is (manifest in {args.output}); use it as data.train"
        )
    else:
        _print_build_summary(manifest, args.output, took)
    stats = manifest["input"].get("img2dataset")
    if stats:
        ok, n = stats.get("successes"), stats.get("count")
        if ok is not None and n is not None:
            print(
                f"img2dataset: {ok} of {n} downloaded "
                f"({stats.get('failed_to_download', 0)} failed to download, "
                f"{stats.get('failed_to_resize', 0)} failed to resize)"
            )
        for err, c in (stats.get("top_errors") or {}).items():
            print(f"  {c} x {err}")
    return 0


def _cmd_from_imagefolder(args: argparse.Namespace) -> int:
    from data_tools.imagefolder import from_imagefolder

    opts = _encode_opts(args, require_caption=False, min_caption_len=0)
    start = time.perf_counter()
    manifest = from_imagefolder(
        args.root,
        args.output,
        samples_per_shard=args.samples_per_shard,
        opts=opts,
        prefix=args.prefix,
        classnames_file=args.classnames,
        shuffle=args.shuffle,
        seed=args.seed,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    _print_build_summary(manifest, args.output, time.perf_counter() - start)
    print(
        f"classes: {manifest['num_classes']} ({manifest['classes']}; {manifest['folders']} "
        f"folders); wrote classnames.txt and templates.txt beside the shards"
    )
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from data_tools.reshard import reshard

    start = time.perf_counter()
    manifest = reshard(
        args.shards,
        args.output,
        samples_per_shard=args.samples_per_shard,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        max_pixels=args.max_pixels,
        prefix=args.prefix,
        shuffle=args.shuffle,
        seed=args.seed,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        progress=args.progress,
    )
    _print_build_summary(manifest, args.output, time.perf_counter() - start)
    return 0


def _bars(rows: list[tuple[str, int]], indent: str = "  ") -> list[str]:
    nonzero = [i for i, (_, c) in enumerate(rows) if c]
    rows = rows[nonzero[0] : nonzero[-1] + 1] if nonzero else rows[:0]
    top = max((c for _, c in rows), default=0)
    width = max((len(label) for label, _ in rows), default=0)
    return [
        f"{indent}{label:>{width}}  {c:>8d}  {'#' * (round(40 * c / top) if top else 0)}".rstrip()
        for label, c in rows
    ]


def _print_stats(stats) -> None:
    from data_tools.inspect_shards import CAPTION_EDGES, SIDE_EDGES, histogram

    width = max(len(s) for s, _ in stats.shards)
    for shard, n in stats.shards:
        print(f"{shard:<{width}}  {n:>8d}")
    print(f"{'total':<{width}}  {stats.total:>8d}  ({_n(len(stats.shards), 'shard')})")
    if stats.chars is None:
        print("captions: none (no .txt members)")
    else:
        c, w = stats.chars, stats.words
        assert w is not None
        print(
            f"captions: {stats.with_caption}; length in chars min/mean/max "
            f"{c[0]}/{c[1]:.1f}/{c[2]}, in words {w[0]}/{w[1]:.1f}/{w[2]}"
        )
        print("caption length (chars):")
        print("\n".join(_bars(histogram(stats.caption_chars, CAPTION_EDGES))))
    if stats.with_label:
        print(f"labels (.cls): {stats.with_label}")
    if stats.image_sizes:
        ws = sorted(w for w, _ in stats.image_sizes)
        hs = sorted(h for _, h in stats.image_sizes)
        mid = len(ws) // 2
        print(
            f"images: {len(ws)}; width min/median/max {ws[0]}/{ws[mid]}/{ws[-1]}, "
            f"height {hs[0]}/{hs[mid]}/{hs[-1]}"
        )
        print("image size (shorter side, px):")
        sides = [min(w, h) for w, h in stats.image_sizes]
        print("\n".join(_bars(histogram(sides, SIDE_EDGES))))
    counts = stats.problem_counts()
    if not counts:
        print(
            "problems: none"
            + (
                ""
                if stats.decoded
                else " found without decoding (`clip-data validate` decodes every image)"
            )
        )
    else:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"problems: {sum(counts.values())} bad samples ({reasons})")


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from data_tools.inspect_shards import inspect_shards, stats_json

    stats = inspect_shards(
        args.shards, num_workers=args.num_workers, progress=args.progress and not args.json
    )
    if args.json:
        print(json.dumps(stats_json(stats), indent=2))
        return 0
    _print_stats(stats)
    if stats.bad:
        print(f"list them with `clip-data validate {args.shards}`")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import json

    from data_tools.inspect_shards import inspect_shards
    from data_tools.io import write_text_atomic

    stats = inspect_shards(
        args.shards,
        decode=True,
        num_workers=args.num_workers,
        max_pixels=args.max_pixels,
        progress=args.progress,
    )
    _print_stats(stats)
    bad = stats.bad
    if args.report:
        write_text_atomic(
            args.report,
            "".join(
                json.dumps({"shard": p.shard, "key": p.key, "reason": p.reason, "detail": p.detail})
                + "\n"
                for p in bad
            ),
        )
    if not bad:
        print(f"valid: {stats.total} samples in {_n(len(stats.shards), 'shard')}")
        return 0
    print(f"bad samples ({len(bad)}):")
    for p in bad[: args.max_list]:
        print(f"  {p.line()}")
    if len(bad) > args.max_list:
        more = f"; all in {args.report}" if args.report else "; --report FILE lists them all"
        print(f"  ... and {len(bad) - args.max_list} more{more}")
    print(
        f"invalid: {len(bad)} bad samples of {stats.total}; the loader skips them, or rebuild "
        "with `clip-data build`/`reshard` (which drop them)",
        file=sys.stderr,
    )
    return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so docs and tests can read it)."""
    parser = make_parser(
        "clip-data",
        "Make and check WebDataset image-caption shards.",
        epilog="example:\n  clip-data synth --output data/synth\n  clip-data build photos/ "
        "--output data/mine\n  clip-data validate data/mine/train",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def output(p: argparse.ArgumentParser) -> None:
        add_option(
            p, "--output", aliases=["--out"], required=True, metavar="DIR", help="output directory"
        )

    def workers(p: argparse.ArgumentParser, help: str) -> None:
        p.add_argument("-j", "--num-workers", type=int, default=0, help=help)

    p = add_subcommand(
        sub,
        "synth",
        _cmd_synth,
        help="write the embedded procedural shapes dataset (no download)",
        description="Write train/, zeroshot/ and retrieval/ shards of coloured shapes with "
        "attribute captions, plus manifest.json. Same seed, same bytes.",
        epilog="example:\n  clip-data synth --output data/synth --seed 0 --train-samples 20000",
    )
    output(p)
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--train-samples", type=int, default=20000, help="training image-caption pairs")
    p.add_argument("--zeroshot-per-class", type=int, default=20, help="images per class (36)")
    p.add_argument("--retrieval-samples", type=int, default=500, help="retrieval split size")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images (px)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard")

    def encode_flags(p: argparse.ArgumentParser, per_shard: int = 1000) -> None:
        output(p)
        p.add_argument(
            "--samples-per-shard", type=int, default=per_shard, help="samples per .tar shard"
        )
        p.add_argument(
            "--max-side",
            type=int,
            default=None,
            help="shrink images so the longer side is at most this (keeps aspect)",
        )
        p.add_argument(
            "--jpeg-quality",
            type=int,
            default=95,
            help="for images that are re-encoded (resized, rotated, not JPEG/PNG/WebP)",
        )
        p.add_argument(
            "--max-pixels",
            type=int,
            default=None,
            help="skip images with more pixels (default: PIL's bound, ~89M)",
        )
        p.add_argument("--shuffle", action="store_true", help="shuffle sample order (seeded)")
        p.add_argument("--seed", type=int, default=0, help="seed of --shuffle and --val-fraction")
        workers(p, "processes encoding images in parallel (0: in this process)")
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace shards of a different earlier build in --output",
        )

    p = add_subcommand(
        sub,
        "build",
        _cmd_build,
        help="make shards from an image folder, a table, or img2dataset output",
        description="INPUT is (a) a folder of images with same-named .txt captions, (b) a "
        "CSV/TSV/JSONL/parquet table of local image paths + captions (other columns go to "
        "each sample's .json), or (c) an img2dataset output folder (or any folder of .tar "
        "shards), re-sharded through the same filters, or with --reuse used as is. Writes "
        "OUTPUT/train/ (and OUTPUT/val/ with --val-fraction) and OUTPUT/manifest.json. A rerun "
        "with the same inputs and options skips the shards already complete.",
        epilog="example:\n  clip-data build photos/ --output data/mine --max-side 512 "
        "--num-workers 2\n"
        "  clip-data build pairs.csv --output data/mine --image-column filepath "
        "--caption-column title --val-fraction 0.01 --shuffle\n"
        "  clip-data build laion_part/ --output data/laion --reuse",
    )
    p.add_argument("input", metavar="INPUT")
    encode_flags(p)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="this fraction of samples (by seeded key hash) goes to OUTPUT/val/",
    )
    p.add_argument("--min-caption-len", type=int, default=1, help="in characters; shorter: skipped")
    p.add_argument(
        "--max-caption-len", type=int, default=None, help="in characters; longer: skipped"
    )
    add_option(
        p,
        "--image-column",
        aliases=["--image-col"],
        default=None,
        help="table column of image paths "
        "(default: image, image_path, filepath, file, path, filename or img)",
    )
    add_option(
        p,
        "--caption-column",
        aliases=["--caption-col"],
        default=None,
        help="table column of captions (default: caption, text, title or txt)",
    )
    add_option(
        p,
        "--key-column",
        aliases=["--key-col"],
        default=None,
        help="table column of sample keys (default: row)",
    )
    p.add_argument(
        "--image-root",
        default=None,
        help="relative table paths are under this (default: the table's folder)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="img2dataset/shards input: count and check, write only the manifest",
    )

    p = add_subcommand(
        sub,
        "from-imagefolder",
        _cmd_from_imagefolder,
        help="make labelled eval shards from a class-per-folder tree",
        description="ROOT/<class>/<image> to OUTPUT/<prefix>-NNNNNN.tar (key.jpg + key.cls + "
        "key.json) with classnames.txt and templates.txt beside them, as clip-eval zero-shot "
        "reads them. ImageNet synset folders (n01440764 ...) get the standard ImageNet-1k "
        "labels, CLIP class names and the 80 CLIP prompts.",
        epilog="example:\n  clip-data from-imagefolder imagenet/val --output data/in1k-val "
        "--max-side 320 --num-workers 2",
    )
    p.add_argument("root", metavar="ROOT")
    encode_flags(p)
    p.add_argument("--prefix", default="val", help="shard name prefix")
    p.add_argument(
        "--classnames",
        default=None,
        help="file of class names, one per line in label order (default: from "
        "the folders; ImageNet synsets get CLIP's names)",
    )

    p = add_subcommand(
        sub,
        "reshard",
        _cmd_reshard,
        help="rewrite shards with another shard size and/or smaller images",
        description="Every field is carried over; images larger than --max-side are "
        "re-encoded, others copied byte for byte. Bad samples are skipped and counted.",
        epilog="example:\n  clip-data reshard data/mine/train --output data/mine256 "
        "--max-side 256 --samples-per-shard 5000 --prefix train",
    )
    p.add_argument("shards", metavar="SHARDS")
    encode_flags(p)
    p.add_argument("--prefix", default="shard", help="shard name prefix")

    p = add_subcommand(
        sub,
        "inspect",
        _cmd_inspect,
        help="count samples per shard, caption length and image size histograms, problems",
        description="SHARDS is a directory, a brace pattern, a glob, a file or a "
        "'::'-separated list of those. Decodes nothing (use validate for that).",
        epilog="example:\n  clip-data inspect data/synth/train\n"
        "  clip-data inspect 'data/synth/train/train-{000000..000004}.tar' --json",
    )
    p.add_argument("shards", metavar="SHARDS")
    workers(p, "shards read in parallel")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead")

    p = add_subcommand(
        sub,
        "validate",
        _cmd_validate,
        help="inspect + decode every image; list bad samples and exit 1 if any",
        description="Finds duplicate keys, undecodable or oversized images, empty or "
        "non-UTF-8 captions, missing images/captions, bad labels/json, unsafe tar members "
        "and truncated shards. Exit status 0: clean, 1: bad samples (listed), 2: error.",
        epilog="example:\n  clip-data validate data/mine/train --num-workers 2 --report bad.jsonl",
    )
    p.add_argument("shards", metavar="SHARDS")
    workers(p, "shards checked in parallel")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="images with more pixels are bad (default: PIL's bound, ~89M)",
    )
    p.add_argument("--max-list", type=int, default=100, help="bad samples printed")
    p.add_argument("--report", default=None, help="write every bad sample as JSON lines here")

    from data_tools.curate.cli import register

    register(sub, output)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `clip-data`; returns the exit status."""
    return run(build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
