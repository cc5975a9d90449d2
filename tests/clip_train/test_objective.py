"""The objective's terms: each against an independent formula or open_clip, by finite differences,
under GradCache accumulation, and with two processes against one."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from clip_train.config import ImageSSLHeadConfig, LossConfig, LossTermConfig, load_config
from clip_train.model import build_model
from clip_train.objective import TERMS, build_objective, freeze_unused
from clip_train.step import forward_backward
from data_tools.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from dist_worker import CFG, batch  # noqa: E402
from torchrun import torchrun  # noqa: E402


def _features(seed: int, n: int = 12, d: int = 8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=dtype, requires_grad=True)
    return image, text, scale, bias


def objective(*terms, **options):
    return build_objective(
        LossConfig(terms=[LossTermConfig(name=n, weight=w, **options) for n, w in terms])
    )


def test_siglip_equals_open_clip():
    """Oracle: open_clip's SigLipLoss, loss and gradients (features, scale, bias)."""
    ours_in = _features(0)
    ref_in = [t.detach().clone().requires_grad_() for t in ours_in]
    ours = objective(("siglip", 1.0))(*ours_in[:3], logit_bias=ours_in[3])["loss"]
    ref = SigLipLoss()(*ref_in)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad)


def test_siglip_formula_written_out():
    image, text, scale, bias = _features(1)
    logits = scale * image @ text.T + bias
    signs = 2 * torch.eye(len(image)) - 1
    logits = logits.detach()
    expected = -sum(
        math.log(1 / (1 + math.exp(-float(signs[i, j] * logits[i, j]))))
        for i in range(len(image))
        for j in range(len(image))
    ) / len(image)
    got = objective(("siglip", 1.0))(image, text, scale, logit_bias=bias)["loss"]
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_margin_formula_and_gradient():
    image, text, scale, _ = _features(2, dtype=torch.float64)
    margin = 0.9
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            d = float(torch.linalg.vector_norm(image[i] - text[j]).detach())
            total += d * d if i == j else max(0.0, margin - d) ** 2
    loss_fn = objective(("margin", 1.0), margin=margin)
    assert loss_fn(image, text, scale)["loss"].item() == pytest.approx(total / (n * n), rel=1e-9)
    # finite differences through the distances (inputs off the hinge's kink)
    assert torch.autograd.gradcheck(lambda a, b: loss_fn(a, b, scale)["loss"], (image, text))


def test_supcon_formula_written_out_and_gradient():
    """Khosla et al.'s loss over images and captions together, by loops; then finite differences."""
    image, text, scale, _ = _features(5, n=6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    tau = 0.2
    z = torch.cat([image, text]).detach()
    y = torch.cat([labels, labels]).tolist()
    total = 0.0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(math.exp(float(z[i] @ z[a]) / tau) for a in others)
        positives = [p for p in others if y[p] == y[i]]
        total += -sum(
            math.log(math.exp(float(z[i] @ z[p]) / tau) / denominator) for p in positives
        ) / len(positives)
    loss_fn = objective(("supcon", 1.0), temperature=tau)
    got = loss_fn(image, text, scale, labels=labels)["loss"]
    assert got.item() == pytest.approx(total / len(z), rel=1e-9)
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn(a, b, scale, labels=labels)["loss"], (image, text)
    )
    with pytest.raises(ValueError, match="class labels"):
        loss_fn(image, text, scale)


