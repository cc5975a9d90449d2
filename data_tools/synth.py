"""The embedded procedural dataset: coloured shapes with attribute captions, no download.

Every image shows one group of 1-3 identical shapes (kind, colour, size) at a position on a
plain background, and its caption is one of ten templates filled from those attributes. A
tiny ViT learns colour, shape, count and position from it in CPU minutes, which is what
`make demo` and the end-to-end tests need. Three splits:

- `train/`: image + one caption + attributes. A few (kind, colour) pairs never appear here,
  so zero-shot accuracy on them measures composition rather than memorisation.
- `zeroshot/`: labelled images of all 36 "<colour> <kind>" classes, with class names and
  prompt templates phrased unlike any training caption.
- `retrieval/`: images with five different captions each (COCO style).

Every sample draws from its own RNG seeded by (seed, split, index), so output is a pure
function of the config: the same seed gives byte-identical shards, and a small set is a
prefix of a large one.
"""

from __future__ import annotations

import io
import logging
import math
import random
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from data_tools.errors import DataError
from data_tools.io import write_json_atomic, write_text_atomic
from data_tools.shards import ShardWriter

log = logging.getLogger(__name__)

FORMAT = "clip-train-synth/1"

KINDS = ("circle", "square", "triangle", "star", "cross", "diamond")
PLURALS = {k: ("crosses" if k == "cross" else k + "s") for k in KINDS}
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 75, 225),
    "yellow": (245, 215, 20),
    "purple": (135, 40, 175),
    "orange": (245, 130, 20),
}
BACKGROUNDS = {
    "white": (250, 250, 250),
    "black": (10, 10, 10),
    "gray": (128, 128, 128),
    "beige": (225, 210, 175),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2, 3)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Group centre as a fraction of the image, and the axis along which 2-3 shapes line up.
_ANCHORS = {
    "left": ((0.25, 0.5), "y"),
    "right": ((0.75, 0.5), "y"),
    "top": ((0.5, 0.25), "x"),
    "bottom": ((0.5, 0.75), "x"),
    "center": ((0.5, 0.5), "x"),
}
# Shape diameter as a fraction of the image: 12.8 px / 17.9 px at 64 px, i.e. more than an
# 8x8 patch, so a patch-8 ViT sees every shape whole. Kinds are scaled to similar areas
# (0.45-0.8 d^2) so that area says "size", not "kind"; none is wider than _EXTENT * d.
_SIZE_FRAC = {"small": 0.2, "large": 0.28}
_EXTENT = 1.1
_SUPERSAMPLE = 4  # draw at 4x and box-downsample: anti-aliased edges for cheap

# Training caption templates. Their phrasings must not overlap ZEROSHOT_TEMPLATES.
CAPTION_TEMPLATES = (
    "a photo of {np} {pos}",
    "{np_nosize}, {size}, on a {bg} background",
    "{count_prefix}{colour} {kind_n}, {size}, {pos_short}",
    "{count_word} {kind_n} in {colour} {pos}, {bg} background",
    "there {be} {np} {pos}",
    "a {bg} background with {np_nosize} {pos}",
    "{kind_n}: {colour}, {size}, {count_digit}, {pos_short}",
    "{np} placed {pos} on {bg}",
    "{count_word} {size} {kind_n} {pos}, coloured {colour}",
    "{np} against a {bg} backdrop, {pos}",
)
ZEROSHOT_TEMPLATES = (
    "a picture of the {}.",
    "an image showing the {}.",
    "a drawing of the {}.",
    "a rendering of the {}.",
    "a sketch of the {}.",
    "a simple graphic of the {}.",
)
RETRIEVAL_CAPTIONS = 5


@dataclass
class SynthConfig:
    """What `clip-data synth` generates; every field maps to a CLI flag."""

    seed: int = 0
    train_samples: int = 20000
    zeroshot_per_class: int = 20
    retrieval_samples: int = 500
    image_size: int = 64
    samples_per_shard: int = 1000
    held_out: int = 6  # (kind, colour) pairs kept out of train, each kind and colour at most once
    jpeg_quality: int = 90

    def validate(self) -> None:
        """Fail on impossible values before any file is written."""
        checks = {
            "train_samples": self.train_samples >= 1,
            "zeroshot_per_class": self.zeroshot_per_class >= 1,
            "retrieval_samples": self.retrieval_samples >= 1,
            "image_size": self.image_size >= 32,
            "samples_per_shard": self.samples_per_shard >= 1,
            "held_out": 0 <= self.held_out <= len(KINDS),
            "jpeg_quality": 1 <= self.jpeg_quality <= 100,
        }
        for key, ok in checks.items():
            if not ok:
                raise DataError(
                    f"synth config {key}={getattr(self, key)!r} is out of range "
                    "(counts >= 1, image_size >= 32, held_out 0-6, jpeg_quality 1-100)"
                )


def class_names() -> list[str]:
    """The 36 zero-shot classes, "<colour> <kind>", colour-major; index = `.cls` label."""
    return [f"{c} {k}" for c in COLOURS for k in KINDS]


