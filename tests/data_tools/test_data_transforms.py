import io
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from data_tools.transforms import OPENAI_DATASET_MEAN, ImageTransform, image_transform


def _image(w=80, h=50, mode="RGB"):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr).convert(mode)


def test_eval_matches_open_clip_preprocess():
    # Oracle: open_clip's own eval transform (resize shorter side bicubic, center crop, normalise).
    ref = open_clip.image_transform(32, is_train=False)
    img = _image()
    ours = image_transform(32)(img)
    assert ours.shape == (3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref(img))


def test_modes_and_big_jpeg_draft():
    t = image_transform(24)
    assert t(_image(mode="L")).shape == (3, 24, 24)
    assert t(_image(mode="RGBA")).shape == (3, 24, 24)
    buf = io.BytesIO()
    _image(1000, 700).save(buf, format="JPEG")
    big = Image.open(io.BytesIO(buf.getvalue()))
    out = t(big)
    assert out.shape == (3, 24, 24)
    assert big.size[0] < 1000  # decoded at reduced scale (draft), not full size
    # a uniform image normalises to (v - mean) / std
    flat = t(Image.new("RGB", (30, 30), (255, 0, 0)))
    torch.testing.assert_close(flat[1], torch.full((24, 24), -OPENAI_DATASET_MEAN[1] / 0.26130258))


def test_train_crop_is_mild_seeded_and_picklable():
    t = ImageTransform(32, train=True)
    t2 = pickle.loads(pickle.dumps(t))
    img = _image(64, 64)
    a, b = t(img), t2(img)
    torch.testing.assert_close(a, b)  # same RNG state after pickling
    t.reseed(1)
    outs = [t(img) for _ in range(4)]
    assert outs[0].shape == (3, 32, 32)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    t.reseed(1)
    torch.testing.assert_close(t(img), outs[0])
    # no horizontal flip: a left-red / right-blue image stays red on the left
    lr = Image.new("RGB", (64, 64), (0, 0, 255))
    lr.paste((255, 0, 0), (0, 0, 32, 64))
    for _ in range(10):
        x = t(lr)
        assert x[0, :, :4].mean() > x[0, :, -4:].mean()


def test_uint8_pixels_normalise_to_open_clips_preprocess_bit_for_bit():
    # Oracle: open_clip's eval transform. The uint8 slot holds the raw pixels; normalize gives
    # exactly what the float32 slot holds (the trainer normalises per micro-batch).
    t, img = image_transform(32), _image()
    resized = t.resize_pil(img)
    pixels = torch.empty(2, 3, 32, 32, dtype=torch.uint8)
    floats = torch.empty(3, 32, 32)
    t.to_tensor_into(resized, pixels[1])
    t.to_tensor_into(resized, floats)
    assert torch.equal(pixels[1], torch.from_numpy(np.array(resized)).permute(2, 0, 1))
    normalised = t.normalize(pixels)
    assert normalised.dtype == torch.float32 and torch.equal(normalised[1], floats)
    torch.testing.assert_close(normalised[1], open_clip.image_transform(32, is_train=False)(img))
    with pytest.raises(TypeError, match="uint8"):
        t.normalize(floats)
