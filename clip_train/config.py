"""Typed run configuration: YAML presets plus `section.key=value` overrides.

The schema is a tree of dataclasses turned into an OmegaConf structured config, so a typo or a
wrong type is caught before any work starts, with one line that names the key.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_tools.errors import ConfigError

IMAGE_INITS = ("timm", "timm-jax", "openclip")
PATCH_INITS = ("lecun", "torch")
DECAY_RULES = ("clip-train", "open_clip")  # the keys of clip_train.optim.DECAY_RULES
LOSS_TERMS = (
    "clip",
    "siglip",
    "margin",
    "supcon",
    "simcse",
    "moco",
    "simclr",
    "byol",
)  # the keys of clip_train.objective.TERMS
# Terms that read the image SSL head's features of two views (clip_train.model.ImageSSLHead).
SSL_HEAD_TERMS = ("simclr", "byol")
# Terms that train one tower only: an objective of these alone leaves the other tower untrained.
SINGLE_TOWER_TERMS = ("simcse", "simclr", "byol")
# Terms that keep EMA copies of the towers (clip_train.momentum.MomentumCopy).
MOMENTUM_TERMS = ("moco", "byol")
MOMENTUM_SCHEDULES = ("constant", "cosine")  # byol's target momentum over training


@dataclass
class ImageTowerConfig:
    """A timm ViT: a registered name, optionally resized by explicit sizes (None = as
    registered)."""

    timm_name: str = "vit_base_patch16_224"
    img_size: int | None = 64
    patch_size: int | None = 8
    width: int | None = 192
    depth: int | None = 6
    heads: int | None = 3
    mlp_ratio: float | None = 4.0
    pool: str = "token"  # timm global_pool: "token" (class token) or "avg"
    # LayerNorm on the embedded tokens (ln_pre) and no patch bias: open_clip's default ViT exactly,
    # so the tower learns per step as open_clip's does (docs/benchmarks.md, "Learning per step").
    # false: its `no_ln_pre` form, with timm's patch bias. Both export to open_clip at any size.
    pre_norm: bool = True
    # Weight init of the trunk: openclip (fan-in scaled, as open_clip's ViT), timm (N(0, 0.02)),
    # timm-jax.
    # timm's fixed 0.02 stalls narrow towers (width < 768): see clip_train.model.init_image_trunk.
    init: str = "openclip"
    # The patch embedding's init: torch (as `init` leaves it: PyTorch's conv default, as open_clip's
    # conv1) or lecun (sqrt(3) larger, zero bias: the original ViT's, as big_vision; timm-jax has it
    # either way). Without ln_pre the patch tokens enter the blocks at the size this gives them:
    # see clip_train.model.init_patch_embed_lecun for what each learns better.
    patch_init: str = "torch"


@dataclass
class TextTowerConfig:
    """Causal transformer over open_clip's BPE tokens, pooled at the EOT token."""

    context_length: int = 32
    vocab_size: int = 49408
    width: int = 256
    heads: int = 4
    layers: int = 4
    mlp_ratio: float = 4.0
    trim_padding: bool = True  # exact for a causal tower pooled at EOT; saves compute
    # Dropout on each block's attention and MLP outputs (BERT's hidden dropout); SimCSE's noise.
    dropout: float = 0.0


@dataclass
class ImageSSLHeadConfig:
    """The image self-supervision head (SLIP's 3-layer MLP on the trunk's pooled features), used
    for training only: checkpoints keep it, exports leave it out."""

    # Set from loss.terms: true exactly when a term reads it (simclr, byol); not a switch of its
    # own.
    enabled: bool = False
    hidden_dim: int | None = None  # None: SLIP's 4096 scaled by trunk width / 768 (192 -> 1024)
    out_dim: int = 256  # SLIP's
    # BYOL's predictor (out_dim -> hidden_dim -> out_dim) on the head's output; set from
    # loss.terms: true exactly when a byol term is listed.
    predictor: bool = False


@dataclass
class ModelConfig:
    embed_dim: int = 256
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    image_ssl: ImageSSLHeadConfig = field(default_factory=ImageSSLHeadConfig)
    init_logit_scale: float = math.log(1 / 0.07)
    # A learned logit bias (SigLIP: -10); None: no such parameter. A siglip loss term sets it.
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0  # clamp on exp(logit_scale), as in CLIP
    lock_image: bool = False  # freeze the image trunk (LiT); its projection still trains
    lock_text: bool = False  # freeze the text tower except its projection
    # Starting weights (clip_train.pretrained): a run/export dir of ours, open_clip:FILE,
    # timm:FILE or timm:NAME (from the local Hugging Face cache). None: random init.
    init_from: str | None = None
    init_download: bool = False  # timm:NAME may download into the cache


