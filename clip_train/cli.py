"""`clip-train`: train, resume, export and report. The CLI decides what the user sees.

    clip-train train --config configs/demo.yaml data.train=data/train train.steps=500
    clip-train resume demo_out/runs/demo
    clip-train export demo_out/runs/demo --output exports/demo
    clip-train report demo_out/runs/demo
    clip-train embed demo_out/runs/demo/export --data demo_out/data/retrieval --output emb/demo
    clip-train index emb/demo && clip-train search emb/demo --text "a red circle"

Shared flags (-v, -q, --no-progress, --version), one-line errors (exit 2) and the dispatch are
those of every clip-* command (data_tools.cli_common).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from data_tools.cli_common import add_option, add_subcommand, make_parser, run
from data_tools.errors import ClipTrainError

log = logging.getLogger("clip_train")


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines a user reads after a run."""
    lines = [
        f"run:           {summary['run_dir']}",
        f"steps:         {summary['steps']}  (samples seen {summary['samples_seen']:,}, "
        f"{summary['train_seconds']} s training)",
    ]
    if summary.get("final_loss") is not None:
        lines.append(f"final loss:    {summary['final_loss']:.4f}")
    results = summary.get("eval", {})
    zs = results.get("zeroshot")
    if zs:
        chance = 1.0 / zs["num_classes"] if zs.get("num_classes") else None
        ratio = f"  ({zs['acc1'] / chance:.1f}x chance {chance:.3f})" if chance else ""
        lines.append(f"zero-shot:     top-1 {zs['acc1']:.3f}  top-5 {zs['acc5']:.3f}{ratio}")
    rt = results.get("retrieval")
    if rt:
        lines.append(
            f"retrieval:     image->text R@1 {rt['text_retrieval_recall@1']:.3f}"
            f" R@5 {rt['text_retrieval_recall@5']:.3f}"
            f" | text->image R@1 {rt['image_retrieval_recall@1']:.3f}"
            f" R@5 {rt['image_retrieval_recall@5']:.3f}"
            + (f"  (chance R@1 {1 / rt['num_images']:.4f})" if rt.get("num_images") else "")
        )
    for name, metrics in results.items():
        if name not in ("zeroshot", "retrieval"):  # eval suite tasks
            shown = ", ".join(
                f"{k} {v:.3f}"
                for k, v in metrics.items()
                if isinstance(v, float) and not k.startswith("num_")
            )
            lines.append(f"{name + ':':<15}{shown}")
    lines.append(f"checkpoint:    {summary['checkpoint']}")
    if summary.get("export_dir"):
        lines.append(f"export:        {summary['export_dir']}  (load with clip_train.load)")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from clip_train.config import load_config

    cfg = load_config(args.config, args.overrides)
    return _run(
        cfg, resume=args.resume, as_json=args.json, overwrite=args.overwrite, progress=args.progress
    )


def cmd_resume(args: argparse.Namespace) -> int:
    from clip_train.config import load_config

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ClipTrainError(
            f"{run_dir} is not a run directory (no config.yaml); start it with `clip-train train`"
        )
    cfg = load_config(saved, args.overrides)
    return _run(cfg, resume=True, as_json=args.json, progress=args.progress)


