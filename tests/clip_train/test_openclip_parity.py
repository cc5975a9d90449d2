"""Our training step against open_clip_train's own, from the same weights on the same batches.

The oracle is open_clip_train itself: its `train_one_epoch` (forward, `open_clip.ClipLoss`,
backward, AdamW step, logit-scale clamp), its `cosine_lr` schedule and its AdamW call, on
open_clip's model holding our weights (a `pre_norm` trunk is open_clip's own ViT;
`clip_train.export` maps the names). Ours is the sequence `clip_train.train` runs per step:
`forward_backward`, the fused AdamW of `build_optimizer`, the LambdaLR of `build_scheduler`,
`clamp_logit_scale`. If the two agree, a difference in learning between the two trainers lies in
what feeds the step (data, init), not in the step (issue 9, docs/benchmarks.md).
"""

import argparse
import copy

import open_clip
import pytest
import torch
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch

from clip_train.config import OptimConfig
from clip_train.export import open_clip_export
from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.optim import build_optimizer, build_scheduler
from clip_train.step import forward_backward

LR, WD, WARMUP, STEPS, BATCH = 1e-3, 0.1, 3, 6, 16


class _Loader(list):
    """A list with the two attributes open_clip_train's DataInfo loader carries."""

    num_batches: int
    num_samples: int


def _epoch(images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """`data` as `train_one_epoch` reads it: an epoch of one batch."""
    data = argparse.Namespace(dataloader=_Loader([(images, tokens)]), set_epoch=lambda epoch: None)
    data.dataloader.num_batches, data.dataloader.num_samples = 1, images.shape[0]
    return {"train": data}


def _open_clip_train_args() -> argparse.Namespace:
    """The fields of open_clip_train's parsed arguments that `train_one_epoch` reads."""
    return argparse.Namespace(
        device="cpu",
        precision="fp32",
        accum_freq=1,
        batch_size=BATCH,
        world_size=1,
        rank=0,
        distill=False,
        skip_scheduler=True,  # the schedule is set before each call, as its loop does
        horovod=False,
        grad_clip_norm=None,
        log_every_n_steps=10**9,
        wandb=False,
    )


def _batches(cfg, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg.text.context_length)
    words = ["red", "blue", "square", "circle", "two", "three", "small", "large", "top", "left"]
    out = []
    for _ in range(n):
        images = torch.randn(BATCH, 3, cfg.image.img_size, cfg.image.img_size, generator=g)
        picks = torch.randint(len(words), (BATCH, 4), generator=g).tolist()
        out.append((images, tokenizer([" ".join(words[i] for i in row) for row in picks])))
    return out


def test_training_step_matches_open_clip_train(tiny_model_cfg, open_clip_train_decay_rule):
    cfg = copy.deepcopy(tiny_model_cfg)
    cfg.image.pre_norm = True  # open_clip's ViT exactly: ln_pre, no patch bias
    torch.manual_seed(0)
    ours = build_model(cfg).train()
    model_cfg, state = open_clip_export(ours)
    model_cfg.pop("custom_text")
    theirs = open_clip.CustomTextCLIP(**model_cfg, output_dict=True)
    theirs.load_state_dict(state, strict=True)
    theirs.train()

    optim_cfg = OptimConfig(
        lr=LR,
        weight_decay=WD,
        warmup_steps=WARMUP,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        decay_rule="open_clip",
    )
    opt = build_optimizer(ours, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, STEPS)
    loss_fn = build_loss("clip")

    # open_clip_train's optimiser and schedule, as its main() builds them
    named = list(theirs.named_parameters())
    exclude = open_clip_train_decay_rule
    their_opt = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD},
        ],
        lr=LR,
        betas=(0.9, 0.999),
        eps=1e-8,
    )
    their_sched = cosine_lr(their_opt, LR, WARMUP, STEPS)
    their_losses = []

    def their_loss(*args, **kwargs):
        out = open_clip.ClipLoss()(*args, **kwargs)
        their_losses.append(float(out["contrastive_loss"].detach()))
        return out

    args = _open_clip_train_args()
    for step, (images, tokens) in enumerate(_batches(cfg, STEPS)):
        lr = opt.param_groups[0]["lr"]
        loss = forward_backward(ours, loss_fn, images, tokens, accum_steps=1)["loss"].item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ours.clamp_logit_scale()

        their_sched(step)
        assert their_opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), step
        train_one_epoch(
            theirs, _epoch(images, tokens), their_loss, 0, their_opt, None, None, None, args
        )
        assert loss == pytest.approx(their_losses[-1], abs=2e-5), step
        assert ours.logit_scale.item() == pytest.approx(theirs.logit_scale.item(), abs=1e-6)

    _, after = open_clip_export(ours)
    their_state = theirs.state_dict()
    for name, value in after.items():
        theirs_value = their_state[name]
        if name.endswith("attn.in_proj_bias"):
            # The key bias adds the same amount to every logit of a query's softmax, so its
            # gradient is 0 up to rounding, and AdamW's first steps (update ~ lr * g / |g|) move it
            # by rounding noise alone, differently on each side; queries and values must agree.
            width = value.shape[0] // 3
            value, theirs_value = (
                torch.cat([v[:width], v[2 * width :]]) for v in (value, theirs_value)
            )
        torch.testing.assert_close(value, theirs_value, atol=2e-5, rtol=0, msg=name)
