"""The byol term: the loss against BYOL's formula written out, finite differences, the model's
predictor and the target network's projections, the momentum schedule and the order of the
updates, accumulation 4x16 == 64, two processes against one, config refusals, and a training run
that logs the term, exports without the predictor and resumes after SIGKILL to the same bits."""

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clip_train.byol import cosine_momentum
from clip_train.checkpoint import OBJECTIVE_FILE
from clip_train.config import LossConfig, LossTermConfig, load_config
from clip_train.model import build_model, inference_config
from clip_train.objective import build_objective
from clip_train.optim import build_optimizer
from clip_train.step import forward_backward
from data_tools.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from dist_byol_worker import BYOL_CFG, VARIANTS, second_views, setup  # noqa: E402
from dist_worker import batch  # noqa: E402
from kill_resume import assert_same_tensors, kill_after_checkpoint  # noqa: E402
from torchrun import torchrun  # noqa: E402


def _byol(*terms, model=None, total_steps=None, **options):
    objective = build_objective(
        LossConfig(terms=[LossTermConfig(name=n, weight=w, **options) for n, w in terms]),
        total_steps=total_steps,
    )
    objective.attach(build_model(BYOL_CFG) if model is None else model)
    return objective, objective.terms[objective.names.index("byol")]


def _unit(seed: int, n: int = 5, dim: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)


def test_loss_formula_written_out_and_finite_differences():
    """BYOL's loss as the paper writes it, ||q/|q| - z'/|z'| ||^2 summed over both directions,
    by loops, mean over images; gradients by finite differences; targets get none."""
    objective, _ = _byol(("byol", 1.0), momentum_schedule="constant")
    pred_1, pred_2 = _unit(0).requires_grad_(), _unit(1).requires_grad_()
    target_1, target_2 = _unit(2).requires_grad_(), _unit(3).requires_grad_()
    image, text = _unit(4), _unit(5)
    scale = torch.tensor(10.0, dtype=torch.float64)

    def squared_distance(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return sum((x / na - y / nb) ** 2 for x, y in zip(a, b))

    rows = zip(pred_1.tolist(), pred_2.tolist(), target_1.tolist(), target_2.tolist())
    expected = [squared_distance(q1, z2) + squared_distance(q2, z1) for q1, q2, z1, z2 in rows]

    def loss(a, b):
        inputs = dict(byol_target_1=target_1, byol_target_2=target_2)
        return objective(image, text, scale, image_pred_1=a, image_pred_2=b, **inputs)

    out = loss(pred_1, pred_2)
    assert out["loss"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert out["momentum"].item() == pytest.approx(0.996)  # BYOL's default base
    out["loss"].backward()
    assert target_1.grad is None and target_2.grad is None
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b)["loss"], (pred_1, pred_2))
    with pytest.raises(ValueError, match="target network's projections"):
        objective(image, text, scale, image_pred_1=pred_1, image_pred_2=pred_2)
    with pytest.raises(ValueError, match="predictions"):
        objective(image, text, scale, byol_target_1=target_1, byol_target_2=target_2)


def test_model_predictions_and_target_projections():
    """The model's image_pred_* are the predictor on the head's (unnormalised) output,
    normalised; the target network starts as a copy of trunk + head, so its projections equal
    the model's image_ssl_* in eval mode; it needs the second view and the model's predictor."""
    model = build_model(BYOL_CFG).eval()
    objective, term = _byol(("clip", 1.0), ("byol", 1.0), model=model, total_steps=4)
    images, tokens = batch(4)
    views = second_views(4)
    out = model(images, tokens, images_2=views)
    projected = model.image_ssl_head(model.visual.trunk(views))
    torch.testing.assert_close(
        out["image_pred_2"], F.normalize(model.image_ssl_predictor(projected), dim=-1)
    )
    assert out["image_pred_1"].shape == (4, 16) and "image_pred_1" not in model(images, tokens)
    targets = objective.targets(images, tokens, views)
    torch.testing.assert_close(targets["byol_target_1"], out["image_ssl_1"])
    torch.testing.assert_close(targets["byol_target_2"], out["image_ssl_2"])
    assert not targets["byol_target_1"].requires_grad
    assert objective.needs == {"logit_scale", "image_views", "momentum"}
    with pytest.raises(ValueError, match="second view"):
        objective.targets(images, tokens)
    with pytest.raises(ValueError, match="head and predictor"):
        term.attach(
            build_model(
                dataclasses.replace(
                    BYOL_CFG, image_ssl=dataclasses.replace(BYOL_CFG.image_ssl, predictor=False)
                )
            )
        )


