"""Embeddings of a shard set, a faiss index over them, and search by text or image.

An embedding directory holds:
  image_embeddings.npy, text_embeddings.npy   float32 [N, D], L2-normalised, row i = sample i
  metadata.jsonl                              one line per sample: key, caption (and json fields)
  info.json                                   model path, count, dimension (written last)
  image.faiss / text.faiss                    after `clip-train index` (inner product = cosine)
Every file is written to a temporary name and renamed, so an interrupted run leaves no torn file.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.errors import ClipTrainError, DataError
from data_tools.io import atomic_path, write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

INFO = "info.json"
MODALITIES = ("image", "text")


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())


@torch.no_grad()
def embed_shards(
    encoder: torch.nn.Module,
    shards: str,
    out_dir: str | Path,
    *,
    model_path: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    progress: Any | None = None,
) -> dict[str, Any]:
    """Encode every image and caption of `shards` with `encoder`; returns the info dict."""
    from data_tools.loader import make_loader

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = make_loader(
        shards,
        batch_size=batch_size,
        image_transform=encoder.preprocess,
        tokenizer=encoder.tokenizer,
        mode="epoch",
        num_workers=num_workers,
        with_json=True,
    )
    images: list[np.ndarray] = []
    texts: list[np.ndarray] = []
    meta: list[str] = []
    encoder.eval()
    for batch in loader:
        images.append(
            encoder.encode_image(batch["image"].to(device), normalize=True).float().cpu().numpy()
        )
        texts.append(
            encoder.encode_text(batch["text"].to(device), normalize=True).float().cpu().numpy()
        )
        for i, key in enumerate(batch["key"]):
            meta.append(
                json.dumps({"key": key, "caption": batch["caption"][i], **_extra(batch, i)})
            )
        if progress is not None:
            progress.update(len(batch["key"]))
    if not meta:
        raise DataError(
            f"no samples with an image and a caption in {shards}; check it with `clip-data inspect`"
        )
    image_emb, text_emb = np.concatenate(images), np.concatenate(texts)
    _save_npy(out_dir / "image_embeddings.npy", image_emb)
    _save_npy(out_dir / "text_embeddings.npy", text_emb)
    write_text_atomic(out_dir / "metadata.jsonl", "\n".join(meta) + "\n")
    info = {
        "model": model_path,
        "shards": str(shards),
        "count": len(meta),
        "dim": int(image_emb.shape[1]),
    }
    write_text_atomic(out_dir / INFO, json.dumps(info, indent=1) + "\n")
    return info


def _extra(batch: dict[str, Any], i: int) -> dict[str, Any]:
    extra = batch.get("json")
    return {"json": extra[i]} if extra else {}


def read_info(emb_dir: str | Path) -> dict[str, Any]:
    path = Path(emb_dir) / INFO
    if not path.is_file():
        raise ClipTrainError(
            f"{emb_dir} holds no embeddings ({INFO} missing); run `clip-train embed` first"
        )
    return json.loads(path.read_text())


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ClipTrainError(
            "the faiss package is needed for indexes: pip install faiss-cpu "
            "(or pip install 'clip-train[search]')"
        ) from None
    return faiss


def build_index(
    emb_dir: str | Path,
    modalities: Iterable[str] = MODALITIES,
    kind: str = "flat",
    nlist: int = 256,
) -> list[Path]:
    """faiss inner-product indexes over the normalised embeddings: exact (`flat`) or IVF (`ivf`)."""
    faiss = _faiss()
    emb_dir = Path(emb_dir)
    read_info(emb_dir)
    written = []
    for modality in modalities:
        vectors = np.ascontiguousarray(
            np.load(emb_dir / f"{modality}_embeddings.npy"), dtype=np.float32
        )
        dim = vectors.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "ivf":
            nlist = max(
                1, min(nlist, vectors.shape[0] // 39)
            )  # faiss wants ~39 points per centroid
            index = faiss.IndexIVFFlat(
                faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT
            )
            index.train(vectors)
            index.nprobe = min(nlist, 16)
        else:
            raise ClipTrainError(f"index kind '{kind}' is not one of: flat, ivf")
        index.add(vectors)
        path = emb_dir / f"{modality}.faiss"
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        written.append(path)
    return written


def search(
    emb_dir: str | Path, query: torch.Tensor, target: str = "image", k: int = 5
) -> list[dict[str, Any]]:
    """The `k` nearest items of `target` modality to one normalised query embedding."""
    faiss = _faiss()
    emb_dir = Path(emb_dir)
    path = emb_dir / f"{target}.faiss"
    if not path.is_file():
        raise ClipTrainError(
            f"no {target} index in {emb_dir}; run `clip-train index {emb_dir}` first"
        )
    index = faiss.read_index(str(path))
    scores, ids = index.search(np.ascontiguousarray(query.reshape(1, -1).float().cpu().numpy()), k)
    meta = (emb_dir / "metadata.jsonl").read_text().splitlines()
    return [
        {"rank": r + 1, "score": float(s), **json.loads(meta[i])}
        for r, (s, i) in enumerate(zip(scores[0], ids[0]))
        if i >= 0
    ]
