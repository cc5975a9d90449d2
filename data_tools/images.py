"""Checking and re-encoding images for the shard builders (opened by `data_tools.samples`).

No torch here: builder worker processes import only PIL.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

from data_tools.samples import BadSample, open_image

# WebDataset field for each PIL format we store as is; anything else is re-encoded to JPEG.
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_ORIENTATION = 0x0112


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without the palette-transparency warning PIL gives for some PNG/GIF files."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Decode fully (catches truncated and corrupt data); returns (width, height)."""
    img = open_image(data, max_pixels)
    try:
        img.load()
    except Exception as e:
        raise BadSample("decode", f"{type(e).__name__}: {e}") from e
    return img.size


def encode_image(
    data: bytes, *, max_side: int | None, jpeg_quality: int, max_pixels: int
) -> tuple[bytes, str, tuple[int, int]]:
    """Bytes to store, their field ("jpg", "png", "webp") and the stored (width, height).

    JPEG/PNG/WebP within `max_side` and without an EXIF rotation are kept byte for byte
    (after a full decode that proves they are readable); others are rotated upright,
    shrunk so the longer side is at most `max_side` (aspect kept; JPEGs decoded at reduced
    scale first) and written as RGB JPEG at `jpeg_quality`.
    """
    img = open_image(data, max_pixels)
    w, h = img.size
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block is no reason to drop the image
        orientation = 1
    shrink = max_side is not None and max(w, h) > max_side
    try:
        if img.format in KEEP_FORMATS and not shrink and orientation in (0, 1):
            img.load()
            return data, KEEP_FORMATS[img.format], (w, h)
        if shrink:
            assert max_side is not None
            # thumbnail() keeps the aspect ratio and uses JPEG draft mode when it can.
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC, reducing_gap=2.0)
        img = to_rgb(ImageOps.exif_transpose(img))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=jpeg_quality)
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("decode", f"{type(e).__name__}: {e}") from e
    return buf.getvalue(), "jpg", img.size
