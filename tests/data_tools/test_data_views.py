"""The second augmented image view (`image_views=2`, SimCLR's augmentation): made only when asked,
different from the first, decoded once, deterministic per seed, resumed exactly."""

import io
import itertools
import json
import pickle

import pytest
import torch
from PIL import Image

from data_tools.batching import Batcher
from data_tools.errors import DataError
from data_tools.loader import make_loader
from data_tools.transforms import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    ImageTransform,
    SimCLRTransform,
)


@pytest.fixture
def noise_shards(tmp_path):
    """Shards of 16 px noise JPEGs (a plain colour would look the same after any crop or flip)."""
    from data_tools.shards import ShardWriter

    def make(counts: list[int]):
        g = torch.Generator().manual_seed(0)
        idx = 0
        for j, n in enumerate(counts):
            with ShardWriter(tmp_path / "noise", f"part{j:02d}", samples_per_shard=n) as w:
                for _ in range(n):
                    arr = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
                    w.write({"__key__": f"s{idx:05d}", "jpg": buf.getvalue(), "txt": f"c {idx}"})
                    idx += 1
        return tmp_path / "noise"

    return make


def _kw(**over):
    kw = dict(
        batch_size=3,
        image_transform=ImageTransform(16, train=True),
        shuffle_buffer=7,
        seed=5,
        image_views=2,
    )
    kw.update(over)
    return kw


def _take(loader, n=None):
    it = iter(loader)
    return list(it if n is None else itertools.islice(it, n))


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["image_2"], y["image_2"])


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """A normalised [3, H, W] view back in [0, 1]."""
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
    return x * std + mean


def test_second_view_only_when_asked_and_different(noise_shards):
    d = noise_shards([6, 6])
    one = _take(make_loader(d, **_kw(image_views=1)))
    two = _take(make_loader(d, **_kw()))
    assert all("image_2" not in b for b in one)
    assert [b["key"] for b in one] == [b["key"] for b in two]
    for b1, b2 in zip(one, two):
        assert b2["image_2"].shape == b2["image"].shape == (3, 3, 16, 16)
        # the first view is what it was (16 px JPEGs: no draft either way; its own RNG stream)
        assert torch.equal(b1["image"], b2["image"])
        for i in range(3):
            assert not torch.equal(b2["image"][i], b2["image_2"][i])


@pytest.mark.parametrize("workers", [0, 2])
def test_second_view_deterministic_and_resumes_exactly(noise_shards, char_tokenizer, workers):
    d = noise_shards([7, 5, 9, 4, 6])
    kw = _kw(num_workers=workers, tokenizer=char_tokenizer)
    full = _take(make_loader(d, **kw))
    _same(_take(make_loader(d, **kw)), full)
    other = _take(make_loader(d, **_kw(num_workers=workers, tokenizer=char_tokenizer, seed=6)))
    assert any(not torch.equal(a["image_2"], b["image_2"]) for a, b in zip(other, full))
    for k in (1, 4, len(full) - 1):
        first = make_loader(d, **kw)
        head = _take(first, k)
        state = json.loads(json.dumps(first.state_dict()))
        first.close()
        _same(head + _take(make_loader(d, **kw, state=state)), full)


def test_views_setting_is_part_of_the_resume_state(make_shards):
    d = make_shards([6, 6])
    loader = make_loader(d, **_kw(image_views=1))
    next(iter(loader))
    with pytest.raises(DataError, match="fields differs"):
        make_loader(d, **_kw(), state=loader.state_dict())
    for bad, message in [
        (dict(image_views=3), "image_views must be 1 or 2"),
        (dict(image_views=1, view_transform=SimCLRTransform(16)), "pass image_views=2"),
        (dict(image_transform=lambda img: torch.zeros(3, 16, 16)), "needs view_transform"),
    ]:
        with pytest.raises(DataError, match=message):
            make_loader(d, **_kw(**bad))


