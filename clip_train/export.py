"""Export a trained model, and load it back as an encoder.

An export directory holds:
  config.json, model.safetensors        our format: `clip_train.load(dir)` rebuilds the encoder
  image_tower.safetensors, text_tower.safetensors   each tower alone (keys without the tower prefix)
  timm/config.json, timm/model.safetensors           the image trunk:
                                        `timm.create_model("local-dir:<dir>/timm", pretrained=True)`
  open_clip/open_clip_config.json, open_clip/open_clip_model.safetensors
                                        when open_clip can build the model (as its own ViT at any
                                        size, with or without ln_pre; else through its timm adapter
                                        at registered sizes):
                                        `open_clip.create_model_and_transforms("local-dir:<dir>/open_clip")`
Training-only parameters (the image SSL head of a simclr term) are not exported: every format
holds the two towers and the temperature (and bias) only.
The directory is built under a temporary name and renamed into place, so a crash leaves either
the previous export or the new one, never a mix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import typing
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import OmegaConf
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import load_file, save_file

from clip_train import openclip_vit
from clip_train.checkpoint import MODEL_FILE, CheckpointManager
from clip_train.config import Config, ModelConfig, config_to_dict
from clip_train.encoder import ClipEncoder
from clip_train.model import (
    CLIPModel,
    build_model,
    inference_config,
    inference_state,
    timm_overrides,
)
from data_tools.errors import ClipTrainError, ConfigError
from data_tools.io import share_tree

log = logging.getLogger(__name__)

FORMAT = "clip-train/1"


def _tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        k[len(prefix) :]: v.detach().contiguous().cpu()
        for k, v in state.items()
        if k.startswith(prefix)
    }


def _timm_adapter_incompatibility(cfg: ModelConfig) -> str | None:
    """Why open_clip's timm adapter cannot build this trunk, or None if it can.

    The adapter calls `timm.create_model(name)` without size arguments, so the image trunk must be
    the registered timm model exactly.
    """
    with torch.device("meta"):  # only the sizes are read: no weights allocated or initialised
        registered = timm.create_model(cfg.image.timm_name, pretrained=False, num_classes=0)
    registered_pre_norm = openclip_vit.has_ln_pre(registered)
    if cfg.image.pre_norm != registered_pre_norm:
        return (
            f"its timm adapter builds '{cfg.image.timm_name}' as registered, "
            f"{'with' if registered_pre_norm else 'without'} pre_norm "
            f"(set model.image.pre_norm={str(registered_pre_norm).lower()} for that)"
        )
    defaults = {
        "img_size": registered.patch_embed.img_size[0],
        "patch_size": registered.patch_embed.patch_size[0],
        "embed_dim": registered.embed_dim,
        "depth": len(registered.blocks),
        "num_heads": registered.blocks[0].attn.num_heads,
        "mlp_ratio": registered.blocks[0].mlp.fc1.out_features / registered.embed_dim,
    }
    differing = [
        f"{k}={v} (registered {defaults[k]})"
        for k, v in timm_overrides(cfg.image).items()
        if k in defaults and float(v) != float(defaults[k])
    ]
    if differing:
        return (
            f"its timm adapter builds '{cfg.image.timm_name}' at its registered sizes, "
            "but this model sets " + ", ".join(differing)
        )
    return None


def open_clip_incompatibility(model: CLIPModel) -> str | None:
    """Why open_clip cannot build `model`, or None if it can (as its own ViT, or through timm)."""
    native = openclip_vit.incompatibility(model.visual.trunk)
    if native is None:
        return None
    adapter = _timm_adapter_incompatibility(model.cfg)
    if adapter is None:
        return None
    return f"open_clip's own ViT cannot express it ({native}), and {adapter}"


def open_clip_export(model: CLIPModel) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """open_clip's `model_cfg` and state dict for `model` (check `open_clip_incompatibility` first).

    Preferred: open_clip's own `VisionTransformer` (any size, `no_ln_pre` where the trunk has none).
    Otherwise its timm adapter, whose state dict is ours unchanged (`visual.trunk.*`).
    """
    cfg, trunk = model.cfg, model.visual.trunk
    text = cfg.text
    model_cfg: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "custom_text": True,
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "heads": text.heads,
            "layers": text.layers,
            "mlp_ratio": text.mlp_ratio,
        },
    }
    if cfg.init_logit_bias is not None:  # SigLIP: open_clip then has the logit_bias parameter too
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    state = _tensors(inference_state(model))
    if openclip_vit.incompatibility(trunk) is None:
        model_cfg["vision_cfg"] = openclip_vit.vision_config(trunk)
        return model_cfg, openclip_vit.to_open_clip(state, trunk)
    model_cfg["vision_cfg"] = {
        "timm_model_name": cfg.image.timm_name,
        "timm_model_pretrained": False,
        "timm_pool": cfg.image.pool,
        "timm_proj": "linear",
        "image_size": model.image_size,
    }
    return model_cfg, state


def open_clip_preprocess(image_size: int) -> dict[str, Any]:
    return {
        "size": image_size,
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def timm_config(cfg: ModelConfig, trunk: torch.nn.Module, image_size: int) -> dict[str, Any]:
    model_args = dict(timm_overrides(cfg.image), num_classes=0, global_pool=cfg.image.pool)
    if cfg.image.pre_norm:
        model_args["pre_norm"] = True
    return {
        "architecture": cfg.image.timm_name,
        "num_features": int(trunk.num_features),
        "num_classes": 0,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, image_size, image_size],
            "interpolation": "bicubic",
            "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD),
            "crop_pct": 1.0,
            "crop_mode": "center",
            "num_classes": 0,
            "fixed_input_size": True,
        },
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")


def is_export_dir(path: Path) -> bool:
    """Whether `path` holds an export this module wrote (so replacing it loses nothing of the
    user's)."""
    try:
        return (path / "export_info.json").is_file() and json.loads(
            (path / "config.json").read_text()
        ).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def check_export_target(out_dir: Path) -> None:
    """Refuse a directory an export would replace that holds anything but an export of ours."""
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not is_export_dir(out_dir))
    ):
        raise ClipTrainError(
            f"{out_dir} exists and is not a clip-train export (no export_info.json/config.json of "
            f"ours); export into a new or empty directory"
        )


