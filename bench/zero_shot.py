"""Zero-shot benchmark: classifier build time and eval images/s, ours vs OpenCLIP, same run.

    python bench/zero_shot.py                       # 1000 classes x 80 templates (minutes on 2 cores)
    python bench/zero_shot.py --quick               # 100 classes x 80 templates, 256 images
    python bench/zero_shot.py --classes 200 --templates 20 --images 512 --device cuda

Models (DESIGN.md's bench_tiny sizes):
- ours: `clip_train.model.build_model` from configs/bench_tiny.yaml, wrapped in `ClipEncoder`;
  our `eval.build_zero_shot_classifier` (prompts sorted by token length, batched by similar
  length; the tower trims padding after each batch's longest prompt).
- OpenCLIP: an open_clip `CustomTextCLIP` custom config of the same sizes whose text tower is
  loaded with OUR text weights, so both sides must give the same classifier (checked to 1e-5);
  built with `open_clip.build_zero_shot_classifier` (10 classes x all templates per forward, all
  padded to the 32-token context). The same OpenCLIP model is also run through our builder
  (`ours_on_open_clip_model`), which shows the trimmed path eval uses for open_clip towers.
- Eval images/s: ONE model (ours) for both loops, on the same generated JPEG class folder:
  our `evaluate_zero_shot` over our folder loader vs a plain loop (torchvision `ImageFolder`,
  `DataLoader`, encode, normalize, logits, top-1/top-5), as in open_clip_train's zero-shot eval.

Prints one JSON line per figure with both numbers and the ratio (ours / OpenCLIP for speed,
>1 = ours faster). Timings run alternately, best of `--repeats`.
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

OPEN_CLIP_NAME = "bench-tiny-openclip"


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000, help="ImageNet classes to use (first N; default 1000)")
    p.add_argument("--templates", type=int, default=80, help="OpenAI templates to use (first N; default 80)")
    p.add_argument("--images", type=int, default=1024, help="images in the eval folder (default 1024)")
    p.add_argument("--batch-size", type=int, default=128, help="eval images per batch (default 128)")
    p.add_argument("--text-batch-size", type=int, default=1024, help="our prompts per text forward (default 1024, as in eval)")
    p.add_argument("--num-workers", type=int, default=0, help="eval loader workers, both sides (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats; best time is kept (default 1)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="100 classes x 80 templates, 256 images")
    p.add_argument("--skip-eval", action="store_true", help="only the classifier build")
    p.add_argument("--skip-classifier", action="store_true", help="only the eval images/s")
    args = p.parse_args()
    if args.quick:
        args.classes, args.images = min(args.classes, 100), min(args.images, 256)
    return args


def _models(device: torch.device):
    import open_clip

    from clip_train.config import load_config
    from clip_train.encoder import ClipEncoder
    from clip_train.model import build_model
    from eval.encoder import OpenClipEncoder

    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", ["data.train=unused"])
    torch.manual_seed(0)
    ours = ClipEncoder(build_model(cfg.model)).to(device).eval()
    text, image = cfg.model.text, cfg.model.image
    oc_cfg = {
        "embed_dim": cfg.model.embed_dim,
        "custom_text": True,
        "vision_cfg": {"image_size": image.img_size, "patch_size": image.patch_size, "width": image.width,
                       "layers": image.depth, "head_width": image.width // image.heads, "mlp_ratio": image.mlp_ratio},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio},
    }
    cfg_dir = Path(tempfile.mkdtemp(prefix="bench_oc_cfg_"))
    (cfg_dir / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(oc_cfg))
    open_clip.add_model_config(cfg_dir / f"{OPEN_CLIP_NAME}.json")
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
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}"


def bench_classifier(args, ours, oc_model, oc_encoder, tokenizer, device) -> None:
    import open_clip

    from eval.zero_shot import build_zero_shot_classifier

    classnames = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    templates = list(open_clip.OPENAI_IMAGENET_TEMPLATES[: args.templates])
    best = {"open_clip": float("inf"), "ours": float("inf"), "ours_oc": float("inf")}
    results = {}
    for _ in range(args.repeats):
        t, results["open_clip"] = _timed(lambda: open_clip.build_zero_shot_classifier(
            oc_model, tokenizer, classnames, templates, num_classes_per_batch=10, device=device))
        best["open_clip"] = min(best["open_clip"], t)
        t, results["ours"] = _timed(lambda: build_zero_shot_classifier(
            ours, classnames, templates, device, batch_size=args.text_batch_size))
        best["ours"] = min(best["ours"], t)
        t, results["ours_oc"] = _timed(lambda: build_zero_shot_classifier(
            oc_encoder, classnames, templates, device, batch_size=args.text_batch_size))
        best["ours_oc"] = min(best["ours_oc"], t)
    reference = results["open_clip"].float()
    for name, label in (("ours", "clip_train_model"), ("ours_oc", "ours_on_open_clip_model")):
        diff = (results[name].float() - reference).abs().max().item()
        print(json.dumps({
            "bench": "zero_shot_classifier_build", "variant": label, "classes": len(classnames),
            "templates": len(templates), "prompts": len(classnames) * len(templates),
            "ours_s": round(best[name], 3), "open_clip_s": round(best["open_clip"], 3),
            "ratio": round(best["open_clip"] / best[name], 3), "max_abs_diff": diff, "same_to_1e-5": diff <= 1e-5,
            "device": str(device), "machine": _machine(device),
        }), flush=True)


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

    loader = torch.utils.data.DataLoader(ImageFolder(str(root), transform=preprocess), batch_size=args.batch_size,
                                         num_workers=args.num_workers)
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
    from eval.datasets import FileLoader, class_folder
    from eval.zero_shot import build_zero_shot_classifier, evaluate_zero_shot

    with tempfile.TemporaryDirectory(prefix="bench_zs_") as tmp:
        root = Path(tmp)
        _image_folder(root, args.images)
        images = class_folder(root)
        classifier = build_zero_shot_classifier(ours, images.classnames, ["a photo of a {}."], device)
        with torch.no_grad():  # warm-up: first-call allocations count for neither side
            ours.encode_image(torch.zeros(args.batch_size, 3, ours.model.image_size, ours.model.image_size, device=device))
        best_ours = best_plain = float("inf")
        for _ in range(args.repeats):
            loader = FileLoader(images, ours.preprocess, args.batch_size, args.num_workers)
            t, metrics = _timed(lambda: evaluate_zero_shot(ours, loader, classifier, device))
            best_ours = min(best_ours, t)
            t, n = _timed(lambda: _plain_eval(ours, classifier, root, ours.preprocess, args, device))
            best_plain = min(best_plain, t)
        assert metrics["num_samples"] == n == args.images
        ours_ips, plain_ips = args.images / best_ours, args.images / best_plain
        print(json.dumps({
            "bench": "zero_shot_eval", "images": args.images, "batch_size": args.batch_size,
            "num_workers": args.num_workers, "ours_images_per_s": round(ours_ips, 1),
            "open_clip_images_per_s": round(plain_ips, 1), "ratio": round(ours_ips / plain_ips, 3),
            "device": str(device), "machine": _machine(device),
        }), flush=True)


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
