"""One raw sample -> one row of a batch: checked, opened with the pixel bound, transformed.

Cheap checks come first (`data_tools.samples.check_sample` reads only the text fields), so a
sample the loader would drop is never decoded; a sample that fails is counted, not raised.
"""

from __future__ import annotations

from data_tools.bad_samples import BadSampleLog
from data_tools.batching import Batcher
from data_tools.read_plan import ReadPlan
from data_tools.samples import BadSample, check_sample, open_image
from data_tools.tario import RawSample


def decode_into(
    s: RawSample, batcher: Batcher, report: BadSampleLog, plan: ReadPlan, need_caption: bool
) -> bool:
    """Check and decode `s` (fields loaded) into `batcher`; False (and reported) when bad.

    `need_caption`: the batches are tokenized, so a sample without a caption is bad."""
    key, url = s.key, s.url
    row, bad = check_sample(
        s.fields,
        caption="yes" if need_caption else "present",
        label="yes" if plan.with_label else "no",
        meta="yes" if plan.with_json else "no",
    )
    if bad:
        report.bad(bad[0][0], key, url, bad[0][1])
        return False
    try:
        img = open_image(s.fields[row.pop("image")], plan.max_pixels)
    except BadSample as e:
        report.bad(e.reason, key, url, str(e))
        return False
    row["key"] = key
    try:
        batcher.image(img)
    except Exception as e:  # truncated or corrupt data surfaces at decode time
        report.bad("decode", key, url, f"{type(e).__name__}: {e}")
        return False
    batcher.add(row)
    return True
