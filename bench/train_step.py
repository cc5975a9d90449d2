"""Training step: ours vs OpenCLIP of the same sizes, same captions, same run.

    python bench/train_step.py                    # bench_tiny on CPU: speed, memory at 512,
                                                  # largest batch in 8 GiB
    python bench/train_step.py --quick            # sanity run of every code path (~3 min on 2
                                                  # quiet cores)
    python bench/train_step.py --only speed --steps 20 --profile
    python bench/train_step.py --device cuda --preset vit_b16 --precision bf16 --batch 256

What is compared (docs/benchmarks.md, "Training step"):
- ours: `configs/bench_tiny.yaml` (or the ViT-B/16 preset) -> `build_model`, `build_optimizer`,
  `build_loss("clip", tiled=False)` (--tiled: the tiled loss); one step =
  `forward_backward(..., accum_steps=k)` + `optimizer.step()` +
  `zero_grad(set_to_none=True)` + `clamp_logit_scale()`, as `clip_train.train` does it.
- OpenCLIP: `open_clip.CLIP` (its native ViT and text transformer) with the same sizes, read from
  our config, `open_clip.ClipLoss()`, `torch.optim.AdamW` with open_clip_train's parameter groups
  (no decay for 1-d, bias, ln/bn and logit_scale) and our optimiser hyper-parameters; one step =
  `model(images, texts)` + loss + backward + step + zero_grad + logit-scale clamp
  (as open_clip_train).
- Data: random image tensors (pixels do not change the cost) and real captions: `data_tools.synth`
  attributes drawn at random, `make_caption` over all `CAPTION_TEMPLATES`, tokenized by open_clip's
  BPE tokenizer to the model's context (32 for bench_tiny). Both sides get the same tensors.

Three measurements:
1. speed: both models in this process, steps alternated A B A B ... (and `ours_no_trim`, our
   model with `model.text.trim_padding=false`, as a third contestant unless --no-ablation), warmup
   steps dropped, medians of the timed steps -> samples/s. Batch --batch (64), accum_steps 1.
   Also reported: the pairwise ratio (each OpenCLIP step over the ours step next to it), the
   fastest step of each side, and process CPU seconds per step.
2. memory at --mem-batch (512): each run in a FRESH subprocess (peaks do not mix): one warmup step
   and one measured step at that batch; peak RSS of the worker at the end, absolute (nothing
   subtracted), plus the RSS after building model + optimizer. The peak is read as VmHWM from
   /proc/self/status: `ru_maxrss` is the same figure for a process started from a shell, but
   Linux carries the parent's high-water mark over fork + exec into it (workers report it too).
   Ours uses micro-batches of --micro (64) with cached features (GradCache: the contrastive batch
   stays 512). On CUDA the figure is `torch.cuda.max_memory_allocated` (RSS is reported too).
3. largest batch under --budget-gib (8): peak memory at a few batch sizes in fresh subprocesses
   (warmup step at batch 64 to create the optimiser state, then one step at B), a fit, a
   prediction and a verification run at the predicted batch (stepping down 5% if it does not fit;
   also 5% above it when a step there took under --larger-max-s). OpenCLIP: affine in B from
   --fit-batches-openclip and --mem-batch. Ours: c*B^2 for the logits of the loss, c from the loss
   alone at two large batches (--loss-batches; a full step at a batch where B^2 shows takes
   minutes on a CPU), plus a + b*B from full steps at --mem-batch and twice that for each
   micro-batch in --micros (one slope, one intercept per micro-batch); the micro-batch with the
   largest prediction is verified. Adding the two over-estimates (the loss's peak and the
   micro-batch activations' peak come at different times), so the prediction errs towards
   fitting and the verified figure is a lower bound on the true one. --max-batch caps our
   verification run (the cap is then reported as a verified lower bound).

JSON lines on stdout, one per figure, each with both numbers, the ratio and what it means, the
machine and the command; progress on stderr. Timings on a shared machine move with its load: the
alternation keeps the ratio fair, absolute samples/s are only as good as the machine was quiet.
On a CPU that other jobs also use, 2 OpenMP threads spin-wait for a descheduled partner: steps
then take 3-10x longer and CPU time rises with wall time, which shows in the CPU-seconds field.
The --device cuda path (synchronize around timings, max_memory_allocated, bf16 autocast, the
vit_b16 preset) ran on an H200 for the speed part (docs/benchmarks.md); memory and largest batch
have not been run on a GPU yet.
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
    ):
        from clip_train.losses import build_loss
        from clip_train.model import build_model
        from clip_train.optim import build_optimizer

        self.name = "ours" if trim_padding else "ours_no_trim"
        self.cfg = our_config(preset, [] if trim_padding else ["model.text.trim_padding=false"])
        self.model = build_model(self.cfg.model).to(device).train()
        self.optimizer = build_optimizer(self.model, self.cfg.optim)
        self.loss = build_loss("clip", **(loss or LOSS_UNTILED))
        self.micro = micro
        self.autocast = _autocast(device, precision)

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        from clip_train.step import forward_backward

        batch = images.shape[0]
        accum = 1 if not self.micro or self.micro >= batch else batch // self.micro
        forward_backward(
            self.model, self.loss, images, tokens, accum_steps=accum, autocast=self.autocast
        )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.clamp_logit_scale()


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


class OpenClip(Contestant):
    def __init__(self, preset: str, device: torch.device, precision: str):
        import open_clip

        self.name = "openclip"
        cfg = our_config(preset)
        self.model = open_clip.CLIP(**openclip_sizes(cfg), output_dict=True).to(device).train()
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            openclip_param_groups(self.model, o.weight_decay),
            lr=o.lr,
            betas=(o.beta1, o.beta2),
            eps=o.eps,
        )
        self.loss = open_clip.ClipLoss()
        self.max_log_scale = math.log(cfg.model.max_logit_scale)
        self.autocast = _autocast(device, precision)

    def step(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        with self.autocast():
            out = self.model(images, tokens)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_log_scale)


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


def make_batch(cfg, batch: int, seed: int, device: torch.device):
    from open_clip.tokenizer import SimpleTokenizer

    size = cfg.model.image.img_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = SimpleTokenizer(context_length=cfg.model.text.context_length)(captions(batch, seed))
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
def bench_speed(args, device: torch.device, common: dict) -> None:
    torch.manual_seed(0)
    loss = loss_kwargs(args)
    contestants = [
        Ours(args.preset, device, args.precision, loss=loss),
        OpenClip(args.preset, device, args.precision),
    ]
    if not args.no_ablation:
        contestants.append(Ours(args.preset, device, args.precision, trim_padding=False, loss=loss))
    cfg = contestants[0].cfg
    pool = [make_batch(cfg, args.batch, seed, device) for seed in range(args.pool)]
    times: dict[str, list[float]] = {c.name: [] for c in contestants}
    cpu: dict[str, list[float]] = {c.name: [] for c in contestants}
    total = args.warmup + args.steps
    for i in range(total):
        images, tokens = pool[i % len(pool)]
        for c in contestants:  # A B (C) A B (C) ...: load drifts hit every side alike
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            c.step(images, tokens)
            _sync(device)
            if i >= args.warmup:
                times[c.name].append(time.perf_counter() - start)
                cpu[c.name].append(time.process_time() - start_cpu)
        log(
            f"speed step {i + 1}/{total}: "
            + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t)
        )
    sps = {n: args.batch / statistics.median(t) for n, t in times.items()}
    pair = [o / p for o, p in zip(times["openclip"], times["ours"])]
    record = {
        "metric": "samples_per_s",
        "batch": args.batch,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "ours": round(sps["ours"], 1),
        "openclip": round(sps["openclip"], 1),
        "ratio": round(sps["ours"] / sps["openclip"], 3),
        "ratio_meaning": "ours / OpenCLIP samples/s (median step time); >1 = ours faster",
        "pairwise_ratio_median": round(statistics.median(pair), 3),
        # on a loaded machine the fastest step is the least disturbed one
        "ours_best": round(args.batch / min(times["ours"]), 1),
        "openclip_best": round(args.batch / min(times["openclip"]), 1),
        "best_ratio": round(min(times["openclip"]) / min(times["ours"]), 3),
        # CPU seconds of the process (all threads) per step; OpenMP threads spinning for a
        # descheduled partner inflate it too on a busy machine
        "ours_cpu_s_per_step": round(statistics.median(cpu["ours"]), 3),
        "openclip_cpu_s_per_step": round(statistics.median(cpu["openclip"]), 3),
        "cpu_time_ratio": round(
            statistics.median(cpu["openclip"]) / statistics.median(cpu["ours"]), 3
        ),
        "ours_step_s": [round(t, 3) for t in times["ours"]],
        "openclip_step_s": [round(t, 3) for t in times["openclip"]],
        "mean_longest_caption_tokens": statistics.mean(longest(t) for _, t in pool),
        "context_length": cfg.model.text.context_length,
        "params_ours": contestants[0].num_params(),
        "params_openclip": contestants[1].num_params(),
    }
    if "ours_no_trim" in sps:
        record["ours_no_trim"] = round(sps["ours_no_trim"], 1)
        record["ours_no_trim_ratio"] = round(sps["ours_no_trim"] / sps["openclip"], 3)
        record["ours_no_trim_best_ratio"] = round(
            min(times["openclip"]) / min(times["ours_no_trim"]), 3
        )
        record["ours_no_trim_cpu_time_ratio"] = round(
            statistics.median(cpu["openclip"]) / statistics.median(cpu["ours_no_trim"]), 3
        )
    emit(record, common)
    if args.profile:
        profile(contestants[:2], pool, device)


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


def worker(spec: dict) -> dict:
    """One memory measurement; runs alone in its own process."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    if spec["impl"] == "loss":  # our loss alone on random unit features: its B^2 term
        from clip_train.losses import build_loss

        loss_fn = build_loss("clip", **spec.get("loss", LOSS_UNTILED))
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
            )
            if spec["impl"] == "ours"
            else OpenClip(spec["preset"], device, spec["precision"])
        )
        build_rss = _rss_now()
        cfg = our_config(spec["preset"])

        def data(batch: int, seed: int):
            return make_batch(cfg, batch, seed, device)

        def run(batch) -> None:
            c.step(*batch)

    build_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    batch = data(spec["warmup_batch"], 1)
    start = time.perf_counter()
    run(batch)
    _sync(device)
    warmup_s = time.perf_counter() - start
    del batch
    batch = data(spec["batch"], 2)
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
    if device.type == "cuda":
        out.update(
            alloc_after_build=build_alloc,
            peak_alloc=torch.cuda.max_memory_allocated(device),
            peak_reserved=torch.cuda.max_memory_reserved(device),
        )
    return out