def _run(cfg, resume: bool, as_json: bool, overwrite: bool = False, progress: bool = True) -> int:
    from clip_train.preempt import PREEMPTED_EXIT_CODE
    from clip_train.train import train

    summary = train(cfg, resume=resume, overwrite=overwrite, progress=progress)
    main_process = os.environ.get("RANK", "0") == "0"
    if summary.get("preempted"):
        if main_process and as_json:
            print(json.dumps(summary, indent=1))
        elif main_process:
            print(
                f"preempted ({summary['preempted']}) after step {summary['steps']}: checkpoint "
                f"{summary['checkpoint']}; continue with `clip-train resume "
                f"{summary['run_dir']}` (exit code {PREEMPTED_EXIT_CODE})",
                file=sys.stderr,
            )
        return PREEMPTED_EXIT_CODE
    if main_process:
        print(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clip_train.export import export_model, load_model

    model = load_model(args.path)
    out = Path(args.output) if args.output else Path(args.path) / "export"
    export_model(model, out)
    info = json.loads((out / "export_info.json").read_text())
    print(f"exported to {out}")
    if args.onnx:
        from clip_train.onnx_export import export_onnx

        for path in export_onnx(model, out / "onnx").values():
            print(f"wrote {path}")
    if not info["open_clip"]:
        print(f"no open_clip export: {info['open_clip_reason']}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    import clip_train
    from clip_train.embed import embed_shards
    from data_tools.loader import count_samples
    from data_tools.progress import progress

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = clip_train.load(args.model, device=args.device)
    total = count_samples(args.data)
    with progress(total=total, unit="sample", desc="embed", enabled=args.progress) as bar:
        info = embed_shards(
            encoder,
            args.data,
            args.output,
            model_path=str(Path(args.model).resolve()),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            progress=bar,
        )
    print(f"{info['count']} image and text embeddings (dim {info['dim']}) in {args.output}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from clip_train.embed import build_index

    for path in build_index(args.emb_dir, args.modality, kind=args.kind):
        print(f"wrote {path}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    import clip_train
    from clip_train.embed import read_info, search

    if (args.text is None) == (args.image is None):
        raise ClipTrainError(
            "give exactly one query: --text 'a caption' or --image path/to/image.jpg"
        )
    if args.text is not None and not args.text.strip():
        raise ClipTrainError("--text is empty: give the caption to search for")
    if args.k < 1:
        raise ClipTrainError(f"-k {args.k}: ask for at least one hit")
    encoder = clip_train.load(args.model or read_info(args.emb_dir)["model"])
    with torch.no_grad():
        if args.text is not None:
            query, default_target = encoder.embed_texts([args.text])[0], "image"
        else:
            path = Path(args.image)
            if not path.is_file():
                raise ClipTrainError(f"query image not found: {path}")
            query, default_target = encoder.embed_images([Image.open(path)])[0], "text"
    hits = search(args.emb_dir, query, target=args.target or default_target, k=args.k)
    for hit in hits:
        print(
            json.dumps(hit)
            if args.json
            else f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['key']}  {hit['caption']}"
        )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clip_train.report import write_report

    paths = write_report(args.run_dir, args.output)
    print(f"wrote {len(paths)} files to {paths[-1].parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (separate so tests and docs can read it)."""
    parser = make_parser("clip-train", "Contrastive image-text pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    def output(p: argparse.ArgumentParser, **kwargs: Any) -> None:
        add_option(p, "--output", aliases=["--out"], metavar="DIR", **kwargs)

    p = add_subcommand(
        sub,
        "train",
        cmd_train,
        help="train a model from a YAML config",
        epilog="example:\n  clip-train train --config configs/demo.yaml "
        "data.train=demo_out/data/train train.steps=200 run.name=try1",
    )
    p.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run's latest checkpoint if there is one",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="the run directory holds an earlier run: remove its checkpoints, metrics "
        "and eval results (other files stay) and start over",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")

    p = add_subcommand(
        sub,
        "resume",
        cmd_resume,
        help="continue a run exactly from its latest checkpoint",
        epilog="example:\n  clip-train resume demo_out/runs/demo            # same config\n"
        "  clip-train resume demo_out/runs/demo train.steps=2000   # extend the run",
    )
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")

    p = add_subcommand(
        sub,
        "export",
        cmd_export,
        help="write the towers (ours, timm, open_clip formats)",
        epilog="example:\n  clip-train export demo_out/runs/demo --output exports/demo\n"
        "  clip-train export demo_out/runs/demo --onnx\n"
        "  python -c \"import clip_train; enc = clip_train.load('exports/demo')\"",
    )
    p.add_argument("path", help="run dir, checkpoint dir or export dir")
    output(p, help="output dir (default: <path>/export)")
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write onnx/image_encoder.onnx and onnx/text_encoder.onnx",
    )

    p = add_subcommand(
        sub,
        "embed",
        cmd_embed,
        help="image and text embeddings of a shard set (.npy + metadata)",
        epilog="example:\n  clip-train embed demo_out/runs/demo/export "
        "--data demo_out/data/retrieval "
        "--output emb/demo",
    )
    p.add_argument("model", help="export dir, run dir or checkpoint dir")
    p.add_argument("--data", required=True, help="shard spec: dir, brace pattern, glob or a::b")
    output(p, required=True, help="output dir")
    p.add_argument("-b", "--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("-j", "--num-workers", type=int, default=0, help="data loader processes")
    p.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when there is a GPU, else cpu)",
    )

    p = add_subcommand(
        sub,
        "index",
        cmd_index,
        help="faiss index over an embedding dir",
        epilog="example:\n  clip-train index emb/demo\n"
        "  clip-train index emb/demo --kind ivf --modality image",
    )
    p.add_argument("emb_dir", help="output of clip-train embed")
    p.add_argument(
        "--kind",
        choices=["flat", "ivf"],
        default="flat",
        help="flat: exact; ivf: faster, approximate",
    )
    p.add_argument(
        "--modality",
        nargs="+",
        choices=["image", "text"],
        default=["image", "text"],
        help="which embeddings to index",
    )

    p = add_subcommand(
        sub,
        "search",
        cmd_search,
        help="nearest images (or captions) to a text or image query",
        epilog="example:\n  clip-train search emb/demo --text 'two small red circles on the left' "
        "-k 5\n  clip-train search emb/demo --image query.jpg --target image",
    )
    p.add_argument("emb_dir", help="output of clip-train embed (and index)")
    p.add_argument("--text", help="text query")
    p.add_argument("--image", help="image query (path)")
    p.add_argument(
        "--target", choices=["image", "text"], help="what to search (default: the other modality)"
    )
    p.add_argument("-k", type=int, default=5, help="number of hits")
    p.add_argument("--model", help="model path (default: the one that made the embeddings)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")

    p = add_subcommand(
        sub,
        "report",
        cmd_report,
        help="PNG plots and a summary of a run's metrics.jsonl",
        epilog="example:\n  clip-train report demo_out/runs/demo\n"
        "  clip-train report demo_out/runs/demo --output /tmp/demo_report",
    )
    p.add_argument("run_dir")
    output(p, help="output dir (default: <run_dir>/report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `clip-train`; returns the exit status (2: a user error, 130: Ctrl-C)."""
    return run(
        build_parser(),
        argv,
        main_process=os.environ.get("RANK", "0") == "0",
        interrupted="interrupted: the last complete checkpoint is intact; "
        "continue with `clip-train resume`",
    )


if __name__ == "__main__":
    sys.exit(main())
