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

    A transform with `decode`, `resize_rgb` and `to_tensor_into`
    (`data_tools.transforms.ImageTransform`) writes each image into its slot; any other
    callable's tensors are stacked at the end. `view_transform` (SimCLR's augmentation,
    `data_tools.transforms.SimCLRTransform`) makes a second view of every image into "image_2":
    the image is decoded once, at the larger resolution the two views need, and augmented twice.
    `uint8=True` keeps the images as uint8 pixels (the transform's `normalize` finishes them),
    which needs such a transform.
    """

    def __init__(
        self, batch_size: int, transform: Any, view_transform: Any = None, uint8: bool = False
    ) -> None:
        self.batch_size = batch_size
        self.transform = transform
        self.view_transform = view_transform
        self.fast = all(
            callable(getattr(t, name, None))
            for t in (transform, view_transform)
            if t is not None
            for name in ("decode", "resize_rgb", "to_tensor_into")
        )
        if uint8 and not self.fast:
            raise ValueError("uint8 images need transforms with decode, resize_rgb, to_tensor_into")
        self.dtype = torch.uint8 if uint8 else torch.float32
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.images: torch.Tensor | None = None
        self.images_2: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []
        self.tensors_2: list[torch.Tensor] = []
        self.rows: list[dict[str, Any]] = []

    def image(self, img: Image.Image) -> None:
        """Transform one opened image into the next slot (raises on a bad image)."""
        views = [t for t in (self.transform, self.view_transform) if t is not None]
        if not self.fast:
            # PIL decodes an opened image once, on first access; both transforms read that copy
            made = [t(img) for t in views]
            for out, tensor in zip((self.tensors, self.tensors_2), made):
                out.append(tensor)
            return
        rgb = self.transform.decode(img, max(t.draft_side for t in views))
        small = [t.resize_rgb(rgb) for t in views]
        if self.images is None:
            self.images = self._slots(self.transform)
            if self.view_transform is not None:
                self.images_2 = self._slots(self.view_transform)
        for t, im, slots in zip(views, small, (self.images, self.images_2)):
            assert slots is not None
            t.to_tensor_into(im, slots[self.n])

    def _slots(self, transform: Any) -> torch.Tensor:
        size = transform.image_size
        return empty_shared((self.batch_size, 3, size, size), self.dtype)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.n += 1

    def finish(self, tokenizer: Any, with_label: bool, with_json: bool) -> dict[str, Any]:
        batch: dict[str, Any] = {"image": self._stacked(self.images, self.tensors)}
        if self.view_transform is not None:
            batch["image_2"] = self._stacked(self.images_2, self.tensors_2)
        batch["key"] = [r["key"] for r in self.rows]
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

    def _stacked(self, slots: torch.Tensor | None, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The batch's images: the filled slots (fast path) or the tensors stacked."""
        n = self.n
        if self.fast:
            assert slots is not None
            return slots if n == self.batch_size else slots[:n]
        images = empty_shared((n, *tensors[0].shape), tensors[0].dtype)
        torch.stack(tensors, out=images)
        return images
