"""Zero-shot benchmark: classifier build time and eval images/s, ours vs OpenCLIP, same run.

    python bench/zero_shot.py                       # 1000 classes x 80 templates (minutes on 2
                                                    # cores)
    python bench/zero_shot.py --quick               # 100 classes x 80 templates, 256 images, 2
                                                    # rounds
    python bench/zero_shot.py --classes 200 --templates 20 --images 512 --device cuda

Models (configs/bench_tiny.yaml's sizes):
- ours: `clip_train.model.build_model` from configs/bench_tiny.yaml, wrapped in `ClipEncoder`;
  our `eval.build_zero_shot_classifier` (prompts sorted by token length, batched by similar
  length; the tower trims padding after each batch's longest prompt).
- OpenCLIP: an open_clip `CustomTextCLIP` custom config of the same sizes whose text tower is
  loaded with OUR text weights, so both sides must give the same classifier (checked to 1e-5);
  built with `open_clip.build_zero_shot_classifier` (10 classes x all templates per forward, all
  padded to the 32-token context). The same OpenCLIP model is also run through our builder
  (`ours_on_open_clip_model`), which shows the trimmed path eval uses for open_clip towers.
- Eval images/s: ONE model (ours) for both loops, on the same generated JPEG class folder and
  the same loader worker count: our `evaluate_zero_shot` over our folder loader vs a plain loop
  (torchvision `ImageFolder`, `DataLoader`, encode, normalize, logits, top-1/top-5), as in
  open_clip_train's zero-shot eval.

Prints one JSON line per figure with both numbers and the ratio (ours / OpenCLIP for speed,
>1 = ours faster): `ratio` from the totals, plus the median and worst of per-round ratios.
The classifier is timed in `--rounds` chunks of classes and the eval in `--eval-rounds` passes,
each side back to back in rotating order, so load from other jobs hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_step import openclip_sizes  # noqa: E402  (bench/, beside this file)

OPEN_CLIP_NAME = "bench-tiny-openclip"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--classes", type=int, default=1000, help="ImageNet classes to use (first N; default 1000)"
    )
    p.add_argument(
        "--templates", type=int, default=80, help="OpenAI templates to use (first N; default 80)"
    )
    p.add_argument(
        "--images", type=int, default=1024, help="images in the eval folder (default 1024)"
    )
    p.add_argument(
        "--batch-size", type=int, default=128, help="eval images per batch (default 128)"
    )
    p.add_argument(
        "--text-batch-size",
        type=int,
        default=1024,
        help="our prompts per text forward (default 1024, as in eval)",
    )
    p.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="eval loader workers, both sides (default: clip-eval zero-shot's, min(4, CPUs // 2))",
    )
    p.add_argument(
        "--rounds", type=int, default=5, help="class chunks timed back to back per side (default 5)"
    )
    p.add_argument(
        "--eval-rounds", type=int, default=5, help="eval passes per side, alternating (default 5)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="100 classes x 80 templates, 256 images")
    p.add_argument("--skip-eval", action="store_true", help="only the classifier build")
    p.add_argument("--skip-classifier", action="store_true", help="only the eval images/s")
    args = p.parse_args()
    if args.quick:
        args.classes, args.images = min(args.classes, 100), min(args.images, 256)
        args.rounds, args.eval_rounds = min(args.rounds, 2), min(args.eval_rounds, 2)
    return args


def _models(device: torch.device):
    import open_clip

    from clip_eval.encoder import OpenClipEncoder
    from clip_train.config import load_config
    from clip_train.encoder import ClipEncoder
    from clip_train.model import build_model

    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", ["data.train=unused"])
    torch.manual_seed(0)
    ours = ClipEncoder(build_model(cfg.model)).to(device).eval()
    oc_cfg = {**openclip_sizes(cfg), "custom_text": True}
    with tempfile.TemporaryDirectory(
        prefix="bench_oc_cfg_"
    ) as cfg_dir:  # read once, at registration
        (Path(cfg_dir) / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(oc_cfg))
        open_clip.add_model_config(Path(cfg_dir) / f"{OPEN_CLIP_NAME}.json")
    oc_model = open_clip.create_model(OPEN_CLIP_NAME, device=device).eval()
    # Same text weights on both sides, so the two classifiers must agree.
    oc_model.text.load_state_dict(ours.model.text.state_dict())
    tokenizer = open_clip.get_tokenizer(OPEN_CLIP_NAME)
    oc_encoder = OpenClipEncoder(oc_model, tokenizer, ours.preprocess).eval()
    return ours, oc_model, oc_encoder, tokenizer


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch threads {torch.get_num_threads()}"
    )


def _summary(times: dict[str, list[float]], ours: str, theirs: str) -> dict:
    """Totals, the ratio of totals and the median/worst of per-round ratios (theirs / ours time)."""
    per_round = sorted(t / o for o, t in zip(times[ours], times[theirs]))
    return {
        "ours_s": round(sum(times[ours]), 3),
        "open_clip_s": round(sum(times[theirs]), 3),
        "ratio": round(sum(times[theirs]) / sum(times[ours]), 3),
        "ratio_median_round": round(per_round[len(per_round) // 2], 3),
        "ratio_worst_round": round(per_round[0], 3),
        "rounds": len(per_round),
    }


def bench_classifier(args, ours, oc_model, oc_encoder, tokenizer, device) -> None:
    """The classes in `--rounds` contiguous chunks, each built by every side back to back.

    Other jobs on a shared machine change its speed by several times within minutes; timing
    both sides on the same chunk, in rotating order, keeps each round's ratio fair. The chunks'
    class embeddings are independent, so their concatenation is the whole classifier.
    """
    import open_clip

    from clip_eval.zero_shot import build_zero_shot_classifier

    classnames = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES[: args.templates])
    rounds = max(1, min(args.rounds, len(classnames)))
    bounds = [round(i * len(classnames) / rounds) for i in range(rounds + 1)]
    builders = {
        "open_clip": lambda names: open_clip.build_zero_shot_classifier(
            oc_model, tokenizer, names, templates, num_classes_per_batch=10, device=device
        ),
        "ours": lambda names: build_zero_shot_classifier(
            ours, names, templates, device, batch_size=args.text_batch_size
        ),
        "ours_oc": lambda names: build_zero_shot_classifier(
            oc_encoder, names, templates, device, batch_size=args.text_batch_size
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in builders}
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in builders}
    order = list(builders)
    for r in range(rounds):
        names = classnames[bounds[r] : bounds[r + 1]]
        for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
            t, out = _timed(lambda name=name, names=names: builders[name](names))
            times[name].append(t)
            parts[name].append(out)
    reference = torch.cat(parts["open_clip"], dim=1).float()
    for name, label in (("ours", "clip_train_model"), ("ours_oc", "ours_on_open_clip_model")):
        diff = (torch.cat(parts[name], dim=1).float() - reference).abs().max().item()
        print(
            json.dumps(
                {
                    "bench": "zero_shot_classifier_build",
                    "variant": label,
                    "classes": len(classnames),
                    "templates": len(templates),
                    "prompts": len(classnames) * len(templates),
                    **_summary(times, name, "open_clip"),
                    "max_abs_diff": diff,
                    "same_to_1e-5": diff <= 1e-5,
                    "text_batch_size": args.text_batch_size,
                    "device": str(device),
                    "machine": _machine(device),
                }
            ),
            flush=True,
        )


def _image_folder(root: Path, num_images: int, num_classes: int = 10, size: int = 80) -> None:
    rng = np.random.default_rng(0)
    for i in range(num_images):
        folder = root / f"class_{i % num_classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def _plain_eval(model, classifier, root: Path, preprocess, args, device) -> int:
    """What a plain loop does (open_clip_train's zero-shot eval): ImageFolder, encode, top-k."""
    from torchvision.datasets import ImageFolder

    loader = torch.utils.data.DataLoader(
        ImageFolder(str(root), transform=preprocess),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    top1 = top5 = n = 0
    with torch.no_grad():
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            features = F.normalize(model.encode_image(images), dim=-1)
            logits = 100.0 * features @ classifier
            pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (pred[:, 0] == target).sum().item()
            top5 += (pred == target[:, None]).any(dim=1).sum().item()
            n += images.shape[0]
    return n


def bench_eval(args, ours, device) -> None:
    """Images/s of the whole eval pass (read, decode, preprocess, encode, score), same model."""
    from clip_eval.datasets import FileLoader, class_folder
    from clip_eval.image_pass import default_num_workers
    from clip_eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot

    if args.num_workers is None:  # both sides get what clip-eval zero-shot uses by default
        args.num_workers = default_num_workers()

    with tempfile.TemporaryDirectory(prefix="bench_zs_") as tmp:
        root = Path(tmp)
        _image_folder(root, args.images)
        images = class_folder(root)
        classifier = build_zero_shot_classifier(
            ours, images.classnames, ["a photo of a {}."], device
        )
        with torch.no_grad():  # warm-up: first-call allocations count for neither side
            ours.encode_image(
                torch.zeros(
                    args.batch_size, 3, ours.model.image_size, ours.model.image_size, device=device
                )
            )

        def run_ours() -> int:
            loader = FileLoader(images, ours.preprocess, args.batch_size, args.num_workers)
            return evaluate_zero_shot(ours, loader, classifier, device)["num_samples"]

        sides = {
            "ours": run_ours,
            "plain": lambda: _plain_eval(ours, classifier, root, ours.preprocess, args, device),
        }
        times: dict[str, list[float]] = {"ours": [], "plain": []}
        for r in range(args.eval_rounds):
            for name in ["ours", "plain"] if r % 2 == 0 else ["plain", "ours"]:
                t, n = _timed(sides[name])
                assert n == args.images
                times[name].append(t)
        summary = _summary(times, "ours", "plain")
        print(
            json.dumps(
                {
                    "bench": "zero_shot_eval",
                    "images": args.images,
                    "batch_size": args.batch_size,
                    "num_workers": args.num_workers,
                    "ours_images_per_s": round(
                        args.images * len(times["ours"]) / sum(times["ours"]), 1
                    ),
                    "open_clip_images_per_s": round(
                        args.images * len(times["plain"]) / sum(times["plain"]), 1
                    ),
                    **{k: v for k, v in summary.items() if k.startswith(("ratio", "rounds"))},
                    "device": str(device),
                    "machine": _machine(device),
                }
            ),
            flush=True,
        )


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    ours, oc_model, oc_encoder, tokenizer = _models(device)
    if not args.skip_classifier:
        bench_classifier(args, ours, oc_model, oc_encoder, tokenizer, device)
    if not args.skip_eval:
        bench_eval(args, ours, device)


if __name__ == "__main__":
    main()
