"""The encoder protocol that evaluation runs on, and how `clip-eval` loads models.

Evaluation needs only four things from a model: image and text embeddings, a tokenizer and the
image preprocessing it was trained with. Our checkpoints (`clip_train.load`) and open_clip models
(through `OpenClipEncoder`) both provide them, so one code path evaluates either.

clip_eval imports nothing from clip_train: the packages depend one way, clip_train -> clip_eval
(its in-training evaluation, `clip_train.evaluation`). Our run and export directories are loaded
through `MODEL_DIR_LOADER`, a "module:function" name (the form of a Python entry point) resolved
only when such a directory is evaluated, so clip_eval works on open_clip models where clip_train
is not installed.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from PIL import Image
from torch import Tensor, nn

from data_tools.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Who loads a run or export directory (clip-train's `load(path, device=...)`); see above.
MODEL_DIR_LOADER = "clip_train:load"


@runtime_checkable
class Encoder(Protocol):
    """What `eval` needs from a model; `nn.Module` encoders are switched to eval mode while used."""

    tokenizer: Callable[[list[str]], Tensor]
    preprocess: Callable[[Image.Image], Tensor]

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Embeddings [B, D] of preprocessed images [B, 3, H, W]."""
        ...

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Embeddings [B, D] of token ids [B, L] from `tokenizer`."""
        ...


class OpenClipEncoder(nn.Module):
    """An open_clip model with its tokenizer and eval preprocessing, as an `Encoder`.

    A module itself, so `.to(device)` and train/eval switching reach the wrapped model.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], Tensor],
        preprocess: Callable[[Image.Image], Tensor],
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.name: str | None = None  # shown in suite results
        # Set when the weights come from a file: cheaper than hashing them for the classifier cache.
        self.weights_identity: str | None = None

    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Image embeddings from the wrapped model."""
        return self.model.encode_image(images, normalize=normalize)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """Text embeddings from the wrapped model."""
        return self.model.encode_text(tokens, normalize=normalize)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception squeezed to one line, so the CLI can show it as `error: ...`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


LOCAL_DIR = "local-dir:"
# open_clip's own preference for the weight file of a 'local-dir:' folder (factory.py).
_LOCAL_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)


def local_dir_weights(model_name: str) -> Path:
    """The weight file open_clip loads for `local-dir:DIR`, found as open_clip finds it."""
    folder = Path(model_name[len(LOCAL_DIR) :]).expanduser()
    if not (folder / "open_clip_config.json").is_file():
        raise DataError(
            f"--model {model_name}: no open_clip_config.json in {folder} "
            "(clip-train export writes one in EXPORT/open_clip)"
        )
    for name in _LOCAL_DIR_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    # open_clip's fallback: any weight file, .safetensors first, then by name
    found = sorted(p for ext in ("safetensors", "bin", "pth") for p in folder.glob(f"*.{ext}"))
    found.sort(key=lambda p: p.suffix == ".safetensors", reverse=True)
    if not found:
        raise DataError(
            f"--model {model_name}: no weight file in {folder} (looked for "
            f"{', '.join(_LOCAL_DIR_WEIGHTS[:3])}, ...)"
        )
    return found[0]


def load_open_clip(
    model_name: str,
    pretrained: str | os.PathLike | None,
    device: str | torch.device = "cpu",
) -> OpenClipEncoder:
    """Build an open_clip architecture with weights from a LOCAL file (or random weights if None).

    Never downloads: pretrained tags ('openai', 'laion2b_...') and 'hf-hub:' names are refused,
    because evaluation must be reproducible offline from files the user names. A 'local-dir:DIR'
    model needs no `pretrained`: its weight file is found in DIR as open_clip finds it.
    """
    import open_clip

    weights = None
    if model_name.startswith(LOCAL_DIR):
        weights = str(local_dir_weights(model_name).resolve())
        if pretrained is not None and str(Path(pretrained).resolve()) != weights:
            raise ConfigError(
                f"--pretrained {pretrained}: {model_name} loads its own weights ({weights}); "
                "drop --pretrained"
            )
        pretrained = None  # open_clip takes the weights from DIR and would only warn about it

    if model_name.startswith("hf-hub:"):
        raise ConfigError(
            f"--model {model_name}: hf-hub models are not downloaded; pass an open_clip "
            "architecture "
            f"name and --pretrained with a local weight file, or 'local-dir:DIR'"
        )
    if (
        not model_name.startswith("local-dir:")
        and model_name.replace("/", "-") not in open_clip.list_models()
    ):
        raise ConfigError(
            f"--model {model_name}: not an open_clip architecture (see open_clip.list_models()) "
            f"and not a run or export directory"
        )
    if pretrained is not None:
        if not os.path.isfile(pretrained):
            raise DataError(
                f"--pretrained {pretrained}: no such file; clip-eval loads only local weight files "
                f"(download a checkpoint yourself and pass its path)"
            )
        # An absolute path can never be mistaken for a pretrained tag (which would download).
        pretrained = weights = os.path.abspath(pretrained)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name,
            pretrained=pretrained,
            device=device,
            pretrained_image=False,
            pretrained_text=False,
            weights_only=True,
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError, OSError) as exc:
        what = f"weights {weights}" if weights else "model"
        raise ConfigError(f"--model {model_name}: could not load {what}: {_one_line(exc)}") from exc
    log.info("loaded open_clip %s (weights: %s)", model_name, weights or "random init")
    encoder = OpenClipEncoder(model, tokenizer, preprocess)
    encoder.name = f"{model_name} ({weights})" if weights else model_name
    if weights is not None:
        stat = os.stat(weights)
        if model_name.startswith(LOCAL_DIR):
            config = (Path(weights).parent / "open_clip_config.json").read_text()
        else:
            config = json.dumps(open_clip.get_model_config(model_name), sort_keys=True, default=str)
        encoder.weights_identity = (
            f"open_clip|{model_name}|{weights}|{stat.st_size}|{stat.st_mtime_ns}|{config}"
        )
    encoder.eval()
    return encoder


def load_model_dir(path: str, device: str | torch.device = "cpu") -> Encoder:
    """A run or export directory, through the loader named in `MODEL_DIR_LOADER`."""
    module_name, _, function = MODEL_DIR_LOADER.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name != module_name:
            raise
        raise ConfigError(
            f"--model {path}: a run or export directory is loaded by {module_name}, "
            "which is not installed (pip install the clip-train package)"
        ) from exc
    return getattr(module, function)(path, device=device)
