"""The training loop: read top to bottom, in sections.

Launch:
    clip-train train --config configs/demo.yaml data.train=/data/shards        # one process
    accelerate launch -m clip_train train --config configs/bench_tiny.yaml ...  # multi-GPU / node
    torchrun --nproc_per_node 2 -m clip_train train --config ...                 # 2 CPU processes
                                                                                 # (gloo)
    torchrun --nproc_per_node 2 -m clip_train train --config ... train.fsdp=true # sharded (FSDP2)
    clip-train resume runs/<name>                                               # continue exactly
    torchrun --nproc_per_node 4 -m clip_train resume runs/<name>                # on 4 processes
                                                                                 # (elastic.py)

SIGTERM or SIGUSR1 (SLURM's `--signal=USR1@120`) stop the run after the current step with a
checkpoint; the CLI then exits with code 75 (clip_train/preempt.py, docs/scaling.md).

Sections: set-up, model, resume, data, loop, evaluate/save/export.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from clip_train import sharding
from clip_train.checkpoint import SHARDED_OPTIM_DIR, CheckpointManager, set_rng_state
from clip_train.config import Config, check_for_processes, config_to_dict, loss_terms, to_yaml
from clip_train.elastic import keep_contrastive_batch, merged_budget, saved_batch
from clip_train.encoder import make_tokenizer
from clip_train.evaluation import evaluate, load_eval_suite
from clip_train.ledger import SampleLedger
from clip_train.model import build_model, lock_towers, locked_modules
from clip_train.objective import build_objective, freeze_unused, load_objective_state
from clip_train.optim import build_optimizer, build_scheduler
from clip_train.preempt import PreemptionGuard
from clip_train.pretrained import init_from_source, warn_locked_without_weights
from clip_train.step import forward_backward
from clip_train.throughput import TrainFlops, device_peak_flops
from data_tools.errors import ClipTrainError, ConfigError, DataError
from data_tools.io import write_text_atomic
from data_tools.loader import (
    BadSampleBudget,
    ShardLoader,
    epoch_batches,
    expand_shards,
    make_loader,
)
from data_tools.transforms import image_transform

log = logging.getLogger(__name__)


class TrainingDiverged(ClipTrainError):
    """Too many steps in a row had a non-finite loss or gradient."""


class MetricsLog:
    """metrics.jsonl (one JSON line per log step) plus Accelerate's trackers; main process only."""

    def __init__(self, path: Path, accelerator: Accelerator):
        self.path, self.accelerator = path, accelerator
        self.enabled = accelerator.is_main_process

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines the interrupted run wrote after the checkpoint it resumes from."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step"}, step=record["step"]
            )


def _accelerator(cfg: Config) -> Accelerator:
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on the CPU")
    for tracker, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        # Accelerate only warns about a missing tracker package and then logs nothing.
        if tracker in cfg.run.trackers and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"run.trackers has {tracker} but the {module} package is not installed: "
                f"pip install 'clip-train[{tracker}]'"
                + (" (set WANDB_MODE=offline to log without network)" if tracker == "wandb" else "")
            )
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and local > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise ConfigError(
            f"{local} processes on this node but {gpus} GPU(s): launch at most {gpus} "
            f"(--nproc_per_node {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on CPUs"
        )
    # Accelerate keeps process-wide state; drop a previous run's precision settings so `train` can
    # be called again in one process (notebooks, sweeps, tests). The process group is kept.
    AcceleratorState._reset_state()
    # cpu=True on GPU-less machines: Accelerate only forms a multi-process CPU group (gloo) under
    # torchrun when told so; otherwise every process would silently train alone.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=cfg.run.trackers or None,
        project_dir=str(cfg.run_dir),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        # Its checkpoints would hold one process's shards; clip-train shards the model itself.
        raise ConfigError(
            "Accelerate's FSDP (distributed_type: FSDP) is not supported: launch with a DDP "
            "(multi-GPU) Accelerate config and set train.fsdp=true (docs/scaling.md#fsdp)"
        )
    if cfg.train.fsdp and accelerator.num_processes == 1:
        raise ConfigError(
            "train.fsdp=true shards over several processes, but this run has one: launch it with "
            "torchrun or accelerate launch, or drop train.fsdp"
        )
    return accelerator


