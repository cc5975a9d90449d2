"""Image embeddings of an eval set, for decontamination: shards, an image folder, or scores.

An eval set is given as a path: a score directory (`clip-data score` output: its image
embeddings are used as they are), a folder or spec of .tar shards (zero-shot or retrieval
shards; captions and labels are not needed), or a folder tree of images (ImageNet-style
class folders). It must be embedded with the model that scored the training shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_tools.curate.score import FORMAT, INFO
from data_tools.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG", ".JPG", ".PNG")


def kind(path: str | Path) -> str:
    """'scores', 'shards' or 'folder' (one line naming the path when it is none of them)."""
    p = Path(path)
    if (p / INFO).is_file():
        return "scores"
    if (
        p.is_dir()
        and any(p.glob("*.tar"))
        or any(c in str(path) for c in "{*")
        or str(path).endswith(".tar")
    ):
        return "shards"
    if p.is_dir() and any(f.suffix in IMAGE_SUFFIXES for f in p.rglob("*")):
        return "folder"
    raise DataError(f"--eval {path}: not a score directory, .tar shards or a folder of images")


class _Folder(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], transform: Any) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


@torch.inference_mode()
def embed_eval_set(
    path: str | Path,
    encoder: Any = None,
    *,
    model_id: Any = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Normalised float32 image embeddings [M, D] of the eval set at `path`."""
    what = kind(path)
    if what == "scores":
        info = json.loads((Path(path) / INFO).read_text())
        if info.get("format") != FORMAT or (model_id is not None and info["model"] != model_id):
            raise DataError(
                f"--eval {path}: scored with {info.get('model')!r}, not the model "
                "of --scores; score it with that model, or give its shards"
            )
        return np.load(Path(path) / "image_emb.npy").astype(np.float32)
    if encoder is None:
        raise DataError(f"--eval {path}: embedding it needs the scoring model; give --model")
    if hasattr(encoder, "eval"):
        encoder.eval()
    if what == "shards":
        from data_tools.loader import make_loader

        batches = (
            b["image"]
            for b in make_loader(
                str(path),
                batch_size=batch_size,
                image_transform=encoder.preprocess,
                num_workers=num_workers,
            )
        )
    else:
        files = sorted(f for f in Path(path).rglob("*") if f.suffix in IMAGE_SUFFIXES)
        batches = iter(
            torch.utils.data.DataLoader(
                _Folder(files, encoder.preprocess), batch_size=batch_size, num_workers=num_workers
            )
        )
    out = [
        encoder.encode_image(b.to(device), normalize=True).float().cpu().numpy() for b in batches
    ]
    if not out:
        raise DataError(f"--eval {path}: no images in it")
    return np.concatenate(out)