def test_cosine_schedule_and_its_ema_after_each_step():
    """BYOL's schedule, 1 - (1 - base)(cos(pi k / K) + 1) / 2, written out; two optimiser steps
    move the target to m_k x target + (1 - m_k) x the updated online trunk and head, with k the
    steps taken before; the target is in no optimizer and gets no gradient."""
    assert cosine_momentum(0.996, 0, 10) == pytest.approx(0.996)
    assert cosine_momentum(0.996, 5, 10) == pytest.approx(0.998)
    assert cosine_momentum(0.5, 1, 3) == pytest.approx(1 - 0.5 * (0.5 + 1) / 2)
    assert cosine_momentum(0.996, 10, 10) == cosine_momentum(0.996, 12, 10) == 1.0

    images, tokens = batch(8)
    views = second_views(8)
    torch.manual_seed(0)
    model = build_model(BYOL_CFG)
    objective, term = _byol(("clip", 1.0), ("byol", 1.0), model=model, total_steps=3, momentum=0.5)
    optimizer = build_optimizer(model, load_config(None, ["data.train=/x"]).optim)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in model.image_ssl_predictor.parameters()} <= held
    assert not held & {id(p) for p in term.target.parameters()}
    for k, m in enumerate([0.5, 0.625]):
        old = {n: v.clone() for n, v in term.target.module.state_dict().items()}
        forward_backward(
            model,
            objective,
            images,
            tokens,
            accum_steps=2,
            targets=objective.targets,
            images_2=views,
        )
        assert model.image_ssl_predictor.fc2.weight.grad is not None
        assert all(p.grad is None and not p.requires_grad for p in term.target.parameters())
        optimizer.step()
        optimizer.zero_grad()
        assert term.momentum_now() == pytest.approx(m)
        objective.after_step()
        assert int(term.steps) == k + 1
        online = {f"trunk.{n}": v for n, v in model.visual.trunk.state_dict().items()}
        online.update({f"head.{n}": v for n, v in model.image_ssl_head.state_dict().items()})
        assert set(online) == set(old)
        for name, value in term.target.module.state_dict().items():
            torch.testing.assert_close(value, m * old[name] + (1 - m) * online[name], msg=name)
    constant, fixed = _byol(("byol", 1.0), momentum=0.9, momentum_schedule="constant")
    constant.after_step()
    assert fixed.momentum_now() == 0.9
    with pytest.raises(ValueError, match="needs total_steps"):
        _byol(("byol", 1.0))