def test_decoded_once_at_the_resolution_both_views_need():
    """One decode per sample; a big JPEG is drafted to what the 8% crop needs, not the first
    view's 90%."""
    calls = []

    class Spy(ImageTransform):
        def decode(self, img, side=None):
            calls.append(side)
            return super().decode(img, side)

    first, second = Spy(32, train=True), SimCLRTransform(32)
    batcher = Batcher(2, first, second)
    buf = io.BytesIO()
    Image.new("RGB", (1024, 1024), (200, 30, 30)).save(buf, format="JPEG")
    for _ in range(2):
        img = Image.open(io.BytesIO(buf.getvalue()))
        batcher.image(img)
        batcher.add({"key": "k"})
    assert calls == [second.draft_side] * 2 == [114] * 2  # ceil(32 / sqrt(0.08))
    assert img.size == (128, 128)  # 1/8 scale still covers 114 px (the first view: 38)
    batch = batcher.finish(None, False, False)
    assert batch["image"].shape == batch["image_2"].shape == (2, 3, 32, 32)


def test_simclr_transform_augmentations():
    """Crops down to 8% of the area, flips, colour jitter and grayscale at SimCLR's rates;
    seeded and picklable."""
    t = SimCLRTransform(32, seed=3)
    assert pickle.loads(pickle.dumps(t)).rng.getstate() == t.rng.getstate()
    # left half red, right half blue: shows flips
    img = Image.new("RGB", (64, 64), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 32, 64))
    t.reseed(1)
    outs = [_pixels(t(img)) for _ in range(400)]
    t.reseed(1)
    torch.testing.assert_close(_pixels(t(img)), outs[0])
    gray = [bool((o.max(0).values - o.min(0).values).abs().max() < 0.02) for o in outs]
    assert 0.12 < sum(gray) / len(outs) < 0.28  # p = 0.2
    # red minus blue per column; a crop that straddles the middle shows which side is red
    redness = [(o[0] - o[2]).mean(0) for o, g in zip(outs, gray) if not g]
    straddle = [r for r in redness if r.max() - r.min() > 0.3]
    flipped = [bool(r[-1] > r[0]) for r in straddle]
    assert len(straddle) > 50 and 0.35 < sum(flipped) / len(flipped) < 0.65  # p = 0.5
    # jitter: views of a plain grey image change brightness; SimCLR's crop alone would not
    t.reseed(2)
    plain = Image.new("RGB", (64, 64), (128, 128, 128))
    levels = {round(float(_pixels(t(plain)).mean()), 3) for _ in range(50)}
    assert len(levels) > 20
    # crops cover 8-100% of the area (the first view's: 90-100%)
    t.reseed(4)
    areas = [h * w / 200**2 for _, _, h, w in (t._crop_box(200, 200) for _ in range(500))]
    assert 0.075 < min(areas) < 0.12 and max(areas) > 0.9
    assert ImageTransform(32, train=True).scale == (0.9, 1.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_batches_normalise_to_the_float_batches(noise_shards, workers):
    """`uint8_images`: both views arrive as pixels, a quarter of the bytes, and the transform's
    normalize turns them into exactly the float32 batches (the trainer does it per micro-batch)."""
    shards = noise_shards([7, 6])
    floats = _take(make_loader(shards, num_workers=workers, **_kw()))
    loader = make_loader(shards, num_workers=workers, uint8_images=True, **_kw())
    pixels = _take(loader)
    assert len(pixels) == len(floats) == 5
    t = _kw()["image_transform"]
    for p, f in zip(pixels, floats):
        assert p["key"] == f["key"]
        assert p["image"].dtype == p["image_2"].dtype == torch.uint8
        assert torch.equal(t.normalize(p["image"]), f["image"])
        assert torch.equal(t.normalize(p["image_2"]), f["image_2"])


def test_uint8_images_need_an_image_transform(noise_shards):
    with pytest.raises(DataError, match="uint8_images=True needs ImageTransforms"):
        make_loader(
            noise_shards([4]),
            **_kw(image_transform=lambda im: torch.zeros(3, 16, 16), image_views=1),
            uint8_images=True,
        )


def test_uint8_views_share_one_normalisation(noise_shards):
    other = SimCLRTransform(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="view_transform's mean/std differ"):
        make_loader(noise_shards([4]), **_kw(view_transform=other), uint8_images=True)