def export_model(model: CLIPModel, out_dir: str | Path) -> Path:
    """Write every export format of `model` to `out_dir` (replaced atomically).

    `out_dir` must be absent, empty, or an earlier export of ours: anything else is refused, so an
    export never deletes a file it did not write.
    """
    out_dir = Path(out_dir)
    check_export_target(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cfg = inference_config(model.cfg)  # training-only parts (the image SSL head) left out
    state = inference_state(model)
    size = model.image_size

    _write_json(tmp / "config.json", {"format": FORMAT, "model": config_to_dict(cfg)})
    save_file(_tensors(state), str(tmp / "model.safetensors"))
    save_file(_tensors(state, "visual."), str(tmp / "image_tower.safetensors"))
    save_file(_tensors(state, "text."), str(tmp / "text_tower.safetensors"))

    (tmp / "timm").mkdir()
    _write_json(tmp / "timm" / "config.json", timm_config(cfg, model.visual.trunk, size))
    save_file(_tensors(state, "visual.trunk."), str(tmp / "timm" / "model.safetensors"))

    reason = open_clip_incompatibility(model)
    if reason is None:
        (tmp / "open_clip").mkdir()
        oc_cfg, oc_state = open_clip_export(model)
        _write_json(
            tmp / "open_clip" / "open_clip_config.json",
            {"model_cfg": oc_cfg, "preprocess_cfg": open_clip_preprocess(size)},
        )
        save_file(oc_state, str(tmp / "open_clip" / "open_clip_model.safetensors"))
    else:
        log.info("no open_clip export: %s", reason)
    _write_json(tmp / "export_info.json", {"open_clip": reason is None, "open_clip_reason": reason})
    share_tree(tmp)  # safetensors writes 0600; exports are shared like any file

    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ loading
def _model_from(cfg: ModelConfig, weights: dict[str, torch.Tensor], source: Path) -> CLIPModel:
    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ClipTrainError(
            f"{source} does not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return model.eval()


def _model_config(raw: dict[str, Any]) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))  # type: ignore[return-value]


