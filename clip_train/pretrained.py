"""Start a model from existing weights (`model.init_from`), before the first step.

Sources, one per run:
  PATH              an export, run or checkpoint directory of ours: the whole model
                    (continue training on new data)
  open_clip:FILE    an open_clip model's state dict (.safetensors, .bin, .pt): both towers and the
                    temperature; its own ViT is mapped onto our timm trunk by timm's converter
  timm:FILE         an image-trunk state dict (timm's names, or anything timm's ViT loader reads)
  timm:NAME         timm's pretrained weights for NAME (e.g. vit_base_patch16_clip_224.openai) from
                    the local Hugging Face cache; downloaded only with `model.init_download=true`

The architecture always comes from the config. A source is mapped onto it and every tensor must
fit: a missing key or a different shape is refused with one line naming it. The name maps are
timm's and open_clip's; what is ours is choosing the source, the text-tower names of open_clip's
two layouts, and the checks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clip_train.config import ModelConfig
from clip_train.model import CLIPModel
from data_tools.errors import ConfigError

log = logging.getLogger(__name__)

# open_clip's `CLIP` keeps its text tower at the top level; `CustomTextCLIP` (and ours) under text.
_TEXT_TOP_LEVEL = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


def _read_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"model.init_from {what}: no such file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: torch and safetensors raise many types
        raise ConfigError(
            f"model.init_from {what}: cannot read {path} ({str(exc).splitlines()[0]})"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _open_clip_to_ours(
    state: dict[str, torch.Tensor], model: CLIPModel, what: str
) -> dict[str, torch.Tensor]:
    """open_clip names (either layout, its own ViT or its timm adapter) -> ours."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    out: dict[str, torch.Tensor] = {}
    if "visual.class_embedding" in state:  # open_clip's own ViT
        ln_pre = "visual.ln_pre.weight" in state
        if ln_pre != ("visual.trunk.norm_pre.weight" in model.state_dict()):
            raise ConfigError(
                f"model.init_from {what}: the checkpoint's ViT has {'an' if ln_pre else 'no'} "
                f"ln_pre; set model.image.pre_norm={str(ln_pre).lower()} to load it"
            )
        trunk = checkpoint_filter_fn(state, model.visual.trunk)  # timm's open_clip -> timm map
        bias = model.visual.trunk.patch_embed.proj.bias
        if bias is not None:  # open_clip's conv1 has none: its position embeddings carry ours
            trunk["patch_embed.proj.bias"] = torch.zeros_like(bias)
        head = trunk.pop("head.weight", None)
        trunk.pop("head.bias", None)
        out.update({f"visual.trunk.{k}": v for k, v in trunk.items()})
        if head is not None:
            out["visual.head.proj.weight"] = head
    else:  # the timm adapter's layout is ours
        out.update({k: v for k, v in state.items() if k.startswith("visual.")})
    for key, value in state.items():
        if key.startswith("text.") or key == "logit_scale":
            out[key] = value
        elif key.startswith(_TEXT_TOP_LEVEL):
            out[f"text.{key}"] = value
    return out


def _timm_to_ours(state: dict[str, torch.Tensor], model: CLIPModel) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn

    trunk = checkpoint_filter_fn(state, model.visual.trunk)  # timm's own loader map
    return {
        f"visual.trunk.{k}": v for k, v in trunk.items() if not k.startswith("head.")
    }  # no classifier


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _timm_pretrained_file(name: str, what: str, download: bool) -> Path:
    """The file timm loads for NAME's pretrained weights, from the local Hugging Face cache (timm
    fetches it there first only when the user allowed downloads)."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise ConfigError(
            f"model.init_from {what}: timm has no Hugging Face weights named '{name}' "
            "(see timm.list_pretrained()), and no such file exists"
        )
    repo = cfg.hf_hub_id.split("@")[0]
    for attempt in ("cache", "download"):
        for filename in _WEIGHT_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str):
                return Path(found)
        if attempt == "cache" and not download:
            raise ConfigError(
                f"model.init_from {what}: not in the local Hugging Face cache; fetch it once "
                f"with `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` "
                "or set model.init_download=true"
            )
        if attempt == "cache":
            log.info("downloading timm weights %s (model.init_download=true)", name)
            timm.create_model(name, pretrained=True, num_classes=0)
    raise ConfigError(
        f"model.init_from {what}: timm loaded the weights but left no file in the cache"
    )


def source_weights(model: CLIPModel, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors `cfg.init_from` gives, in our names (a subset of the model's keys)."""
    source = cfg.init_from
    what = source
    kind, _, rest = source.partition(":")
    if kind == "open_clip" and rest:
        return _open_clip_to_ours(_read_state(Path(rest).expanduser(), what), model, what)
    if kind == "timm" and rest:
        path = Path(rest).expanduser()
        if (
            not path.exists()
            and "/" not in rest
            and not rest.endswith((".safetensors", ".bin", ".pt", ".pth"))
        ):
            path = _timm_pretrained_file(rest, what, cfg.init_download)
        return _timm_to_ours(_read_state(path, what), model)
    from clip_train.export import load_model  # one of ours: an export, run or checkpoint dir

    try:
        return load_model(Path(source).expanduser()).state_dict()
    except Exception as exc:  # ClipTrainError (not found, not ours) or a shape mismatch
        raise ConfigError(f"model.init_from {what}: {str(exc).splitlines()[0]}") from None


def init_from_source(model: CLIPModel, cfg: ModelConfig) -> str | None:
    """Copy the weights of `cfg.init_from` into `model`; returns which towers they covered.

    Every tensor must fit the configured architecture; a tower the source does not cover keeps
    its fresh init (e.g. timm:... gives only the image trunk).
    """
    if not cfg.init_from:
        return None
    weights = source_weights(model, cfg)
    own = model.state_dict()
    for key, value in weights.items():
        if key not in own:
            log.info(
                "model.init_from %s: %s has no place in this model, skipped", cfg.init_from, key
            )
        elif value.shape != own[key].shape:
            raise ConfigError(
                f"model.init_from {cfg.init_from}: {key} is {tuple(value.shape)} there and "
                f"{tuple(own[key].shape)} in this model; set the model sizes to the checkpoint's"
            )
    covered = {k for k in weights if k in own}
    towers = []
    for name, prefix in (
        ("image trunk", "visual.trunk."),
        ("image projection", "visual.head."),
        ("text tower", "text."),
    ):
        keys = [k for k in own if k.startswith(prefix)]
        missing = [k for k in keys if k not in covered]
        if missing and len(missing) < len(keys):  # a tower half covered is another architecture
            raise ConfigError(
                f"model.init_from {cfg.init_from}: the source has no {missing[0]} (and "
                f"{len(missing) - 1} more {name} tensors); it is not this architecture"
            )
        if keys and not missing:
            towers.append(name)
    with torch.no_grad():
        for key in covered:
            own[key].copy_(weights[key])
    summary = ", ".join(towers + (["logit_scale"] if "logit_scale" in covered else []))
    log.info("initialised %s from %s", summary or "nothing", cfg.init_from)
    return summary


def warn_locked_without_weights(cfg: ModelConfig, covered: str | None) -> None:
    """A locked tower that starts from random weights stays random: say so."""
    if cfg.lock_image and "image trunk" not in (covered or ""):
        log.warning(
            "model.lock_image=true freezes an image trunk that was not initialised from weights "
            "(set model.init_from); it will stay at its random init"
        )
    if cfg.lock_text and "text tower" not in (covered or ""):
        log.warning(
            "model.lock_text=true freezes a text tower that was not initialised from weights "
            "(set model.init_from); it will stay at its random init"
        )
