r"""Stream swap: one model, one training step, the data streams of two trainers.

    bash bench/openclip_env.sh                                   # once: the OpenCLIP venv
    .venv/bin/python bench/stream_swap.py --data /tmp/clip-train-ttq/synth-8000 --seeds 20 21 22
    .venv/bin/python bench/stream_swap.py --data DIR --arms openclip ours full --device cuda

`bench/time_to_quality.py` runs the two trainers whole, so a difference between them can come from
the model's init, the training step or the data stream. The step is open_clip_train's
(tests/clip_train/test_openclip_parity.py), so this bench holds the rest still: per seed it
records each arm's stream, then trains `configs/bench_tiny.yaml` from the same initial weights
(drawn from the seed) with clip-train's step on each, and evaluates with `clip-eval` on the
held-out splits. What differs between two rows of a seed's model is the stream and nothing else.
Arms:
- `openclip`: open_clip_train's own pipeline (`open_clip_train.data.get_wds_dataset`: shards
  shuffled per pass and dealt to its 2 workers, a 5000-sample buffer, its preprocess and
  tokenizer), run in the bench venv by this file (`--record-openclip`, internal);
- `ours`: our loader as `clip-train train` opens it (epoch mode, each worker a fixed half of the
  shards, a --shuffle-buffer buffer, the trainer's crop);
- `full`: ours with one worker and a buffer as large as the set (a full shuffle every pass).
`--models ours openclip` also trains open_clip's own `CLIP` of the same sizes (its ViT with
`ln_pre`, its init, open_clip_train's decay groups) on each stream, its weights drawn with the
seed, so the model can be swapped with the stream held still too; `ours` is the default (with
`ln_pre`: open_clip's ViT on the timm trunk, our decay groups), `ours+no_ln_pre` ours with
`model.image.pre_norm=false` (the default before 2026-11-27, which the tables in
docs/benchmarks.md up to then call `ours`).
A stream is --epochs passes of the batches open_clip_train's epoch mode gives (with 2 workers),
kept as uint8 pixels (open_clip's normalised floats mapped back exactly) and tokens in --work,
about 0.4 GB per arm at the default sizes, deleted after its run unless --keep; `--reuse` trains
more models on kept streams and leaves them in place (open_clip_train's stream is not repeatable:
its sample shuffle is not seeded);
`--rebatch` deals a recording's samples into batches at random within each pass, so a stream's
samples (pixels, crops) can be told from its order.

Hyper-parameters are bench/time_to_quality.py's (batch 128, lr 1e-3, warmup 100, cosine, weight
decay 0.1, AdamW 0.9/0.999/1e-8). Prints one JSON line per run (final loss, the loss curve per
--window steps, clip-eval's metrics in percent) and a summary: per arm (`model:arm` with several
models) the means over seeds and the mean paired difference from the first with a t interval.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

ARMS = ("openclip", "ours", "full")
MODELS = ("ours", "ours+no_ln_pre", "openclip")
BATCH, WORKERS = 128, 2
METRICS = [
    "final_loss",
    "acc1",
    "text_retrieval_recall@1",
    "text_retrieval_recall@10",
    "image_retrieval_recall@1",
    "image_retrieval_recall@10",
]


def log(msg: str) -> None:
    print(f"[stream_swap] {msg}", file=sys.stderr, flush=True)


def bench_config(data: Path):
    """`configs/bench_tiny.yaml` with time_to_quality's hyper-parameters."""
    from clip_train.config import load_config

    return load_config(
        ROOT / "configs" / "bench_tiny.yaml",
        [
            f"data.train={data / 'train'}",
            "optim.lr=1e-3",
            "optim.weight_decay=0.1",
            "optim.warmup_steps=100",
            "optim.beta1=0.9",
            "optim.beta2=0.999",
            "optim.eps=1e-8",
        ],
    )


def tokenizer_for(cfg):
    import open_clip

    return open_clip.get_tokenizer("ViT-B-32", context_length=cfg.model.text.context_length)


def record_openclip(cfg, seed: int, batches: int, epochs: int, out: Path) -> None:
    """open_clip_train's training stream (call in the bench venv: webdataset 0.2.86). Its sample
    buffer draws from a clock-seeded RNG, so this stream is not repeatable."""
    import numpy as np
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip_train.data import get_wds_dataset

    random.seed(seed)  # as open_clip_train's main seeds everything before building the data
    np.random.seed(seed)
    torch.manual_seed(seed)
    args = argparse.Namespace(
        train_data="::".join(map(str, sorted(Path(cfg.data.train).glob("*.tar")))),
        val_data=None,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        train_num_samples=batches * BATCH,
        seed=seed,
        batch_size=BATCH,
        world_size=1,
        workers=WORKERS,
    )
    preprocess = open_clip.image_transform(
        cfg.model.image.img_size, is_train=True, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD
    )
    data = get_wds_dataset(args, preprocess, True, epoch=0, tokenizer=tokenizer_for(cfg))
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1)
    images, tokens = [], []
    for epoch in range(epochs):
        data.set_epoch(epoch)  # what its train_one_epoch calls before each pass
        for x, t in data.dataloader:
            pixels = (x * std + mean) * 255  # ToTensor's k/255, normalised: k comes back exactly
            rounded = pixels.round()
            if (pixels - rounded).abs().max() > 0.01:
                raise SystemExit("open_clip's images are not 8-bit pixels normalised")
            images.append(rounded.clamp(0, 255).to(torch.uint8))
            tokens.append(t)
    torch.save({"images": torch.stack(images), "tokens": torch.stack(tokens)}, out)


