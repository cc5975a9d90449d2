"""Training step: ours vs OpenCLIP of the same sizes, like for like, same captions, same run.

    bash bench/openclip_env.sh                    # once: the OpenCLIP venv (memory workers)
    python bench/train_step.py                    # bench_tiny on CPU: all four parts
    python bench/train_step.py --quick            # sanity run of every code path (small sizes)
    python bench/train_step.py --only speed --steps 20 --profile
    python bench/train_step.py --only speed --captions ../shared/data/icons/train   # real captions
    python bench/train_step.py --only largest --tiled true --largest-sides ours
    python bench/train_step.py --device cuda --preset vit_b16 --precision bf16 --batch 256

What is compared (docs/benchmarks.md, "Training step"):
- ours: `configs/bench_tiny.yaml` (or the ViT-B/16 preset) -> `build_model`, `build_optimizer`
  (AdamW fused=True, as clip_train.train), `build_loss("clip", tiled=False)` (--tiled: the tiled
  loss); one step = `forward_backward(..., accum_steps=k)` (GradCache over micro-batches when
  k > 1) + `optimizer.step()` + `zero_grad(set_to_none=True)` + `clamp_logit_scale()`.
- OpenCLIP: `open_clip.CLIP` (its native ViT and text transformer) with the same sizes, read from
  our config, `open_clip.ClipLoss()`, `torch.optim.AdamW` with open_clip_train's parameter groups
  and our hyper-parameters; one step = one call of open_clip_train's own
  `open_clip_train.train.train_one_epoch` over an epoch of one step's micro-batches, with
  `accum_freq` = batch / micro-batch (its feature-cache accumulation: a no-grad pass over all
  micro-batches, then for each one a forward pass and the loss over the whole contrastive batch).
- Optimiser: both sides are run with both torch AdamW implementations, the default one (the
  single-tensor loop on the CPU) and fused=True; every figure names which. open_clip_train has
  no flag for fused: it is one keyword in its main.py, which OpenCLIP users can also set.
- Data: random image tensors (pixels do not change the cost) and real captions: `data_tools.synth`
  attributes drawn at random, `make_caption` over all `CAPTION_TEMPLATES`, tokenized by open_clip's
  BPE tokenizer to the model's context (32 for bench_tiny), or with --captions DIR the captions
  of a shard set (what trimming saves depends on their length). Both sides get the same tensors.

Four measurements:
1. speed: in this process, steps alternated A B C D ... (ours fused, ours default AdamW, OpenCLIP
   default, OpenCLIP fused, and ours without text trimming unless --no-ablation), batch --batch
   (64) in one batch, warmup steps dropped, medians -> samples/s. Each ratio names its pair
   (SPEED_PAIRS): the headline is the like-for-like one, fused on both sides. Also reported: the
   pairwise ratio (each OpenCLIP step over the ours step next to it), the fastest steps' ratio and
   process CPU seconds per step. (open_clip_train.train imports no webdataset, so it runs in our
   venv here.)
2. speed_accum: the same four at --mem-batch (512) in micro-batches of --micro (64): ours
   GradCache vs OpenCLIP accum_freq 8, alternated, --accum-steps timed.
3. memory at --mem-batch (512): each run in a FRESH subprocess (peaks do not mix), OpenCLIP's in
   the venv of bench/openclip_env.sh as bench/loader.py runs its side: a warm-up step and a
   measured step at that batch; peak RSS of the worker at the end, absolute (nothing
   subtracted), plus the RSS after building model + optimizer. The peak is read as VmHWM from
   /proc/self/status: `ru_maxrss` is the same figure for a process started from a shell, but
   Linux carries the parent's high-water mark over fork + exec into it. The headline pair: both
   sides accumulate micro-batches of --micro (the contrastive batch stays 512), both fused; also
   OpenCLIP with its default AdamW and both sides in one batch (MEMORY_RUNS). On CUDA the figure
   is `torch.cuda.max_memory_allocated` (RSS is reported too).
4. largest contrastive batch under --budget-gib (8), both sides accumulating micro-batches of
   --micro, both fused, both keeping the full B x B logits (ours untiled unless --tiled):
   peak = a + b*B + c*B^2 per side, c from that side's loss alone at --loss-batches (OpenCLIP's
   ClipLoss builds logits_per_image and logits_per_text, two B x B products), a and b from full
   steps at --mem-batch and twice that (warm-up step at 64 first, so the optimiser state exists);
   then verification runs in fresh processes: at the prediction, --above (3%) above it if that
   fitted (5% below until one fits if not), halving the bracket while a fitting step takes under
   --larger-max-s. A run stops as soon as its peak passes the budget, so failing runs are cheap;
   a fitting OpenCLIP run near its largest batch is not (each of its B/64 micro-steps computes
   the B x B loss: most of an hour on 2 CPU cores). --openclip-micro-steps K stops OpenCLIP's
   verification steps after K micro-steps: each makes the same allocations (the micro-batch's
   forward, all cached features concatenated, the B x B loss, backward), so from K = 2 (the
   gradients then exist) the peak is the whole step's but the AdamW update; the record names K.
   --max-batch caps the runs (the cap is then a verified lower bound).

JSON lines on stdout, one per figure, each with both numbers, the ratio and what it means, the
machine, its load and the command; progress on stderr. Timings on a shared machine move with its
load: the alternation keeps the ratios fair, absolute samples/s are only as good as the machine
was quiet. On a CPU that other jobs also use, 2 OpenMP threads spin-wait for a descheduled
partner: steps then take 3-10x longer and CPU time rises with wall time, which shows in the
CPU-seconds field. The --device cuda path (synchronize around timings, max_memory_allocated, bf16
autocast, the vit_b16 preset) ran on an H200 for the speed part before the like-for-like pairs
(docs/benchmarks.md); memory and largest batch have not been run on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

GIB = 2**30
# Our config overrides per preset; OpenCLIP's sizes are read back from the resulting config.
PRESETS: dict[str, list[str]] = {
    "bench_tiny": [],
    "vit_b16": [
        "model.embed_dim=512",
        "model.image.timm_name=vit_base_patch16_224",
        "model.image.img_size=224",
        "model.image.patch_size=16",
        "model.image.width=768",
        "model.image.depth=12",
        "model.image.heads=12",
        "model.text.context_length=77",
        "model.text.width=512",
        "model.text.heads=8",
        "model.text.layers=12",
    ],
}
WARMUP_BATCH = 64  # fit/verify runs: one small step first, so the optimiser state exists
# The figures in docs/benchmarks.md before issue 11 are of the full logits; --tiled picks the loss.
LOSS_UNTILED = {"tiled": False}


def loss_kwargs(args) -> dict:
    """build_loss keywords for our side from --tiled/--tile-size (untiled when absent)."""
    tiled = getattr(args, "tiled", "false")
    if tiled == "false":
        return dict(LOSS_UNTILED)
    return {
        "tiled": True if tiled == "true" else tiled,
        "tile_size": getattr(args, "tile_size", 1024),
    }


# -- models, steps and data ------------------------------------------------------------------------
def our_config(preset: str, extra: list[str] = ()):
    from clip_train.config import load_config

    return load_config(
        ROOT / "configs" / "bench_tiny.yaml", ["data.train=unused", *PRESETS[preset], *extra]
    )


def _autocast(
    device: torch.device, precision: str
) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Contestant:
    """A model, its optimiser and one training step over (images, tokens)."""

    name: str
    model: torch.nn.Module
    step: Callable[[torch.Tensor, torch.Tensor], None]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class Ours(Contestant):
    def __init__(
        self,
        preset: str,
        device: torch.device,
        precision: str,
        micro: int | None = None,
        trim_padding: bool = True,
        loss: dict | None = None,
        fused: bool = True,
        uint8_images: bool = False,
    ):
        from clip_train.losses import build_loss
        from clip_train.model import build_model
        from clip_train.optim import build_optimizer, param_groups
        from data_tools.transforms import ImageTransform

        self.name = ("ours" if trim_padding else "ours_no_trim") + ("" if fused else "_unfused")
        self.cfg = our_config(preset, [] if trim_padding else ["model.text.trim_padding=false"])
        self.model = build_model(self.cfg.model).to(device).train()
        if fused:  # what clip_train.train runs
            self.optimizer = build_optimizer(self.model, self.cfg.optim)
        else:  # the same groups and hyper-parameters, torch's default AdamW implementation
            o = self.cfg.optim
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, o.weight_decay, o.decay_rule),
                lr=o.lr,
                betas=(o.beta1, o.beta2),
                eps=o.eps,
            )
        self.loss = build_loss("clip", **(loss or LOSS_UNTILED))
        self.micro = micro
        self.autocast = _autocast(device, precision)
        # uint8 batches, normalised per micro-batch, as clip_train.train runs with its default
        # data.uint8_images
        self.prepare = (
            ImageTransform(self.cfg.model.image.img_size).normalize if uint8_images else None
        )

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        from clip_train.step import forward_backward

        forward_backward(
            self.model,
            self.loss,
            images,
            tokens,
            accum_steps=accum_steps(images.shape[0], self.micro),
            autocast=self.autocast,
            prepare=self.prepare,
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()


def accum_steps(batch: int, micro: int | None) -> int:
    """Micro-batches per step: one unless --micro splits the batch (both sides alike)."""
    if not micro or micro >= batch:
        return 1
    if batch % micro:
        raise ValueError(f"batch {batch} is not a multiple of the micro-batch {micro}")
    return batch // micro


def openclip_sizes(cfg) -> dict:
    """open_clip.CLIP keyword arguments with the sizes of our model config."""
    image, text = cfg.model.image, cfg.model.text
    return {
        "embed_dim": cfg.model.embed_dim,
        "vision_cfg": {
            "image_size": image.img_size,
            "patch_size": image.patch_size,
            "width": image.width,
            "layers": image.depth,
            "head_width": image.width // image.heads,
            "mlp_ratio": image.mlp_ratio,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }


def openclip_param_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """open_clip_train's groups (`optim.decay_rule=open_clip`): embeddings are decayed too."""
    from clip_train.optim import param_groups

    return param_groups(model, weight_decay, "open_clip")