def held_out_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    """`n` (kind, colour) pairs to hold out of train: a seeded matching, so every kind and
    colour still appears in train with other partners."""
    rng = random.Random(f"synth:{seed}:held_out")
    colours = list(COLOURS)
    rng.shuffle(colours)
    return sorted(zip(KINDS, colours))[:n] if n else []


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_fields(attrs: dict[str, Any]) -> dict[str, str]:
    """Words the caption templates are filled with, pluralised by count."""
    n, kind, colour, size = attrs["count"], attrs["kind"], attrs["colour"], attrs["size"]
    kind_n = kind if n == 1 else PLURALS[kind]
    if n == 1:
        np_ = f"{_article(size)} {size} {colour} {kind}"
        np_nosize = f"{_article(colour)} {colour} {kind}"
    else:
        np_ = f"{COUNT_WORDS[n]} {size} {colour} {kind_n}"
        np_nosize = f"{COUNT_WORDS[n]} {colour} {kind_n}"
    return {
        "np": np_,
        "np_nosize": np_nosize,
        "kind_n": kind_n,
        "colour": colour,
        "size": size,
        "count_word": COUNT_WORDS[n],
        "count_digit": str(n),
        "count_prefix": "" if n == 1 else COUNT_WORDS[n] + " ",
        "be": "is" if n == 1 else "are",
        "pos": POSITION_PHRASES[attrs["position"]],
        "pos_short": attrs["position"],
        "bg": attrs["background"],
    }


def make_caption(attrs: dict[str, Any], template: int) -> str:
    """Caption `template` (index into CAPTION_TEMPLATES) for an image's attributes."""
    return CAPTION_TEMPLATES[template].format(**caption_fields(attrs))


# -- drawing -------------------------------------------------------------------------------
def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        half = 1.1 * r  # equilateral, side 1.1 d, centred on its bounding box
        h = half * math.sqrt(3)
        return [(cx, cy - h / 2), (cx + half, cy + h / 2), (cx - half, cy + h / 2)]
    if kind == "diamond":
        return [(cx, cy - 1.1 * r), (cx + 0.85 * r, cy), (cx, cy + 1.1 * r), (cx - 0.85 * r, cy)]
    if kind == "star":
        pts = []
        outer = 1.1 * r
        for i in range(10):
            rad = outer if i % 2 == 0 else 0.55 * outer
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, d: float, fill) -> None:
    r = d / 2
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        s = 0.85 * r  # a square of the same bounding box looks much bigger than a circle
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif kind == "cross":
        w = 0.34 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(kind, cx, cy, r), fill=fill)


def render(attrs: dict[str, Any], image_size: int, rng: random.Random) -> Image.Image:
    """Draw the shapes described by `attrs` (kind, colour, size, position, count, background)."""
    S = image_size
    k = _SUPERSAMPLE
    img = Image.new("RGB", (S * k, S * k), _jitter(BACKGROUNDS[attrs["background"]], rng, 6))
    draw = ImageDraw.Draw(img)
    fill = _jitter(COLOURS[attrs["colour"]], rng, 12)
    d = _SIZE_FRAC[attrs["size"]] * S
    n = attrs["count"]
    (fx, fy), axis = _ANCHORS[attrs["position"]]
    spacing = min(1.3 * d, (S - _EXTENT * d - 2) / (n - 1)) if n > 1 else 0.0
    jit = 0.04 * S
    gx = fx * S + rng.uniform(-jit, jit)
    gy = fy * S + rng.uniform(-jit, jit)
    lo, hi = _EXTENT * d / 2 + 1, S - _EXTENT * d / 2 - 1
    for j in range(n):
        off = (j - (n - 1) / 2) * spacing
        cx, cy = (gx + off, gy) if axis == "x" else (gx, gy + off)
        cx, cy = min(hi, max(lo, cx)), min(hi, max(lo, cy))
        _draw_shape(draw, attrs["kind"], cx * k, cy * k, d * k, fill)
    return img.reduce(k)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: at 64 px, 4:2:0 subsampling smears the colour of small shapes.
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _sample_attrs(rng: random.Random, combos: list[tuple[str, str]]) -> dict[str, Any]:
    kind, colour = combos[rng.randrange(len(combos))]
    return {
        "kind": kind,
        "colour": colour,
        "size": rng.choice(SIZES),
        "position": rng.choice(POSITIONS),
        "count": rng.choice(COUNTS),
        "background": rng.choice(list(BACKGROUNDS)),
    }


# -- splits --------------------------------------------------------------------------------
def _sample_rng(seed: int, split: str, i: int) -> random.Random:
    return random.Random(f"synth:{seed}:{split}:{i}")


def _train_sample(cfg: SynthConfig, i: int, combos: list[tuple[str, str]]) -> dict[str, Any]:
    rng = _sample_rng(cfg.seed, "train", i)
    attrs = _sample_attrs(rng, combos)
    caption = make_caption(attrs, rng.randrange(len(CAPTION_TEMPLATES)))
    img = render(attrs, cfg.image_size, rng)
    return {
        "__key__": f"train_{i:08d}",
        "jpg": _jpeg(img, cfg.jpeg_quality),
        "txt": caption,
        "json": attrs,
    }