# What a run writes into its directory; --overwrite removes these and nothing else.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "eval_results.json", "eval", "report", "ledger")


def _previous_run(run_dir: Path) -> list:
    """The outputs of an earlier run in `run_dir` that a fresh start would destroy."""
    ckpts = run_dir / "checkpoints"
    found = ["checkpoints"] if ckpts.is_dir() and any(ckpts.iterdir()) else []
    return found + (["metrics.jsonl"] if (run_dir / "metrics.jsonl").exists() else [])


def _clear_previous_run(run_dir: Path, run_name: str) -> None:
    from clip_train.export import is_export_dir

    for name in (
        *RUN_OUTPUTS,
        run_name,
        "wandb",
    ):  # + tracker logs: TensorBoard's <run.name>/, W&B's
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if is_export_dir(run_dir / "export"):
        shutil.rmtree(run_dir / "export")
    log.info("--overwrite: removed the previous run's outputs in %s", run_dir)


# Model keys a resume may change: they shape neither the weights nor the optimizer's groups.
_RESUMABLE_MODEL_KEYS = {
    "image.init",
    "image.patch_init",
    "text.trim_padding",
    "max_logit_scale",
    "init_logit_scale",
    "init_from",
    "init_download",
}


def _check_same_architecture(ckpt_dir: Path, cfg: Config) -> None:
    """A resume whose overrides change the architecture fails with the keys, not a tensor-shape
    trace."""
    from omegaconf import OmegaConf

    from clip_train.config import ModelConfig

    try:
        saved = OmegaConf.to_container(
            OmegaConf.merge(
                OmegaConf.structured(ModelConfig), OmegaConf.load(ckpt_dir / "config.yaml").model
            )
        )
    except Exception as exc:  # OmegaConf raises several types
        raise ConfigError(
            f"cannot read the model config of {ckpt_dir}/config.yaml: {str(exc).splitlines()[0]}"
        ) from None
    now = config_to_dict(cfg.model)
    flat_saved = {k.replace("/", "."): v for k, v in _flat(saved).items()}
    flat_now = {k.replace("/", "."): v for k, v in _flat(now).items()}
    changed = [
        f"model.{k} ({flat_saved.get(k)} in the checkpoint, {v} now)"
        for k, v in flat_now.items()
        if k not in _RESUMABLE_MODEL_KEYS and flat_saved.get(k) != v
    ]
    if changed:
        raise ConfigError(
            f"cannot resume {ckpt_dir}: the overrides change the model or its trainable parts: "
            f"{', '.join(changed)}; resume with the run's model settings, or start a new run"
        )


