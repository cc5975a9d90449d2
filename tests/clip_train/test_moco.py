"""The moco term and its momentum state: the loss against the formula written out (queue
included), finite differences, accumulation, two processes against one, the order of the updates
(once per optimiser step, EMA then FIFO enqueue of gathered keys), config refusals, and a
training run that logs the term and resumes after SIGKILL to the same bits."""

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clip_train.checkpoint import OBJECTIVE_FILE
from clip_train.config import LossConfig, LossTermConfig, check_for_processes, load_config
from clip_train.moco import KeyQueue
from clip_train.model import build_model
from clip_train.momentum import MomentumCopy
from clip_train.objective import build_objective, freeze_unused
from clip_train.step import forward_backward
from data_tools.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from dist_moco_worker import PRELOAD, QUEUE, VARIANTS, moco_objective, setup  # noqa: E402
from dist_worker import CFG, batch  # noqa: E402
from kill_resume import assert_same_tensors, kill_after_checkpoint  # noqa: E402
from torchrun import torchrun  # noqa: E402

NARROW = replace(CFG, embed_dim=8)  # keys of 8 numbers: a quick gradcheck


def _unit(seed: int, n: int, dtype=torch.float64, dim: int = CFG.embed_dim) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=-1)


def _moco(*terms, model=None, **options):
    objective = build_objective(
        LossConfig(terms=[LossTermConfig(name=n, weight=w, **options) for n, w in terms])
    )
    objective.attach(build_model(CFG) if model is None else model)
    return objective, objective.terms[objective.names.index("moco")]


def _written_out(queries, keys, queue, scale):
    """Mean over rows of -log softmax(scale * q . [keys; queue])[matching key], by loops."""
    columns = [k.tolist() for k in keys] + [k.tolist() for k in queue]
    total = 0.0
    for i, q in enumerate(queries.tolist()):
        scores = [scale * sum(a * b for a, b in zip(q, c)) for c in columns]
        top = max(scores)
        total += -(scores[i] - top - math.log(sum(math.exp(s - top) for s in scores)))
    return total / len(queries)


@pytest.mark.parametrize("temperature", [None, 0.2])
def test_loss_formula_written_out_with_queue_and_gradient(temperature):
    model = build_model(NARROW)
    objective, term = _moco(("moco", 1.0), model=model, queue_size=20, temperature=temperature)
    unit = lambda seed, n: _unit(seed, n, dim=8)  # noqa: E731
    image, text = unit(0, 6).requires_grad_(), unit(1, 6).requires_grad_()
    image_keys, text_keys = unit(2, 6), unit(3, 6)
    term.image_queue.push(unit(4, 5))
    term.text_queue.push(unit(5, 5))
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    inputs = {"momentum_image_features": image_keys, "momentum_text_features": text_keys}
    out = objective(image, text, scale, **inputs)

    # the queues and the batch keys are held in float32: the oracle reads what is stored
    stored = lambda t: t.float().double()  # noqa: E731
    s = 7.0 if temperature is None else 1 / temperature
    i2t = _written_out(image.detach(), stored(text_keys), term.text_queue.filled().double(), s)
    t2i = _written_out(text.detach(), stored(image_keys), term.image_queue.filled().double(), s)
    assert len(term.text_queue) == 5
    assert out["loss_i2t"].item() == pytest.approx(i2t, rel=1e-9)
    assert out["loss"].item() == pytest.approx((i2t + t2i) / 2, rel=1e-9)
    assert objective.needs == (
        {"momentum", "logit_scale"} - ({"logit_scale"} if temperature else set())
    )
    # finite differences through queries and temperature (keys and queues are constants)
    assert torch.autograd.gradcheck(
        lambda a, b, c: objective(a, b, c, **inputs)["loss"], (image, text, scale)
    )
    with pytest.raises(ValueError, match="momentum keys"):
        objective(image, text, scale)