def _zeroshot_sample(cfg: SynthConfig, i: int, held: set[tuple[str, str]]) -> dict[str, Any]:
    rng = _sample_rng(cfg.seed, "zeroshot", i)
    label = i % (len(COLOURS) * len(KINDS))  # classes interleaved, so any prefix is balanced
    colour, kind = list(COLOURS)[label // len(KINDS)], KINDS[label % len(KINDS)]
    attrs = _sample_attrs(rng, [(kind, colour)])
    img = render(attrs, cfg.image_size, rng)
    meta = {
        **attrs,
        "label": label,
        "classname": f"{colour} {kind}",
        "held_out": (kind, colour) in held,
    }
    return {
        "__key__": f"zeroshot_{i:08d}",
        "jpg": _jpeg(img, cfg.jpeg_quality),
        "cls": label,
        "json": meta,
    }


def _retrieval_sample(cfg: SynthConfig, i: int, combos: list[tuple[str, str]]) -> dict[str, Any]:
    rng = _sample_rng(cfg.seed, "retrieval", i)
    attrs = _sample_attrs(rng, combos)
    captions: list[str] = []
    for t in rng.sample(range(len(CAPTION_TEMPLATES)), len(CAPTION_TEMPLATES)):
        c = make_caption(attrs, t)
        if c not in captions:
            captions.append(c)
        if len(captions) == RETRIEVAL_CAPTIONS:
            break
    img = render(attrs, cfg.image_size, rng)
    return {
        "__key__": f"retrieval_{i:08d}",
        "jpg": _jpeg(img, cfg.jpeg_quality),
        "txt": captions[0],
        "json": {**attrs, "captions": captions},
    }


def _remove_stale(split_dir: Path, prefix: str, keep: list[Path]) -> None:
    """Delete shards of an earlier, larger run in the same directory (ours by name only)."""
    pattern = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    keep_names = {p.name for p in keep}
    for p in split_dir.iterdir():
        if pattern.fullmatch(p.name) and p.name not in keep_names:
            log.info("removing stale shard %s", p)
            p.unlink()


def write_synth(out_dir: str | Path, cfg: SynthConfig, *, progress: bool = False) -> dict[str, Any]:
    """Generate the train/zeroshot/retrieval splits under `out_dir`; returns the manifest.

    `manifest.json` is written last, so its presence means the set is complete.
    """
    from data_tools.progress import progress as progress_bar

    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(
            f"synth output {out} exists and is not a directory (choose another --output)"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)

    held = held_out_pairs(cfg.seed, cfg.held_out)
    held_set = set(held)
    all_combos = [(k, c) for c in COLOURS for k in KINDS]
    train_combos = [p for p in all_combos if p not in held_set]
    n_zs = cfg.zeroshot_per_class * len(all_combos)

    splits: list[tuple[str, int, Callable[[int], dict[str, Any]]]] = [
        ("train", cfg.train_samples, lambda i: _train_sample(cfg, i, train_combos)),
        ("zeroshot", n_zs, lambda i: _zeroshot_sample(cfg, i, held_set)),
        # Retrieval stays in the training distribution; held-out pairs are zero-shot's job.
        ("retrieval", cfg.retrieval_samples, lambda i: _retrieval_sample(cfg, i, train_combos)),
    ]
    split_info: dict[str, Any] = {}
    total = sum(n for _, n, _ in splits)
    with progress_bar(total=total, unit="img", enabled=progress, desc="synth") as bar:
        for name, n, make in splits:
            with ShardWriter(out / name, name, cfg.samples_per_shard) as writer:
                for i in range(n):
                    writer.write(make(i))
                    bar.update(1)
            _remove_stale(out / name, name, writer.shards)
            split_info[name] = {
                "path": name,
                "samples": writer.num_samples,
                "shards": [p.name for p in writer.shards],
                "shard_counts": writer.shard_counts,
                "shard_bytes": [p.stat().st_size for p in writer.shards],
            }
            log.debug("wrote %d %s samples in %d shards", n, name, len(writer.shards))

    names = class_names()
    write_text_atomic(out / "zeroshot" / "classnames.txt", "\n".join(names) + "\n")
    write_text_atomic(out / "zeroshot" / "templates.txt", "\n".join(ZEROSHOT_TEMPLATES) + "\n")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "config": asdict(cfg),
        "seed": cfg.seed,
        "image_size": cfg.image_size,
        "counts": {name: info["samples"] for name, info in split_info.items()},
        "splits": split_info,
        "held_out": [{"kind": k, "colour": c} for k, c in held],
        "held_out_classes": [f"{c} {k}" for k, c in held],
        "classnames": names,
        "templates": list(ZEROSHOT_TEMPLATES),
        "caption_templates": list(CAPTION_TEMPLATES),
        "captions_per_retrieval_image": RETRIEVAL_CAPTIONS,
        "attributes": {
            "kind": list(KINDS),
            "colour": list(COLOURS),
            "size": list(SIZES),
            "position": list(POSITIONS),
            "count": list(COUNTS),
            "background": list(BACKGROUNDS),
        },
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
