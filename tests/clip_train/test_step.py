import open_clip
import pytest
import torch

from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "small", "large", "circle", "square", "star", "on", "the", "left"]
    captions = [" ".join(words[j] for j in torch.randint(0, len(words), (1 + i % 9,), generator=g).tolist())
                for i in range(n)]
    return torch.randn(n, 3, 32, 32, generator=g), open_clip.tokenizer.SimpleTokenizer(context_length=16)(captions)


def _grads(model, images, tokens, accum):
    model.zero_grad()
    losses = forward_backward(model, build_loss("clip"), images, tokens, accum_steps=accum)
    return losses["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_cached_accumulation_equals_one_big_batch(tiny_model_cfg):
    """4 micro-batches of 16 keep all 64 samples as negatives: same loss and gradients as batch 64."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    images, tokens = _batch()
    loss_1, grads_1 = _grads(model, images, tokens, 1)
    loss_4, grads_4 = _grads(model, images, tokens, 4)
    torch.testing.assert_close(loss_4, loss_1, rtol=1e-6, atol=1e-6)
    for name in grads_1:
        torch.testing.assert_close(grads_4[name], grads_1[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_gradient_checkpointing_same_gradients(tiny_model_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    images, tokens = _batch(16)
    _, plain = _grads(model, images, tokens, 1)
    model.set_grad_checkpointing(True)
    _, ckpt = _grads(model, images, tokens, 1)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7)


def test_uneven_micro_batches_rejected(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    images, tokens = _batch(10)
    with pytest.raises(ValueError, match="equal micro-batches"):
        forward_backward(model, build_loss("clip"), images, tokens, accum_steps=4)