def test_simcse_formula_written_out_and_gradient():
    """Gao et al.'s unsupervised loss: cross-entropy of each caption against the second views."""
    _, first, scale, _ = _features(6, n=5, dtype=torch.float64)
    _, second, _, _ = _features(7, n=5, dtype=torch.float64)
    tau = 0.05
    a, b = first.detach(), second.detach()
    total = 0.0
    for i in range(len(a)):
        scores = [float(a[i] @ b[j]) / tau for j in range(len(b))]
        top = max(scores)
        total += -(scores[i] - top - math.log(sum(math.exp(x - top) for x in scores)))
    loss_fn = objective(("simcse", 1.0))
    got = loss_fn(first, first, scale, text_features_2=second)["loss"]
    assert got.item() == pytest.approx(total / len(a), rel=1e-9)
    assert torch.autograd.gradcheck(
        lambda x, y: loss_fn(x, x, scale, text_features_2=y)["loss"], (first, second)
    )


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_text_dropout_makes_two_views_and_accumulation_replays_it(device):
    """model.text.dropout gives two different encodings of one caption. With 4 micro-batches,
    GradCache's gradients equal those of one graph over the same 4 forwards (same dropout masks:
    the cached pass and the re-run replay the RNG: CPU's, or CUDA's on a GPU), for clip +
    simcse."""
    cfg = dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, dropout=0.1))
    images, tokens = (t.to(device) for t in batch(64))
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    out = model(images[:4], tokens[:4], text_views=2)
    assert not torch.allclose(out["text_features"], out["text_features_2"])

    terms = objective(("clip", 1.0), ("simcse", 0.5))
    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    torch.manual_seed(1)
    outs = [model(im, tok, text_views=2) for im, tok in zip(images.chunk(4), tokens.chunk(4))]
    cat = {
        k: torch.cat([o[k] for o in outs])
        for k in ("image_features", "text_features", "text_features_2")
    }
    reference = terms(
        cat["image_features"],
        cat["text_features"],
        outs[-1]["logit_scale"],
        text_features_2=cat["text_features_2"],
    )
    reference["loss"].backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    torch.manual_seed(1)
    losses = forward_backward(
        model,
        objective(("clip", 1.0), ("simcse", 0.5)),
        images,
        tokens,
        accum_steps=4,
        text_views=2,
    )
    torch.testing.assert_close(losses["loss"], reference["loss"].detach())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    rtol, atol = (1e-4, 1e-6) if device == "cpu" else (1e-3, 1e-5)  # cuDNN/cuBLAS vs one graph
    for name, grad in expected.items():
        torch.testing.assert_close(
            got[name], grad, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}"
        )


def test_simclr_formula_written_out_and_gradient():
    """SimCLR's NT-Xent by loops: each of the 2N views against the 2N - 1 others, the other view
    of its image the positive; mean over views. Then finite differences."""
    _, first, scale, _ = _features(10, n=5, dtype=torch.float64)
    _, second, _, _ = _features(11, n=5, dtype=torch.float64)
    tau = 0.2
    z = torch.cat([first, second]).detach()
    n = len(first)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denominator = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[partner]) / tau) / denominator)
    loss_fn = objective(("simclr", 1.0), temperature=tau)
    image, text, _, _ = _features(12, n=5, dtype=torch.float64)
    got = loss_fn(image, text, scale, image_ssl_1=first, image_ssl_2=second)
    assert got["loss"].item() == pytest.approx(total / (2 * n), rel=1e-9)
    assert torch.autograd.gradcheck(
        lambda a, b: loss_fn(image, text, scale, image_ssl_1=a, image_ssl_2=b)["loss"],
        (first, second),
    )
    assert objective(("simclr", 1.0)).terms[0].temperature == 0.1  # SimCLR's default
    with pytest.raises(ValueError, match="two image views"):
        loss_fn(image, text, scale)


def _ssl_cfg(cfg=None):
    """The test model with the image SSL head (what a simclr term turns on in the config)."""
    cfg = CFG if cfg is None else cfg
    return dataclasses.replace(cfg, image_ssl=ImageSSLHeadConfig(enabled=True))


def _views(n: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(321))


