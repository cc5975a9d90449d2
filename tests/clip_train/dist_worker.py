"""Run under torchrun by test_distributed.py: one step of gradients on this rank's half of a batch.

Each variant (loss layout x accumulation) writes, on rank 0, the DDP-averaged gradients and the
loss averaged over processes, for comparison with one process on the whole batch. `--tiled` runs
the same variants with the tiled loss, in tiles of 3: they split neither the 8 rows of a process
nor the 16 gathered columns evenly.
"""

import sys

import open_clip
import torch
from accelerate import Accelerator

import clip_train
from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from clip_train.losses import build_loss
from clip_train.model import build_model
from clip_train.step import forward_backward

CFG = ModelConfig(
    embed_dim=32,
    image=ImageTowerConfig(img_size=32, patch_size=8, width=48, depth=2, heads=2),
    text=TextTowerConfig(context_length=16, width=48, heads=2, layers=2),
)
VARIANTS = [
    dict(local_loss=False, gather_with_grad=True, accum_steps=1),
    dict(local_loss=True, gather_with_grad=True, accum_steps=1),
    dict(local_loss=True, gather_with_grad=True, accum_steps=2),
]


def batch(n: int = 16):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red", "blue", "green", "small", "large", "circle", "square", "star"]
    captions = [
        " ".join(words[j] for j in torch.randint(0, 8, (1 + i % 6,), generator=g).tolist())
        for i in range(n)
    ]
    return images, open_clip.tokenizer.SimpleTokenizer(context_length=16)(captions)


def main(out_path: str, tiled: bool = False) -> None:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    images, tokens = batch()
    per = images.shape[0] // world
    results = []
    for variant in VARIANTS:
        torch.manual_seed(0)
        model = accelerator.prepare(build_model(CFG))
        loss_fn = build_loss(
            "clip",
            rank=rank,
            world_size=world,
            local_loss=variant["local_loss"],
            gather_with_grad=variant["gather_with_grad"],
            tiled=tiled,
            tile_size=3,
        )
        mine = slice(rank * per, (rank + 1) * per)
        losses = forward_backward(
            model,
            loss_fn,
            images[mine],
            tokens[mine],
            accum_steps=variant["accum_steps"],
            backward=accelerator.backward,
            no_sync=lambda: accelerator.no_sync(model),
        )
        loss = accelerator.reduce(losses["loss"].detach(), reduction="mean")
        grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters()}
        results.append(
            {
                "variant": variant,
                "loss": loss,
                "grads": grads,
                "world": world,
                "clip_train": clip_train.__file__,
            }
        )
    if accelerator.is_main_process:
        torch.save(results, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], tiled="--tiled" in sys.argv[2:])
