"""Image preprocessing: PIL image -> normalised float tensor, run inside loader workers.

A small picklable class rather than a torchvision `Compose` of lambdas so DataLoader workers
can receive it under any start method, and so its augmentation draws from its own seeded RNG
(never the global one): the loader reseeds it at every batch from (seed, epoch, rank, worker,
batch index), which is what makes a resumed epoch augment exactly like an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image
from torchvision.transforms import InterpolationMode

from data_tools.images import to_rgb

__all__ = [
    "ImageTransform",
    "image_transform",
    "to_rgb",
    "OPENAI_DATASET_MEAN",
    "OPENAI_DATASET_STD",
]


class ImageTransform:
    """Resize the shorter side to `image_size` (bicubic), center-crop, normalise.

    `train=True` adds a mild random-resized crop (area 90-100%). There is deliberately no
    horizontal flip: captions say "left" and "right".
    """

    def __init__(
        self,
        image_size: int,
        train: bool = False,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self.scale = scale
        self.ratio = ratio
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation RNG (the loader calls this at the start of every batch)."""
        self.rng = random.Random(seed)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(image_size={self.image_size}, train={self.train}, "
            f"mean={self.mean}, std={self.std})"
        )

    def _crop_box(self, w: int, h: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of a random crop with area in `scale`, aspect in `ratio`."""
        area = w * h
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * self.rng.uniform(*self.scale)
            aspect = math.exp(self.rng.uniform(log_lo, log_hi))
            cw = int(round(math.sqrt(target * aspect)))
            ch = int(round(math.sqrt(target / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return self.rng.randint(0, h - ch), self.rng.randint(0, w - cw), ch, cw
        side = min(w, h)
        return (h - side) // 2, (w - side) // 2, side, side

    def resize_pil(self, img: Image.Image) -> Image.Image:
        """The geometric part: an RGB image of exactly `image_size` x `image_size`.

        Big JPEGs are decoded at 1/2, 1/4 or 1/8 scale when that still covers the target
        (PIL draft mode), so a 512 px shard feeding a 64 px model costs a fraction of a
        full decode. Training draws its crop from the transform's own RNG.
        """
        size = self.image_size
        if img.format == "JPEG" and min(img.size) > size:
            # Ask for margin when we will crop (the crop may take 90% of the area).
            want = int(math.ceil(size / 0.85)) if self.train else size
            img.draft("RGB", (want, want))
        img = to_rgb(img)
        if self.train:
            top, left, ch, cw = self._crop_box(*img.size)
            return img.resize(
                (size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch)
            )
        if img.size != (size, size):  # already the right size: nothing to resample
            img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
            img = TF.center_crop(img, [size, size])
        return img

    def to_tensor_into(self, img: Image.Image, out: torch.Tensor) -> None:
        """Write `img` (RGB, `image_size` square) normalised into `out` ([3, H, W] float32).

        The loader calls this on a slot of a batch tensor that already lives in shared
        memory, so an image is converted once, while it is in cache, and never copied again.
        The values are bit-identical to torchvision's `to_tensor` + `normalize`.
        """
        arr = np.asarray(img)
        if arr.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected a {self.image_size}px RGB image, got array {arr.shape}")
        np.copyto(out.numpy(), arr.transpose(2, 0, 1), casting="unsafe")
        out.div_(255).sub_(self._mean_t).div_(self._std_t)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out = torch.empty(3, self.image_size, self.image_size)
        self.to_tensor_into(self.resize_pil(img), out)
        return out


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing used for training (`train=True`) and evaluation."""
    return ImageTransform(image_size, train=train, mean=mean, std=std)