class _Epoch:
    """The `data["train"]` that open_clip_train's `train_one_epoch` reads: one optimiser step's
    micro-batches, as its DataInfo would hand them out (set_epoch, a dataloader with
    num_batches and num_samples)."""

    class Loader(list):
        num_batches: int
        num_samples: int

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.dataloader = self.Loader(batches)
        self.dataloader.num_batches = len(batches)
        self.dataloader.num_samples = sum(b[0].shape[0] for b in batches)

    def set_epoch(self, epoch: int) -> None:
        pass


class OpenClip(Contestant):
    """open_clip.CLIP stepped by open_clip_train's own training loop: each step is one call of
    `open_clip_train.train.train_one_epoch` over an epoch of one optimiser step, with
    `accum_freq` = batch / micro-batch (its feature-cache accumulation) when --micro splits it."""

    def __init__(
        self,
        preset: str,
        device: torch.device,
        precision: str,
        micro: int | None = None,
        fused: bool = False,
    ):
        import open_clip

        self.name = "openclip" + ("_fused" if fused else "")
        cfg = our_config(preset)
        self.model = open_clip.CLIP(**openclip_sizes(cfg), output_dict=True).to(device).train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(  # open_clip_train's call, plus fused=True if asked
            openclip_param_groups(self.model, o.weight_decay),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
            **({"fused": True} if fused else {}),
        )
        self.loss = open_clip.ClipLoss()
        self.micro = micro
        self.max_micro_steps: int | None = None  # measurement runs: stop after this many
        self.micro_steps_run = 0
        self.device = device
        self.precision = {"fp32": "fp32", "bf16": "amp_bf16"}[precision]
        if cfg.model.max_logit_scale != 100:
            raise ValueError("open_clip_train clamps the logit scale at ln(100)")

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        from open_clip_train.train import train_one_epoch

        accum = accum_steps(images.shape[0], self.micro)
        micro = images.shape[0] // accum
        args = argparse.Namespace(  # the fields train_one_epoch reads (open_clip_train.params)
            device=str(self.device),
            precision=self.precision,
            accum_freq=accum,
            batch_size=micro,
            world_size=1,
            rank=0,
            distill=False,
            skip_scheduler=True,  # ours is not stepping a schedule either
            horovod=False,
            grad_clip_norm=None,
            log_every_n_steps=10**9,
            wandb=False,
        )
        data = {"train": _Epoch(list(zip(images.split(micro), tokens.split(micro))))}
        loss = (
            self.loss
            if self.max_micro_steps is None
            else _StopAfter(self.loss, self.max_micro_steps)
        )
        try:
            train_one_epoch(self.model, data, loss, 0, self.optimizer, None, None, None, args)
        except _StopAfter.Reached:
            self.micro_steps_run = self.max_micro_steps
        else:
            self.micro_steps_run = accum


