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
    assert {
        "logit_scale",
        "text.token_embedding.weight",
        "text.positional_embedding",
        "visual.trunk.pos_embed",
        "visual.trunk.cls_token",
        "text.ln_final.weight",
    } <= no_decay
    assert all(not n.endswith(".bias") for n in decay)
    assert (
        "visual.head.proj.weight" in decay
        and "text.transformer.resblocks.0.attn.in_proj_weight" in decay
    )
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
    cfg = OptimConfig(
        warmup_steps=10, cooldown_steps=20, min_lr_ratio=0.0, schedule="const-cooldown"
    )
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


def test_open_clip_decay_rule_matches_open_clip_train(tiny_model_cfg, open_clip_train_decay_rule):
    """`optim.decay_rule=open_clip` decays exactly the parameters open_clip_train decays on the
    same model in open_clip's names (pre_norm trunk: open_clip's own ViT, names mapped by the
    export)."""
    from clip_train import openclip_vit
    from clip_train.config import DECAY_RULES
    from clip_train.optim import DECAY_RULES as RULES
    from clip_train.optim import param_groups

    assert set(RULES) == set(DECAY_RULES)
    tiny_model_cfg.image.pre_norm = True
    model = build_model(tiny_model_cfg)
    exclude = open_clip_train_decay_rule
    named = dict(model.named_parameters())
    theirs = openclip_vit.to_open_clip(named, model.visual.trunk)
    ours_to_theirs = dict(zip(named, theirs))  # to_open_clip keeps the order of the keys
    decayed, _ = param_groups(model, 0.1, "open_clip")
    decayed_ids = {id(p) for p in decayed["params"]}
    for name, param in named.items():
        their_name = ours_to_theirs[name]
        assert (id(param) in decayed_ids) == (not exclude(their_name, theirs[their_name])), (
            name,
            their_name,
        )
    # and the two rules differ where the issue says: embeddings
    ours_decayed = {id(p) for p in param_groups(model, 0.1)[0]["params"]}
    assert id(model.text.token_embedding.weight) in decayed_ids - ours_decayed
    assert id(model.visual.trunk.pos_embed) in decayed_ids - ours_decayed
