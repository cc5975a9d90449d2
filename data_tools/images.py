"""Opening and re-encoding images for the shard builders, with a pixel bound.

No torch here: builder worker processes import only PIL.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps

# WebDataset field for each PIL format we store as is; anything else is re-encoded to JPEG.
KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_ORIENTATION = 0x0112


class BadImage(Exception):
    """An image we skip: `reason` is a skip reason ("decode", "too_large"), the message why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB without the palette-transparency warning PIL gives for some PNG/GIF files."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel bound before anything is decoded."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x MAX_IMAGE_PIXELS; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadImage("decode", "not an image PIL can read (corrupt or unknown format)") from e
    except Exception as e:
        raise BadImage("decode", f"not an image ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return img


def check_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Decode fully (catches truncated and corrupt data); returns (width, height)."""
    img = open_image(data, max_pixels)
    try:
        img.load()
    except Exception as e:
        raise BadImage("decode", f"{type(e).__name__}: {e}") from e
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
    except BadImage:
        raise
    except Exception as e:
        raise BadImage("decode", f"{type(e).__name__}: {e}") from e
    return buf.getvalue(), "jpg", img.size
