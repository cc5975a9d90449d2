import open_clip
import pytest
import torch

from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = [
        "red",
        "blue",
        "green",
        "small",
        "large",
        "circle",
        "square",
        "star",
        "on",
        "the",
        "left",
    ]
    captions = [
        " ".join(words[j] for j in torch.randint(0, len(words), (1 + i % 9,), generator=g).tolist())
        for i in range(n)
    ]
    return torch.randn(n, 3, 32, 32, generator=g), open_clip.tokenizer.SimpleTokenizer(
        context_length=16
    )(captions)


def _grads(model, images, tokens, accum):
    model.zero_grad()
    losses = forward_backward(model, build_loss("clip"), images, tokens, accum_steps=accum)
    return losses["loss"], {n: p.grad.clone() for n, p in model.named_parameters()}


def test_cached_accumulation_equals_one_big_batch(tiny_model_cfg):
    """4 micro-batches of 16 keep all 64 samples as negatives: same loss and gradients as batch
    64."""
    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    images, tokens = _batch()
    loss_1, grads_1 = _grads(model, images, tokens, 1)
    loss_4, grads_4 = _grads(model, images, tokens, 4)
    torch.testing.assert_close(loss_4, loss_1, rtol=1e-6, atol=1e-6)
    for name in grads_1:
        torch.testing.assert_close(
            grads_4[name], grads_1[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


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


class _DropoutClip(torch.nn.Module):
    """A tiny two-tower model whose forward draws from the global RNG (dropout in both towers)."""

    def __init__(self):
        super().__init__()
        self.image = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(3 * 8 * 8, 32),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(32, 16),
        )
        self.embed = torch.nn.Embedding(100, 32)
        self.text = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(32, 16))
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, images, tokens):
        image = torch.nn.functional.normalize(self.image(images), dim=-1)
        text = torch.nn.functional.normalize(self.text(self.embed(tokens).mean(1)), dim=-1)
        return {
            "image_features": image,
            "text_features": text,
            "logit_scale": self.logit_scale.exp(),
        }


def test_cached_accumulation_replays_dropout(monkeypatch):
    """With dropout, GradCache's re-run must draw the masks of its embedding pass: its gradients
    equal those of the whole-batch loss over the embedding pass's features (same masks)."""
    import clip_train.step as step_module

    torch.manual_seed(0)
    model = _DropoutClip().train()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(32, 3, 8, 8, generator=g)
    tokens = torch.randint(0, 100, (32, 5), generator=g)

    torch.manual_seed(7)  # reference: the 4 micro-batches with a graph, one loss over all of them
    outs = [model(im, tok) for im, tok in zip(images.chunk(4), tokens.chunk(4))]
    loss = build_loss("clip")(
        torch.cat([o["image_features"] for o in outs]),
        torch.cat([o["text_features"] for o in outs]),
        outs[-1]["logit_scale"],
    )["loss"]
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    after_reference = torch.get_rng_state()

    torch.manual_seed(7)
    loss_4, grads_4 = _grads(model, images, tokens, 4)
    torch.testing.assert_close(loss_4, loss.detach())
    for name in reference:
        torch.testing.assert_close(grads_4[name], reference[name], msg=lambda m: f"{name}: {m}")
    assert torch.equal(torch.get_rng_state(), after_reference)  # the RNG ends as after one pass

    monkeypatch.setattr(step_module, "_set_rng_state", lambda state, device: None)  # no replay
    torch.manual_seed(7)
    _, unreplayed = _grads(model, images, tokens, 4)
    assert not torch.allclose(unreplayed["image.1.weight"], reference["image.1.weight"])


@pytest.mark.parametrize("accum", [1, 4])
def test_uint8_images_prepared_per_micro_batch_equal_float_images(tiny_model_cfg, accum):
    """`prepare` (the loader's normalize, as the trainer passes it with data.uint8_images) turns
    each micro-batch of pixels into the float input: the same loss and gradients, bit for bit, as
    the float batch normalised up front."""
    from data_tools.transforms import ImageTransform

    torch.manual_seed(0)
    model = build_model(tiny_model_cfg)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    _, tokens = _batch()
    t = ImageTransform(32)
    seen = []

    def prepare(x):
        seen.append(x.shape[0])
        return t.normalize(x)

    ref_loss, ref = _grads(model, t.normalize(pixels), tokens, accum)
    model.zero_grad()
    loss = forward_backward(
        model, build_loss("clip"), pixels, tokens, accum_steps=accum, prepare=prepare
    )["loss"]
    assert seen == [64 // accum] * (accum if accum == 1 else 2 * accum)  # both GradCache passes
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(p.grad, ref[n]) for n, p in model.named_parameters())
