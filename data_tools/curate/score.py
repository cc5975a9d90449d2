"""Image-text cosine similarity of every sample of a shard set, with the embeddings behind it.

A score directory holds:
  run.json           model and shards this run was started with; a resume must name the same
  parts/NNNNNN.npz   one per input shard, written atomically once that shard is done: keys,
                     score (float32), image and text (float16 [n, D], L2-normalised)
  keys.jsonl         one line per scored sample, row i of the arrays: {"shard": i, "key": k}
  unscored.jsonl     the samples the loader skipped as bad (same form), so that every key of
                     the shards is accounted for when `filter`/`dedup` check them
  scores.npy         float32 [N] cosine of image and caption embedding
  image_emb.npy, text_emb.npy   float16 [N, D], L2-normalised (for dedup and search)
  info.json          written last: the run is complete when it exists

Samples the loader skips (undecodable image, no caption) have no row; `filter` removes them.
Resume works per shard: a rerun skips shards whose part exists. Several processes
(`torchrun --nproc-per-node N -m data_tools score ...`) take shards `i % N == rank`; rank 0
merges the parts once all ranks are done.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_tools.errors import DataError
from data_tools.io import write_bytes_atomic, write_json_atomic, write_text_atomic
from data_tools.tario import ReadMode, iter_shard
from data_tools.urls import expand_shards

log = logging.getLogger(__name__)

FORMAT = "clip-data-scores/1"
RUN = "run.json"
INFO = "info.json"


def save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes_atomic(path, buffer.getvalue())


def part_path(out: Path, i: int) -> Path:
    return out / "parts" / f"{i:06d}.npz"


def shard_keys(url: str) -> list[str]:
    """Keys of one shard in stored order, from tar headers only (nothing decoded)."""
    return [s.key for s in iter_shard(url, mode=ReadMode(False), on_problem=lambda *a: None)]


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from torchrun/accelerate's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


class _Attribution:
    """Which input shard each key of one worker's stream came from.

    The loader gives worker w shards w, w+W, ... in order and skips bad samples, so walking
    each shard's key list (from tar headers) in step with the stream places every key; a key
    not found in the rest of the current shard means that shard is finished.
    """

    def __init__(
        self,
        shard_ids: list[int],
        keys: dict[int, list[str]],
        done: Callable[[int, list[tuple[str, float, np.ndarray, np.ndarray]]], None],
    ):
        self.queue = deque(shard_ids)
        self.keys = keys
        self.done = done
        self.cur: int | None = None
        self.pos = 0
        self.rows: list[tuple[str, float, np.ndarray, np.ndarray]] = []

    def add(self, key: str, row: tuple[str, float, np.ndarray, np.ndarray]) -> None:
        while True:
            if self.cur is None:
                if not self.queue:
                    raise DataError(
                        f"key {key!r} came from no listed shard (shards changed "
                        "while scoring?); rerun `clip-data score`"
                    )
                self.cur, self.pos, self.rows = self.queue.popleft(), 0, []
            try:
                p = self.keys[self.cur].index(key, self.pos)
            except ValueError:
                self.finish()
                continue
            self.pos = p + 1
            self.rows.append(row)
            return

    def finish(self) -> None:
        if self.cur is not None:
            self.done(self.cur, self.rows)
            self.cur, self.rows = None, []

    def close(self) -> None:
        self.finish()
        while self.queue:
            self.done(self.queue.popleft(), [])


def _write_part(
    out: Path,
    i: int,
    rows: list[tuple[str, float, np.ndarray, np.ndarray]],
    dim: int,
    listed: list[str],
) -> None:
    buffer = io.BytesIO()
    scored = {r[0] for r in rows}
    np.savez(
        buffer,
        keys=np.array([r[0] for r in rows], dtype=str),
        unscored=np.array([k for k in listed if k not in scored], dtype=str),
        score=np.array([r[1] for r in rows], dtype=np.float32),
        image=(np.stack([r[2] for r in rows]) if rows else np.zeros((0, dim))).astype(np.float16),
        text=(np.stack([r[3] for r in rows]) if rows else np.zeros((0, dim))).astype(np.float16),
    )
    write_bytes_atomic(part_path(out, i), buffer.getvalue())


def _confirm(encoder: Any, text_forward: Any, tokens: torch.Tensor, device: torch.device) -> bool:
    """Whether `text_forward` gives the model's own text features (checked once, on 4 rows:
    the check runs the full-context tower, the cost the trimmed forward exists to avoid)."""
    tokens = tokens[:4]
    try:
        full = encoder.encode_text(tokens.to(device), normalize=True).float()
        cut = torch.nn.functional.normalize(text_forward(tokens.to(device)).float(), dim=-1)
    except Exception:  # noqa: BLE001 - any failure just means: use the model's own forward
        return False
    return bool(torch.allclose(full, cut, atol=1e-4))


def _run_options(model_id: str, urls: list[str]) -> dict[str, Any]:
    return {"format": FORMAT, "model": model_id, "shards": [os.path.abspath(u) for u in urls]}


def check_run(out: Path, options: dict[str, Any]) -> None:
    """Refuse an existing score directory started with other options (before writing)."""
    path = out / RUN
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise DataError(
                f"--output {out} is not empty and holds no {RUN}; choose an empty or new directory"
            )
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise DataError(f"{path} is not valid JSON; remove {out} and score again") from None
    for field in ("format", "model", "shards"):
        if before.get(field) != options[field]:
            what = {
                "shards": "another shard set",
                "model": f"--model {before.get('model')}",
                "format": "another format",
            }[field]
            raise DataError(
                f"{out} holds an interrupted score run of {what}; resume it with the "
                f"same options, or choose another --output"
            )


@torch.inference_mode()
def score_shards(
    encoder: Any,
    shards: Any,
    out_dir: str | Path,
    *,
    model_id: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    text_forward: Any = None,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Score every sample of `shards` with `encoder` into `out_dir` (see the module docstring).

    Returns the info dict on rank 0 (None on other ranks). `model_id` names the model in
    run.json so a resume with another model is refused. `text_forward`: a text forward that
    skips the padding after each batch's longest caption (the CLI passes clip_eval's
    `trimmed_text_forward` for open_clip towers; ours trim inside `encode_text`); it is
    checked against `encode_text` on the first batch and dropped if it differs.
    """
    from data_tools.progress import progress as progress_bar

    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"--num-workers must be >= 0, got {num_workers}")
    out = Path(out_dir)
    urls = expand_shards(shards)
    options = _run_options(model_id, urls)
    rank, world = dist_info()
    if (out / INFO).is_file() and json.loads((out / RUN).read_text()) == options:
        log.info("%s is complete already", out)
        return json.loads((out / INFO).read_text()) if rank == 0 else None
    check_run(out, options)
    _barrier(world)  # every rank checked before rank 0 writes run.json
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN, options)
    (out / "parts").mkdir(parents=True, exist_ok=True)

    mine = [i for i in range(len(urls)) if i % world == rank]
    pending = [i for i in mine if not part_path(out, i).is_file()]
    if len(pending) < len(mine):
        log.info(
            "resuming: %d of %d shards of this process are scored already",
            len(mine) - len(pending),
            len(mine),
        )
    if pending:
        _score(
            encoder,
            urls,
            pending,
            out,
            batch_size,
            num_workers,
            torch.device(device),
            text_forward,
            progress_bar,
            progress,
        )
    _barrier(world)
    if rank != 0:
        return None
    return merge(out, urls, model_id)


