"""On-disk cache of zero-shot classifiers, keyed by (model, class names, templates, precision).

Building ImageNet's 1000 x 80 classifier runs the text tower 80,000 times; the result depends
only on the text weights, the prompts and the numeric precision, so it is stored once as
safetensors and reused by later evaluations of the same model.

The model's identity is `encoder.weights_identity` when the loader set one (open_clip weights
from a file: architecture + path + size + mtime), otherwise a hash of every parameter and buffer
byte plus the module structure, so in-memory models (e.g. mid-training) never hit a stale entry.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from data_tools.io import atomic_path

log = logging.getLogger(__name__)

ENV_VAR = "CLIP_TRAIN_CACHE"
_FORMAT = "clip-train-classifier-v1"


def default_cache_dir() -> Path:
    """`$CLIP_TRAIN_CACHE/classifiers`, else `$XDG_CACHE_HOME/clip-train/classifiers`, else
    ~/.cache/..."""
    root = os.environ.get(ENV_VAR)
    if root:
        return Path(root).expanduser() / "classifiers"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clip-train" / "classifiers"


def _hash_module(module: nn.Module, hasher: hashlib._Hash) -> None:
    hasher.update(repr(module).encode())
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        hasher.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def model_identity(encoder: object) -> str:
    """A string that changes whenever the weights or architecture of `encoder` change."""
    given = getattr(encoder, "weights_identity", None)
    if isinstance(given, str) and given:
        return given
    hasher = hashlib.blake2b(digest_size=20)
    hasher.update(type(encoder).__qualname__.encode())
    if isinstance(encoder, nn.Module):
        _hash_module(encoder, hasher)
    else:  # an Encoder that is not a module: its model attribute, if any, carries the weights
        inner = getattr(encoder, "model", None)
        if not isinstance(inner, nn.Module):
            raise TypeError(
                "cannot identify a non-module encoder for caching; set encoder.weights_identity"
            )
        _hash_module(inner, hasher)
    context = getattr(getattr(encoder, "tokenizer", None), "context_length", None)
    hasher.update(f"ctx={context}".encode())
    return "sha:" + hasher.hexdigest()


def cache_key(
    model_id: str,
    classnames: Sequence[str],
    prompts: Sequence[str],
    num_templates: int,
    precision: str,
) -> str:
    """Hex key of one classifier: the model, every class name and every rendered prompt,
    precision."""
    hasher = hashlib.sha256()
    for part in (_FORMAT, model_id, precision, str(len(classnames)), str(num_templates)):
        hasher.update(part.encode() + b"\x00")
    for name in classnames:
        hasher.update(name.encode() + b"\x01")
    for prompt in prompts:  # templates may be callables: their rendered prompts are what counts
        hasher.update(prompt.encode() + b"\x02")
    return hasher.hexdigest()[:32]


def load_classifier(
    cache_dir: Path, key: str, shape: tuple[int, int] | None = None
) -> Tensor | None:
    """The cached classifier [D, C] for `key`, or None (absent, unreadable or the wrong shape)."""
    path = Path(cache_dir) / f"{key}.safetensors"
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensor = load_file(str(path))["classifier"]
    except (OSError, KeyError, SafetensorError, RuntimeError) as exc:
        log.warning("ignoring unreadable cached classifier %s (%s)", path, exc)
        return None
    if tensor.ndim != 2 or (shape is not None and tensor.shape[1] != shape[1]):
        log.warning("ignoring cached classifier %s of shape %s", path, tuple(tensor.shape))
        return None
    log.info("zero-shot classifier from cache: %s", path)
    return tensor


def save_classifier(
    cache_dir: Path, key: str, classifier: Tensor, metadata: dict[str, str]
) -> Path | None:
    """Store atomically (`data_tools.io.atomic_path`); a cache that cannot be written only logs."""
    from safetensors.torch import save_file

    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.safetensors"
    try:
        with atomic_path(path) as tmp:
            save_file(
                {"classifier": classifier.detach().float().cpu().contiguous()},
                str(tmp),
                metadata={"format": _FORMAT, **metadata},
            )
    except OSError as exc:
        log.warning("could not cache the classifier in %s (%s); continuing without", cache_dir, exc)
        return None
    log.info("cached zero-shot classifier: %s", path)
    return path
