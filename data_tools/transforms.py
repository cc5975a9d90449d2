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
    "SimCLRTransform",
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
        # 255 as a tensor, not a Python number: CUDA divides by a scalar as a multiplication by
        # its reciprocal, which differs from true division in the last bit for half the pixel
        # values; tensor / tensor is true division on every device, as the CPU's `div_(255)` is
        self._255_t = torch.full((1, 1, 1), 255.0)
        self._on_device: dict[torch.device, tuple[torch.Tensor, ...]] = {}
        self.scale = scale
        self.ratio = ratio
        self.rng = random.Random(seed)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_on_device"] = {}  # never send GPU tensors to loader workers
        return state

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

    @property
    def draft_side(self) -> int:
        """The smallest source side a JPEG may be decoded at (with margin for the crop: it may
        take 90% of the area)."""
        return int(math.ceil(self.image_size / 0.85)) if self.train else self.image_size

    def decode(self, img: Image.Image, side: int | None = None) -> Image.Image:
        """`img` as RGB; big JPEGs decoded at 1/2, 1/4 or 1/8 scale when that still covers `side`
        (PIL draft mode; default `draft_side`), so a 512 px shard feeding a 64 px model costs a
        fraction of a full decode. The loader passes a larger `side` when a second view of the
        same decoded image needs one."""
        if img.format == "JPEG" and min(img.size) > self.image_size:
            want = self.draft_side if side is None else side
            img.draft("RGB", (want, want))
        return to_rgb(img)

    def resize_pil(self, img: Image.Image) -> Image.Image:
        """The geometric part: an RGB image of exactly `image_size` x `image_size`.

        Training draws its crop from the transform's own RNG."""
        return self.resize_rgb(self.decode(img))

    def resize_rgb(self, img: Image.Image) -> Image.Image:
        """`resize_pil` on an image `decode` returned (never modified: views share it)."""
        size = self.image_size
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
        """Write `img` (RGB, `image_size` square) into `out` ([3, H, W]): normalised when `out`
        is float32, its raw pixels when `out` is uint8 (`normalize` finishes those later).

        The loader calls this on a slot of a batch tensor that already lives in shared
        memory, so an image is converted once, while it is in cache, and never copied again.
        The values are bit-identical to torchvision's `to_tensor` + `normalize`.
        """
        arr = np.asarray(img)
        if arr.shape != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected a {self.image_size}px RGB image, got array {arr.shape}")
        np.copyto(out.numpy(), arr.transpose(2, 0, 1), casting="unsafe")
        if out.dtype != torch.uint8:
            self._normalize_(out)

    def _normalize_(self, x: torch.Tensor) -> torch.Tensor:
        stats = (self._255_t, self._mean_t, self._std_t)
        if x.device.type != "cpu":  # copied to a device once, not at every micro-batch
            if x.device not in self._on_device:
                self._on_device[x.device] = tuple(t.to(x.device) for t in stats)
            stats = self._on_device[x.device]
        scale, mean, std = stats
        return x.div_(scale).sub_(mean).div_(std)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels ([..., 3, H, W], any device) -> the float32 tensor `to_tensor_into`
        would have written, bit for bit: the same operations in the same order, each correctly
        rounded (tested on the CPU; on CUDA by tests/clip_train/test_cuda.py).

        A loader made with `uint8_images=True` sends pixels, a quarter of float32's bytes in
        shared memory and host-to-device copies (as timm's prefetching loader does); the trainer
        calls this per micro-batch on the device."""
        if pixels.dtype != torch.uint8:
            raise TypeError(f"normalize takes uint8 pixels, got {pixels.dtype}")
        return self._normalize_(pixels.to(torch.float32))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        out = torch.empty(3, self.image_size, self.image_size)
        self.to_tensor_into(self.resize_pil(img), out)
        return out


class SimCLRTransform(ImageTransform):
    """The second, strongly augmented image view of SimCLR (Chen et al., 2020) and SLIP: random
    resized crop (area 8-100%, bicubic), horizontal flip, colour jitter (brightness, contrast,
    saturation 0.4, hue 0.1, in a random order) with probability 0.8, grayscale with probability
    0.2; then normalised as the first view. Every draw comes from the transform's own RNG (the
    loader reseeds it per batch), so views are deterministic and resume exactly.

    Flipping is fine here: this view is compared with images only, never with a caption. SimCLR's
    Gaussian blur is left out (SLIP keeps it for ImageNet at 224 px; small images lose too much).
    """

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = OPENAI_DATASET_MEAN,
        std: Sequence[float] = OPENAI_DATASET_STD,
        scale: tuple[float, float] = (0.08, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        flip_p: float = 0.5,
        seed: int = 0,
    ) -> None:
        super().__init__(image_size, train=True, mean=mean, std=std, scale=scale, seed=seed)
        self.jitter, self.jitter_p = tuple(float(j) for j in jitter), float(jitter_p)
        self.grayscale_p, self.flip_p = float(grayscale_p), float(flip_p)

    def __repr__(self) -> str:
        return (
            f"SimCLRTransform(image_size={self.image_size}, scale={self.scale}, "
            f"jitter={self.jitter}@{self.jitter_p}, grayscale@{self.grayscale_p}, "
            f"flip@{self.flip_p})"
        )

    @property
    def draft_side(self) -> int:
        # the smallest crop still has at least as many source pixels as the output
        return int(math.ceil(self.image_size / math.sqrt(self.scale[0])))

    def resize_rgb(self, img: Image.Image) -> Image.Image:
        img = super().resize_rgb(img)  # the random resized crop
        if self.rng.random() < self.flip_p:
            img = TF.hflip(img)
        if self.rng.random() < self.jitter_p:
            img = self._jitter(img)
        if self.rng.random() < self.grayscale_p:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        return img

    def _jitter(self, img: Image.Image) -> Image.Image:
        """torchvision's ColorJitter, its factors and order drawn from our RNG."""
        b, c, s, h = self.jitter
        ops = [
            (TF.adjust_brightness, self.rng.uniform(1 - b, 1 + b)),
            (TF.adjust_contrast, self.rng.uniform(1 - c, 1 + c)),
            (TF.adjust_saturation, self.rng.uniform(1 - s, 1 + s)),
            (TF.adjust_hue, self.rng.uniform(-h, h)),
        ]
        self.rng.shuffle(ops)
        for op, factor in ops:
            img = op(img, factor)
        return img


def image_transform(
    image_size: int,
    train: bool = False,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """The preprocessing used for training (`train=True`) and evaluation."""
    return ImageTransform(image_size, train=train, mean=mean, std=std)
