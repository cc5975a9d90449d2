"""One optimisation step's forward and backward, with or without cached micro-batches.

A contrastive loss couples every sample of the batch, so plain gradient accumulation would shrink
the set of negatives to one micro-batch. With `accum_steps > 1` we follow GradCache (Gao et al.,
2021): embed every micro-batch without a graph, compute the loss once on the whole batch with the
embeddings as leaves, then re-run each micro-batch with a graph and backpropagate the cached
embedding gradients through it. Activations of one micro-batch at a time are kept, and the
gradients equal those of the whole batch at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

Backward = Callable[[torch.Tensor], None]


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _store(
    buffers: dict[str, torch.Tensor], key: str, value: torch.Tensor, at: int, rows: int, n: int
) -> None:
    """Copy `value` (`rows` rows: one micro-batch's) into rows `at`... of `buffers[key]`, a
    tensor of `n` rows made on first use (like `value` otherwise)."""
    if value.shape[0] != rows:
        raise ValueError(f"{key}: {value.shape[0]} rows from a micro-batch of {rows}")
    if key not in buffers:
        buffers[key] = value.new_empty((n, *value.shape[1:]))
    buffers[key][at : at + rows].copy_(value)


# Per-sample outputs of the model a loss reads, cached per micro-batch with GradCache; the
# second text view (another dropout mask of the same captions) exists only for SimCSE, the two
# image views through the image SSL head only with a second image view (SimCLR, BYOL), and
# through BYOL's predictor only with a byol term.
FEATURES = (
    "image_features",
    "text_features",
    "text_features_2",
    "image_ssl_1",
    "image_ssl_2",
    "image_pred_1",
    "image_pred_2",
)
Targets = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], dict[str, torch.Tensor]]


def _extras(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model outputs a loss takes besides features and temperature (SigLIP's logit bias)."""
    return {k: out[k] for k in ("logit_bias",) if k in out}


def _labels(labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {} if labels is None else {"labels": labels}


def _loss(
    loss_fn: nn.Module,
    features: dict[str, torch.Tensor],
    scalars: dict[str, torch.Tensor],
    labels: torch.Tensor | None,
    targets: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    extra = {k: v for k, v in features.items() if k not in ("image_features", "text_features")}
    return loss_fn(
        features["image_features"],
        features["text_features"],
        scalars["logit_scale"],
        **{k: v for k, v in scalars.items() if k != "logit_scale"},
        **extra,
        **targets,
        **_labels(labels),
    )


def forward_backward(
    model: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    accum_steps: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    backward: Backward = lambda loss: loss.backward(),
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    labels: torch.Tensor | None = None,
    text_views: int = 1,
    targets: Targets | None = None,
    images_2: torch.Tensor | None = None,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward and backward of one step; returns the (detached) loss terms.

    `labels` (class ids of the batch) go to the loss when given (a supcon term reads them);
    `text_views=2` encodes the captions twice (a simcse term reads the second view); `images_2`
    (a second augmented view of `images`, the loader's "image_2") goes to the model, whose
    `image_ssl_1`/`image_ssl_2` a simclr term reads (and `image_pred_1`/`image_pred_2`, a byol
    term's); `targets(images, tokens, images_2)` (the objective's: moco's momentum keys, byol's
    target projections) runs once per micro-batch without a graph, and the loss gets its
    outputs, for the whole batch, under their names.

    `prepare` (the loader's `ImageTransform.normalize`) turns images as the loader sent them (uint8
    pixels, a quarter of float32's bytes) into the model's input, one micro-batch at a time, so
    the step never holds the whole batch as floats (4.6 GiB of 64 px images at batch 100,000).

    `autocast`, `backward` and `no_sync` come from Accelerate (mixed precision, loss scaling, DDP
    gradient sync); the defaults run plain PyTorch.
    """

    def inputs(im: torch.Tensor, im2: torch.Tensor | None) -> tuple:
        if prepare is None:
            return im, im2
        return prepare(im), None if im2 is None else prepare(im2)

    def forward(im: torch.Tensor, tok: torch.Tensor, im2: torch.Tensor | None) -> dict:
        options = {} if text_views == 1 else {"text_views": text_views}
        if im2 is not None:
            options["images_2"] = im2
        return model(im, tok, **options)

    if accum_steps == 1:
        images, images_2 = inputs(images, images_2)
        with autocast():
            out = forward(images, tokens, images_2)
            losses = _loss(
                loss_fn,
                {k: out[k] for k in FEATURES if k in out},
                {"logit_scale": out["logit_scale"], **_extras(out)},
                labels,
                targets(images, tokens, images_2) if targets is not None else {},
            )
        backward(losses["loss"])
        return {k: v.detach() for k, v in losses.items()}

    image_chunks, token_chunks = images.chunk(accum_steps), tokens.chunk(accum_steps)
    if len(image_chunks) != accum_steps or images.shape[0] % accum_steps:
        raise ValueError(
            f"batch of {images.shape[0]} does not split into {accum_steps} equal micro-batches"
        )
    view_chunks = [None] * accum_steps if images_2 is None else images_2.chunk(accum_steps)
    device = images.device

    # 1. embeddings of every micro-batch, no graph; remember the RNG so step 3 replays it exactly.
    # What this pass keeps (embeddings, momentum targets, RNG states) is copied into tensors made
    # once for the whole batch: hundreds of small tensors kept one per micro-batch, each allocated
    # between that micro-batch's MiB-sized temporaries, pin glibc's heap so it cannot reuse or
    # return the space around them (at batch 100,032 on the CPU the heap grew by GiBs in this pass).
    n = images.shape[0]
    features: dict[str, torch.Tensor] = {}
    batch_targets: dict[str, torch.Tensor] = {}  # no graph: not leaves
    rng_states: dict[str, torch.Tensor] = {}  # "cpu", "cuda": one row per micro-batch
    at = 0
    with torch.no_grad():
        for k, (im, tok, im2) in enumerate(zip(image_chunks, token_chunks, view_chunks)):
            for name, state in zip(("cpu", "cuda"), _rng_state(device)):
                if state is not None:
                    _store(rng_states, name, state[None], k, 1, accum_steps)
            im, im2 = inputs(im, im2)  # after the RNG is saved: step 3 replays it from here
            rows = im.shape[0]
            with autocast():
                out = forward(im, tok, im2)
                for key, value in (targets(im, tok, im2) if targets is not None else {}).items():
                    _store(batch_targets, key, value, at, rows, n)
            for key in FEATURES:
                if key in out:
                    _store(features, key, out[key], at, rows, n)
            at += rows
        scalars = {"logit_scale": out["logit_scale"], **_extras(out)}
    rng_after = _rng_state(device)

    # 2. the loss on the whole batch, with the embeddings (and the temperature, bias) as leaves
    features = {k: v.requires_grad_() for k, v in features.items()}
    leaves = {k: v.detach().requires_grad_() for k, v in scalars.items()}
    with autocast():
        losses = _loss(loss_fn, features, leaves, labels, batch_targets)
    backward(losses["loss"])  # grads land on the leaves (scaled, under fp16 loss scaling)
    sizes = [c.shape[0] for c in image_chunks]
    feature_grads = {k: v.grad.split(sizes) for k, v in features.items() if v.grad is not None}
    # Only their gradients are needed from here on; the loss's graph (its AccumulateGrad nodes
    # hold the leaves) goes with the detach.
    losses = {k: v.detach() for k, v in losses.items()}
    del features

    # 3. each micro-batch again with a graph; gradients sync across processes on the last one only.
    # The temperature's (and bias's) gradient rides on the last micro-batch so it passes through
    # the same (DDP-wrapped) forward as every other parameter.
    for k, (im, tok, im2) in enumerate(zip(image_chunks, token_chunks, view_chunks)):
        last = k == accum_steps - 1
        # copies of the rows: torch.set_rng_state given a row view of the buffer crashes (segfault
        # in torch 2.14's CPU generator)
        cuda_state = rng_states["cuda"][k].clone() if "cuda" in rng_states else None
        _set_rng_state((rng_states["cpu"][k].clone(), cuda_state), device)
        im, im2 = inputs(im, im2)
        with contextlib.nullcontext() if last else no_sync():
            with autocast():
                out = forward(im, tok, im2)
            outputs = [out[name] for name in feature_grads]
            grads = [g[k] for g in feature_grads.values()]
            if last:
                for name, leaf in leaves.items():
                    if leaf.grad is not None:
                        outputs.append(out[name])
                        grads.append(leaf.grad)
            torch.autograd.backward(outputs, grads)
    _set_rng_state(rng_after, device)
    return losses
