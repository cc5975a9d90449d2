"""ONNX export of the two towers, each taking a batch of any size and returning normalised
embeddings.

The text graph runs over the full context (padding trimming depends on the data, which a static
graph cannot express; the result is the same). Needs `onnx` and `onnxscript`
(`pip install 'clip-train[onnx]'`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from clip_train.model import CLIPModel
from data_tools.errors import ClipTrainError
from data_tools.io import atomic_path

log = logging.getLogger(__name__)


class _ImageEncoder(nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images, normalize=True)


class _TextEncoder(nn.Module):
    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)


def export_onnx(model: CLIPModel, out_dir: str | Path) -> dict[str, Path]:
    """Write `image_encoder.onnx` (input `images` [B,3,H,W]) and `text_encoder.onnx` (input `tokens`
    [B, context_length] int64), output `embeddings` [B, D]."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ClipTrainError(
            "ONNX export needs the onnx and onnxscript packages: pip install 'clip-train[onnx]'"
        ) from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    trim = model.text.trim_padding
    model.text.trim_padding = False
    size, context = model.image_size, model.cfg.text.context_length
    batch = torch.export.Dim("batch", min=1, max=65536)
    graphs = {
        "image_encoder.onnx": (_ImageEncoder(model), torch.zeros(2, 3, size, size), "images"),
        "text_encoder.onnx": (
            _TextEncoder(model),
            torch.zeros(2, context, dtype=torch.long),
            "tokens",
        ),
    }
    written = {}
    try:
        for name, (module, example, input_name) in graphs.items():
            path = out_dir / name
            with atomic_path(path) as tmp:
                torch.onnx.export(
                    module.eval(),
                    (example,),
                    str(tmp),
                    input_names=[input_name],
                    output_names=["embeddings"],
                    dynamic_shapes=({0: batch},),
                    dynamo=True,
                    external_data=False,
                    verbose=False,
                )
            written[name] = path
    finally:
        model.text.trim_padding = trim
    return written