def record_ours(
    cfg, seed: int, batches: int, epochs: int, workers: int, buffer: int, out: Path
) -> None:
    """Our loader's stream, opened per pass as clip_train.train opens it."""
    from data_tools.loader import make_loader
    from data_tools.transforms import image_transform

    tokenizer = tokenizer_for(cfg)
    transform = image_transform(cfg.model.image.img_size, train=True)
    images, tokens = [], []
    for epoch in range(epochs):
        loader = make_loader(
            cfg.data.train,
            batch_size=BATCH,
            image_transform=transform,
            tokenizer=tokenizer,
            num_workers=workers,
            shuffle_buffer=buffer,
            seed=seed,
            epoch=epoch,
            drop_last=True,
            max_batches=batches,
            uint8_images=True,
        )
        for b in loader:
            images.append(b["image"].clone())
            tokens.append(b["text"].clone())
    torch.save({"images": torch.stack(images), "tokens": torch.stack(tokens)}, out)


def rebatch(stream: dict, per_pass: int, seed: int) -> dict:
    """The recording's samples (pixels, crops, captions) dealt into batches at random within each
    pass: the stream's order and batch composition drawn afresh, its samples kept."""
    steps, batch = stream["tokens"].shape[:2]
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [p * per_pass * batch + torch.randperm(per_pass * batch, generator=gen)
         for p in range(steps // per_pass)]
    )  # fmt: skip
    return {
        key: stream[key].flatten(0, 1)[order].reshape(stream[key].shape)
        for key in ("images", "tokens")
    }


def build(cfg, name: str) -> torch.nn.Module:
    """`ours` (configs/bench_tiny.yaml), `ours+no_ln_pre` or open_clip's own `CLIP` of the same
    sizes."""
    if name.startswith("ours"):
        import dataclasses

        from clip_train.model import build_model

        pre_norm = False if name == "ours+no_ln_pre" else cfg.model.image.pre_norm
        image = dataclasses.replace(cfg.model.image, pre_norm=pre_norm)
        return build_model(dataclasses.replace(cfg.model, image=image))
    import open_clip
    from train_step import openclip_sizes

    return open_clip.CLIP(**openclip_sizes(cfg), output_dict=True)


def save_open_clip(model: torch.nn.Module, name: str, cfg, out: Path) -> Path:
    """An open_clip folder (`local-dir:`) of the trained model: our export, or open_clip's own
    weights and config as bench/time_to_quality.py writes them."""
    import time_to_quality as tq

    from clip_train.export import export_model

    if name.startswith("ours"):
        export_model(model, out)
        return out / "open_clip"
    return tq.save_open_clip_dir(model.state_dict(), cfg, out / "open_clip")


def train_on(
    cfg, name: str, stream: dict, seed: int, data: Path, out: Path, device: str, window: int
) -> dict:
    """Model `name` from the seed's initial weights, clip-train's step over every batch of
    `stream` (a recording as loaded: images, tokens), saved for open_clip and evaluated by
    clip-eval (metrics in percent)."""
    import dataclasses

    import time_to_quality as tq
    from train_step import LOSS_UNTILED

    from clip_train.losses import build_loss
    from clip_train.optim import build_optimizer, build_scheduler
    from clip_train.step import forward_backward
    from data_tools.transforms import ImageTransform

    images, tokens = stream["images"], stream["tokens"]
    steps = images.shape[0]
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build(cfg, name).to(dev).train()
    # open_clip's parameter names under open_clip_train's decay rule (as its main builds them)
    optim_cfg = cfg.optim
    if name == "openclip":
        optim_cfg = dataclasses.replace(cfg.optim, decay_rule="open_clip")
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_scheduler(optimizer, optim_cfg, steps)
    max_scale = math.log(cfg.model.max_logit_scale)
    loss_fn = build_loss("clip", **LOSS_UNTILED)
    normalize = ImageTransform(cfg.model.image.img_size).normalize
    losses, start = [], time.perf_counter()
    for i in range(steps):  # the sequence clip_train.train runs per step
        out_ = forward_backward(
            model,
            loss_fn,
            images[i].to(dev),
            tokens[i].to(dev),
            accum_steps=1,
            prepare=normalize,
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, max_scale)
        losses.append(out_["loss"].item())
    train_s = time.perf_counter() - start
    local = save_open_clip(model.cpu().eval(), name, cfg, out)
    result = {
        "steps": steps,
        "train_s": round(train_s, 1),
        "final_loss": round(statistics.fmean(losses[-20:]), 4),
        "loss_curve": tq.curve(losses, window),
    }
    return {**result, **tq.evaluate(["--model", f"local-dir:{local}"], data, out, device)}


def paired(diffs: list[float]) -> dict:
    """Mean of paired differences with a 95% t interval (scipy)."""
    from scipy.stats import t

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"diff": round(mean, 3), "ci95": None}
    half = t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"diff": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)]}


