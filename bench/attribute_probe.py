"""Which caption attributes a model tells apart, on the synthetic set's held-out retrieval pairs.

    python bench/attribute_probe.py --data /tmp/clip-train-ttq/synth-8000/retrieval \
        --model runs/ours-s6 local-dir:runs/openclip-s6/open_clip

R@10 says how often the right caption is near the top; it does not say what a model gets wrong.
Every held-out pair of `clip-data synth` carries its attributes in its .json (shape, colour, size,
position, count, background). For each image and each caption template of `data_tools.synth`
that mentions an attribute, the probe writes the captions that differ from the true one in that
attribute alone (one per value it can take) and counts the image as right when the true caption
scores highest: per-attribute accuracy, over every held-out image and every template that
names the attribute (the JSON calls the shape `kind`, as the .json does). Chance is 1 / the
number of values (shape 17%, colour 17%, size 50%, position 20%, count 33%, background 25%).

Models are what `clip-eval` loads: our run or export directories and `local-dir:DIR` open_clip
folders (bench/time_to_quality.py keeps both trainers' models in its --work folder). Prints one
JSON line per model.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ablate_tower import read_samples  # noqa: E402  (bench/, beside this file)

from data_tools import synth  # noqa: E402
from data_tools.errors import DataError  # noqa: E402

VALUES: dict[str, tuple] = {
    "kind": synth.KINDS,
    "colour": tuple(synth.COLOURS),
    "size": synth.SIZES,
    "position": synth.POSITIONS,
    "count": synth.COUNTS,
    "background": tuple(synth.BACKGROUNDS),
}


def read_pairs(folder: Path) -> list[tuple[Image.Image, dict]]:
    """(image, attributes) of every held-out pair, in shard order."""
    pairs = []
    for key, fields in read_samples(folder).items():
        meta = json.loads(fields.get("json", b"{}"))
        missing = [a for a in VALUES if a not in meta]
        if "jpg" not in fields or missing:
            raise SystemExit(
                f"{folder}: sample {key} has no .jpg or lacks {missing} in its .json; "
                f"pass the retrieval/ folder of a set `clip-data synth` wrote"
            )
        pairs.append((Image.open(io.BytesIO(fields["jpg"])).convert("RGB"), meta))
    if not pairs:
        raise SystemExit(f"{folder}: no .tar shards; pass the retrieval/ folder of a synthetic set")
    return pairs


def questions(metas: list[dict]) -> list[tuple[int, str, list[str], int]]:
    """(image index, attribute, candidate captions, index of the true one) for every image and
    every template in which each value of the attribute gives a different caption."""
    out = []
    for i, meta in enumerate(metas):
        attrs = {a: meta[a] for a in VALUES}
        for attr, values in VALUES.items():
            if attrs[attr] not in values:
                raise SystemExit(
                    f"held-out pair {i}: {attr} {attrs[attr]!r} is none of {list(values)}; "
                    f"was the set written by another version of `clip-data synth`?"
                )
            for t in range(len(synth.CAPTION_TEMPLATES)):
                captions = [synth.make_caption({**attrs, attr: v}, t) for v in values]
                if len(set(captions)) == len(values):
                    out.append((i, attr, captions, values.index(attrs[attr])))
    return out


def probe(model: str, pairs: list[tuple[Image.Image, dict]], qs: list, device: str) -> dict:
    """Per-attribute accuracy (percent) of one model."""
    from clip_eval._common import inference
    from clip_eval.cli import load_encoder
    from clip_eval.text import encode_texts

    try:
        encoder = load_encoder(model, None, device)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    texts = list(dict.fromkeys(c for q in qs for c in q[2]))
    column = {t: j for j, t in enumerate(texts)}
    images = torch.stack([encoder.preprocess(img) for img, _ in pairs]).to(device)
    with inference(encoder):  # the held-out split is small (500 pairs): one image batch
        image_f = encoder.encode_image(images, normalize=True).float()
        text_f = encode_texts(encoder, texts, device)
    sims = (image_f @ text_f.T).cpu()
    right = {a: 0 for a in VALUES}
    asked = {a: 0 for a in VALUES}
    for i, attr, captions, true in qs:
        scores = sims[i, [column[c] for c in captions]]
        right[attr] += int(int(scores.argmax()) == true)
        asked[attr] += 1
    return {"model": model, **{a: round(100 * right[a] / asked[a], 1) for a in VALUES}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="retrieval/ folder of a `clip-data synth` set")
    p.add_argument("--model", nargs="+", required=True, help="run/export dirs or local-dir:DIR")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    pairs = read_pairs(Path(a.data))
    qs = questions([meta for _, meta in pairs])
    for model in a.model:
        print(json.dumps(probe(model, pairs, qs, a.device)), flush=True)


if __name__ == "__main__":
    main()
