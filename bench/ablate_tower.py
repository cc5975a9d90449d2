r"""Which part of the model makes it learn per step: one training loop, many model variants.

    python bench/ablate_tower.py --data ../shared/data/icons --steps 252 --seeds 0 1 2
    python bench/ablate_tower.py --data ../shared/data/icons \
        --variants ours openclip ours+openclip_init
    python bench/ablate_tower.py --device cuda ...   # same figures in seconds on a GPU

Every variant is trained by the same in-process loop on the same batches in the same order (per
seed), with the same optimiser, schedule and loss, so what differs between two rows is the model
and nothing else; the trainers themselves are compared by bench/time_to_quality.py. The data
(train shards, held-out retrieval and zero-shot shards of the layout `../shared/data/icons` and
`clip-data synth` write) is decoded once into memory; a full shuffle per epoch; no augmentation,
or with `--augment` the trainers' own: each batch's images through `clip-train train`'s random
resized crop (`data_tools.transforms`, area 90-100%, bicubic), seeded per seed, so every variant
still sees the same crops.

Variants (`ours`: the model `configs/bench_tiny.yaml` builds, with '+' changes):
- `ours`: the current default (with `ln_pre`, open_clip's ViT); `openclip`: open_clip's own `CLIP`
  (its ViT and text tower) with the same sizes, the reference to match; `ours+no_ln_pre`: the
  default before 2026-11-27, which the tables in docs/benchmarks.md up to then call `ours`;
  `ours+timm_init`: the first default (timm's N(0, 0.02)).
- `+avg`: mean of the patch tokens instead of the class token.
- `+openclip_init`: the image trunk's linear layers initialised as open_clip's ViT initialises its
  own (PyTorch defaults: fan-in scaled; qkv Xavier), class/position embeddings N(0, width^-1/2).
- `+linear_init`: the linear layers alone; `+embed_init`: the class/position embeddings alone;
  `+qkv_init`: the qkv projections alone (each applied after the init chosen, e.g.
  `ours+timm_init+linear_init`).
- `+no_ln_pre`: timm's ViT without `pre_norm` (open_clip's `no_ln_pre` form, with timm's patch
  bias); `+ln_pre`: with it (the default now: the older commands in the docs still run);
  `+jax_init`: timm's own `weight_init='jax'`.
- `+patch_norm`: `ln_pre` on the patch tokens only; the class token enters the first block as
  initialised (small), not scaled to unit size by the norm.
- `+decay_embed`: open_clip_train's weight-decay groups (position and token embeddings decayed;
  its class token is 1-d and is not).
- `+no_patch_bias`: with `+no_ln_pre`, the patch embedding without its bias (open_clip's conv1
  has none; timm's default has one); `+patch_bias`: with `ln_pre`, keep a patch bias (timm drops
  it).
- `+patch_lecun`: `model.image.patch_init=lecun`, the original ViT's patch-embedding init (LeCun
  normal, std 1/sqrt(fan_in), zero bias) instead of PyTorch's conv default (1/sqrt(3 fan_in)).
- `+patch_x1.5`, `+patch_x2`, `+patch_x3`: the patch embedding's initial weights and bias scaled
  up, so the patch tokens enter the first block at about the size `ln_pre` gives them on
  coloured images.
Variants combine with '+' (`ours+timm_init+no_ln_pre`); an unknown change is refused.

Prints one JSON line per (variant, seed) with the train-loss curve (mean over windows of
--window steps) and held-out retrieval R@1/R@10 (both directions) and zero-shot top-1 (with
`--breakdown FIELD`, also R@10 per value of that field of the held-out pairs' .json, e.g. the
synthetic set's `background`), then one summary line per variant: means over seeds.
`--init-cosine N` trains nothing: it prints, per variant and seed, how alike the initialised
model finds the first N train images (the pairwise cosine of their embeddings) and, for our
towers, the size (RMS) of the patch and class tokens as they enter the first block.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train_step import openclip_param_groups, openclip_sizes  # noqa: E402  (bench/, beside this file)

from clip_train.config import load_config  # noqa: E402
from clip_train.losses import ClipInfoNCE  # noqa: E402
from clip_train.model import build_model, init_embeddings_fan_in, init_linear_fan_in  # noqa: E402
from clip_train.optim import param_groups  # noqa: E402
from data_tools.transforms import image_transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def read_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every sample of the folder's shards, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_split(folder: Path, size: int) -> tuple[torch.Tensor, list[str], list[int], list[dict]]:
    """uint8 images [N, 3, size, size], captions, labels (-1 where none) and .json metadata
    ({} where none) of every shard."""
    tf = image_transform(size)
    images, captions, labels, metas = [], [], [], []
    for fields in read_samples(folder).values():
        jpg = fields.get("jpg") or fields.get("png")
        if jpg is None:
            continue
        img = tf.resize_pil(Image.open(io.BytesIO(jpg)))
        images.append(torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy()))
        captions.append(fields.get("txt", b"").decode().strip())
        labels.append(int(fields["cls"]) if "cls" in fields else -1)
        metas.append(json.loads(fields["json"]) if "json" in fields else {})
    return torch.stack(images), captions, labels, metas


def augment(images: torch.Tensor, tf) -> torch.Tensor:
    """uint8 images [B, 3, S, S] through the training transform's crop (PIL, as the trainer)."""
    crops = [
        np.asarray(tf.resize_rgb(Image.fromarray(img.permute(1, 2, 0).numpy()))) for img in images
    ]
    return torch.from_numpy(np.stack(crops).transpose(0, 3, 1, 2).copy())


def normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


INITS = {"timm_init": "timm", "jax_init": "timm-jax", "openclip_init": "openclip"}
PATCH_SCALES = {"patch_x1.5": 1.5, "patch_x2": 2.0, "patch_x3": 3.0}
CHANGES = {
    "avg",
    "ln_pre",
    "no_ln_pre",
    "patch_norm",
    "linear_init",
    "qkv_init",
    "embed_init",
    "decay_embed",
    "no_patch_bias",
    "patch_bias",
    "patch_lecun",
    *PATCH_SCALES,
    *INITS,
}


def check_variant(name: str) -> tuple[str, set[str]]:
    base, *parts = name.split("+")
    changes = set(parts)
    unknown = changes - CHANGES | ({base} - {"ours", "openclip"})
    if (
        unknown
        or len(changes & set(INITS)) > 1
        or len(changes & set(PATCH_SCALES)) > 1
        or ("no_ln_pre" in changes and changes & {"ln_pre", "patch_norm", "patch_bias"})
        or ("no_patch_bias" in changes and "no_ln_pre" not in changes)  # ln_pre has no bias
        or {"patch_bias", "no_patch_bias"} <= changes
        or (base == "openclip" and changes - {"decay_embed"})
    ):
        raise SystemExit(
            f"variant {name!r}: use ours|openclip, then '+' changes from {sorted(CHANGES)} "
            f"(at most one of {sorted(INITS)} and of {sorted(PATCH_SCALES)}; no_ln_pre not "
            "with ln_pre, patch_norm or patch_bias; no_patch_bias only with no_ln_pre; "
            "openclip takes only decay_embed)"
        )
    return base, changes


class PatchOnly(torch.nn.Module):
    """Apply `norm` to the patch tokens and pass the class (prefix) tokens through."""

    def __init__(self, norm: torch.nn.Module, prefix: int):
        super().__init__()
        self.norm, self.prefix = norm, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, : self.prefix], self.norm(x[:, self.prefix :])], dim=1)


def build_variant(name: str, cfg) -> tuple[torch.nn.Module, bool]:
    """(model, decay embeddings as open_clip_train does)."""
    base, changes = check_variant(name)
    if base == "openclip":
        model = open_clip.CLIP(**openclip_sizes(cfg), output_dict=True)
        return model, "decay_embed" in changes
    img = cfg.model.image
    if "avg" in changes:
        img.pool = "avg"
    img.pre_norm = "no_ln_pre" not in changes
    for change in changes & set(INITS):
        img.init = INITS[change]
    if "patch_lecun" in changes:
        img.patch_init = "lecun"
    model = build_model(cfg.model)
    trunk = model.visual.trunk
    if "linear_init" in changes:
        init_linear_fan_in(trunk)
    if "qkv_init" in changes:
        init_linear_fan_in(trunk, qkv_only=True)
    if "embed_init" in changes:
        init_embeddings_fan_in(trunk)
    if "patch_norm" in changes:
        trunk.norm_pre = PatchOnly(trunk.norm_pre, trunk.num_prefix_tokens)
    proj = trunk.patch_embed.proj
    if "no_patch_bias" in changes:
        proj.register_parameter("bias", None)
    if "patch_bias" in changes:  # PyTorch's default conv init for the new bias
        with_bias = torch.nn.Conv2d(
            proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride, bias=True
        )
        with torch.no_grad():
            with_bias.weight.copy_(proj.weight)
        trunk.patch_embed.proj = with_bias
    for change in changes & set(PATCH_SCALES):
        with torch.no_grad():
            for p in trunk.patch_embed.proj.parameters():
                p.mul_(PATCH_SCALES[change])
    return model, "decay_embed" in changes