@dataclass
class DataConfig:
    train: str = MISSING  # shard spec: a directory, brace pattern, glob or `a::b` list
    zeroshot: str | None = None  # labelled shards with classnames.txt / templates.txt
    retrieval: str | None = None
    num_workers: int = 2
    shuffle_buffer: int = 1000
    mode: str = (
        "epoch"  # epoch: each sample once per pass; resampled: shards drawn with replacement
    )
    weights: list[float] | None = None  # one per '::'-separated source of data.train (resampled)
    samples_per_epoch: int | None = None  # resampled: samples in one pass (for epochs in the log)
    max_bad_fraction: float = 0.01  # stop when more of the samples read than this are unusable
    # workers send uint8 pixels; the step normalises each micro-batch on the device (a quarter of
    # the bytes in shared memory, host-to-device copies and the batch held through the step)
    uint8_images: bool = True


@dataclass
class LossTermConfig:
    """One term of the objective (clip_train.objective.TERMS); keys a term does not use are
    ignored."""

    name: str = MISSING
    weight: float = 1.0
    label_smoothing: float = 0.0  # clip: cross-entropy label smoothing
    margin: float = 1.0  # margin: distance unmatched pairs are pushed beyond
    # supcon (default 0.1), simcse (0.05), simclr (0.1): fixed temperature; moco: None reads the
    # model's learned temperature, a value fixes it
    temperature: float | None = None
    queue_size: int = 4096  # moco: past keys per modality kept as extra negatives (>= global batch)
    # moco (default 0.995), byol (0.996): EMA rate of the momentum towers / target, in [0, 1)
    momentum: float | None = None
    # byol: cosine (default; BYOL's rise of the momentum to 1 over train.steps) or constant
    momentum_schedule: str | None = None


@dataclass
class LossConfig:
    name: str = "clip"  # one term (clip_train.objective.TERMS), weight 1; or list them in `terms`
    terms: list[LossTermConfig] = field(default_factory=list)
    local_loss: bool = False  # each process computes only its own rows of the logits
    gather_with_grad: bool = (
        True  # exact full-batch gradients; False (open_clip's default) scales them by
    )
    # 1/processes with the full loss and is wrong with local_loss
    # InfoNCE in tiles (clip_train.tiled_loss): same loss and gradients without the B x B logits.
    # auto: tiled when the logits would reach 8192 x 8192 entries, ~1 GiB (docs/scaling.md).
    tiled: bool | str = "auto"
    tile_size: int = 1024  # rows and columns of one tile


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    # Which parameters decay (clip_train.optim.DECAY_RULES): clip-train (not embeddings or the
    # class token) or open_clip (open_clip_train's: embeddings decay too).
    decay_rule: str = "clip-train"
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    schedule: str = "cosine"  # registry key in clip_train.optim: cosine | constant | const-cooldown
    warmup_steps: int = 100
    cooldown_steps: int = 0  # const-cooldown: linear decay to min_lr over the last N steps
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # per process and micro-batch
    accum_steps: int = 1  # micro-batches per step, all in one contrastive batch (GradCache)
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    # Shard parameters, gradients and optimizer state over the processes (torch's FSDP2,
    # clip_train/sharding.py) instead of replicating them (DDP); docs/scaling.md#fsdp.
    fsdp: bool = False
    max_nonfinite: int = 5  # stop after this many steps in a row with non-finite loss or gradients
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU; None: known GPUs only
    seed: int = 0
    # cuDNN's deterministic kernels (the patch embedding is the one convolution): on a GPU a
    # resumed run then ends bit for bit as the uninterrupted one; false lets cuDNN pick others.
    deterministic: bool = True
    log_every: int = 10
    save_every: int = 500  # 0: only at the end
    keep_last: int = 2


@dataclass
class EvalConfig:
    at_end: bool = True
    every: int = 0  # also evaluate every N steps (0: only at the end)
    suite: str | None = None  # eval suite YAML (eval/suite.py) run with data.zeroshot/retrieval
    batch_size: int = 128
    num_workers: int = 0


@dataclass
class ExportConfig:
    at_end: bool = True


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"
    progress: bool = True  # tqdm bar on the main process when stderr is a terminal (else log lines)
    trackers: list[str] = field(default_factory=list)  # tensorboard, wandb (Accelerate trackers)
    ledger: bool = False  # RUN_DIR/ledger/rank_R.jsonl: the sample keys of every step (ledger.py)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name


