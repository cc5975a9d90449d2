import math

import torch

from clip_train.config import OptimConfig
from clip_train.model import build_model
from clip_train.optim import build_optimizer, build_scheduler, const_cooldown, cosine


def test_no_decay_on_biases_norms_embeddings_and_scale(tiny_model_cfg):
    model = build_model(tiny_model_cfg)
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in opt.param_groups[0]["params"]}
    no_decay = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert {"logit_scale", "text.token_embedding.weight", "text.positional_embedding",
            "visual.trunk.pos_embed", "visual.trunk.cls_token", "text.ln_final.weight"} <= no_decay
    assert all(not n.endswith(".bias") for n in decay)
    assert "visual.head.proj.weight" in decay and "text.transformer.resblocks.0.attn.in_proj_weight" in decay
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg, total_steps=110)
    lrs = []
    for _ in range(110):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0)
    assert math.isclose(lrs[60], cosine(60, 110, cfg))
    assert math.isclose(cosine(110, 110, cfg), 0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_const_cooldown():
    cfg = OptimConfig(warmup_steps=10, cooldown_steps=20, min_lr_ratio=0.0, schedule="const-cooldown")
    assert const_cooldown(5, 100, cfg) == 0.6
    assert const_cooldown(50, 100, cfg) == 1.0 and const_cooldown(80, 100, cfg) == 1.0
    assert math.isclose(const_cooldown(90, 100, cfg), 0.5) and const_cooldown(100, 100, cfg) == 0.0


def test_locked_towers_are_frozen(tiny_model_cfg):
    from clip_train.model import lock_towers

    tiny_model_cfg.lock_image = tiny_model_cfg.lock_text = True
    model = build_model(tiny_model_cfg)
    lock_towers(model, tiny_model_cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"logit_scale", "visual.head.proj.weight", "text.text_projection"}
    opt = build_optimizer(model, OptimConfig())
    assert sum(len(g["params"]) for g in opt.param_groups) == 3