def measure(
    args, impl: str, batch: int, micro: int | None = None, warmup_batch: int | None = None
) -> dict:
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
    }
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(
            f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # the figure the budget is about: host RSS on CPU, allocated device memory on CUDA
    res["peak"] = res["peak_alloc"] if args.device.startswith("cuda") else res["peak_rss"]
    res.update(spec, wall_s=wall)
    log(
        f"memory {impl} batch {batch}"
        + (f" micro {micro}" if micro else "")
        + f" warmup {spec['warmup_batch']}: "
        f"peak {res['peak'] / GIB:.3f} GiB (rss after build {res['rss_after_build'] / GIB:.3f}), "
        f"step {res['step_s']:.1f}s, wall {wall:.0f}s"
    )
    return res


def _point(r: dict) -> dict:
    keep = {
        "impl": r["impl"],
        "batch": r["batch"],
        "micro": r["micro"],
        "warmup_batch": r["warmup_batch"],
        "peak_gib": round(r["peak"] / GIB, 3),
        "peak_rss_gib": round(r["peak_rss"] / GIB, 3),
        "rss_after_build_gib": round(r["rss_after_build"] / GIB, 3),
        "step_s": round(r["step_s"], 2),
    }
    if "peak_reserved" in r:
        keep["peak_reserved_gib"] = round(r["peak_reserved"] / GIB, 3)
    return keep


def memory_unit(args) -> str:
    return "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"


def bench_memory(args, common: dict) -> dict[str, dict]:
    b = args.mem_batch
    runs = {
        "ours": measure(args, "ours", b, micro=args.micro),
        "openclip": measure(args, "openclip", b),
    }
    if not args.no_ablation:
        runs["ours_no_microbatch"] = measure(args, "ours", b)
    ours, oc = runs["ours"], runs["openclip"]
    record = {
        "metric": "peak_memory_gib",
        "batch": b,
        "ours_micro_batch": args.micro,
        "memory": memory_unit(args),
        "ours": round(ours["peak"] / GIB, 3),
        "openclip": round(oc["peak"] / GIB, 3),
        "ratio": round(ours["peak"] / oc["peak"], 3),
        "ratio_meaning": "ours / OpenCLIP peak memory; lower is better",
        "improvement": round(oc["peak"] / ours["peak"], 2),
        "ours_after_build_gib": round(ours["rss_after_build"] / GIB, 3),
        "openclip_after_build_gib": round(oc["rss_after_build"] / GIB, 3),
        "ours_step_s": round(ours["step_s"], 2),
        "openclip_step_s": round(oc["step_s"], 2),
        "note": "absolute peak of the process (nothing subtracted); "
        "warmup step and measured step both at this batch",
    }
    if "ours_no_microbatch" in runs:
        record["ours_no_microbatch"] = round(runs["ours_no_microbatch"]["peak"] / GIB, 3)
        record["ours_no_microbatch_step_s"] = round(runs["ours_no_microbatch"]["step_s"], 2)
    emit(record, common)
    return runs


def _lstsq(xs: list[list[float]], ys: list[float]) -> list[float]:
    sol = torch.linalg.lstsq(
        torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)[:, None]
    )
    return sol.solution[:, 0].tolist()