class _StopAfter:
    """open_clip_train's loss, stopping its accumulation loop at the (k+1)-th call: k micro-steps
    (forward, the B x B loss over all cached features, backward) have then run. Each of its
    micro-steps makes the same allocations, so the peak of the first few is the step's; near its
    largest batch a whole step (B / micro of them, each over B x B) is an hour on 2 CPU cores."""

    class Reached(Exception):
        pass

    def __init__(self, loss, k: int):
        self.loss, self.k, self.calls = loss, k, 0

    def __call__(self, *args, **kwargs):
        if self.calls == self.k:
            raise self.Reached
        self.calls += 1
        return self.loss(*args, **kwargs)


def captions(n: int, seed: int) -> list[str]:
    """`n` synthetic-set captions: random attributes through `make_caption`, any template."""
    from data_tools import synth

    rng = random.Random(f"bench-train-step:{seed}")
    out = []
    for _ in range(n):
        attrs = {
            "kind": rng.choice(synth.KINDS),
            "colour": rng.choice(sorted(synth.COLOURS)),
            "size": rng.choice(synth.SIZES),
            "position": rng.choice(synth.POSITIONS),
            "count": rng.choice(synth.COUNTS),
            "background": rng.choice(sorted(synth.BACKGROUNDS)),
        }
        out.append(synth.make_caption(attrs, rng.randrange(len(synth.CAPTION_TEMPLATES))))
    return out


def shard_captions(path: str) -> list[str]:
    """Every caption (.txt) of the tar shards under `path`, in shard and member order."""
    import tarfile

    out = []
    for shard in sorted(Path(path).glob("*.tar")):
        with tarfile.open(shard) as tar:
            out += [
                tar.extractfile(m).read().decode()
                for m in tar
                if m.isfile() and m.name.endswith(".txt")
            ]
    if not out:
        sys.exit(f"--captions {path}: no .txt in its *.tar shards; give a shard folder")
    return out


def make_batch(
    cfg,
    batch: int,
    seed: int,
    device: torch.device,
    real: list[str] | None = None,
    uint8: bool = False,
):
    """Random images (float32, or uint8 pixels with `uint8`) and `batch` captions: synthetic
    ones, or drawn from `real` (--captions)."""
    from open_clip.tokenizer import SimpleTokenizer

    size = cfg.model.image.img_size
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, 3, size, size)
    if uint8:
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        images = torch.randn(*shape, generator=gen)
    texts = (
        random.Random(f"bench-train-step:{seed}").sample(real, batch)
        if real
        else captions(batch, seed)
    )
    tokens = SimpleTokenizer(context_length=cfg.model.text.context_length)(texts)
    return images.to(device), tokens.to(device)


def longest(tokens: torch.Tensor) -> int:
    return int(tokens.argmax(dim=-1).max()) + 1  # EOT has the largest id