def test_simclr_accumulation_4x16_equals_64():
    """clip + simclr: the loss and every gradient of a step of 4 cached micro-batches of 16 equal
    one batch of 64 (both views' head features cached by GradCache)."""
    images, tokens = batch(64)
    images_2 = _views(64)
    runs = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(_ssl_cfg())
        losses = forward_backward(
            model,
            objective(("clip", 1.0), ("simclr", 0.5)),
            images,
            tokens,
            accum_steps=accum,
            images_2=images_2,
        )
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        runs.append((losses, grads))
    (full_losses, full), (acc_losses, acc) = runs
    assert set(full_losses) == {
        "loss",
        "loss/clip",
        "clip/loss_i2t",
        "clip/loss_t2i",
        "loss/simclr",
        "simclr/accuracy",
    }
    for key, value in full_losses.items():
        torch.testing.assert_close(acc_losses[key], value, msg=key)
    assert set(acc) == set(full) and any(n.startswith("image_ssl_head.") for n in full)
    for name, grad in full.items():
        torch.testing.assert_close(
            acc[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def test_simclr_two_views_replay_dropout_and_drop_path():
    """With drop-path in the image trunk (which now sees both views) and dropout in the text
    tower, GradCache's gradients equal one graph over the same 4 forwards: the re-run replays
    the masks of the cached pass. Removing the replay breaks this."""
    from timm.layers import DropPath

    cfg = dataclasses.replace(_ssl_cfg(), text=dataclasses.replace(CFG.text, dropout=0.1))
    images, tokens = batch(64)
    images_2 = _views(64)

    def fresh():
        torch.manual_seed(0)
        model = build_model(cfg).train()
        for block in model.visual.trunk.blocks:
            block.drop_path1, block.drop_path2 = DropPath(0.3), DropPath(0.3)
        return model

    model = fresh()
    torch.manual_seed(1)
    chunks = zip(images.chunk(4), tokens.chunk(4), images_2.chunk(4))
    outs = [model(im, tok, images_2=im2) for im, tok, im2 in chunks]
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    views = {k: torch.cat([o[k] for o in outs]) for k in ("image_ssl_1", "image_ssl_2")}
    terms = objective(("clip", 1.0), ("simclr", 0.5))
    reference = terms(cat["image_features"], cat["text_features"], outs[-1]["logit_scale"], **views)
    reference["loss"].backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    model = fresh()
    torch.manual_seed(1)
    losses = forward_backward(model, terms, images, tokens, accum_steps=4, images_2=images_2)
    torch.testing.assert_close(losses["loss"], reference["loss"].detach())
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(
            got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def test_two_views_model_outputs():
    """The second view goes through the same trunk and the SSL head: image_features are those of
    the first view alone; the head's features are normalised; without the head, a clear error."""
    model = build_model(_ssl_cfg()).eval()
    images, tokens = batch(4)
    images_2 = _views(4)
    out = model(images, tokens, images_2=images_2)
    alone = model(images, tokens)
    torch.testing.assert_close(out["image_features"], alone["image_features"])
    assert "image_ssl_1" not in alone
    for key in ("image_ssl_1", "image_ssl_2"):
        assert out[key].shape == (4, 256)
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(
        out["image_ssl_2"],
        F.normalize(model.image_ssl_head(model.visual.trunk(images_2)), dim=-1),
    )
    assert model.image_ssl_head.fc1.out_features == 256  # SLIP's 4096 x width 48 / 768
    with pytest.raises(ValueError, match="image SSL head"):
        build_model(CFG)(images, tokens, images_2=images_2)
    assert not hasattr(build_model(CFG), "image_ssl_head")


def test_simclr_config():
    base = ["data.train=/x", "loss.terms=[{name: clip}, {name: simclr, weight: 0.5}]"]
    cfg = load_config("configs/demo.yaml", base)
    assert cfg.model.image_ssl.enabled and cfg.loss.terms[1].temperature is None
    assert not load_config("configs/demo.yaml", ["data.train=/x"]).model.image_ssl.enabled
    hidden = load_config("configs/demo.yaml", [*base, "model.image_ssl.hidden_dim=64"])
    assert build_model(hidden.model).image_ssl_head.fc1.out_features == 64
    for overrides, message in [
        (["loss.terms=[{name: clip}, {name: simclr, temperature: 0}]"], "temperature must be > 0"),
        (["loss.terms=[{name: clip}, {name: simclr, temperature: -0.1}]"], "must be > 0"),
        (["loss.name=simclr"], "single towers only"),
        (["loss.terms=[{name: simclr}, {name: simcse}]", "model.text.dropout=0.1"], "image-text"),
        ([*base[1:], "model.lock_image=true"], "model.lock_image=true freezes it"),
        (["model.image_ssl.enabled=true"], "no loss term reads the image SSL head"),
        ([*base[1:], "model.image_ssl.out_dim=0"], "model.image_ssl.out_dim must be positive"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("configs/demo.yaml", ["data.train=/x", *overrides])


def test_every_term_takes_every_input_the_objective_passes():
    """The objective hands all its inputs to each term; a term ignores what it does not read, so
    any combination works (supcon beside simcse gets text_features_2, and so on). The stateful
    terms are attached to a model (moco: momentum towers, queues; byol: a target network) and
    get their targets."""
    image, text, scale, bias = _features(8, d=CFG.embed_dim)
    keys, second, _, _ = _features(9, d=CFG.embed_dim)
    labels = torch.arange(len(image)) % 3
    terms = [LossTermConfig(name=name) for name in TERMS]
    loss_fn = build_objective(LossConfig(terms=terms), total_steps=10)
    ssl = ImageSSLHeadConfig(enabled=True, predictor=True)
    loss_fn.attach(build_model(dataclasses.replace(CFG, image_ssl=ssl)))
    out = loss_fn(
        image,
        text,
        scale,
        logit_bias=bias,
        labels=labels,
        text_features_2=second,
        image_ssl_1=second.flip(0),
        image_ssl_2=image.flip(1),
        momentum_image_features=keys.detach(),
        momentum_text_features=second.detach(),
        image_pred_1=image.flip(0),
        image_pred_2=second,
        byol_target_1=keys.detach(),
        byol_target_2=text.detach().flip(0),
    )
    assert {f"loss/{name}" for name in TERMS} <= set(out) and torch.isfinite(out["loss"])


def test_clip_label_smoothing_formula():
    image, text, scale, _ = _features(3)
    logits = scale * image @ text.T
    labels = torch.arange(len(image))
    expected = (
        F.cross_entropy(logits, labels, label_smoothing=0.1)
        + F.cross_entropy(logits.T, labels, label_smoothing=0.1)
    ) / 2
    got = objective(("clip", 1.0), label_smoothing=0.1)(image, text, scale)["loss"]
    torch.testing.assert_close(got, expected)
    assert objective(("clip", 1.0))(image, text, scale)["loss"] < got  # smoothing adds a floor


def test_weighted_terms_sum_and_log_each():
    image, text, scale, bias = _features(4)
    both = objective(("clip", 1.0), ("siglip", 0.5))(image, text, scale, logit_bias=bias)
    clip = objective(("clip", 1.0))(image, text, scale)["loss"]
    siglip = objective(("siglip", 1.0))(image, text, scale, logit_bias=bias)["loss"]
    torch.testing.assert_close(both["loss"], clip + 0.5 * siglip)
    assert set(both) == {"loss", "loss/clip", "loss/siglip", "clip/loss_i2t", "clip/loss_t2i"}
    single = objective(("clip", 1.0))(image, text, scale)
    assert set(single) == {"loss", "loss_i2t", "loss_t2i"}  # one term logs what it always logged


@pytest.mark.parametrize(
    "terms",
    [[("siglip", 1.0)], [("margin", 1.0)], [("clip", 1.0), ("siglip", 0.3)], [("supcon", 1.0)]],
)
def test_accumulation_4x16_equals_64(terms):
    cfg = CFG
    cfg.init_logit_bias = -10.0
    images, tokens = batch(64)
    grads = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(cfg)
        loss_fn = objective(*terms)
        losses = forward_backward(
            model,
            loss_fn,
            images,
            tokens,
            accum_steps=accum,
            labels=torch.arange(64) % 5 if "labels" in loss_fn.needs else None,
        )
        grads.append(
            (losses["loss"], {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    cfg.init_logit_bias = None
    (loss_full, full), (loss_acc, acc) = grads
    torch.testing.assert_close(loss_acc, loss_full)
    assert set(acc) == set(full) and ("logit_bias" in full) == any(n == "siglip" for n, _ in terms)
    for name, grad in full.items():
        torch.testing.assert_close(
            acc[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )


def test_two_processes_equal_one(tmp_path):
    """torchrun, 2 gloo processes, DDP-averaged gradients == one process on the whole batch, for
    siglip (ring exchange), margin, supcon, simcse and simclr (gathered columns) and weighted
    sums, with accumulation."""
    from dist_objective_worker import VARIANTS, labels, loss_config, model_config, second_views

    out = tmp_path / "grads.pt"
    torchrun(str(Path(__file__).parent / "dist_objective_worker.py"), str(out))
    results = torch.load(out, weights_only=False)
    assert len(results) == len(VARIANTS)
    images, tokens = batch()
    CFG.init_logit_bias = -10.0
    for result in results:
        torch.manual_seed(0)
        model = build_model(model_config(result["variant"]))
        objective = build_objective(loss_config(result["variant"]))
        freeze_unused(model, objective)
        losses = forward_backward(
            model,
            objective,
            images,
            tokens,
            labels=labels() if "labels" in objective.needs else None,
            text_views=2 if "text_views" in objective.needs else 1,
            images_2=second_views() if "image_views" in objective.needs else None,
        )
        assert result["world"] == 2
        torch.testing.assert_close(
            result["loss"], losses["loss"], rtol=1e-5, atol=1e-5, msg=str(result["variant"])
        )
        for name, param in model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(
                    result["grads"][name],
                    param.grad,
                    rtol=1e-5,
                    atol=1e-5,
                    msg=lambda m: f"{result['variant']} {name}: {m}",
                )
    CFG.init_logit_bias = None


def test_config_terms(tmp_path):
    cfg = load_config("configs/demo.yaml", ["data.train=/x"])
    assert [t.name for t in (cfg.loss.terms or [LossTermConfig(name=cfg.loss.name)])] == ["clip"]
    assert cfg.model.init_logit_bias is None
    (tmp_path / "sig.yaml").write_text(
        "loss:\n  terms:\n    - {name: clip, weight: 1.0}\n    - {name: siglip, weight: 0.5}\n"
    )
    cfg = load_config(tmp_path / "sig.yaml", ["data.train=/x"])
    assert (cfg.model.init_logit_bias, cfg.model.init_logit_scale) == (
        -10.0,
        math.log(10),
    )  # SigLIP's init
    assert hasattr(build_model(cfg.model), "logit_bias")
    for override, message in [
        ("loss.name=siglp", "did you mean 'siglip'"),
        ("loss.name=simcse", "set model.text.dropout"),
        ("loss.terms=[{name: clip, weight: 0}]", "weight must be > 0"),
        ("loss.terms=[{name: clip}, {name: clip}]", "names a term twice"),
        ("loss.terms=[{name: margin, margin: -1}]", "margin must be > 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("configs/demo.yaml", ["data.train=/x", override])
    from clip_train.config import LOSS_TERMS
    from clip_train.objective import TERM_NEEDS

    assert set(TERMS) == set(LOSS_TERMS) == set(TERM_NEEDS)


def test_simcse_training_run(synth_dir, tmp_path):
    import json

    from smoke_config import make_cfg

    from clip_train.train import train

    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "cse",
        "train.steps=2",
        "train.log_every=1",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
        "model.text.dropout=0.1",
        "train.accum_steps=2",
        "loss.terms=[{name: clip, weight: 1.0}, {name: simcse, weight: 0.5}]",
    )
    train(cfg)
    record = json.loads((tmp_path / "cse" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss/simcse"] > 0 and math.isfinite(record["loss"])


def _labelled_shards(out, n: int = 96):
    import io

    from PIL import Image

    from data_tools.shards import ShardWriter

    colours = ["red", "green", "blue"]
    with ShardWriter(out, "lab", samples_per_shard=48) as writer:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32), colours[i % 3]).save(buf, "JPEG")
            writer.write(
                {
                    "__key__": f"s{i:04d}",
                    "jpg": buf.getvalue(),
                    "txt": f"a {colours[i % 3]} square",
                    "cls": i % 3,
                }
            )


def test_supcon_trains_on_labelled_shards_and_refuses_unlabelled(synth_dir, tmp_path):
    from smoke_config import make_cfg

    from clip_train.train import train

    _labelled_shards(tmp_path / "lab")
    terms = "loss.terms=[{name: clip, weight: 1.0}, {name: supcon, weight: 0.5}]"
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "sup",
        "train.steps=2",
        "train.save_every=0",
        "eval.at_end=false",
        "export.at_end=false",
        f"data.train={tmp_path}/lab",
        terms,
    )
    summary = train(cfg)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    cfg = make_cfg(synth_dir, tmp_path, "unlabelled", "train.steps=2", terms)
    with pytest.raises(
        ConfigError, match=r"read class labels, but .*train-000000.tar has no \.cls"
    ):
        train(cfg)
    assert not (tmp_path / "unlabelled").exists()  # refused before anything was written


def test_unread_temperature_is_frozen():
    """margin alone reads no temperature: it is frozen, so it gets no update and DDP averages
    every other gradient (an unused trainable parameter leaves its bucket unreduced)."""
    model = build_model(CFG)
    freeze_unused(model, objective(("margin", 1.0)))
    assert not model.logit_scale.requires_grad
    model = build_model(CFG)
    freeze_unused(model, objective(("clip", 1.0), ("margin", 1.0)))
    assert model.logit_scale.requires_grad


def test_training_run_logs_each_term_and_exports_the_bias(synth_dir, tmp_path):
    """The real loop with clip + siglip: each term in metrics.jsonl, and open_clip loads the export
    with SigLIP's learned bias."""
    import json

    import open_clip
    from smoke_config import make_cfg

    from clip_train.train import train

    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "sig",
        "train.steps=2",
        "train.log_every=1",
        "train.save_every=0",
        "eval.at_end=false",
        "model.image.pre_norm=true",
        "loss.terms=[{name: clip, weight: 1.0}, {name: siglip, weight: 0.5}]",
    )
    train(cfg)
    record = json.loads((tmp_path / "sig" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["loss"] == pytest.approx(
        record["loss/clip"] + 0.5 * record["loss/siglip"], rel=1e-5
    )
    oc_model, _, _ = open_clip.create_model_and_transforms(
        f"local-dir:{tmp_path / 'sig' / 'export' / 'open_clip'}"
    )
    from clip_train.export import load_model

    trained = load_model(tmp_path / "sig" / "export")
    assert (
        torch.equal(oc_model.logit_bias, trained.logit_bias) and trained.logit_bias.item() != -10.0
    )


def test_simclr_training_run_logs_resumes_exactly_and_exports_without_the_head(synth_dir, tmp_path):
    """`clip-train train` with clip + simclr under accumulation: both terms logged; a run resumed
    from its middle checkpoint ends with the same weights (head included), bit for bit; the
    export holds the CLIP towers only, and open_clip loads it."""
    import json
    import shutil

    import open_clip
    from safetensors.torch import load_file
    from smoke_config import TINY

    from clip_train.cli import main as cli_main
    from clip_train.export import load_model
    from clip_train.train import train

    args = [
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.train={synth_dir}/train",
        "data.zeroshot=null",
        "data.retrieval=null",
        f"run.output_dir={tmp_path}",
        "run.name=clr",
        *TINY,
        "train.steps=4",
        "train.log_every=1",
        "train.save_every=2",
        "train.accum_steps=2",
        "eval.at_end=false",
        "model.image.pre_norm=true",
        "loss.terms=[{name: clip, weight: 1.0}, {name: simclr, weight: 0.5, temperature: 0.1}]",
    ]
    assert cli_main(args) == 0
    run = tmp_path / "clr"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["loss/simclr"] > 0 and record["loss/clip"] > 0
        assert record["loss"] == pytest.approx(
            record["loss/clip"] + 0.5 * record["loss/simclr"], rel=1e-5
        )

    # the same run stopped after step 2 and resumed
    shutil.copytree(run / "checkpoints", tmp_path / "again" / "checkpoints")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step_4")
    (tmp_path / "again" / "checkpoints" / "latest").unlink()
    cfg = load_config(run / "config.yaml", ["run.name=again", "export.at_end=false"])
    assert train(cfg, resume=True)["steps"] == 4
    final = load_file(run / "checkpoints" / "step_4" / "model.safetensors")
    resumed = load_file(tmp_path / "again" / "checkpoints" / "step_4" / "model.safetensors")
    assert any(k.startswith("image_ssl_head.") for k in final) and set(final) == set(resumed)
    for key, value in final.items():
        assert torch.equal(value, resumed[key]), key

    exported = load_file(run / "export" / "model.safetensors")
    assert set(exported) == {k for k in final if not k.startswith("image_ssl_head.")}
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model"]["image_ssl"]["enabled"] is False
    assert not hasattr(load_model(run / "export"), "image_ssl_head")
    assert hasattr(load_model(run), "image_ssl_head")  # the run's checkpoint keeps it
    open_clip.create_model_and_transforms(f"local-dir:{run / 'export' / 'open_clip'}")