def _known_keys(node: Any = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`model.image.width`, ...)."""
    node = OmegaConf.structured(Config) if node is None else node
    keys = []
    for name in node:
        child = node._get_node(name)
        if OmegaConf.is_dict(child):
            keys += _known_keys(child, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _one_line(exc: OmegaConfBaseException, source: str) -> str:
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "Key '" in msg and "not in" in msg:
        close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.6)
        hint = (
            f"did you mean '{close[0]}'?" if close else "check the spelling against configs/*.yaml"
        )
        return f"unknown config key '{key}' in {source}; {hint}"
    if key:
        return f"bad value for config key '{key}' in {source}: {msg}"
    return f"bad config in {source}: {msg}"


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML preset (optional) + dotted overrides -> validated `Config`."""
    schema = OmegaConf.structured(Config)
    layers: list[tuple[Any, str]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((OmegaConf.load(path), str(path)))
        except Exception as exc:  # YAML syntax errors come in several types
            raise ConfigError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            layers.append((OmegaConf.from_dotlist([item]), f"override '{item}'"))
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, f"override '{item}'")) from None
    cfg = schema
    for layer, source in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(_one_line(exc, source)) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"config key '{missing[0]}' is required (set it in the YAML or as {missing[0]}=...)"
        )
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def loss_terms(cfg: LossConfig) -> list[LossTermConfig]:
    """The objective's terms: `loss.terms`, or `loss.name` alone with weight 1."""
    return list(cfg.terms) or [LossTermConfig(name=cfg.name)]


def _check_loss_terms(cfg: Config) -> None:
    """Term names, weights and knobs; SigLIP's bias and temperature init when the user set none."""
    if cfg.loss.terms and cfg.loss.name != "clip":
        raise ConfigError("give loss.name (one term) or loss.terms (several), not both")
    terms = loss_terms(cfg.loss)
    for i, term in enumerate(terms):
        where = f"loss.terms[{i}]" if cfg.loss.terms else "loss.name"
        if term.name not in LOSS_TERMS:
            close = difflib.get_close_matches(term.name, LOSS_TERMS, n=1)
            raise ConfigError(
                f"{where} '{term.name}' is not one of: {', '.join(LOSS_TERMS)}"
                + (f"; did you mean '{close[0]}'?" if close else "")
            )
        if not term.weight > 0:
            raise ConfigError(f"{where}: weight must be > 0, not {term.weight}")
        if not 0 <= term.label_smoothing < 1:
            raise ConfigError(
                f"{where}: label_smoothing must be in [0, 1), not {term.label_smoothing}"
            )
        if not term.margin > 0:
            raise ConfigError(f"{where}: margin must be > 0, not {term.margin}")
        if term.temperature is not None and not term.temperature > 0:
            raise ConfigError(f"{where}: temperature must be > 0, not {term.temperature}")
        if term.name in MOMENTUM_TERMS:
            _check_momentum(cfg, term, where)
        if term.name == "moco":
            _check_moco(cfg, term, where, world_size=1)
    if any(t.name == "simcse" for t in terms) and not cfg.model.text.dropout > 0:
        raise ConfigError(
            "loss term simcse contrasts two dropout views of each caption: set model.text.dropout "
            "(SimCSE uses 0.1)"
        )
    if not 0 <= cfg.model.text.dropout < 1:
        raise ConfigError(f"model.text.dropout must be in [0, 1), not {cfg.model.text.dropout}")
    if len({t.name for t in terms}) < len(terms):
        raise ConfigError("loss.terms names a term twice; give each term once with its weight")
    _check_ssl_head(cfg, [t.name for t in terms if t.name in SSL_HEAD_TERMS])
    if any(t.name in SSL_HEAD_TERMS for t in terms) and all(
        t.name in SINGLE_TOWER_TERMS for t in terms
    ):
        raise ConfigError(
            f"loss terms {', '.join(t.name for t in terms)} train single towers only (no "
            "image-text pairs): add an image-text term to loss.terms, e.g. "
            "{name: clip, weight: 1.0}"
        )
    if any(t.name == "siglip" for t in terms) and cfg.model.init_logit_bias is None:
        # As open_clip_train's --siglip and the paper: bias -10, temperature 10 (unless set).
        cfg.model.init_logit_bias = -10.0
        if cfg.model.init_logit_scale == math.log(1 / 0.07):
            cfg.model.init_logit_scale = math.log(10)