def test_key_queue_is_a_fifo_ring():
    queue = KeyQueue(10, 3)
    assert len(queue) == 0 and queue.filled().shape == (0, 3)
    pushed = torch.arange(3 * 4 * 3, dtype=torch.float32).reshape(12, 3)
    for chunk in pushed.split(4):
        queue.push(chunk)
    # 12 keys into 10 slots: key j sits in slot j % 10; the two oldest are gone
    assert len(queue) == 10 and int(queue.count) == 12
    for j in range(2, 12):
        assert torch.equal(queue.keys[j % 10], pushed[j])
    with pytest.raises(ValueError, match="cannot push 11 keys"):
        queue.push(torch.zeros(11, 3))


def test_momentum_copy_is_an_ema_that_is_never_trained():
    torch.manual_seed(0)
    source = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 2)
    )
    ema = MomentumCopy(source, 0.9)
    ema.train()
    assert not ema.module.training  # eval always: no dropout, no RNG drawn
    assert not any(p.requires_grad for p in ema.parameters())
    assert all(k.startswith("module.") for k in ema.state_dict())  # the copy only
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    ema.update()
    for name, p in source.state_dict().items():
        torch.testing.assert_close(ema.module.state_dict()[name], 0.9 * before[name] + 0.1 * p)
    x = torch.randn(5, 4)
    torch.testing.assert_close(ema(x), ema.module(x))
    assert not ema(x).requires_grad
    ema.update(momentum=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), source.parameters()))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MomentumCopy(source, 1.0)


@pytest.mark.parametrize("terms", [[("moco", 1.0)], [("clip", 1.0), ("moco", 0.5)]])
def test_accumulation_4x16_equals_64_and_one_update_per_step(terms):
    images, tokens = batch(64)
    runs = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(CFG)
        objective, term = _moco(*terms, model=model, queue_size=100)
        term.image_queue.push(_unit(6, 10, torch.float32))
        term.text_queue.push(_unit(7, 10, torch.float32))
        losses = forward_backward(
            model, objective, images, tokens, accum_steps=accum, targets=objective.targets
        )
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        objective.after_step()
        runs.append((losses, grads, term))
    (full_loss, full, full_term), (acc_loss, acc, acc_term) = runs
    torch.testing.assert_close(acc_loss["loss"], full_loss["loss"])
    assert set(acc) == set(full)
    for name, grad in full.items():
        torch.testing.assert_close(
            acc[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}"
        )
    # the whole batch's keys entered the queues once, not once per micro-batch
    assert int(acc_term.text_queue.count) == int(full_term.text_queue.count) == 10 + 64
    torch.testing.assert_close(acc_term.text_queue.keys, full_term.text_queue.keys)