def _score(
    encoder: Any,
    urls: list[str],
    pending: list[int],
    out: Path,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    text_forward: Any,
    progress_bar: Any,
    progress: bool,
) -> None:
    from data_tools.loader import make_loader

    keys = {i: shard_keys(urls[i]) for i in pending}
    workers = max(1, min(num_workers, len(pending)))
    loader = make_loader(
        [urls[i] for i in pending],
        batch_size=batch_size,
        image_transform=encoder.preprocess,
        tokenizer=encoder.tokenizer,
        mode="epoch",
        num_workers=workers if num_workers else 0,
    )
    if hasattr(encoder, "eval"):
        encoder.eval()
    dim = 0

    def done(i: int, rows: list) -> None:
        _write_part(out, i, rows, dim, keys[i])

    walkers = [_Attribution(pending[w::workers], keys, done) for w in range(workers)]
    trim: bool | None = None if text_forward is not None else False
    bar = progress_bar(
        total=sum(len(k) for k in keys.values()), desc="score", unit="sample", enabled=progress
    )
    try:
        for batch in loader:
            tokens = batch["text"]
            if trim is None:
                trim = _confirm(encoder, text_forward, tokens, device)
                log.info(
                    "text tower %s",
                    "trimmed to each batch's longest caption"
                    if trim
                    else "run over the full context (the trimmed forward differs)",
                )
            if trim:
                txt = torch.nn.functional.normalize(text_forward(tokens.to(device)), dim=-1)
            else:
                txt = encoder.encode_text(tokens.to(device), normalize=True)
            img = encoder.encode_image(batch["image"].to(device), normalize=True).float()
            txt = txt.float()
            score = (img * txt).sum(-1).cpu().numpy()
            img, txt = img.cpu().numpy(), txt.cpu().numpy()
            dim = img.shape[1]
            walker = walkers[batch.get("_worker", 0)]
            for j, key in enumerate(batch["key"]):
                walker.add(key, (key, float(score[j]), img[j], txt[j]))
            bar.update(len(batch["key"]) + sum(batch.get("_skipped", {}).values()))
        for w in walkers:
            w.close()
    finally:
        bar.close()
        loader.close()
    if loader.skipped:
        log.warning(
            "the %d skipped samples get no score; `filter` and `dedup` drop them",
            sum(loader.skipped.values()),
        )