def _round_down(x: float, multiple: int) -> int:
    return max(multiple, int(x // multiple) * multiple)


def _verify(
    args,
    impl: str,
    predicted: int,
    multiple: int,
    cap: int | None,
    micro: int | None,
    points: list[dict],
) -> tuple[int, int | None, bool]:
    """Run at the prediction; if it fits, also 5% above it (when a step there is affordable), if
    not, 5% below until one fits; a bracket (fits, does not) is then halved down to ~2%.
    Returns (largest batch seen to fit, smallest seen not to fit or None, whether capped)."""
    budget = args.budget_gib * GIB
    capped = cap is not None and predicted > cap
    batch = _round_down(min(predicted, cap) if capped else predicted, multiple)
    fits, fails = 0, None
    for _ in range(6):
        r = measure(args, impl, batch, micro=micro, warmup_batch=min(WARMUP_BATCH, batch))
        points.append(_point(r))
        if r["peak"] <= budget:
            fits = max(fits, batch)
        else:
            fails = batch if fails is None else min(fails, batch)
        if fits and r["step_s"] > args.larger_max_s:  # another run as long: not affordable
            log(f"{impl}: stopping at {batch} (its step took {r['step_s']:.0f}s > --larger-max-s)")
            break
        if fits and fails:
            if fails - fits <= max(multiple, fits // 50):
                break
            nxt = _round_down((fits + fails) / 2, multiple)
            if nxt <= fits:
                break
        elif fits:
            nxt = _round_down(batch * 1.05, multiple)
            if capped or nxt == batch or (cap is not None and nxt > cap):
                break
        else:
            nxt = _round_down(batch * 0.95, multiple)
        batch = nxt
    return fits, fails, capped and fits == _round_down(cap, multiple)


def bench_largest(args, common: dict, mem_runs: dict[str, dict]) -> None:
    budget = args.budget_gib * GIB
    fit_batches = args.fit_batches_openclip
    points: list[dict] = []

    # OpenCLIP: affine in B
    oc_runs = [measure(args, "openclip", b, warmup_batch=min(WARMUP_BATCH, b)) for b in fit_batches]
    if "openclip" in mem_runs and mem_runs["openclip"]["batch"] not in fit_batches:
        oc_runs.append(mem_runs["openclip"])
    points += [_point(r) for r in oc_runs]
    a, b = _lstsq([[1.0, r["batch"]] for r in oc_runs], [r["peak"] for r in oc_runs])
    oc_pred = int((budget - a) / b)
    log(f"openclip fit: {a / GIB:.3f} GiB + {b / 2**20:.2f} MiB * B -> predicted {oc_pred}")
    oc_verified, oc_fails, _ = _verify(args, "openclip", oc_pred, 8, None, None, points)

    # Ours: c * B^2 from the loss alone, then affine in B from full steps, for each micro-batch
    loss_runs = [
        measure(args, "loss", n, warmup_batch=min(WARMUP_BATCH, n)) for n in args.loss_batches
    ]
    points += [_point(r) for r in loss_runs]
    (n1, p1), (n2, p2) = [(r["batch"], r["peak"]) for r in loss_runs[:2]]
    c = max(0.0, (p2 - p1) / (n2**2 - n1**2))
    log(f"loss alone: {c:.1f} bytes * B^2")
    # Full steps at mem_batch and twice that for each micro-batch; one slope for all (the per-sample
    # part: the batch itself, features and their gradients), one intercept per micro-batch (its
    # activations). Differences of ~0.1 GiB are near the allocator's noise: the joint fit is
    # steadier.
    runs = []
    for micro in args.micros:
        for n in (args.mem_batch, 2 * args.mem_batch):
            old = mem_runs.get("ours")
            if old is not None and old["batch"] == n and old["micro"] == micro:
                runs.append(old)
            else:
                runs.append(
                    measure(args, "ours", n, micro=micro, warmup_batch=min(WARMUP_BATCH, n))
                )
    points += [_point(r) for r in runs]
    rows = [[float(r["micro"] == m) for m in args.micros] + [float(r["batch"])] for r in runs]
    sol = _lstsq(rows, [r["peak"] - c * r["batch"] ** 2 for r in runs])
    cfg = our_config(args.preset)
    # the batch itself (fp32 images + int64 tokens) is a floor under the fitted slope
    floor = 3 * cfg.model.image.img_size**2 * 4 + cfg.model.text.context_length * 8
    b0 = max(sol[-1], floor)
    best = None
    for micro, a0 in zip(args.micros, sol[:-1]):
        if c > 0:
            pred = int((-b0 + math.sqrt(b0 * b0 + 4 * c * max(0.0, budget - a0))) / (2 * c))
        else:
            pred = int((budget - a0) / b0) if b0 > 0 else 10**9
        pred = _round_down(pred, micro)
        log(
            f"ours micro {micro}: {a0 / GIB:.3f} GiB + {b0 / 2**10:.1f} KiB * B "
            f"+ {c:.1f} B * B^2 -> predicted {pred}"
        )
        if best is None or pred > best[1] or (pred == best[1] and micro > best[0]):
            best = (micro, pred, a0)
    micro, ours_pred, a0 = best
    cap = args.max_batch or None
    ours_verified, ours_fails, at_cap = _verify(args, "ours", ours_pred, micro, cap, micro, points)
    lower_bound = at_cap or ours_fails is None
    emit(
        {
            "metric": "largest_batch",
            "budget_gib": args.budget_gib,
            "memory": memory_unit(args),
            "ours": ours_verified,
            "openclip": oc_verified,
            "ratio": round(ours_verified / oc_verified, 2) if oc_verified else None,
            "ratio_meaning": "ours / OpenCLIP largest batch verified to fit; >1 = ours fits more"
            + (" (ours: a lower bound, no larger batch was tried)" if lower_bound else ""),
            "ours_is_lower_bound": lower_bound,
            "openclip_smallest_failing": oc_fails,
            "ours_smallest_failing": ours_fails,
            "ours_predicted": ours_pred,
            "openclip_predicted": oc_pred,
            "ours_micro_batch": micro,
            "ours_fit": {
                "const_gib": round(a0 / GIB, 3),
                "per_sample_kib": round(b0 / 1024, 1),
                "per_sample_sq_bytes": round(c, 2),
            },
            "openclip_fit": {"const_gib": round(a / GIB, 3), "per_sample_mib": round(b / 2**20, 3)},
            "predicted_ratio": round(ours_pred / oc_pred, 2) if oc_pred > 0 else None,
            "points": points,
        },
        common,
    )


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
        choices=("speed", "memory", "largest"),
        action="append",
        help="run only these parts (repeatable; default all)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a sanity run of every path")
    p.add_argument("--batch", type=int, help="speed: samples per step (default 64)")
    p.add_argument("--warmup", type=int, help="speed: untimed steps per side (default 3)")
    p.add_argument("--steps", type=int, help="speed: timed steps per side (default 20)")
    p.add_argument("--pool", type=int, default=4, help="speed: distinct batches cycled (default 4)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="speed: torch.profiler top ops of both sides (stderr)",
    )
    p.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip ours_no_trim (speed) and ours without micro-batches (memory)",
    )
    p.add_argument("--mem-batch", type=int, help="memory: contrastive batch (default 512)")
    p.add_argument("--micro", type=int, help="memory: our micro-batch (default 64)")
    p.add_argument("--budget-gib", type=float, help="largest batch: memory budget (default 8)")
    p.add_argument(
        "--micros", type=_ints, help="largest batch: our micro-batches to try (default 64,128)"
    )
    p.add_argument(
        "--fit-batches-openclip",
        type=_ints,
        help="largest batch: OpenCLIP fit points (default 128,256)",
    )
    p.add_argument(
        "--loss-batches", type=_ints, help="largest batch: loss-alone points (default 4096,8192)"
    )
    p.add_argument(
        "--max-batch",
        type=int,
        help="largest batch: cap on our verification run; 0 = none (default none)",
    )
    p.add_argument(
        "--larger-max-s",
        type=float,
        default=240.0,
        help="largest batch: also verify 5%% above the prediction when a step at it took less "
        "(default 240)",
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
    big = args.preset == "vit_b16"  # ViT-B/16: a GPU preset; smaller fit points and micro-batches
    defaults = {
        "batch": 32 if quick else 64,
        "warmup": 1 if quick else 3,
        "steps": 3 if quick else 20,
        "mem_batch": 128 if quick else 512,
        "micro": 32 if quick else 64,
        "budget_gib": 2.0 if quick else 8.0,
        "micros": [32, 64] if quick or big else [64, 128],
        "fit_batches_openclip": [32, 64] if quick or big else [128, 256],
        "loss_batches": [1024, 2048] if quick else [4096, 8192],
        "max_batch": 512 if quick else 0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = set(args.only or ("speed", "memory", "largest"))
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
    mem_runs: dict[str, dict] = {}
    if "memory" in args.only:
        mem_runs = bench_memory(args, common)
    if "largest" in args.only:
        bench_largest(args, common, mem_runs)
    log(f"done in {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