def test_after_the_optimiser_step_ema_then_enqueue_the_keys_used():
    """One step: the queues receive the keys the loss used (from the towers before the EMA
    update), and the towers move to m * old + (1 - m) * the updated model; the towers are in no
    optimizer and get no gradient."""
    images, tokens = batch(16)
    torch.manual_seed(0)
    model = build_model(CFG)
    objective, term = _moco(("moco", 1.0), model=model, queue_size=40, momentum=0.75)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    towers = term.towers.module
    old = {k: v.clone() for k, v in towers.state_dict().items()}
    used = objective.targets(images, tokens)
    forward_backward(model, objective, images, tokens, accum_steps=2, targets=objective.targets)
    assert all(p.grad is None for p in towers.parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not held & {id(p) for p in towers.parameters()}
    optimizer.step()
    objective.after_step()
    new = {**{f"visual.{k}": v for k, v in model.visual.state_dict().items()}}
    new.update({f"text.{k}": v for k, v in model.text.state_dict().items()})
    for name, value in towers.state_dict().items():
        torch.testing.assert_close(value, 0.75 * old[name] + 0.25 * new[name], msg=name)
    assert int(term.image_queue.count) == 16
    torch.testing.assert_close(term.image_queue.filled(), used["momentum_image_features"])
    torch.testing.assert_close(term.text_queue.filled(), used["momentum_text_features"])
    with pytest.raises(RuntimeError, match="without a forward"):
        objective.after_step()


def test_two_processes_equal_one(tmp_path):
    """torchrun, 2 gloo processes: DDP-averaged gradients and the loss equal one process on the
    whole batch; after the optimiser step every rank's towers and queues are identical and equal
    to the single process's (the queues hold all 16 gathered keys, in rank order)."""
    out = tmp_path / "moco.pt"
    torchrun(str(Path(__file__).parent / "dist_moco_worker.py"), str(out))
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
        )
        assert result["world"] == 2
        torch.testing.assert_close(result["loss"], losses["loss"], rtol=1e-5, atol=1e-5)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(result["grads"]) == set(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(
                result["grads"][name], grad, rtol=1e-5, atol=1e-5, msg=f"{variant} {name}"
            )
        optimizer.step()
        objective.after_step()
        for name, reference in objective.state_dict().items():
            ranks = result["state"][name]
            assert torch.equal(ranks[0], ranks[1]), f"{variant} {name}: ranks differ"
            torch.testing.assert_close(ranks[0], reference, rtol=1e-5, atol=1e-5, msg=name)
        counts = [v for k, v in result["state"].items() if k.endswith("_queue.count")]
        assert [c.tolist() for c in counts] == [[PRELOAD + 16] * 2] * 2
    assert QUEUE >= PRELOAD + 16  # nothing was overwritten: the 16 new keys sit after the old


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["loss.terms=[{name: moco, queue_size: 8}]"], ["loss.terms[0]", "queue_size=8", "16"]),
        (
            ["loss.terms=[{name: moco, queue_size: 40}]", "train.accum_steps=3"],
            ["queue_size=40", "global batch 48", "train.accum_steps"],
        ),
        (["loss.terms=[{name: moco, momentum: 1.0}]"], ["loss.terms[0]", "momentum", "[0, 1)"]),
        (["loss.terms=[{name: clip}, {name: moco, momentum: -0.1}]"], ["loss.terms[1]"]),
        (["loss.terms=[{name: moco}]", "train.fsdp=true"], ["moco", "train.fsdp"]),
        (["loss.name=moco", "train.batch_size=5000"], ["loss.name=moco", "loss.terms"]),
    ],
)
def test_bad_combinations_are_one_line_naming_the_keys(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["data.train=/x", "train.batch_size=16", *overrides])
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), info.value


def test_queue_against_the_global_batch_of_several_processes():
    cfg = load_config(
        None, ["data.train=/x", "train.batch_size=16", "loss.terms=[{name: moco, queue_size: 48}]"]
    )
    check_for_processes(cfg, 3)  # 48 keys a step: fits
    with pytest.raises(ConfigError, match=r"global batch 64 \(.* x 4 processes\)"):
        check_for_processes(cfg, 4)