def merge(out: Path, urls: list[str], model_id: str) -> dict[str, Any]:
    """Join the per-shard parts into the arrays and key table; info.json last."""
    keys, unscored, scores, images, texts = [], [], [], [], []
    for i in range(len(urls)):
        path = part_path(out, i)
        if not path.is_file():
            raise DataError(
                f"{path} is missing: shard {urls[i]} was not scored; rerun "
                "`clip-data score` with the same options to finish it"
            )
        with np.load(path) as part:
            keys.extend(json.dumps({"shard": i, "key": str(k)}) for k in part["keys"])
            unscored.extend(json.dumps({"shard": i, "key": str(k)}) for k in part["unscored"])
            scores.append(part["score"])
            images.append(part["image"])
            texts.append(part["text"])
    dim = max((a.shape[1] for a in images if a.size), default=0)
    score = np.concatenate(scores).astype(np.float32)
    image = np.concatenate([a.reshape(-1, dim) for a in images]).astype(np.float16)
    text = np.concatenate([a.reshape(-1, dim) for a in texts]).astype(np.float16)
    if not len(score):
        raise DataError(
            f"no sample of {urls[0]}... has an image and a caption; check the "
            "shards with `clip-data inspect`"
        )
    save_npy(out / "scores.npy", score)
    save_npy(out / "image_emb.npy", image)
    save_npy(out / "text_emb.npy", text)
    write_text_atomic(out / "keys.jsonl", "\n".join(keys) + "\n")
    write_text_atomic(out / "unscored.jsonl", "".join(line + "\n" for line in unscored))
    info = {
        "format": FORMAT,
        "model": model_id,
        "shards": [os.path.abspath(u) for u in urls],
        "count": len(score),
        "dim": int(dim),
        "score_mean": float(score.mean()),
    }
    write_json_atomic(out / INFO, info)
    return info
