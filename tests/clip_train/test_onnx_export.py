"""ONNX towers give the PyTorch embeddings, at a batch size other than the one exported with."""

import numpy as np
import pytest
import torch

from clip_train.cli import main
from clip_train.export import export_model
from clip_train.model import build_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_onnx_towers_match_pytorch(tiny_model_cfg, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg).eval()
    out = export_model(model, tmp_path / "export")
    assert main(["-q", "export", str(out), "--out", str(out), "--onnx"]) == 0
    images = torch.randn(3, 3, 32, 32)
    from clip_train.encoder import make_tokenizer

    tokens = make_tokenizer(tiny_model_cfg)(
        ["a red circle", "two small blue squares on the left", "a star"]
    )
    image_sess = ort.InferenceSession(str(out / "onnx" / "image_encoder.onnx"))
    text_sess = ort.InferenceSession(str(out / "onnx" / "text_encoder.onnx"))
    with torch.no_grad():
        np.testing.assert_allclose(
            image_sess.run(None, {"images": images.numpy()})[0],
            model.encode_image(images, normalize=True).numpy(),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            text_sess.run(None, {"tokens": tokens.numpy()})[0],
            model.encode_text(tokens, normalize=True).numpy(),
            atol=1e-5,
        )