# -- machine and output ----------------------------------------------------------------------------
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import open_clip
    import timm

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def load_now() -> dict:
    """Load of the machine when a figure is printed: other jobs slow every timing down."""
    out = {}
    try:
        out["loadavg_1m"] = round(os.getloadavg()[0], 2)
        with open("/proc/pressure/cpu") as f:  # share of time some task waited for a CPU
            out["cpu_pressure_avg60"] = float(f.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def emit(record: dict, common: dict) -> None:
    print(json.dumps({"bench": "train_step", **record, **common, "load": load_now()}), flush=True)


def log(msg: str) -> None:
    print(f"[train_step] {msg}", file=sys.stderr, flush=True)


# -- 1. speed --------------------------------------------------------------------------------------
# (ours, OpenCLIP, what differs between them): every speed ratio names its two contestants.
SPEED_PAIRS = (
    (
        "ours",
        "openclip_fused",
        "like for like: torch AdamW(fused=True) on both sides; differs: the model code (timm ViT "
        "vs open_clip's, text tower trimmed to the longest caption) and the loop",
    ),
    (
        "ours_unfused",
        "openclip",
        "like for like: torch's default AdamW (single-tensor on the CPU) on both sides; differs: "
        "the model code and the loop",
    ),
    (
        "ours",
        "openclip",
        "as shipped: ours fused AdamW (clip_train.optim), OpenCLIP its default AdamW; fused=True "
        "is a torch flag OpenCLIP users can also set (one keyword in open_clip_train/main.py, "
        "no CLI flag)",
    ),
    (
        "ours_no_trim",
        "openclip_fused",
        "ablation: ours without text trimming (model.text.trim_padding=false); fused AdamW on "
        "both sides",
    ),
)


def _race(contestants: list[Contestant], pool, device, warmup: int, steps: int, tag: str):
    """Steps alternated A B C ... A B C ...: load drifts hit every side alike. Returns per name
    the timed steps' wall and process-CPU seconds."""
    times: dict[str, list[float]] = {c.name: [] for c in contestants}
    cpu: dict[str, list[float]] = {c.name: [] for c in contestants}
    total = warmup + steps
    for i in range(total):
        images, tokens = pool[i % len(pool)]
        for c in contestants:
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            c.step(images, tokens)
            _sync(device)
            if i >= warmup:
                times[c.name].append(time.perf_counter() - start)
                cpu[c.name].append(time.process_time() - start_cpu)
        log(
            f"{tag} step {i + 1}/{total}: "
            + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t)
        )
    return times, cpu


def _pairs(times: dict, cpu: dict, batch: int) -> list[dict]:
    out = []
    for ours, oc, differs in SPEED_PAIRS:
        if ours not in times or oc not in times:
            continue
        med = statistics.median
        out.append(
            {
                "ours": ours,
                "openclip": oc,
                "differs": differs,
                "ours_samples_per_s": round(batch / med(times[ours]), 1),
                "openclip_samples_per_s": round(batch / med(times[oc]), 1),
                "ratio": round(med(times[oc]) / med(times[ours]), 3),
                # each OpenCLIP step over the ours step run next to it
                "pairwise_ratio_median": round(
                    med([o / p for o, p in zip(times[oc], times[ours])]), 3
                ),
                # on a loaded machine the fastest step is the least disturbed one
                "best_ratio": round(min(times[oc]) / min(times[ours]), 3),
                # CPU seconds of the process (all threads) per step; OpenMP threads spinning for
                # a descheduled partner inflate it too on a busy machine
                "cpu_time_ratio": round(med(cpu[oc]) / med(cpu[ours]), 3),
            }
        )
    return out


def tag_of(accum: bool) -> str:
    return "speed_accum" if accum else "speed"


def bench_speed(args, device: torch.device, common: dict, accum: bool = False) -> None:
    """Both optimisers on both sides, alternated in this process. accum: the contrastive batch
    --mem-batch in micro-batches of --micro (ours GradCache, OpenCLIP accum_freq); else one
    batch of --batch."""
    torch.manual_seed(0)
    loss = loss_kwargs(args)
    batch, micro = (args.mem_batch, args.micro) if accum else (args.batch, None)
    warmup, steps = (args.accum_warmup, args.accum_steps) if accum else (args.warmup, args.steps)
    contestants: list[Contestant] = [
        Ours(args.preset, device, args.precision, micro=micro, loss=loss),
        Ours(args.preset, device, args.precision, micro=micro, loss=loss, fused=False),
        OpenClip(args.preset, device, args.precision, micro=micro),
        OpenClip(args.preset, device, args.precision, micro=micro, fused=True),
    ]
    if not args.no_ablation and not accum:
        contestants.append(Ours(args.preset, device, args.precision, trim_padding=False, loss=loss))
    cfg = contestants[0].cfg
    real = shard_captions(args.captions) if args.captions else None
    pool = [make_batch(cfg, batch, seed, device, real) for seed in range(args.pool)]
    tag = tag_of(accum)
    times, cpu = _race(contestants, pool, device, warmup, steps, tag)
    med = statistics.median
    pairs = _pairs(times, cpu, batch)
    record = {
        "metric": "samples_per_s" + ("_accum" if accum else ""),
        "batch": batch,
        "micro_batch": micro,
        "warmup_steps": warmup,
        "timed_steps": steps,
        # the headline: the same optimiser implementation on both sides (fused)
        "ours": pairs[0]["ours_samples_per_s"],
        "openclip": pairs[0]["openclip_samples_per_s"],
        "ratio": pairs[0]["ratio"],
        "ratio_meaning": "ours / OpenCLIP-fused samples/s (median step time), the same AdamW "
        "on both sides; >1 = ours faster",
        "pairs": pairs,
        "samples_per_s": {n: round(batch / med(t), 1) for n, t in times.items()},
        "best_samples_per_s": {n: round(batch / min(t), 1) for n, t in times.items()},
        "cpu_s_per_step": {n: round(med(t), 3) for n, t in cpu.items()},
        "step_s": {n: [round(x, 3) for x in t] for n, t in times.items()},
        "mean_longest_caption_tokens": statistics.mean(
            longest(chunk) for _, t in pool for chunk in t.split(micro or batch)
        ),
        "context_length": cfg.model.text.context_length,
        "captions": args.captions or "synthetic (data_tools.synth)",
        "params_ours": contestants[0].num_params(),
        "params_openclip": contestants[2].num_params(),
    }
    emit(record, common)
    if args.profile and not accum:
        profile([contestants[0], contestants[3]], pool, device)


