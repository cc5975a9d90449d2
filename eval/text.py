"""Encoding many texts fast: sort by token length, batch similar lengths, run over trimmed width.

Prompts are short (ImageNet's 80 OpenAI templates average under 10 tokens in a 77- or 32-token
context), so a text tower run over the padded width spends most of its time on padding. For a
causal tower pooled at the EOT token (the largest id, found by argmax), no position up to the EOT
attends past it, so cutting the columns after the longest caption of a batch is exact; sorting
texts by length first makes every batch nearly free of padding.

- Our models (`clip_train`) trim inside their text tower, so sorting is all they need.
- open_clip's standard towers (`CLIP` with its inlined text transformer, and `TextTransformer`
  in `CustomTextCLIP`) are run here through `trimmed_text_forward` when they are causal with
  argmax pooling and no class token; anything else (HF text towers, bidirectional or CoCa
  towers, subclasses) goes through the model's own `encode_text` unchanged.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clip_eval._common import autocast, progress_bar

log = logging.getLogger(__name__)

# Rows of the first batch recomputed through the model's own encode_text to confirm the trimmed
# path on this model; the bound is far above float32 noise and far below any real bug.
_CHECK_ROWS = 4
_CHECK_TOLERANCE = 1e-4
# Verdicts of the check per model object: it depends on the architecture, not on the weights.
_CONFIRMED: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


def _unwrap(encoder: object) -> object:
    """The open_clip model inside an `OpenClipEncoder`, or the object itself."""
    return getattr(encoder, "model", encoder)


def _open_clip_text_parts(model: object) -> dict | None:
    """The pieces of an open_clip causal, argmax-pooled text tower, or None if it is not one."""
    try:
        from open_clip.model import CLIP
        from open_clip.transformer import TextTransformer
    except ImportError:  # pragma: no cover - open_clip is a dependency
        return None
    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        parts = dict(
            token_embedding=model.token_embedding,
            positional_embedding=model.positional_embedding,
            transformer=model.transformer,
            ln_final=model.ln_final,
            text_projection=model.text_projection,
            attn_mask=getattr(model, "attn_mask", None),
            pool_type=getattr(model, "text_pool_type", "argmax"),
        )
    else:
        text = getattr(model, "text", None)
        # Exactly TextTransformer: a subclass (like clip_train's, which trims by itself) may
        # change forward, and we only replicate what we have read.
        if type(text) is not TextTransformer or getattr(text, "output_tokens", False):
            return None
        if text.cls_emb is not None or text.use_pad_mask:
            return None
        encode_text = getattr(type(model), "encode_text", None)
        from open_clip.model import CustomTextCLIP

        if not isinstance(model, CustomTextCLIP) or encode_text is not CustomTextCLIP.encode_text:
            return None
        parts = dict(
            token_embedding=text.token_embedding,
            positional_embedding=text.positional_embedding,
            transformer=text.transformer,
            ln_final=text.ln_final,
            text_projection=text.text_projection,
            attn_mask=text.attn_mask,
            pool_type=text.pool_type,
        )
    if parts["attn_mask"] is None or parts["pool_type"] != "argmax":
        return None  # bidirectional or not EOT-pooled: padding matters, use the plain path
    if not hasattr(parts["transformer"], "get_cast_dtype"):
        return None
    return parts


def trimmed_text_forward(encoder: object) -> Callable[[Tensor], Tensor] | None:
    """A text forward for `encoder`'s open_clip tower that skips the all-padding tail, or None.

    Same computation as open_clip's `encode_text` (without normalization) on the columns up to
    the batch's last EOT, with the causal mask sliced to that width.
    """
    parts = _open_clip_text_parts(_unwrap(encoder))
    if parts is None:
        return None

    def forward(tokens: Tensor) -> Tensor:
        eot = tokens.argmax(dim=-1)
        width = int(eot.max()) + 1
        tokens = tokens[:, :width]
        transformer = parts["transformer"]
        cast_dtype = transformer.get_cast_dtype()
        x = parts["token_embedding"](tokens).to(cast_dtype)
        x = x + parts["positional_embedding"][:width].to(cast_dtype)
        x = transformer(x, attn_mask=parts["attn_mask"][:width, :width])
        x = parts["ln_final"](x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        projection = parts["text_projection"]
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection

    return forward


def token_lengths(tokens: Tensor) -> Tensor:
    """Tokens up to and including the last non-padding (non-zero) id, per row; used for sorting."""
    nonzero = tokens != 0
    positions = torch.arange(1, tokens.shape[1] + 1, device=tokens.device)
    return (nonzero * positions).amax(dim=1)


def _confirm_trimmed(encoder: object, forward: Callable[[Tensor], Tensor], tokens: Tensor) -> bool:
    """Whether the trimmed forward reproduces the model's own encode_text on a few rows (once per
    model)."""
    model = _unwrap(encoder)
    try:
        known = _CONFIRMED.get(model)
    except TypeError:  # not weak-referenceable: check every time
        known = None
    if known is not None:
        return known
    verdict = _check_trimmed(encoder, forward, tokens)
    try:
        _CONFIRMED[model] = verdict
    except TypeError:
        pass
    return verdict


def _check_trimmed(encoder: object, forward: Callable[[Tensor], Tensor], tokens: Tensor) -> bool:
    rows = tokens[:_CHECK_ROWS]
    with torch.no_grad():
        want = F.normalize(encoder.encode_text(rows).float(), dim=-1)
        got = F.normalize(forward(rows).float(), dim=-1)
    diff = (want - got).abs().max().item()
    if diff > _CHECK_TOLERANCE:
        log.warning(
            "trimmed text path differs from encode_text by %.2e on this model; using the plain "
            "path",
            diff,
        )
        return False
    return True


def encode_texts(
    encoder: object,
    texts: Sequence[str],
    device: str | torch.device,
    batch_size: int = 1024,
    progress: bool = False,
    desc: str = "texts",
) -> Tensor:
    """L2-normalized float32 embeddings [N, D] of `texts`, in the given order.

    Tokenizes everything once, encodes in batches of similar length (longest first, so a memory
    problem shows on the first batch) and puts the rows back in order. Call inside `inference`.
    """
    device = torch.device(device)
    if len(texts) == 0:
        raise ValueError("encode_texts needs at least one text")
    tokens = encoder.tokenizer(list(texts))
    order = torch.argsort(token_lengths(tokens), descending=True, stable=True)
    forward = trimmed_text_forward(encoder)
    plain = encoder.encode_text
    out: Tensor | None = None
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, progress, desc, total=len(starts), unit="batch"):
        index = order[start : start + batch_size]
        batch = tokens[index].to(device, non_blocking=True)
        if forward is not None and start == 0 and not _confirm_trimmed(encoder, forward, batch):
            forward = None
        with autocast(device):
            features = (forward or plain)(batch)
        features = F.normalize(features.float(), dim=-1)
        if out is None:
            out = torch.empty(len(texts), features.shape[1], device=device)
        out[index.to(device)] = features
    assert out is not None
    log.debug(
        "encoded %d texts (%s path)",
        len(texts),
        "trimmed" if forward is not None else "encode_text",
    )
    return out