def load_model(path: str | Path) -> CLIPModel:
    """A `CLIPModel` from an export dir, a run dir (its latest checkpoint) or a checkpoint dir."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        meta = json.loads((path / "config.json").read_text())
        if meta.get("format") != FORMAT:
            raise ClipTrainError(
                f"{path / 'config.json'} is not a clip-train export (format {meta.get('format')!r})"
            )
        return _model_from(
            _model_config(meta["model"]), load_file(str(path / "model.safetensors")), path
        )
    if (path / "config.yaml").is_file() and (path / MODEL_FILE).is_file():  # one checkpoint dir
        cfg = _run_config(path / "config.yaml")
        return _model_from(cfg.model, load_file(str(path / MODEL_FILE)), path)
    if (path / "checkpoints").is_dir() and (path / "config.yaml").is_file():  # a run dir
        ckpt = CheckpointManager(path / "checkpoints").load_latest(with_training_state=False)
        if ckpt is None:
            raise ClipTrainError(f"run {path} has no complete checkpoint yet")
        return _model_from(_run_config(ckpt.path / "config.yaml").model, ckpt.model, ckpt.path)
    if not path.exists():
        raise ClipTrainError(f"model path not found: {path}")
    raise ClipTrainError(
        f"{path} is neither a clip-train export (config.json + model.safetensors), "
        "a run directory nor a checkpoint directory"
    )


def _run_config(path: Path) -> Config:
    """The resolved config a run saved: the schema fills keys added since; keys it does not know
    (a newer clip-train saved the run) are dropped with a warning, except under `model`, where
    an unknown key may change what the weights compute, so loading stops with one line."""
    saved = OmegaConf.to_container(OmegaConf.load(path))
    schema = OmegaConf.structured(Config)
    unknown = _unknown_keys(saved, Config)
    for key in unknown:
        if key.startswith("model."):
            raise ConfigError(
                f"{path}: model key '{key}' is unknown to this clip-train (the run was saved by a "
                "newer version?): upgrade clip-train to load this model"
            )
        log.warning("%s: key '%s' unknown to this clip-train, ignored", path, key)
    merged = OmegaConf.merge(schema, _without(saved, set(unknown)))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _unknown_keys(saved: Any, cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of `saved` (plain containers) that the config dataclass `cls` does not have."""
    if not isinstance(saved, dict):
        return []
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in saved.items():
        name = f"{prefix}{key}"
        if key not in hints:
            out.append(name)
            continue
        nested = [t for t in (hints[key], *typing.get_args(hints[key])) if is_dataclass(t)]
        if nested:  # a section (or an optional one); free-form dicts keep any key
            out += _unknown_keys(value, nested[0], name + ".")
    return out


def _without(saved: dict, dotted: set[str], prefix: str = "") -> dict:
    """`saved` without the dotted keys."""
    out = {}
    for key, value in saved.items():
        name = f"{prefix}{key}"
        if name in dotted:
            continue
        out[key] = _without(value, dotted, name + ".") if isinstance(value, dict) else value
    return out


def load(path: str | Path, device: str | torch.device = "cpu") -> ClipEncoder:
    """An encoder (`encode_image`, `encode_text`, `tokenizer`, `preprocess`) in eval mode."""
    return ClipEncoder(load_model(path)).to(device).eval()
