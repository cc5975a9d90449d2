"""`clip-train`: train, resume, export and report. The CLI decides what the user sees.

    clip-train train --config configs/demo.yaml data.train=data/train train.steps=500
    clip-train resume runs/demo
    clip-train export runs/demo --out exports/demo
    clip-train report runs/demo
    clip-train embed runs/demo/export --data demo_out/data/retrieval --out emb/demo
    clip-train index emb/demo && clip-train search emb/demo --text "a red circle"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from data_tools.errors import ClipTrainError

log = logging.getLogger("clip_train")


def _setup_logging(verbose: bool) -> None:
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if (verbose and main_process) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def format_summary(summary: Dict[str, Any]) -> str:
    """The few lines a user reads after a run."""
    lines = [f"run:           {summary['run_dir']}",
             f"steps:         {summary['steps']}  (samples seen {summary['samples_seen']:,}, "
             f"{summary['train_seconds']} s training)"]
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
        lines.append(f"retrieval:     image->text R@1 {rt['text_retrieval_recall@1']:.3f} R@5 {rt['text_retrieval_recall@5']:.3f}"
                     f" | text->image R@1 {rt['image_retrieval_recall@1']:.3f} R@5 {rt['image_retrieval_recall@5']:.3f}"
                     + (f"  (chance R@1 {1 / rt['num_images']:.4f})" if rt.get("num_images") else ""))
    for name, metrics in results.items():
        if name not in ("zeroshot", "retrieval"):  # eval suite tasks
            shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                              if isinstance(v, float) and not k.startswith("num_"))
            lines.append(f"{name + ':':<15}{shown}")
    lines.append(f"checkpoint:    {summary['checkpoint']}")
    if summary.get("export_dir"):
        lines.append(f"export:        {summary['export_dir']}  (load with clip_train.load)")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    from clip_train.config import load_config

    cfg = load_config(args.config, args.overrides)
    return _run(cfg, resume=args.resume, as_json=args.json, overwrite=args.overwrite)


def cmd_resume(args: argparse.Namespace) -> int:
    from clip_train.config import load_config

    run_dir = Path(args.run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ClipTrainError(f"{run_dir} is not a run directory (no config.yaml); start it with `clip-train train`")
    cfg = load_config(saved, args.overrides)
    return _run(cfg, resume=True, as_json=args.json)


def _run(cfg, resume: bool, as_json: bool, overwrite: bool = False) -> int:
    from clip_train.preempt import PREEMPTED_EXIT_CODE
    from clip_train.train import train

    summary = train(cfg, resume=resume, overwrite=overwrite)
    main_process = os.environ.get("RANK", "0") == "0"
    if summary.get("preempted"):
        if main_process and as_json:
            print(json.dumps(summary, indent=1))
        elif main_process:
            print(f"preempted ({summary['preempted']}) after step {summary['steps']}: checkpoint "
                  f"{summary['checkpoint']}; continue with `clip-train resume "
                  f"{summary['run_dir']}` (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if main_process:
        print(json.dumps(summary, indent=1) if as_json else format_summary(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clip_train.export import export_model, load_model

    model = load_model(args.path)
    out = Path(args.out) if args.out else Path(args.path) / "export"
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
    from tqdm import tqdm

    import clip_train
    from clip_train.embed import embed_shards
    from data_tools.loader import count_samples

    encoder = clip_train.load(args.model, device=args.device)
    with tqdm(total=count_samples(args.data), unit="sample", desc="embed", disable=args.quiet) as bar:
        info = embed_shards(encoder, args.data, args.out, model_path=str(Path(args.model).resolve()),
                            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                            progress=bar)
    print(f"{info['count']} image and text embeddings (dim {info['dim']}) in {args.out}")
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
        raise ClipTrainError("give exactly one query: --text 'a caption' or --image path/to/image.jpg")
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
        print(json.dumps(hit) if args.json else f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['key']}  {hit['caption']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clip_train.report import write_report

    paths = write_report(args.run_dir, args.out)
    print(f"wrote {len(paths)} files to {paths[-1].parent}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-train", description="Contrastive image-text pretraining.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors in the log")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("train", help="train a model from a YAML config", formatter_class=fmt,
                       epilog="example:\n  clip-train train --config configs/demo.yaml data.train=demo_out/data/train "
                              "train.steps=200 run.name=try1")
    p.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint if there is one")
    p.add_argument("--overwrite", action="store_true",
                   help="the run directory holds an earlier run: remove its checkpoints, metrics and eval "
                        "results (other files stay) and start over")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", help="continue a run exactly from its latest checkpoint", formatter_class=fmt,
                       epilog="example:\n  clip-train resume runs/demo            # same config\n"
                              "  clip-train resume runs/demo train.steps=2000   # extend the run")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("export", help="write the towers (ours, timm, open_clip formats)", formatter_class=fmt,
                       epilog="example:\n  clip-train export runs/demo --out exports/demo\n  clip-train export runs/demo --onnx\n"
                              "  python -c \"import clip_train; enc = clip_train.load('exports/demo')\"")
    p.add_argument("path", help="run dir, checkpoint dir or export dir")
    p.add_argument("--out", help="output dir (default: <path>/export)")
    p.add_argument("--onnx", action="store_true", help="also write onnx/image_encoder.onnx and onnx/text_encoder.onnx")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="image and text embeddings of a shard set (.npy + metadata)",
                       formatter_class=fmt,
                       epilog="example:\n  clip-train embed runs/demo/export --data demo_out/data/retrieval --out emb/demo")
    p.add_argument("model", help="export dir, run dir or checkpoint dir")
    p.add_argument("--data", required=True, help="shard spec: dir, brace pattern, glob or a::b")
    p.add_argument("--out", required=True, help="output dir")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("index", help="faiss index over an embedding dir", formatter_class=fmt,
                       epilog="example:\n  clip-train index emb/demo\n  clip-train index emb/demo --kind ivf --modality image")
    p.add_argument("emb_dir")
    p.add_argument("--kind", choices=["flat", "ivf"], default="flat", help="flat: exact; ivf: faster, approximate")
    p.add_argument("--modality", nargs="+", choices=["image", "text"], default=["image", "text"])
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="nearest images (or captions) to a text or image query", formatter_class=fmt,
                       epilog="example:\n  clip-train search emb/demo --text 'two small red circles on the left' -k 5\n"
                              "  clip-train search emb/demo --image query.jpg --target image")
    p.add_argument("emb_dir")
    p.add_argument("--text", help="text query")
    p.add_argument("--image", help="image query (path)")
    p.add_argument("--target", choices=["image", "text"], help="what to search (default: the other modality)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--model", help="model path (default: the one that made the embeddings)")
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("report", help="PNG plots and a summary of a run's metrics.jsonl", formatter_class=fmt,
                       epilog="example:\n  clip-train report runs/demo\n  clip-train report runs/demo --out /tmp/demo_report")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output dir (default: <run_dir>/report)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(verbose=not args.quiet)
    try:
        return args.func(args)
    except ClipTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; continue with `clip-train resume`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
