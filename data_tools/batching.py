"""Batches assembled in place: each decoded image goes straight into a batch tensor whose
storage is already in shared memory, so handing the batch to the main process copies nothing
(as torch's default_collate does for a DataLoader worker)."""

from __future__ import annotations

import math
from typing import Any

import torch
from PIL import Image
from torch.utils.data import get_worker_info


def empty_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor, in shared memory when made in a DataLoader worker."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class Batcher:
    """Collects decoded samples of one batch; images go straight into the batch tensor.

    A transform with `resize_pil` and `to_tensor_into` (`data_tools.transforms.ImageTransform`)
    writes each image into its slot; any other callable's tensors are stacked at the end.
    """

    def __init__(self, batch_size: int, transform: Any) -> None:
        self.batch_size = batch_size
        self.transform = transform
        self.fast = callable(getattr(transform, "resize_pil", None)) and callable(
            getattr(transform, "to_tensor_into", None)
        )
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.images: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []
        self.rows: list[dict[str, Any]] = []

    def image(self, img: Image.Image) -> None:
        """Transform one opened image into the next slot (raises on a bad image)."""
        if self.fast:
            small = self.transform.resize_pil(img)
            if self.images is None:
                s = self.transform.image_size
                self.images = empty_shared((self.batch_size, 3, s, s), torch.float32)
            self.transform.to_tensor_into(small, self.images[self.n])
        else:
            self.tensors.append(self.transform(img))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.n += 1

    def finish(self, tokenizer: Any, with_label: bool, with_json: bool) -> dict[str, Any]:
        n = self.n
        if self.fast:
            assert self.images is not None
            images = self.images if n == self.batch_size else self.images[:n]
        else:
            first = self.tensors[0]
            images = empty_shared((n, *first.shape), first.dtype)
            torch.stack(self.tensors, out=images)
        batch: dict[str, Any] = {"image": images, "key": [r["key"] for r in self.rows]}
        if any("caption" in r for r in self.rows):
            batch["caption"] = [r.get("caption", "") for r in self.rows]
        if tokenizer is not None:
            batch["text"] = torch.as_tensor(tokenizer(batch["caption"])).long()
        if with_label:
            batch["label"] = torch.tensor([r["label"] for r in self.rows], dtype=torch.long)
        if with_json:
            batch["json"] = [r["json"] for r in self.rows]
        self.reset()
        return batch
