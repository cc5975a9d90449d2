"""The builders' per-sample work: read an `Item`, check its caption, encode its image.

Runs in builder worker processes (spawned: they import PIL, not torch), so the options travel
once per worker through `init_worker` and each item comes back as (sample, "", "") or
(None, reason, detail) with a reason from `data_tools.samples.REASONS`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

from data_tools.build_inputs import Item
from data_tools.errors import DataError
from data_tools.images import encode_image
from data_tools.samples import IMAGE_FIELDS, BadSample, check_sample
from data_tools.tario import FieldLoader, RawSample


@dataclass(frozen=True)
class EncodeOptions:
    """How each sample is checked and encoded; every field maps to a `clip-data` flag."""

    max_side: int | None = None
    jpeg_quality: int = 95
    max_pixels: int = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
    require_caption: bool = True
    min_caption_len: int = 1
    max_caption_len: int | None = None

    def validate(self) -> None:
        if self.max_side is not None and self.max_side < 8:
            raise DataError(f"--max-side {self.max_side} is too small (>= 8)")
        if not 1 <= self.jpeg_quality <= 100:
            raise DataError(f"--jpeg-quality {self.jpeg_quality} is not in 1-100")
        if self.max_pixels < 1:
            raise DataError(f"--max-pixels {self.max_pixels} must be >= 1")
        if self.max_caption_len is not None and self.max_caption_len < self.min_caption_len:
            raise DataError(
                f"--max-caption-len {self.max_caption_len} < --min-caption-len "
                f"{self.min_caption_len}"
            )


_OPTS: EncodeOptions | None = None
_FIELDS: FieldLoader | None = None


def init_worker(opts: EncodeOptions) -> None:
    global _OPTS, _FIELDS
    _OPTS, _FIELDS = opts, FieldLoader()


def _caption(raw: bytes | str | None, opts: EncodeOptions) -> str | None:
    """The checked caption, or `BadSample` (reason and why)."""
    row, bad = check_sample(
        {} if raw is None else {"txt": raw},
        image=False,
        caption="yes" if opts.require_caption else "present",
        min_caption_len=opts.min_caption_len,
        max_caption_len=opts.max_caption_len,
    )
    if bad:
        raise BadSample(*bad[0])
    return row.get("caption")


def encode_item(
    item: Item, opts: EncodeOptions | None = None, fields: FieldLoader | None = None
) -> tuple[dict[str, Any] | None, str, str]:
    """(sample, "", "") for a good item, (None, reason, detail) for a bad one."""
    opts = opts or _OPTS or EncodeOptions()
    try:
        extra: dict[str, Any] = {}
        if item.url is not None:
            loader = fields or _FIELDS or FieldLoader()
            raw = loader.load(RawSample(item.key, item.url, {}, dict(item.refs or {})))
            data = dict(raw.fields)
            img_field = next((e for e in IMAGE_FIELDS if e in data), None)
            image = data.pop(img_field) if img_field else None
            caption = _caption(data.pop("txt", None), opts)
            extra = data  # json, cls and anything else travel as they are
        else:
            image = None
            if item.image is not None:
                try:
                    with open(item.image, "rb") as f:
                        image = f.read()
                except OSError as e:
                    raise BadSample(
                        "missing_image", f"cannot read {item.image} ({e.strerror})"
                    ) from e
            raw_cap: bytes | str | None = item.caption
            if raw_cap is None and item.caption_path is not None:
                try:
                    with open(item.caption_path, "rb") as f:
                        raw_cap = f.read()
                except OSError as e:
                    raise BadSample("missing_caption", f"cannot read {item.caption_path}") from e
            caption = _caption(raw_cap, opts)
        if image is None:
            raise BadSample("missing_image", "no image")
        data_out, ext, _ = encode_image(
            image,
            max_side=opts.max_side,
            jpeg_quality=opts.jpeg_quality,
            max_pixels=opts.max_pixels,
        )
    except BadSample as e:
        return None, e.reason, str(e)
    sample: dict[str, Any] = {"__key__": item.key, ext: data_out}
    if caption is not None:
        sample["txt"] = caption
    if item.label is not None:
        sample["cls"] = item.label
    sample.update(extra)
    if item.meta:
        if "json" in sample:  # a source shard's json, plus what the listing knows
            try:
                sample["json"] = {**json.loads(sample["json"]), **item.meta}
            except ValueError:
                pass
        else:
            sample["json"] = item.meta
    return sample, "", ""


def encode_in_worker(item: Item) -> tuple[dict[str, Any] | None, str, str]:
    return encode_item(item)
