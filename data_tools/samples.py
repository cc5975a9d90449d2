"""What a sample is and what can be wrong with one: field names, the guarded image open and
`check_sample`, shared by the loader, `clip-data validate`, the shard builders and evaluation.

One set of reason names (`REASONS`) is counted by all of them, so a bad sample is called the
same in a build manifest, a validate report and a training log. No torch here: builder worker
processes import only PIL.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")  # WebDataset fields that hold an image
IMAGE_FILE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

REASONS = (
    "decode",  # the image does not decode
    "too_large",  # more pixels than max_pixels (decompression bomb)
    "missing_image",  # no .jpg/.jpeg/.png/.webp (or the image file cannot be read)
    "missing_caption",  # no caption where one is needed
    "empty_caption",  # a caption of only white space where one is needed
    "caption_too_short",  # builders' --min-caption-len
    "caption_too_long",  # builders' --max-caption-len
    "bad_utf8",  # the caption is not UTF-8
    "bad_label",  # missing (where needed) or non-integer .cls
    "bad_json",  # missing (where needed) or invalid .json
    "duplicate_key",  # builders: another sample has this key
    "truncated_tar",  # the shard ends early; its last sample is lost
    "unsafe_member",  # a tar member with an absolute path, '..' or a link: rejected
    "unreadable_shard",  # the shard cannot be opened or is not a tar
)

# How a text field is checked: "no" not at all, "present" only when the sample has it,
# "yes" it must be there (and, for a caption, not be empty).
Need = Literal["no", "present", "yes"]


class BadSample(Exception):
    """A sample we skip: `reason` is one of `REASONS`, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_image_file(name: str | os.PathLike[str]) -> bool:
    """An image file by extension, not hidden (dot files are editors' and OSes' droppings)."""
    base = os.path.basename(os.fspath(name))
    return os.path.splitext(base)[1].lower() in IMAGE_FILE_EXTS and not base.startswith(".")


def open_image(src: bytes | str | os.PathLike[str], max_pixels: int) -> Image.Image:
    """Open (header only) and check the pixel bound before anything is decoded.

    PIL only warns between 1x and 2x `MAX_IMAGE_PIXELS`; that warning is an error here too.
    Raises `BadSample` ("decode" or "too_large").
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadSample("too_large", str(e)) from e
    except Image.UnidentifiedImageError as e:
        raise BadSample("decode", "not an image PIL can read (corrupt or unknown format)") from e
    except Exception as e:  # any header failure is a bad sample, not a crash
        raise BadSample("decode", f"not an image ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise BadSample("too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return img


def check_sample(
    fields: Mapping[str, Any],
    *,
    caption: Need = "present",
    label: Need = "no",
    meta: Need = "no",
    image: bool = True,
    min_caption_len: int = 0,
    max_caption_len: int | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Parse the text fields of one sample without decoding its image.

    Returns the parsed row ("caption", "label", "json" where present and valid, "image": the
    image field or None) and every problem as (reason, detail), in a fixed order (caption,
    label, json, image), so a reader that stops at the first one always names the same.
    Callers choose what is required: the loader what its batches carry, validate what is
    present, builders their caption options (`image=False`: the image is not a field).
    """
    row: dict[str, Any] = {}
    bad: list[tuple[str, str]] = []
    raw = fields.get("txt")
    if raw is None:
        if caption == "yes":
            bad.append(("missing_caption", "no caption (.txt)"))
    elif caption != "no":
        text: str | None = raw if isinstance(raw, str) else None
        if text is None:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(("bad_utf8", f"caption is not UTF-8 ({e})"))
        if text is not None:
            text = text.strip()
            row["caption"] = text
            if not text and (caption == "yes" or min_caption_len > 0):
                bad.append(("empty_caption", "the caption is empty"))
            elif len(text) < min_caption_len:
                bad.append(
                    (
                        "caption_too_short",
                        f"{len(text)} chars < --min-caption-len {min_caption_len}",
                    )
                )
            elif max_caption_len is not None and len(text) > max_caption_len:
                bad.append(
                    ("caption_too_long", f"{len(text)} chars > --max-caption-len {max_caption_len}")
                )
    if label == "yes" or (label == "present" and "cls" in fields):
        try:
            row["label"] = int(fields["cls"].decode("ascii").strip())
        except (KeyError, ValueError, UnicodeDecodeError):
            bad.append(("bad_label", "missing or non-integer label (.cls)"))
    if meta == "yes" or (meta == "present" and "json" in fields):
        try:
            row["json"] = json.loads(fields["json"].decode("utf-8"))
        except (KeyError, ValueError, UnicodeDecodeError) as e:
            bad.append(("bad_json", f"missing or invalid .json ({e})"))
    row["image"] = next((e for e in IMAGE_FIELDS if e in fields), None)
    if row["image"] is None and image:
        bad.append(("missing_image", "no image (.jpg/.jpeg/.png/.webp)"))
    return row, bad