def test_training_run_logs_updates_once_per_step_and_resumes_exactly(synth_dir, tmp_path):
    """The real loop with clip + moco and accumulation: loss/clip and loss/moco are logged; each
    checkpoint holds the towers and queues (objective.safetensors, not the model file); between
    consecutive steps the towers are the EMA of the saved models and the queue advanced by one
    global batch, first in first out; a run killed with SIGKILL resumes to the same bits."""
    from smoke_config import TINY, make_cfg

    from clip_train.train import train

    common = [
        "train.steps=4",
        "train.save_every=1",
        "train.keep_last=10",
        "train.log_every=1",
        "train.batch_size=8",
        "train.accum_steps=2",
        "eval.at_end=false",
        "export.at_end=false",
        "loss.terms=[{name: clip, weight: 1.0}, {name: moco, weight: 0.5, queue_size: 24}]",
    ]
    train(make_cfg(synth_dir, tmp_path, "straight", *common))
    run = tmp_path / "straight"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss/moco"] > 0 and r["loss/clip"] > 0 for r in records)
    assert records[-1]["loss"] == pytest.approx(
        records[-1]["loss/clip"] + 0.5 * records[-1]["loss/moco"], rel=1e-5
    )

    def saved(step):
        ckpt = run / "checkpoints" / f"step_{step}"
        return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / OBJECTIVE_FILE))

    model_1, state_1 = saved(1)
    model_2, state_2 = saved(2)
    assert not any("towers" in k or "queue" in k for k in model_1)
    assert set(model_1) == set(
        build_model(make_cfg(synth_dir, tmp_path, "x", *common).model).state_dict()
    )
    prefix = "terms.1.towers.module."
    towers = {k[len(prefix) :]: v for k, v in state_2.items() if k.startswith(prefix)}
    assert set(towers) == {k for k in model_1 if k.split(".")[0] in ("visual", "text")}
    for name, value in towers.items():
        expected = 0.995 * state_1[prefix + name] + 0.005 * model_2[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    queue = "terms.1.image_queue."
    assert [int(saved(s)[1][queue + "count"]) for s in (1, 2, 3)] == [16, 32, 48]
    # step 2's 16 keys went to slots 16..23 and, wrapping, 0..7; slots 8..15 still hold step 1's
    assert torch.equal(state_2[queue + "keys"][8:16], state_1[queue + "keys"][8:16])
    assert not torch.equal(state_2[queue + "keys"][:8], state_1[queue + "keys"][:8])
    assert not torch.equal(state_2[queue + "keys"][16:], state_1[queue + "keys"][16:])

    args = [
        f"data.train={synth_dir}/train",
        f"run.output_dir={tmp_path}",
        "run.name=killed",
        *TINY,
        *common,
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


def test_resume_refuses_a_changed_queue(synth_dir, tmp_path, make_cfg):
    from clip_train.train import train

    common = ["train.steps=1", "eval.at_end=false", "export.at_end=false"]
    terms = "loss.terms=[{name: moco, queue_size: %d}]"
    train(make_cfg(synth_dir, tmp_path, "q", *common, terms % 32))
    with pytest.raises(ConfigError, match="objective state does not fit loss.terms"):
        train(make_cfg(synth_dir, tmp_path, "q", *common, terms % 48), resume=True)


def test_unread_temperature_is_frozen_with_a_fixed_moco_temperature():
    model = build_model(CFG)
    freeze_unused(model, moco_objective(dict(terms=[("moco", 1.0)], temperature=0.1)))
    assert not model.logit_scale.requires_grad


def test_skipped_steps_move_no_momentum_state_bf16(synth_dir, tmp_path, make_cfg, monkeypatch):
    """A step whose gradients are not finite is skipped, and so are the EMA and the enqueue: 4
    steps with 2 skipped leave 2 batches in the queues. Under bf16 autocast the keys are stored
    in float32 and stay finite."""
    import clip_train.train as train_module

    real = train_module.forward_backward
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        losses = real(model, *args, **kwargs)
        if calls["n"] in (2, 3):
            next(model.parameters()).grad.fill_(float("nan"))
        return losses

    monkeypatch.setattr(train_module, "forward_backward", poisoned)
    cfg = make_cfg(
        synth_dir,
        tmp_path,
        "skip",
        "train.steps=4",
        "train.save_every=0",
        "train.mixed_precision=bf16",
        "eval.at_end=false",
        "export.at_end=false",
        "loss.terms=[{name: clip}, {name: moco, queue_size: 64}]",
    )
    assert train_module.train(cfg)["nonfinite_skipped"] == 2
    state = load_file(str(tmp_path / "skip" / "checkpoints" / "step_4" / OBJECTIVE_FILE))
    assert int(state["terms.1.text_queue.count"]) == 2 * 16
    assert state["terms.1.text_queue.keys"].dtype == torch.float32
    assert all(torch.isfinite(v).all() for v in state.values())