def _check_momentum(cfg: Config, term: LossTermConfig, where: str) -> None:
    """The keys of a term with EMA copies of the towers (moco, byol)."""
    if where == "loss.name":  # its keys can only be given in the list form
        where = f"loss.name={term.name} (give its keys as loss.terms=[{{name: {term.name}, ...}}])"
    if term.momentum is not None and not 0 <= term.momentum < 1:
        raise ConfigError(f"{where}: momentum must be in [0, 1), not {term.momentum}")
    schedule = term.momentum_schedule
    if schedule is not None and schedule not in MOMENTUM_SCHEDULES:
        raise ConfigError(
            f"{where}: momentum_schedule must be one of {', '.join(MOMENTUM_SCHEDULES)}, "
            f"not '{schedule}'"
        )
    if cfg.train.fsdp:
        raise ConfigError(
            f"{where}: {term.name} keeps whole momentum copies of the towers, which "
            f"train.fsdp=true does not shard: set train.fsdp=false or drop the {term.name} term"
        )


def _check_moco(cfg: Config, term: LossTermConfig, where: str, world_size: int) -> None:
    if where == "loss.name":  # its keys can only be given in the list form
        where = "loss.name=moco (give its keys as loss.terms=[{name: moco, ...}])"
    batch = cfg.train.batch_size * cfg.train.accum_steps * world_size
    if term.queue_size < batch:
        raise ConfigError(
            f"{where}: queue_size={term.queue_size} is smaller than the global batch {batch} "
            f"(train.batch_size x train.accum_steps x {world_size} "
            f"process{'es' if world_size > 1 else ''}): "
            "raise queue_size or lower the batch"
        )


def check_for_processes(cfg: Config, world_size: int) -> None:
    """What only the number of processes decides (moco's queue against the global batch)."""
    for i, term in enumerate(loss_terms(cfg.loss)):
        if term.name == "moco":
            where = f"loss.terms[{i}]" if cfg.loss.terms else "loss.name"
            _check_moco(cfg, term, where, world_size)


def _check_ssl_head(cfg: Config, readers: list[str]) -> None:
    """The image SSL head exists exactly when a term reads it; its sizes are positive."""
    head = cfg.model.image_ssl
    if head.enabled and not readers:
        raise ConfigError(
            "model.image_ssl.enabled=true but no loss term reads the image SSL head: add a "
            f"{' or '.join(SSL_HEAD_TERMS)} term to loss.terms, or drop the key (the terms set it)"
        )
    head.enabled = bool(readers)
    if head.predictor and "byol" not in readers:
        raise ConfigError(
            "model.image_ssl.predictor=true but no byol term reads it: add a byol term to "
            "loss.terms, or drop the key (the term sets it)"
        )
    head.predictor = "byol" in readers
    if not readers:
        return
    if cfg.model.lock_image:
        raise ConfigError(
            f"loss term {readers[0]} trains the image trunk on two views, but "
            "model.lock_image=true freezes it: drop one of them"
        )
    for key in ("hidden_dim", "out_dim"):
        value = getattr(head, key)
        if value is not None and value < 1:
            raise ConfigError(f"model.image_ssl.{key} must be positive, not {value}")