@torch.no_grad()
def initial_cosine(variant: str, seed: int, args, images: torch.Tensor) -> dict:
    """How alike the freshly initialised model finds the images: the pairwise cosine of their
    embeddings (near 1: the logits start flat and the contrastive gradient is weak); and the size
    (RMS over channels) of the patch and class tokens as they enter the first block."""
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", [f"data.train={args.data}"])
    torch.manual_seed(seed)
    model, _ = build_variant(variant, cfg)
    pixels = normalise(images)
    emb = F.normalize(model.eval().encode_image(pixels), dim=-1)
    pairs = (emb @ emb.T)[~torch.eye(len(emb), dtype=torch.bool)]
    row = {
        "variant": variant,
        "seed": seed,
        "images": len(emb),
        "cosine_mean": round(pairs.mean().item(), 3),
        "cosine_std": round(pairs.std().item(), 3),
    }
    if hasattr(model, "visual") and hasattr(model.visual, "trunk"):  # ours (timm's ViT)
        trunk = model.visual.trunk
        tokens = trunk.norm_pre(trunk._pos_embed(trunk.patch_embed(pixels)))
        prefix = trunk.num_prefix_tokens
        rms = tokens.pow(2).mean(-1).sqrt()
        row["patch_rms"] = round(rms[:, prefix:].mean().item(), 3)
        row["class_rms"] = round(rms[:, :prefix].mean().item(), 3)
    return row


@torch.no_grad()
def evaluate(
    model, images, captions, labels, classnames, templates, tokenizer, device, groups=None
) -> dict:
    model.eval()
    feats = []
    for chunk in images.split(256):
        feats.append(F.normalize(model.encode_image(normalise(chunk.to(device))), dim=-1))
    img = torch.cat(feats)
    txt = F.normalize(model.encode_text(tokenizer(captions).to(device)), dim=-1)
    sim = img @ txt.T
    out = {}
    for direction, s in (("i2t", sim), ("t2i", sim.T)):
        rank = (s > s.diag().unsqueeze(1)).sum(1)  # items scored above the true one
        out[f"{direction}_R@1"] = 100 * (rank < 1).float().mean().item()
        out[f"{direction}_R@10"] = 100 * (rank < 10).float().mean().item()
        for value, members in (groups or {}).items():  # ranked among all pairs
            out[f"{direction}_R@10[{value}]"] = 100 * (rank[members] < 10).float().mean().item()
    if classnames:
        w = []
        for c in classnames:
            e = F.normalize(
                model.encode_text(tokenizer([t.format(c) for t in templates]).to(device)), dim=-1
            )
            w.append(F.normalize(e.mean(0), dim=0))
        pred = (img @ torch.stack(w).T).argmax(1).cpu()
        lab = torch.tensor(labels)
        out["zeroshot_top1"] = 100 * (pred == lab).float().mean().item()
    model.train()
    return out