@pytest.mark.parametrize("terms", [[("clip", 1.0), ("byol", 0.5)], [("byol", 1.0)]])
def test_accumulation_4x16_equals_64(terms):
    """Loss, every gradient (predictor's included) and the target after the step: 4 cached
    micro-batches of 16 equal one batch of 64."""
    images, tokens = batch(64)
    views = second_views(64)
    runs = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(BYOL_CFG)
        objective, term = _byol(*terms, model=model, total_steps=10, momentum=0.5)
        losses = forward_backward(
            model,
            objective,
            images,
            tokens,
            accum_steps=accum,
            targets=objective.targets,
            images_2=views,
        )
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.optim.SGD(model.parameters(), lr=0.5).step()
        objective.after_step()
        runs.append((losses, grads, objective.state_dict()))
    (full_losses, full, full_state), (acc_losses, acc, acc_state) = runs
    assert set(acc_losses) == set(full_losses)
    for key, value in full_losses.items():
        torch.testing.assert_close(acc_losses[key], value, msg=key)
    assert set(acc) == set(full)
    assert any(n.startswith("image_ssl_predictor.") for n in full)
    for name, grad in full.items():
        torch.testing.assert_close(
            acc[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )
    assert set(acc_state) == set(full_state)
    for name, value in full_state.items():
        torch.testing.assert_close(acc_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_equal_one(tmp_path):
    """torchrun, 2 gloo processes: losses and DDP-averaged gradients equal one process on the
    whole batch; after the optimiser step both ranks hold the same target network, equal to the
    single process's."""
    out = tmp_path / "byol.pt"
    torchrun(str(Path(__file__).parent / "dist_byol_worker.py"), str(out))
    results = torch.load(out, weights_only=True)
    assert len(results) == len(VARIANTS)
    images, tokens = batch()
    for result in results:
        variant = result["variant"]
        model, objective = setup(variant)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        losses = forward_backward(
            model,
            objective,
            images,
            tokens,
            accum_steps=variant["accum_steps"],
            targets=objective.targets,
            images_2=second_views(),
        )
        assert result["world"] == 2 and set(result["loss"]) == set(losses)
        for key, value in losses.items():
            torch.testing.assert_close(result["loss"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(result["grads"]) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=f"{variant} {name}"
            )
        optimizer.step()
        objective.after_step()
        state = objective.state_dict()
        assert set(result["state"]) == set(state)
        for name, reference in state.items():
            ranks = result["state"][name]
            assert torch.equal(ranks[0], ranks[1]), f"{variant} {name}: ranks differ"
            torch.testing.assert_close(ranks[0], reference, rtol=1e-5, atol=1e-5, msg=name)


def test_config_turns_on_head_and_predictor_and_refuses_bad_combinations():
    base = ["data.train=/x", "train.batch_size=16"]
    cfg = load_config(None, [*base, "loss.terms=[{name: clip}, {name: byol, weight: 0.5}]"])
    assert cfg.model.image_ssl.enabled and cfg.model.image_ssl.predictor
    assert cfg.loss.terms[1].momentum is None  # the term's default, 0.996
    assert build_objective(cfg.loss, total_steps=10).terms[1].momentum == 0.996
    simclr = load_config(None, [*base, "loss.terms=[{name: clip}, {name: simclr}]"])
    assert simclr.model.image_ssl.enabled and not simclr.model.image_ssl.predictor
    assert not inference_config(cfg.model).image_ssl.predictor
    clip_byol = "loss.terms=[{name: clip}, {name: byol}]"
    for overrides, words in [
        (["loss.name=byol"], ["single towers only", "image-text term"]),
        (["loss.terms=[{name: simclr}, {name: byol}]"], ["single towers only"]),
        ([clip_byol, "model.lock_image=true"], ["byol", "model.lock_image=true"]),
        (["loss.terms=[{name: clip}, {name: byol, momentum: 1.0}]"], ["loss.terms[1]", "[0, 1)"]),
        (
            ["loss.terms=[{name: clip}, {name: byol, momentum_schedule: linear}]"],
            ["loss.terms[1]", "momentum_schedule", "constant, cosine", "linear"],
        ),
        ([clip_byol, "train.fsdp=true"], ["byol", "train.fsdp"]),
        (["model.image_ssl.predictor=true"], ["model.image_ssl.predictor", "byol"]),
        (
            ["loss.terms=[{name: clip}, {name: simclr}]", "model.image_ssl.predictor=true"],
            ["model.image_ssl.predictor"],
        ),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(None, [*base, *overrides])
        message = str(info.value)
        assert "\n" not in message and all(w in message for w in words), message


def test_training_run_logs_exports_without_predictor_and_resumes_exactly(synth_dir, tmp_path):
    """`clip-train train` with clip + byol 0.5 under accumulation: loss/clip and loss/byol logged;
    checkpoints hold the predictor in the model and the target in objective.safetensors, where
    consecutive steps show the EMA at the cosine schedule's rate; the export is a plain CLIP
    model; a run killed with SIGKILL after step 2 resumes to the same bits."""
    from smoke_config import TINY, make_cfg

    from clip_train.export import load_model
    from clip_train.train import train

    common = [
        "train.steps=4",
        "train.save_every=1",
        "train.keep_last=10",
        "train.log_every=1",
        "train.batch_size=8",
        "train.accum_steps=2",
        "eval.at_end=false",
        "loss.terms=[{name: clip, weight: 1.0}, {name: byol, weight: 0.5, momentum: 0.5}]",
    ]
    train(make_cfg(synth_dir, tmp_path, "straight", *common))
    run = tmp_path / "straight"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["loss/clip"] > 0 and 0 < record["loss/byol"] <= 8
        assert record["loss"] == pytest.approx(
            record["loss/clip"] + 0.5 * record["loss/byol"], rel=1e-5
        )
    assert [r["byol/momentum"] for r in records] == pytest.approx(
        [cosine_momentum(0.5, k, 4) for k in range(4)]
    )

    def saved(step):
        ckpt = run / "checkpoints" / f"step_{step}"
        return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / OBJECTIVE_FILE))

    model_1, state_1 = saved(1)
    model_2, state_2 = saved(2)
    assert any(k.startswith("image_ssl_predictor.") for k in model_1)
    assert not any("target" in k for k in model_1)
    assert int(state_1["terms.1.steps"]) == 1 and int(state_2["terms.1.steps"]) == 2
    prefix = "terms.1.target.module."
    target = {k[len(prefix) :]: v for k, v in state_2.items() if k.startswith(prefix)}
    online = {"trunk.": "visual.trunk.", "head.": "image_ssl_head."}
    m = cosine_momentum(0.5, 1, 4)  # the update after the second step taken
    assert len(target) == sum(k.startswith(tuple(online.values())) for k in model_2)
    for name, value in target.items():
        part = name.split(".")[0] + "."
        source = online[part] + name[len(part) :]
        expected = m * state_1[prefix + name] + (1 - m) * model_2[source]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)

    exported = load_file(str(run / "export" / "model.safetensors"))
    plain = build_model(inference_config(load_model(run).cfg))
    assert set(exported) == set(plain.state_dict())
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model"]["image_ssl"] == {**config["model"]["image_ssl"], "predictor": False}
    assert not hasattr(load_model(run / "export"), "image_ssl_predictor")
    assert hasattr(load_model(run), "image_ssl_predictor")  # the checkpoint keeps it

    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={tmp_path}",
        "run.name=killed",
        *TINY,
        *common,
        "export.at_end=false",
    ]
    ckpts = kill_after_checkpoint(args, tmp_path / "killed", step=2)
    assert not (ckpts / "step_4").exists()

    summary = train(load_config(tmp_path / "killed" / "config.yaml"), resume=True)
    assert summary["steps"] == 4
    assert_same_tensors(
        run / "checkpoints" / "step_4",
        ckpts / "step_4",
        names=("model.safetensors", OBJECTIVE_FILE),
    )