def kind_of(model: str, arm: str, models: list[str]) -> str:
    """A run's name in the summary: the arm, or `model:arm` when several models are trained."""
    return arm if len(models) == 1 else f"{model}:{arm}"


def summarize(runs: list[dict], kinds: list[str]) -> dict:
    """Per run kind (`arm`, or `model:arm` with several models): means over the seeds every kind
    ran, and each kind's paired difference from the first."""
    by = {(r["kind"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs if all((k, r["seed"]) in by for k in kinds)})
    out: dict = {"summary": "stream_swap", "seeds": seeds}
    for kind in kinds:
        out[kind] = {k: round(statistics.fmean(by[kind, s][k] for s in seeds), 3) for k in METRICS}
        if kind != kinds[0]:
            out[f"{kind}_minus_{kinds[0]}"] = {
                k: paired([by[kind, s][k] - by[kinds[0], s][k] for s in seeds]) for k in METRICS
            }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="train/, zeroshot/, retrieval/ (clip-data synth)")
    p.add_argument("--seeds", nargs="+", type=int, default=[20, 21, 22])
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--models", nargs="+", choices=MODELS, default=["ours"])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="the `ours` arm's buffer")
    p.add_argument("--work", default="/tmp/clip-train-stream-swap")
    p.add_argument("--device", default="cpu")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--keep", action="store_true", help="keep the recorded streams")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="train on the streams a --keep run left in --work (same --data and --epochs) "
        "instead of recording them again: open_clip_train's stream is not repeatable",
    )
    p.add_argument(
        "--rebatch",
        action="store_true",
        help="deal each recording's samples into batches at random within each pass before "
        "training (its pixels, crops and captions kept; arms shown as ARM-rebatched)",
    )
    p.add_argument("--openclip-python", help="python of the OpenCLIP venv (bench/openclip_env.sh)")
    p.add_argument("--record-openclip", metavar="FILE", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    import time_to_quality as tq

    data = Path(a.data).resolve()
    counts = tq.shard_counts(data / "train")
    batches = tq.openclip_steps_per_epoch(counts, BATCH, WORKERS)
    if batches == 0:
        raise SystemExit(f"{data / 'train'}: too few samples for batch {BATCH} x {WORKERS}")
    cfg = bench_config(data)
    if a.record_openclip:  # the child process, in the bench venv
        record_openclip(cfg, a.seeds[0], batches, a.epochs, Path(a.record_openclip))
        return

    python = a.openclip_python
    if "openclip" in a.arms and not python:
        python = subprocess.run(
            ["bash", str(ROOT / "bench" / "openclip_env.sh")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.splitlines()[-1]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(
        json.dumps(
            {
                "bench": "stream_swap",
                "data": str(data),
                "steps": batches * a.epochs,
                "arms": a.arms,
                "device": a.device,
                "date": time.strftime("%Y-%m-%d"),
            }
        ),
        flush=True,
    )
    runs = []
    shown = {arm: f"{arm}-rebatched" if a.rebatch else arm for arm in a.arms}
    for seed in a.seeds:
        for arm in a.arms:
            stream = work / f"stream-{arm}-s{seed}.pt"
            reused = a.reuse and stream.is_file()
            if reused:
                log(f"seed {seed}: reusing the recorded {arm} stream {stream}")
            elif arm == "openclip":
                log(f"seed {seed}: recording the {arm} stream")
                subprocess.run(
                    [python, __file__, "--data", str(data), "--seeds", str(seed),
                     "--epochs", str(a.epochs), "--record-openclip", str(stream)],
                    check=True,
                )  # fmt: skip
            else:
                log(f"seed {seed}: recording the {arm} stream")
                workers, buffer = (WORKERS, a.shuffle_buffer) if arm == "ours" else (1, sum(counts))
                record_ours(cfg, seed, batches, a.epochs, workers, buffer, stream)
            recorded = torch.load(stream)  # once for every model trained on it
            if a.rebatch:
                recorded = rebatch(recorded, batches, seed)
            for name in a.models:
                log(f"seed {seed}: training {name} on the {shown[arm]} stream")
                model_dir = work / f"model-{name}-{shown[arm]}-s{seed}"
                result = train_on(cfg, name, recorded, seed, data, model_dir, a.device, a.window)
                kind = kind_of(name, shown[arm], a.models)
                run = {"kind": kind, "model": name, "arm": shown[arm], "seed": seed, **result}
                runs.append(run)
                print(json.dumps(run), flush=True)
            if not (a.keep or reused):  # a reused recording is a --keep run's, not this run's
                stream.unlink()
    kinds = [kind_of(m, shown[arm], a.models) for arm in a.arms for m in a.models]
    print(json.dumps(summarize(runs, kinds)), flush=True)


if __name__ == "__main__":
    main()