def profile(contestants: list[Contestant], pool, device: torch.device, steps: int = 3) -> None:
    """Top ops by self time for each side, on stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for c in contestants:
        with torch_profile(activities=activities) as prof:
            for i in range(steps):
                c.step(*pool[i % len(pool)])
            _sync(device)
        print(f"\n== profile: {c.name}, {steps} steps ==", file=sys.stderr)
        print(
            prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=60),
            file=sys.stderr,
        )


# -- 2/3. memory in fresh subprocesses -------------------------------------------------------------
def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> float:
    """Peak RSS of this process since its exec: VmHWM. (`ru_maxrss` is the same number for a process
    started from a small shell, but Linux carries the PARENT's high-water mark over fork + exec into
    it, so a worker started by this 2 GiB bench would never read below 2 GiB.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return _ru_maxrss()


def _ru_maxrss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _abort_above(budget: float) -> None:
    """Exit as soon as the peak passes `budget`: such a run has failed already, and a step at a
    batch near the largest takes minutes (OpenCLIP's accumulation: an hour)."""
    import threading

    def watch() -> None:
        start = time.perf_counter()
        while True:
            peak = _peak_rss()
            if peak > budget:
                out = {"peak_rss": peak, "exceeded": True, "after_s": time.perf_counter() - start}
                print(json.dumps(out), flush=True)
                os._exit(0)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def worker(spec: dict) -> dict:
    """One memory measurement; runs alone in its own process (OpenCLIP's in its venv)."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["impl"] in ("loss", "openclip_loss"):  # a loss alone on random unit features
        if spec["impl"] == "loss":
            from clip_train.losses import build_loss

            loss_fn = build_loss("clip", **spec.get("loss", LOSS_UNTILED))
        else:
            import open_clip

            oc_loss = open_clip.ClipLoss()

            def loss_fn(img, txt, scale):
                return {"loss": oc_loss(img, txt, scale)}

        dim = our_config(spec["preset"]).model.embed_dim
        build_rss = _rss_now()

        def data(batch: int, seed: int):
            gen = torch.Generator().manual_seed(seed)
            return [
                torch.nn.functional.normalize(torch.randn(batch, dim, generator=gen), dim=-1)
                .to(device)
                .requires_grad_()
                for _ in range(2)
            ]

        def run(feats) -> None:
            loss_fn(*feats, torch.tensor(1 / 0.07, device=device))["loss"].backward()
    else:
        c = (
            Ours(
                spec["preset"],
                device,
                spec["precision"],
                micro=spec.get("micro"),
                loss=spec.get("loss"),
                fused=spec.get("fused", True),
                uint8_images=spec.get("uint8_images", False),
            )
            if spec["impl"] == "ours"
            else OpenClip(
                spec["preset"],
                device,
                spec["precision"],
                micro=spec.get("micro"),
                fused=spec.get("fused", False),
            )
        )
        build_rss = _rss_now()
        cfg = our_config(spec["preset"])

        def data(batch: int, seed: int):
            return make_batch(cfg, batch, seed, device, uint8=spec.get("uint8_images", False))

        def run(batch) -> None:
            c.step(*batch)

    if spec.get("abort_above_gib") and device.type == "cpu":
        _abort_above(spec["abort_above_gib"] * GIB)
    build_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    batch = data(spec["warmup_batch"], 1)
    start = time.perf_counter()
    run(batch)
    _sync(device)
    warmup_s = time.perf_counter() - start
    del batch
    batch = data(spec["batch"], 2)
    partial = spec.get("max_micro_steps") if spec["impl"] == "openclip" else None
    if partial:
        c.max_micro_steps = partial
    start = time.perf_counter()
    run(batch)
    _sync(device)
    step_s = time.perf_counter() - start
    out = {
        "rss_after_build": build_rss,
        "peak_rss": _peak_rss(),
        "ru_maxrss": _ru_maxrss(),
        "warmup_s": warmup_s,
        "step_s": step_s,
    }
    if partial:
        out["micro_steps_run"] = c.micro_steps_run
        out["micro_steps"] = accum_steps(spec["batch"], spec["micro"])
    if device.type == "cuda":
        out.update(
            alloc_after_build=build_alloc,
            peak_alloc=torch.cuda.max_memory_allocated(device),
            peak_reserved=torch.cuda.max_memory_reserved(device),
        )
    return out


def openclip_python(args) -> str:
    """The python of the OpenCLIP venv (--openclip-python, else made by bench/openclip_env.sh)."""
    if not getattr(args, "openclip_python", None):
        env_sh = ROOT / "bench" / "openclip_env.sh"
        out = subprocess.run(["bash", str(env_sh)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"bench/openclip_env.sh failed ({out.stderr.strip()}); pass --openclip-python")
        args.openclip_python = out.stdout.strip().splitlines()[-1]
    return args.openclip_python


def measure(
    args,
    impl: str,
    batch: int,
    micro: int | None = None,
    warmup_batch: int | None = None,
    fused: bool | None = None,
    abort_above_gib: float | None = None,
    max_micro_steps: int | None = None,
    uint8_images: bool = False,
) -> dict:
    """Peak memory of a warm-up step and a step at `batch` in a fresh process: ours in this
    python, OpenCLIP's (impl openclip, openclip_loss) in the venv of bench/openclip_env.sh, as
    bench/loader.py runs its side. fused: the AdamW implementation (default: each side's own,
    ours fused, OpenCLIP's default). abort_above_gib: stop the run once its peak passes that
    (the result then has exceeded=True and no step time). max_micro_steps (OpenCLIP): stop its
    measured step after that many micro-steps (`_StopAfter`; the result names how many ran).
    uint8_images (ours): the batch as uint8 pixels, normalised per micro-batch (the trainer's
    default) instead of float32 images."""
    spec = {
        "impl": impl,
        "batch": batch,
        "micro": micro,
        "warmup_batch": warmup_batch or batch,
        "preset": args.preset,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "loss": loss_kwargs(args),
        "fused": None if impl.endswith("loss") else (impl == "ours") if fused is None else fused,
        "abort_above_gib": abort_above_gib,
        "max_micro_steps": max_micro_steps,
        "uint8_images": uint8_images,
    }
    python = openclip_python(args) if impl.startswith("openclip") else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.setdefault("exceeded", False)
    # the figure the budget is about: host RSS on CPU, allocated device memory on CUDA
    res["peak"] = res["peak_alloc"] if args.device.startswith("cuda") else res["peak_rss"]
    res.update(spec, wall_s=wall, python=python)
    if res["exceeded"]:
        log(
            f"memory {impl} batch {batch}" + (f" micro {micro}" if micro else "") + ": "
            f"peak passed {abort_above_gib} GiB after {res['after_s']:.0f}s; stopped "
            f"(wall {wall:.0f}s)"
        )
        return res
    log(
        f"memory {impl} batch {batch}"
        + (f" micro {micro}" if micro else "")
        + (" fused" if spec["fused"] and impl != "ours" else "")
        + f" warmup {spec['warmup_batch']}: "
        f"peak {res['peak'] / GIB:.3f} GiB (rss after build {res['rss_after_build'] / GIB:.3f}), "
        f"step {res['step_s']:.1f}s"
        + (
            f" ({res['micro_steps_run']} of {res['micro_steps']} micro-steps)"
            if "micro_steps_run" in res
            else ""
        )
        + f", wall {wall:.0f}s"
    )
    return res


def _point(r: dict) -> dict:
    keep = {
        "impl": r["impl"],
        "batch": r["batch"],
        "micro": r["micro"],
        "fused": r["fused"],
        "warmup_batch": r["warmup_batch"],
        "peak_gib": round(r["peak"] / GIB, 3),
    }
    if r["exceeded"]:
        return {**keep, "exceeded_budget_after_s": round(r["after_s"], 1)}
    keep.update(
        peak_rss_gib=round(r["peak_rss"] / GIB, 3),
        rss_after_build_gib=round(r["rss_after_build"] / GIB, 3),
        step_s=round(r["step_s"], 2),
        **{k: r[k] for k in ("micro_steps_run", "micro_steps") if k in r},
    )
    if "peak_reserved" in r:
        keep["peak_reserved_gib"] = round(r["peak_reserved"] / GIB, 3)
    return keep


def memory_unit(args) -> str:
    return "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"


# (name, impl, micro-batched, fused AdamW, what the row is)
MEMORY_RUNS = (
    ("ours", "ours", True, True, "GradCache: micro-batches of --micro, cached features"),
    ("openclip", "openclip", True, True, "open_clip_train accum_freq = batch / --micro"),
    ("openclip_default_adamw", "openclip", True, False, "as openclip, its default AdamW"),
    ("ours_one_batch", "ours", False, True, "one batch, no micro-batches"),
    ("openclip_one_batch", "openclip", False, True, "one batch, accum_freq 1"),
)


def bench_memory(args, common: dict) -> dict[str, dict]:
    """Peak memory at --mem-batch, each figure a fresh process, warm-up step at the same batch.
    The headline pair: both sides accumulate micro-batches of --micro (the contrastive batch and
    its B x B logits stay --mem-batch), both with AdamW(fused=True)."""
    b = args.mem_batch
    runs = {}
    for name, impl, micro, fused, _ in MEMORY_RUNS:
        if args.no_ablation and name not in ("ours", "openclip"):
            continue
        runs[name] = measure(args, impl, b, micro=args.micro if micro else None, fused=fused)
    rows = {
        name: {
            "peak_gib": round(runs[name]["peak"] / GIB, 3),
            "after_build_gib": round(runs[name]["rss_after_build"] / GIB, 3),
            "step_s": round(runs[name]["step_s"], 2),
            "what": what,
        }
        for name, *_, what in MEMORY_RUNS
        if name in runs
    }
    ours, oc = runs["ours"], runs["openclip"]
    record = {
        "metric": "peak_memory_gib",
        "batch": b,
        "micro_batch": args.micro,
        "memory": memory_unit(args),
        "ours": round(ours["peak"] / GIB, 3),
        "openclip": round(oc["peak"] / GIB, 3),
        "ratio": round(ours["peak"] / oc["peak"], 3),
        "ratio_meaning": "ours / OpenCLIP peak memory, both accumulating micro-batches of "
        f"{args.micro} into a contrastive batch of {b}, both fused AdamW; lower is better",
        "rows": rows,
        "note": "absolute peak of the process (nothing subtracted); warm-up step and measured "
        "step both at this batch; step_s: one step in that process, not a speed comparison",
    }
    if "openclip_one_batch" in runs:
        record["one_batch_ratio"] = round(
            runs["ours_one_batch"]["peak"] / runs["openclip_one_batch"]["peak"], 3
        )
    emit(record, common)
    return runs


def _lstsq(xs: list[list[float]], ys: list[float]) -> list[float]:
    sol = torch.linalg.lstsq(
        torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)[:, None]
    )
    return sol.solution[:, 0].tolist()


def _round_down(x: float, multiple: int) -> int:
    return max(multiple, int(x // multiple) * multiple)


def _verify(args, impl: str, predicted: int, points: list[dict]) -> tuple[int, int | None, bool]:
    """Run at the prediction, then --above it if that fitted or 5% below until one fits; then
    halve the bracket (fits, does not) down to ~2% while a fitting step is affordable
    (--larger-max-s). A run that passes the budget stops there, so failing runs are cheap; at
    most --max-verify runs. Returns (largest batch seen to fit, smallest seen not to, capped)."""
    budget, multiple = args.budget_gib, args.micro
    cap = args.max_batch or None
    capped = cap is not None and predicted > cap
    batch = _round_down(min(predicted, cap) if capped else predicted, multiple)
    fits, fails, affordable = 0, None, True
    for _ in range(args.max_verify):
        r = measure(
            args,
            impl,
            batch,
            micro=multiple,
            warmup_batch=min(WARMUP_BATCH, batch),
            fused=True,
            abort_above_gib=budget,
            max_micro_steps=args.openclip_micro_steps if impl == "openclip" else None,
        )
        points.append(_point(r))
        if r["exceeded"] or r["peak"] > budget * GIB:
            fails = batch if fails is None else min(fails, batch)
        else:
            fits = max(fits, batch)
            affordable = r["step_s"] <= args.larger_max_s
        if fits and fails:
            nxt = _round_down((fits + fails) / 2, multiple)
            if fails - fits <= max(multiple, fits // 50) or nxt <= fits or not affordable:
                break
        elif fits:
            nxt = _round_down(batch * (1 + args.above), multiple)
            if capped or nxt == batch or (cap is not None and nxt > cap):
                break
            if batch != _round_down(predicted, multiple) and not affordable:
                log(f"{impl}: stopping at {batch} (its step took > --larger-max-s)")
                break
        else:
            nxt = _round_down(batch * 0.95, multiple)
        batch = nxt
    return fits, fails, capped and fits == _round_down(cap, multiple)


def _fit(args, impl: str, loss_impl: str, mem_runs: dict, points: list[dict]) -> dict:
    """Peak = a + b x B + c x B^2 at micro-batches of --micro: c from the loss alone at
    --loss-batches (its B x B logits; a full step at a batch where B^2 shows takes minutes on a
    CPU), a and b from full steps at --mem-batch and twice that."""
    loss_runs = [
        measure(args, loss_impl, n, warmup_batch=min(WARMUP_BATCH, n)) for n in args.loss_batches
    ]
    points += [_point(r) for r in loss_runs]
    (n1, p1), (n2, p2) = [(r["batch"], r["peak"]) for r in loss_runs[:2]]
    c = max(0.0, (p2 - p1) / (n2**2 - n1**2))
    runs = []
    for n in (args.mem_batch, 2 * args.mem_batch):
        old = next(
            (
                r
                for r in mem_runs.values()
                if (r["impl"], r["batch"], r["micro"], r["fused"]) == (impl, n, args.micro, True)
            ),
            None,
        )
        runs.append(
            old
            or measure(
                args, impl, n, micro=args.micro, warmup_batch=min(WARMUP_BATCH, n), fused=True
            )
        )
    points += [_point(r) for r in runs]
    a, b = _lstsq(
        [[1.0, r["batch"]] for r in runs], [r["peak"] - c * r["batch"] ** 2 for r in runs]
    )
    cfg = our_config(args.preset)
    # the batch itself (fp32 images + int64 tokens), held whole by both loops, is a floor under
    # the slope: two points ~0.1 GiB apart are near the allocator's noise
    b = max(b, 3 * cfg.model.image.img_size**2 * 4 + cfg.model.text.context_length * 8)
    budget = args.budget_gib * GIB
    if c > 0:
        pred = (-b + math.sqrt(b * b + 4 * c * max(0.0, budget - a))) / (2 * c)
    else:
        pred = (budget - a) / b
    pred = _round_down(pred, args.micro)
    log(
        f"{impl} fit: {a / GIB:.3f} GiB + {b / 2**10:.1f} KiB * B + {c:.2f} B * B^2 "
        f"-> predicted {pred}"
    )
    return {
        "const_gib": round(a / GIB, 3),
        "per_sample_kib": round(b / 1024, 1),
        "per_sample_sq_bytes": round(c, 2),
        "predicted": pred,
    }


def bench_largest(args, common: dict, mem_runs: dict[str, dict]) -> None:
    """Largest contrastive batch under --budget-gib, both sides accumulating micro-batches of
    --micro with fused AdamW: a fit, then verification runs (`_verify`)."""
    sides = {"ours": "loss", "openclip": "openclip_loss"}
    record = {
        "metric": "largest_batch",
        "budget_gib": args.budget_gib,
        "memory": memory_unit(args),
        "micro_batch": args.micro,
        "ours_loss": loss_kwargs(args),
    }
    for side in args.largest_sides:
        points: list[dict] = []
        fit = _fit(args, side, sides[side], mem_runs, points)
        fits, fails, capped = _verify(args, side, fit["predicted"], points)
        record[side] = fits
        record[f"{side}_smallest_failing"] = fails
        record[f"{side}_is_lower_bound"] = capped or fails is None
        record[f"{side}_fit"] = fit
        record[f"{side}_points"] = points
    if "ours" in record and "openclip" in record:
        record["ratio"] = round(record["ours"] / record["openclip"], 2)
        record["ratio_meaning"] = (
            "ours / OpenCLIP largest contrastive batch verified to fit, both accumulating "
            f"micro-batches of {args.micro}; >1 = ours fits more"
        )
    emit(record, common)


# -- main ------------------------------------------------------------------------------------------
def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench_tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast, both sides"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--only",
        choices=("speed", "speed_accum", "memory", "largest"),
        action="append",
        help="run only these parts (repeatable; default all)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity run of every path")
    p.add_argument("--batch", type=int, help="speed: samples per step (default 64)")
    p.add_argument("--warmup", type=int, help="speed: untimed steps per side (default 3)")
    p.add_argument("--steps", type=int, help="speed: timed steps per side (default 20)")
    p.add_argument("--accum-warmup", type=int, help="speed_accum: untimed steps (default 1)")
    p.add_argument("--accum-steps", type=int, help="speed_accum: timed steps (default 4)")
    p.add_argument("--pool", type=int, default=4, help="speed: distinct batches cycled (default 4)")
    p.add_argument(
        "--captions",
        help="speed: draw the captions from the .txt of these shards (e.g. a train/ folder) "
        "instead of synthetic ones",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="speed: torch.profiler top ops of ours and OpenCLIP, both fused (stderr)",
    )
    p.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip ours_no_trim (speed) and the one-batch and default-AdamW rows (memory)",
    )
    p.add_argument(
        "--mem-batch", type=int, help="memory, speed_accum: contrastive batch (default 512)"
    )
    p.add_argument(
        "--micro", type=int, help="memory, speed_accum, largest: micro-batch (default 64)"
    )
    p.add_argument("--budget-gib", type=float, help="largest batch: memory budget (default 8)")
    p.add_argument(
        "--largest-sides",
        type=lambda t: [x for x in t.split(",") if x],
        default=["ours", "openclip"],
        help="largest batch: sides to run (default ours,openclip)",
    )
    p.add_argument(
        "--loss-batches", type=_ints, help="largest batch: loss-alone points (default 4096,8192)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="largest batch: cap on the verification runs; 0 = none (default none)",
    )
    p.add_argument(
        "--above",
        type=float,
        default=0.03,
        help="largest batch: after a fit at the prediction, verify this fraction above it "
        "(default 0.03)",
    )
    p.add_argument(
        "--larger-max-s",
        type=float,
        default=240.0,
        help="largest batch: bisect further only while a fitting step took less (default 240)",
    )
    p.add_argument(
        "--max-verify", type=int, default=4, help="largest batch: runs per side (default 4)"
    )
    p.add_argument(
        "--openclip-micro-steps",
        type=int,
        help="largest batch: stop OpenCLIP's verification steps after this many micro-steps "
        "(each repeats the same allocations; default: whole steps)",
    )
    p.add_argument(
        "--openclip-python",
        help="python of the OpenCLIP venv (default: made by bench/openclip_env.sh)",
    )
    p.add_argument(
        "--tiled",
        choices=("false", "true", "auto"),
        default="false",
        help="our loss: loss.tiled (default false: the full logits, as the recorded figures)",
    )
    p.add_argument(
        "--tile-size", type=int, default=1024, help="our loss: loss.tile_size (default 1024)"
    )
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    big = args.preset == "vit_b16"  # ViT-B/16: a GPU preset; smaller micro-batches
    defaults = {
        "batch": 32 if quick else 64,
        "warmup": 1 if quick else 3,
        "steps": 3 if quick else 20,
        "mem_batch": 128 if quick else 512,
        "micro": 32 if quick or big else 64,
        "budget_gib": 2.0 if quick else 8.0,
        "accum_warmup": 1,
        "accum_steps": 1 if quick else 4,
        "loss_batches": [1024, 2048] if quick else [4096, 8192],
        "max_batch": 512 if quick else 0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if set(args.largest_sides) - {"ours", "openclip"}:
        p.error("--largest-sides takes ours, openclip or both")
    args.only = set(args.only or ("speed", "speed_accum", "memory", "largest"))
    return args


def main(argv=None) -> None:
    args = parse(argv)
    if args._worker:
        print(json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    common = {
        "preset": args.preset,
        "device": args.device,
        "precision": args.precision,
        "machine": machine(device),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
    }
    if "speed" in args.only:
        bench_speed(args, device, common)
    if "speed_accum" in args.only:
        bench_speed(args, device, common, accum=True)
    mem_runs: dict[str, dict] = {}
    if "memory" in args.only:
        mem_runs = bench_memory(args, common)
    if "largest" in args.only:
        bench_largest(args, common, mem_runs)
    log(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