def train(
    cfg: Config, resume: bool = False, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the summary the CLI prints.

    A run directory that already holds checkpoints or metrics is never restarted silently: pass
    `resume=True` to continue it or `overwrite=True` to remove its outputs and start over.
    `progress=False` (the CLI's -q/--no-progress) turns the bar off like `run.progress=false`.
    """
    # ---------------------------------------------------------------- set-up
    accelerator = _accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
    is_main, device = accelerator.is_main_process, accelerator.device
    if not resume:  # a resume checks after the checkpoint, which may change the batch split
        check_for_processes(cfg, world)
    run_dir = cfg.run_dir
    shards = expand_shards(cfg.data.train)  # a bad path fails here, before any work
    if resume and overwrite:
        raise ConfigError("resume continues the run and overwrite starts it over: give one of them")
    previous = [] if resume else _previous_run(run_dir)
    if cfg.export.at_end:  # every process looks, so all of them stop together
        from clip_train.export import check_export_target

        check_export_target(run_dir / "export")  # fail now, not after the whole run
    if previous and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(previous)}): continue it with "
            f"`clip-train resume {run_dir}` (or `train --resume`), start it over with "
            f"`train --overwrite`, or choose another run.name"
        )
    suite = load_eval_suite(cfg)  # a bad suite file fails now, not hours into the run
    set_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    # ---------------------------------------------------------------- model
    model = build_model(cfg.model)
    covered = init_from_source(
        model, cfg.model
    )  # a checkpoint, when resuming, replaces these below
    warn_locked_without_weights(cfg.model, covered)
    lock_towers(model, cfg.model)
    loss_fn = build_objective(cfg.loss, rank=rank, world_size=world, total_steps=cfg.train.steps)
    freeze_unused(model, loss_fn)  # e.g. the temperature under a margin loss alone
    # Momentum towers (moco) and the target network (byol) copy the model as it starts, before
    # any wrapper; a resume replaces them with the checkpoint's.
    loss_fn.attach(model, device)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    tokenizer = make_tokenizer(cfg.model)
    fsdp = cfg.train.fsdp
    if fsdp:  # before the optimizer, which must hold the sharded parameters
        sharding.shard_model(model, device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    # The scheduler stays unprepared: Accelerate's wrapper would step it once per process.
    if fsdp:  # the model is sharded already; a DDP wrapper would replicate it again
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    if cfg.train.compile:
        unwrapped.compile()  # in place: parameter names and checkpoints are unchanged
    peak = device_peak_flops(device, cfg.train.peak_flops)
    image_tokens = unwrapped.visual.trunk.patch_embed.num_patches + 1
    flops = TrainFlops(unwrapped) if peak else None  # only for MFU, which needs a known peak

    # ---------------------------------------------------------------- resume
    ckpts = CheckpointManager(
        run_dir / "checkpoints",
        cfg.train.keep_last,
        rank,
        world,
        barrier=accelerator.wait_for_everyone,
    )
    state = {"step": 0, "samples_seen": 0, "epoch": 0, "batch_in_epoch": 0, "nonfinite_skipped": 0}
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator)
    ledger = SampleLedger(run_dir, rank, cfg.run.ledger)
    rank_state: dict[str, Any] = {}
    positions: list[dict[str, Any]] | dict[str, Any] | None = None  # the loader's saved state
    ckpt_step = 0
    if resume:
        ckpt = ckpts.load_latest()
        if ckpt is None:
            log.info("no checkpoint in %s: starting from step 0", ckpts.root)
        else:
            _check_same_architecture(ckpt.path, cfg)
            saved_optim = ckpt.training["optimizer"]
            if bool(saved_optim.get("sharded")) != fsdp:
                saved_fsdp = str(not fsdp).lower()
                raise ConfigError(
                    f"cannot resume {ckpt.path}: it was saved with train.fsdp={saved_fsdp}; "
                    f"resume it with train.fsdp={saved_fsdp}"
                )
            if fsdp:
                sharding.load_full_model_state(unwrapped, ckpt.model)
                sharding.load_optimizer(
                    unwrapped,
                    optimizer.optimizer,
                    ckpt.path / saved_optim["sharded"],
                    saved_optim["param_groups"],
                )
            else:
                unwrapped.load_state_dict(ckpt.model)
                optimizer.load_state_dict(saved_optim)
            scheduler.load_state_dict(ckpt.training["scheduler"])
            load_objective_state(loss_fn, ckpt.objective, ckpt.path)
            if accelerator.scaler is not None and ckpt.training.get("scaler"):
                accelerator.scaler.load_state_dict(ckpt.training["scaler"])
            if ckpt.rng is not None:
                set_rng_state(ckpt.rng)
            state.update({k: ckpt.trainer_state.get(k, v) for k, v in state.items()})
            rank_state = ckpt.rank_state or {}
            positions = rank_state.get("loader")
            saved_world = int(ckpt.trainer_state.get("world_size", world))
            # Every process's data position: the loader keeps this process's own on the same
            # layout, and deals out what the saving processes left on another (data_tools.redeal).
            if ckpt.rank_states and all("loader" in s for s in ckpt.rank_states):
                positions = [s["loader"] for s in ckpt.rank_states]
            if saved_world != world:
                if not isinstance(positions, list):
                    raise DataError(
                        f"cannot resume {ckpt.path} on {world} processes: it lacks the data "
                        f"position of some of the {saved_world} processes that saved it "
                        f"(rank_R.json); resume on {saved_world} processes"
                    )
                cfg, change = keep_contrastive_batch(
                    cfg, saved_batch(ckpt.path), saved_world, world
                )
                if is_main:
                    log.info(change)
                rank_state = {"bad_samples": merged_budget(ckpt.rank_states or [], rank)}
            ckpt_step = state["step"]
            log.info("resumed from %s at step %d", ckpt.path, state["step"])
    if resume:
        check_for_processes(cfg, world)
    step_batch = cfg.train.batch_size * cfg.train.accum_steps  # per process, one contrastive batch
    log.info(
        "run %s: %d processes on %s, %d train shards, contrastive batch %d",
        run_dir,
        world,
        device,
        len(shards),
        step_batch * world,
    )

    def save() -> Path:
        training = {
            "scheduler": scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        position = {"loader": loader.state_dict(), "bad_samples": budget.state_dict()}
        if not fsdp:
            training = {"optimizer": optimizer.state_dict(), **training}
            return ckpts.save(
                state["step"],
                unwrapped.state_dict(),
                training,
                dict(state),
                to_yaml(cfg),
                position,
                objective_state=loss_fn.state_dict(),
            )
        # FSDP: the model gathered whole (what eval, export and load read), the optimizer in shards
        shards, groups = sharding.optimizer_state(unwrapped, optimizer.optimizer)
        training = {"optimizer": {"sharded": SHARDED_OPTIM_DIR, "param_groups": groups}, **training}
        return ckpts.save(
            state["step"],
            sharding.full_model_state(unwrapped),
            training,
            dict(state),
            to_yaml(cfg),
            position,
            write_shards=lambda tmp: sharding.save_shards(shards, tmp / SHARDED_OPTIM_DIR),
            objective_state=loss_fn.state_dict(),
        )

    def plain_model() -> torch.nn.Module | None:
        """The model as one process runs it (evaluation, export); every process must call this.

        Under FSDP a forward needs every process, so the main one gets a gathered copy (the others
        None); otherwise the model itself."""
        if not fsdp:
            return unwrapped
        full = sharding.full_model_state(unwrapped)
        return sharding.plain_copy(full, cfg.model, device) if is_main else None

    # ---------------------------------------------------------------- data
    train_transform = image_transform(unwrapped.image_size, train=True)
    # Epoch mode: every process stops a pass after the same number of batches, or DDP would hang.
    max_batches = None
    if cfg.data.mode == "epoch":
        max_batches = min(
            epoch_batches(
                cfg.data.train,
                batch_size=step_batch,
                world_size=world,
                num_workers=cfg.data.num_workers,
                drop_last=True,
            )
        )
        if max_batches == 0:
            raise DataError(
                f"data.train '{cfg.data.train}' has too few samples "
                f"for one batch of {step_batch} on "
                f"each of {world} processes; use a smaller train.batch_size or more data"
            )
    needs_labels = "labels" in loss_fn.needs
    needs_views = "image_views" in loss_fn.needs
    if needs_labels:
        _check_labelled(shards, cfg)
    budget = BadSampleBudget(cfg.data.max_bad_fraction, shards=cfg.data.train)
    if rank_state.get("bad_samples"):
        budget.load_state_dict(rank_state["bad_samples"])

    def open_loader(
        epoch: int,
        position: list[dict[str, Any]] | dict[str, Any] | None = None,
        reuse: ShardLoader | None = None,
    ) -> ShardLoader:
        """One pass of batches; `position` (every process's loader state, or this one's) resumes
        mid-pass without decoding the rest; the `reuse`d pass's workers go on with this one.

        The loader feeds `budget` (stopping the run, naming bad keys, past data.max_bad_fraction),
        including the samples of each pass's dropped tail, which reach no batch."""
        return make_loader(
            cfg.data.train,
            batch_size=step_batch,
            image_transform=train_transform,
            tokenizer=tokenizer,
            mode=cfg.data.mode,
            num_workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            drop_last=True,
            pin_memory=device.type == "cuda",
            weights=cfg.data.weights,
            samples_per_epoch=cfg.data.samples_per_epoch,
            max_batches=max_batches,
            state=position,
            budget=budget,
            with_label=needs_labels,
            image_views=2 if needs_views else 1,  # "image_2": SimCLR's augmentation
            uint8_images=cfg.data.uint8_images,  # normalised per micro-batch in forward_backward
            reuse=reuse,
        )

    # ---------------------------------------------------------------- publish
    # Config, model, checkpoint and data are known good: only now is anything in the run dir
    # changed.
    if previous:
        accelerator.wait_for_everyone()  # every process has looked before the main one deletes
        if is_main:
            _clear_previous_run(run_dir, cfg.run.name)
        accelerator.wait_for_everyone()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", to_yaml(cfg))
        if resume:  # a run resumed before its first checkpoint restarts its log
            metrics.truncate_after(ckpt_step)
    if resume:
        ledger.truncate_after(ckpt_step, world, is_main)
    if cfg.run.trackers:
        accelerator.init_trackers(cfg.run.name, config=_flat(config_to_dict(cfg)))

    # ---------------------------------------------------------------- loop
    model.train()
    for module in locked_modules(unwrapped, cfg.model):
        module.eval()
    loader = open_loader(state["epoch"], positions)
    data_iter = iter(loader)
    sync_pass_end = world > 1 and cfg.data.mode == "epoch"
    loss_sums: dict[str, torch.Tensor] = {}
    window = {"steps": 0, "finite": 0, "data_time": 0.0, "flops": 0.0, "start": time.perf_counter()}
    last_loss: float | None = None
    nonfinite_in_a_row = 0
    # A bar only on a terminal: in a cluster log its redraws would pile up as one endless line, so
    # there each log step is one plain log line instead.
    use_bar = is_main and cfg.run.progress and progress and sys.stderr.isatty()
    progress = tqdm(
        total=cfg.train.steps,
        initial=state["step"],
        disable=not use_bar,
        desc=f"train {cfg.run.name}",
        unit="step",
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    preempted: str | None = None  # the signal that stopped the run early
    saved_step = -1

    # GradCache's non-final micro-batches keep their gradients local (DDP's no_sync; FSDP's own
    # switch).
    no_sync = (
        (lambda: sharding.no_gradient_sync(model)) if fsdp else (lambda: accelerator.no_sync(model))
    )

    def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(t, reduction="sum") if world > 1 else t

    with PreemptionGuard() as guard:  # only around the loop: elsewhere signals act as usual
        while state["step"] < cfg.train.steps:
            t0 = time.perf_counter()
            batch = next(data_iter, None)
            if sync_pass_end:
                # A pass ends for every process at once: one rank's loader can run dry a batch early
                # (bad samples skipped, short shards); deciding alone would desynchronise the
                # epochs.
                have = torch.tensor([0.0 if batch is None else 1.0], device=device)
                if accelerator.reduce(have, reduction="sum").item() < world:
                    batch = None
            if batch is None:  # end of epoch: reshuffle and go on
                if state["batch_in_epoch"] == 0:
                    raise DataError(
                        f"data.train '{cfg.data.train}' gave no full batch of {step_batch} "
                        "on process "
                        f"{rank}; use fewer processes, a smaller train.batch_size or more data"
                    )
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
                loader = open_loader(state["epoch"], reuse=loader)
                data_iter = iter(loader)
                continue
            window["data_time"] += time.perf_counter() - t0
            images = batch["image"].to(device, non_blocking=True)
            tokens = batch["text"].to(device, non_blocking=True)

            labels = batch["label"].to(device, non_blocking=True) if needs_labels else None
            images_2 = batch["image_2"].to(device, non_blocking=True) if needs_views else None
            losses = forward_backward(
                model,
                loss_fn,
                images,
                tokens,
                accum_steps=cfg.train.accum_steps,
                labels=labels,
                text_views=2 if "text_views" in loss_fn.needs else 1,
                targets=loss_fn.targets if loss_fn.has_targets else None,
                images_2=images_2,
                prepare=train_transform.normalize if cfg.data.uint8_images else None,
                autocast=accelerator.autocast,
                backward=accelerator.backward,
                no_sync=no_sync,
            )
            if fsdp:
                sharding.average_replicated_grads(model)
                grad_norm = sharding.clip_grad_norm(list(model.parameters()), cfg.optim.grad_clip)
            else:
                grad_norm = _grad_norm(model, accelerator, cfg.optim.grad_clip)
            if accelerator.scaler is not None:
                # fp16: the loss scaler skips overflowing steps and lowers its scale by itself;
                # such a skip is routine, so it is counted but never stops the run.
                optimizer.step()
                stepped = not accelerator.optimizer_step_was_skipped
                state["nonfinite_skipped"] += int(not stepped)
            else:
                finite = torch.isfinite(grad_norm) & torch.isfinite(losses["loss"])
                if world > 1:  # every process must take the same decision
                    finite = accelerator.reduce(finite.float(), reduction="sum") == world
                stepped = bool(finite)  # the one device sync of the decision
                if stepped:
                    optimizer.step()
                    nonfinite_in_a_row = 0
                else:
                    state["nonfinite_skipped"] += 1
                    nonfinite_in_a_row += 1
                    log.warning(
                        "step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        state["step"] + 1,
                        nonfinite_in_a_row,
                    )
                    if nonfinite_in_a_row >= cfg.train.max_nonfinite:
                        raise TrainingDiverged(
                            f"loss or gradients were not finite for {nonfinite_in_a_row} "
                            "steps in a row (up to step "
                            f"{state['step'] + 1}); lower optim.lr or set optim.grad_clip; "
                            f"the last good checkpoint is in {ckpts.root}"
                        )
            if stepped:  # once per step taken: momentum towers, queues (moco), target (byol)
                loss_fn.after_step()
            # the lr this step used: the record of step k shows it, as open_clip_train's log does
            step_lr = scheduler.get_last_lr()[0]
            with warnings.catch_warnings():
                if not stepped:  # a skipped step advances the schedule too, by design;
                    # PyTorch's order check calls that a mistake when no step was taken yet
                    warnings.filterwarnings(
                        "ignore", "Detected call of `lr_scheduler.step", UserWarning
                    )
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            unwrapped.clamp_logit_scale()

            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["samples_seen"] += images.shape[0] * world
            ledger.write(state["step"], state["epoch"], batch["key"])
            if stepped:  # a skipped step's loss is not part of the window mean
                window["finite"] += 1
                for k, v in losses.items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + v.float()
            window["steps"] += 1
            if flops is not None:
                window["flops"] += images.shape[0] * flops.per_sample(
                    image_tokens, int(tokens.argmax(-1).max()) + 1
                )
            progress.update(1)

            if state["step"] % cfg.train.log_every == 0 or state["step"] == cfg.train.steps:
                elapsed = time.perf_counter() - window["start"]
                means = _mean_over_processes(loss_sums, window["finite"], accelerator)
                record = {
                    "step": state["step"],
                    "samples_seen": state["samples_seen"],
                    "epoch": state["epoch"],
                    **means,
                    "lr": step_lr,
                    "logit_scale": unwrapped.logit_scale.exp().item(),
                    "samples_per_s": window["steps"] * images.shape[0] * world / elapsed,
                    "data_wait_frac": window["data_time"] / elapsed,
                    "nonfinite_skipped": state["nonfinite_skipped"],
                }
                if peak:
                    record["mfu"] = window["flops"] / elapsed / peak
                last_loss = record.get("loss", last_loss)
                metrics.write(record)
                if is_main and not use_bar:
                    log.info(
                        "step %d/%d  loss %.4f  lr %.3g  logit scale %.2f  %.0f samples/s  "
                        "data wait %.0f%%",
                        state["step"],
                        cfg.train.steps,
                        last_loss if last_loss is not None else float("nan"),
                        record["lr"],
                        record["logit_scale"],
                        record["samples_per_s"],
                        100 * record["data_wait_frac"],
                    )
                progress.set_postfix(
                    loss=f"{last_loss:.3f}" if last_loss is not None else "nan",
                    scale=f"{record['logit_scale']:.1f}",
                )
                loss_sums = {}
                window.update(
                    steps=0, finite=0, data_time=0.0, flops=0.0, start=time.perf_counter()
                )
            if (
                cfg.train.save_every
                and state["step"] % cfg.train.save_every == 0
                and state["step"] < cfg.train.steps
            ):
                save()
                saved_step = state["step"]
            if (
                cfg.eval.every
                and state["step"] % cfg.eval.every == 0
                and state["step"] < cfg.train.steps
            ):
                eval_model = plain_model()
                if is_main:  # the others wait at the barrier (long suites: raise the NCCL timeout)
                    results = evaluate(
                        eval_model, cfg, device, suite, run_dir / "eval" / f"step_{state['step']}"
                    )
                    metrics.write(
                        {
                            "step": state["step"],
                            "samples_seen": state["samples_seen"],
                            **_flat(results, "eval"),
                        }
                    )
                accelerator.wait_for_everyone()
                del eval_model
                window.update(
                    steps=0, finite=0, data_time=0.0, flops=0.0, start=time.perf_counter()
                )
                loss_sums = {}
            # A scheduler's warning (SLURM --signal, preemption): stop here with a checkpoint.
            # The last step goes on to the normal end (save, evaluate, export) instead.
            if state["step"] < cfg.train.steps and guard.stop_agreed(sum_over_processes, device):
                preempted = guard.signal_name
                if saved_step == state["step"]:
                    final_ckpt = ckpts.root / f"step_{saved_step}"
                else:
                    final_ckpt = save()
                log.info(
                    "%s: stopped after step %d, checkpoint %s", preempted, state["step"], final_ckpt
                )
                break
    progress.close()
    train_time = time.perf_counter() - t_start

    # ---------------------------------------------------------------- evaluate / save / export
    if not preempted:
        final_ckpt = save()
    loader.close()
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "checkpoint": str(final_ckpt),
        "steps": state["step"],
        "samples_seen": state["samples_seen"],
        "final_loss": last_loss,
        "train_seconds": round(train_time, 1),
        "nonfinite_skipped": state["nonfinite_skipped"],
    }
    if preempted:  # the checkpoint is saved; evaluation and export are for the finished run
        summary["preempted"] = preempted
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary
    final_model = plain_model() if cfg.eval.at_end or cfg.export.at_end else None
    if is_main and cfg.eval.at_end:
        summary["eval"] = evaluate(
            final_model, cfg, device, suite, run_dir / "eval" / f"step_{state['step']}"
        )
        write_text_atomic(
            run_dir / "eval_results.json", json.dumps(summary["eval"], indent=1) + "\n"
        )
        metrics.write(
            {
                "step": state["step"],
                "samples_seen": state["samples_seen"],
                **_flat(summary["eval"], "eval"),
            }
        )
    if is_main and cfg.export.at_end:
        from clip_train.export import export_model

        summary["export_dir"] = str(export_model(final_model, run_dir / "export"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _check_labelled(shards: list, cfg: Config) -> None:
    """A term that reads class labels needs `.cls` in the shards: say so before training."""
    from data_tools.tario import iter_shard

    first = next(iter_shard(str(shards[0])), None)
    if first is None or not ({"cls"} & (set(first.fields) | set(first.refs))):
        terms = ", ".join(t.name for t in loss_terms(cfg.loss))
        raise ConfigError(
            f"loss term(s) {terms} read class labels, but {shards[0]} has no .cls in its first "
            f"sample{'' if first is None else f' ({first.key})'}; "
            "give every sample an integer .cls "
            "(clip-data from-imagefolder writes them) or drop those terms"
        )


def _mean_over_processes(
    sums: dict[str, torch.Tensor], steps: int, accelerator: Accelerator
) -> dict[str, float]:
    """Window means of the loss terms, averaged over processes (every process must call this).

    With `loss.local_loss` each process's loss covers only its own rows; the mean over processes
    is the loss of the whole contrastive batch, which one process alone does not know.
    """
    if not sums:  # no finite step in the window: the same on every process
        return {}
    names = sorted(sums)
    means = torch.stack([sums[k] for k in names]) / steps
    if accelerator.num_processes > 1:
        means = accelerator.reduce(means, reduction="mean")
    return dict(zip(names, means.tolist()))


def _grad_norm(
    model: torch.nn.Module, accelerator: Accelerator, clip: float | None
) -> torch.Tensor:
    """Total gradient norm (clipping to `clip` when set); non-finite when any gradient is."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.as_tensor(accelerator.clip_grad_norm_(params, clip))
    if accelerator.scaler is not None:
        accelerator.unscale_gradients()
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params])
    )


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}: tracker and metrics.jsonl keys."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flat(value, name))
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
        else:
            out[name] = str(value)
    return out
