"""The object `eval` and users consume: a model plus the tokenizer and preprocessing it expects."""

from __future__ import annotations

from collections.abc import Callable

import torch
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torch import nn

from clip_train.config import ModelConfig
from clip_train.model import CLIPModel
from data_tools.transforms import image_transform


def make_tokenizer(cfg: ModelConfig) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel: no download)."""
    return SimpleTokenizer(context_length=cfg.text.context_length)


class ClipEncoder(nn.Module):
    """Wraps a `CLIPModel` (sharing its parameters) with `tokenizer` and `preprocess`."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.tokenizer = make_tokenizer(model.cfg)
        self.preprocess: Callable[[Image.Image], torch.Tensor] = image_transform(
            model.image_size, train=False
        )

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=normalize)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.encode_text(self.tokenizer(texts).to(device), normalize=normalize)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image], normalize: bool = True) -> torch.Tensor:
        device = next(self.model.parameters()).device
        return self.encode_image(
            torch.stack([self.preprocess(im) for im in images]).to(device), normalize=normalize
        )