def train_one(variant: str, seed: int, args, data: dict, device) -> dict:
    cfg = load_config(ROOT / "configs" / "bench_tiny.yaml", [f"data.train={args.data}"])
    torch.manual_seed(seed)
    model, decay_embed = build_variant(variant, cfg)
    model.to(device).train()
    groups = openclip_param_groups(model, args.wd) if decay_embed else param_groups(model, args.wd)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / args.warmup
            if s < args.warmup
            else 0.5
            * (1 + math.cos(math.pi * (s - args.warmup) / max(1, args.steps - args.warmup)))
        ),
    )
    loss_fn = ClipInfoNCE()
    images, tokens = data["train_images"], data["train_tokens"]
    n = images.shape[0]
    order = torch.Generator().manual_seed(1000 + seed)  # the same batches for every variant
    perm, pos, losses = torch.randperm(n, generator=order), 0, []
    crop = image_transform(images.shape[-1], train=True) if args.augment else None
    if crop is not None:
        crop.reseed(2000 + seed)  # the same crops for every variant
    start = time.perf_counter()
    for _ in range(args.steps):
        if pos + args.batch > n:
            perm, pos = torch.randperm(n, generator=order), 0
        idx = perm[pos : pos + args.batch]
        pos += args.batch
        batch = augment(images[idx], crop) if crop is not None else images[idx]
        x = normalise(batch.to(device, non_blocking=True))
        out = model(x, tokens[idx].to(device))
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            (model.logit_scale if hasattr(model, "logit_scale") else None).clamp_(0, math.log(100))
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    metrics = evaluate(
        model,
        data["ret_images"],
        data["ret_captions"],
        None,
        None,
        None,
        data["tokenizer"],
        device,
        data.get("ret_groups"),
    )
    if data.get("zs_images") is not None:
        zs = evaluate(
            model,
            data["zs_images"],
            data["zs_captions"],
            data["zs_labels"],
            data["classnames"],
            data["templates"],
            data["tokenizer"],
            device,
        )
        metrics["zeroshot_top1"] = zs["zeroshot_top1"]
    w = args.window
    curve = [round(statistics.fmean(losses[i : i + w]), 3) for i in range(0, len(losses), w)]
    return {
        "variant": variant,
        "seed": seed,
        "steps": args.steps,
        "train_s": round(seconds, 1),
        "final_loss": round(statistics.fmean(losses[-w:]), 4),
        "loss_curve": curve,
        **{k: round(v, 2) for k, v in metrics.items()},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", required=True, help="folder with train/, retrieval/ and zeroshot/ shards"
    )
    p.add_argument(
        "--variants", nargs="+", default=["ours", "openclip", "ours+avg", "ours+openclip_init"]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=252)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--window", type=int, default=21)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--init-cosine",
        type=int,
        default=0,
        metavar="N",
        help="instead of training: the pairwise cosine of the first N train images' embeddings "
        "at initialisation, per variant and seed",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="the trainers' random resized crop (area 90-100%%) on every training batch",
    )
    p.add_argument(
        "--breakdown",
        metavar="FIELD",
        help="also the retrieval R@10 per value of this field of the held-out pairs' .json "
        "(each pair still ranked among all), e.g. the synthetic set's background",
    )
    args = p.parse_args(argv)
    for variant in args.variants:
        check_variant(variant)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    root = Path(args.data)
    size = load_config(ROOT / "configs" / "bench_tiny.yaml", ["data.train=x"]).model.image.img_size
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    data: dict = {"tokenizer": tokenizer}
    data["train_images"], caps, _, _ = read_split(root / "train", size)
    if args.init_cosine:
        for seed in args.seeds:
            for variant in args.variants:
                r = initial_cosine(variant, seed, args, data["train_images"][: args.init_cosine])
                print(json.dumps(r), flush=True)
        return
    data["train_tokens"] = tokenizer(caps)
    data["ret_images"], data["ret_captions"], _, metas = read_split(root / "retrieval", size)
    if args.breakdown:
        values = [m.get(args.breakdown) for m in metas]  # None: a pair without the field
        if all(v is None for v in values):
            raise SystemExit(
                f"--breakdown {args.breakdown}: no .json of {root / 'retrieval'} has that field; "
                "name one they have (clip-data synth writes background, colour, kind, ...)"
            )
        names = [str(v) for v in values]
        data["ret_groups"] = {
            v: torch.tensor([x == v for x in names], device=device) for v in sorted(set(names))
        }
    zs = root / "zeroshot"
    if zs.is_dir():
        data["zs_images"], data["zs_captions"], data["zs_labels"], _ = read_split(zs, size)
        data["classnames"] = (zs / "classnames.txt").read_text().splitlines()
        data["templates"] = (zs / "templates.txt").read_text().splitlines()
    if device.type == "cuda" and not args.augment:  # crops are drawn on the host
        data["train_images"] = data["train_images"].to(device)
    print(
        json.dumps(
            {
                "data": str(root),
                "train": len(caps),
                "retrieval": len(data["ret_captions"]),
                "device": str(device),
                "augment": args.augment,
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )
    results = []
    for seed in args.seeds:
        for variant in args.variants:  # alternate variants within a seed
            r = train_one(variant, seed, args, data, device)
            results.append(r)
            print(json.dumps(r), flush=True)
    for variant in args.variants:
        rows = [r for r in results if r["variant"] == variant]
        keys = [k for k in rows[0] if k not in ("variant", "seed", "steps", "loss_curve")]
        summary = {
            "summary": variant,
            "seeds": len(rows),
            **{k: round(statistics.fmean(r[k] for r in rows), 3) for k in keys},
            "loss_curve": [
                round(statistics.fmean(c), 3) for c in zip(*(r["loss_curve"] for r in rows))
            ],
        }
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