def validate(cfg: Config) -> None:
    """Combinations the types cannot express; each failure names the key."""
    img, txt = cfg.model.image, cfg.model.text
    if img.width and img.heads and img.width % img.heads:
        raise ConfigError(
            f"model.image.width={img.width} is not divisible by model.image.heads={img.heads}"
        )
    if img.img_size and img.patch_size and img.img_size % img.patch_size:
        raise ConfigError(
            f"model.image.img_size={img.img_size} is not divisible by "
            f"model.image.patch_size={img.patch_size}"
        )
    if txt.width % txt.heads:
        raise ConfigError(
            f"model.text.width={txt.width} is not divisible by model.text.heads={txt.heads}"
        )
    _validate_timm_name(img.timm_name)
    if img.init not in IMAGE_INITS:
        raise ConfigError(
            f"model.image.init must be one of {', '.join(IMAGE_INITS)}, not '{img.init}'"
        )
    if img.patch_init not in PATCH_INITS:
        raise ConfigError(
            f"model.image.patch_init must be one of {', '.join(PATCH_INITS)}, not "
            f"'{img.patch_init}'"
        )
    if cfg.train.mixed_precision == "False":  # YAML reads a bare `no` as false
        cfg.train.mixed_precision = "no"
    if cfg.train.mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(
            f"train.mixed_precision must be no, bf16 or fp16, not '{cfg.train.mixed_precision}'"
        )
    for key in ("train.steps", "train.batch_size", "train.log_every", "model.embed_dim"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"{key} must be positive")
    if cfg.data.mode not in ("epoch", "resampled"):
        raise ConfigError(f"data.mode must be epoch or resampled, not '{cfg.data.mode}'")
    if cfg.data.mode == "epoch" and (cfg.data.weights or cfg.data.samples_per_epoch):
        raise ConfigError("data.weights and data.samples_per_epoch need data.mode=resampled")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train.split("::")):
        raise ConfigError(
            f"data.weights has {len(cfg.data.weights)} entries but data.train has "
            f"{len(cfg.data.train.split('::'))} '::'-separated sources"
        )
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError("data.max_bad_fraction must be in [0, 1]")
    if cfg.eval.every < 0:
        raise ConfigError("eval.every must be >= 0")
    if cfg.eval.every and not (cfg.data.zeroshot or cfg.data.retrieval or cfg.eval.suite):
        raise ConfigError(
            "eval.every is set but there is nothing to evaluate: set data.zeroshot, "
            "data.retrieval or eval.suite"
        )
    if cfg.train.fsdp and cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.fsdp=true does not support train.mixed_precision=fp16 "
            "(its loss scaler is untested "
            "on sharded gradients); use bf16"
        )
    if cfg.train.fsdp and cfg.train.compile:
        raise ConfigError(
            "train.fsdp=true does not support train.compile=true yet; turn one of them off"
        )
    if cfg.train.accum_steps < 1:
        raise ConfigError("train.accum_steps must be at least 1")
    if cfg.loss.local_loss and not cfg.loss.gather_with_grad:
        raise ConfigError(
            "loss.local_loss=true needs loss.gather_with_grad=true: without it the gradients are "
            "not those of the contrastive loss"
        )
    if cfg.loss.tiled not in (True, False, "auto"):
        raise ConfigError(f"loss.tiled must be true, false or auto, not '{cfg.loss.tiled}'")
    if cfg.loss.tile_size < 1:
        raise ConfigError(f"loss.tile_size must be positive, not {cfg.loss.tile_size}")
    if cfg.train.max_nonfinite < 1:
        raise ConfigError("train.max_nonfinite must be at least 1")
    unknown = set(cfg.run.trackers) - {"tensorboard", "wandb"}
    if unknown:
        raise ConfigError(
            f"run.trackers: unknown tracker(s) {sorted(unknown)}; use tensorboard and/or wandb"
        )
    _check_loss_terms(cfg)
    if cfg.optim.decay_rule not in DECAY_RULES:
        raise ConfigError(
            f"optim.decay_rule must be one of {', '.join(DECAY_RULES)}, "
            f"not '{cfg.optim.decay_rule}'"
        )
    if (
        cfg.optim.schedule == "const-cooldown"
        and not 0 < cfg.optim.cooldown_steps <= cfg.train.steps
    ):
        raise ConfigError(
            "optim.cooldown_steps must be in (0, train.steps] with optim.schedule=const-cooldown"
        )
    if cfg.train.keep_last < 1:
        raise ConfigError("train.keep_last must be at least 1")
    if cfg.optim.warmup_steps < 0:
        raise ConfigError("optim.warmup_steps must be >= 0")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio must be in [0, 1]")
    opt = cfg.optim
    for key, ok, rule in (
        ("lr", opt.lr > 0, "> 0"),
        ("weight_decay", opt.weight_decay >= 0, ">= 0"),
        ("beta1", 0 <= opt.beta1 < 1, "in [0, 1)"),
        ("beta2", 0 <= opt.beta2 < 1, "in [0, 1)"),
        ("eps", opt.eps > 0, "> 0"),
        ("grad_clip", opt.grad_clip is None or opt.grad_clip > 0, "> 0"),
    ):
        if not ok:
            raise ConfigError(f"optim.{key}={getattr(opt, key)} must be {rule}")


def _validate_timm_name(name: str) -> None:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models("vit_*"), n=1, cutoff=0.6)
        raise ConfigError(
            f"model.image.timm_name '{name}' is not a timm model"
            + (f"; did you mean '{close[0]}'?" if close else "; see timm.list_models('vit_*')")
        )
    if not timm.models.is_model_in_modules(name, ["vision_transformer", "deit"]):
        raise ConfigError(
            f"model.image.timm_name '{name}' is not a timm VisionTransformer "
            "(the image tower is a ViT); "
            f"use one of timm.list_models('vit_*'), e.g. vit_base_patch16_224"
        )


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
