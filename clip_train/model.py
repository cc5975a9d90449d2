"""The CLIP model: a timm ViT image tower and a causal text tower projected into one space.

Module and parameter names follow open_clip's `CustomTextCLIP` with a timm vision tower
(`visual.trunk`, `visual.head.proj`, `text.*`, `logit_scale`), so export to open_clip is a copy
of the state dict, not a translation. The model knows nothing of losses, data or processes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import timm
import torch
import torch.nn.functional as F
from open_clip.transformer import TextTransformer
from timm.layers import lecun_normal_
from torch import nn

from clip_train.config import ImageTowerConfig, ModelConfig, TextTowerConfig

# Our size names -> timm VisionTransformer keyword arguments.
_TIMM_KWARGS = {
    "img_size": "img_size",
    "patch_size": "patch_size",
    "width": "embed_dim",
    "depth": "depth",
    "heads": "num_heads",
    "mlp_ratio": "mlp_ratio",
}


def timm_overrides(cfg: ImageTowerConfig) -> dict:
    """The explicit sizes in `cfg`, as timm keyword arguments."""
    return {
        timm_key: getattr(cfg, ours)
        for ours, timm_key in _TIMM_KWARGS.items()
        if getattr(cfg, ours) is not None
    }


def init_linear_fan_in(trunk: nn.Module, qkv_only: bool = False) -> None:
    """Linear layers of the blocks as open_clip's ViT initialises them: PyTorch's fan-in scaled
    default (std 1/sqrt(3 fan_in)), qkv Xavier-uniform over the stacked projection, zero biases
    on the attention projections (as nn.MultiheadAttention)."""
    for block in trunk.blocks:
        nn.init.xavier_uniform_(block.attn.qkv.weight)
        if block.attn.qkv.bias is not None:
            nn.init.zeros_(block.attn.qkv.bias)
        if qkv_only:
            continue
        block.attn.proj.reset_parameters()
        if block.attn.proj.bias is not None:
            nn.init.zeros_(block.attn.proj.bias)
        for module in block.mlp.children():
            if isinstance(module, nn.Linear):
                module.reset_parameters()


def init_embeddings_fan_in(trunk: nn.Module) -> None:
    """Class token and position embeddings N(0, width^-1/2), as open_clip's ViT (timm: 1e-6,
    0.02)."""
    std = trunk.embed_dim**-0.5
    if trunk.cls_token is not None:
        nn.init.normal_(trunk.cls_token, std=std)
    if trunk.pos_embed is not None:
        nn.init.normal_(trunk.pos_embed, std=std)


def init_image_trunk(trunk: nn.Module, mode: str) -> None:
    """Re-initialise a freshly built timm ViT: `timm` keeps timm's own init, `openclip` uses
    open_clip's fan-in scaled one (`timm-jax` is applied at build time by timm itself).

    timm draws every linear weight from N(0, 0.02): right for ViT-B's width 768, where fan-in
    scaling gives about the same, but at width 192 the attention logits start ~6x smaller than
    open_clip's and the class token reads a near-uniform average of the patches
    (bench/ablate_tower.py, docs/benchmarks.md).
    """
    if mode == "openclip":
        init_linear_fan_in(trunk)
        init_embeddings_fan_in(trunk)


def init_patch_embed_lecun(trunk: nn.Module) -> None:
    """The patch embedding as the original ViT initialises it (big_vision; timm's 'jax' init):
    LeCun normal, std 1/sqrt(fan_in), zero bias.

    PyTorch's conv default (open_clip's conv1, timm's own init; `patch_init: torch`, the default)
    is sqrt(3) smaller: on coloured images the patch tokens then enter the first block at ~0.66
    RMS, and without ln_pre (which rescales them to 1) the tower learns less per step than
    open_clip's. LeCun's scale (~1.2 there) closes that gap in a same-loop ablation (less so with
    the real trainers), but outline icons on white, whose tokens already start at ~1, then learn
    less early and can sit at chance (docs/benchmarks.md, "Learning per step"), so it is an
    option, not the default.
    """
    proj = trunk.patch_embed.proj
    lecun_normal_(proj.weight)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)


class ImageTower(nn.Module):
    """timm ViT trunk without classifier, then a bias-free linear projection."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        # pre_norm both ways: some registered ViTs (timm's CLIP ones) have it on by default
        extra = {"pre_norm": cfg.pre_norm}
        if cfg.init == "timm-jax":
            extra["weight_init"] = "jax"
        self.trunk = timm.create_model(
            cfg.timm_name,
            pretrained=False,
            num_classes=0,
            global_pool=cfg.pool,
            **timm_overrides(cfg),
            **extra,
        )
        init_image_trunk(self.trunk, cfg.init)
        if cfg.patch_init == "lecun":
            init_patch_embed_lecun(self.trunk)
        self.head = nn.Sequential(
            OrderedDict(proj=nn.Linear(self.trunk.num_features, embed_dim, bias=False))
        )
        nn.init.normal_(self.head.proj.weight, std=self.trunk.num_features**-0.5)

    @property
    def image_size(self) -> int:
        return int(self.trunk.patch_embed.img_size[0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(images))


class TextTower(TextTransformer):
    """open_clip's text transformer, run only over the columns up to the longest caption.

    Tokens after a caption's EOT are padding; with a causal mask no earlier position attends to
    them, and pooling reads the EOT position, so dropping the all-padding tail of a batch gives the
    same features for a fraction of the compute (captions are usually far shorter than the context).
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=embed_dim,
        )
        self.trim_padding = cfg.trim_padding
        if cfg.dropout:  # on the residual branches, before open_clip's (parameter-free) layer scale
            for block in self.transformer.resblocks:
                block.ls_1 = nn.Sequential(nn.Dropout(cfg.dropout), block.ls_1)
                block.ls_2 = nn.Sequential(nn.Dropout(cfg.dropout), block.ls_2)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        # open_clip's tokenizer puts the EOT token (the largest id) last; argmax finds it.
        eot = text.argmax(dim=-1)
        if self.trim_padding:
            text = text[:, : int(eot.max()) + 1]
        seq_len = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:seq_len]
        x = self.transformer(x, attn_mask=self.attn_mask[:seq_len, :seq_len])
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        return pooled @ self.text_projection


class ImageSSLHead(nn.Sequential):
    """The image self-supervision head of SLIP (Mu et al., 2022): a 3-layer MLP on the image
    trunk's pooled features, beside (not after) the CLIP projection, so the SSL term shapes the
    trunk without pulling the joint image-text space.

    LayerNorm where SLIP has (synchronised) BatchNorm: per-sample normalisation keeps a GradCache
    micro-batch and each process's share exact, with no statistics to synchronise.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(in_dim, hidden_dim),
                norm1=nn.LayerNorm(hidden_dim),
                act1=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden_dim, hidden_dim),
                norm2=nn.LayerNorm(hidden_dim),
                act2=nn.ReLU(inplace=True),
                fc3=nn.Linear(hidden_dim, out_dim),
            )
        )


class BYOLPredictor(nn.Sequential):
    """BYOL's predictor (Grill et al., 2020): a 2-layer MLP from the image SSL head's output
    (BYOL's projector) back to its size; only the online network has one, and the asymmetry is
    what keeps BYOL from collapsing without negatives. LayerNorm where BYOL has BatchNorm, for
    the same reason as `ImageSSLHead`."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__(
            OrderedDict(
                fc1=nn.Linear(dim, hidden_dim),
                norm1=nn.LayerNorm(hidden_dim),
                act1=nn.ReLU(inplace=True),
                fc2=nn.Linear(hidden_dim, dim),
            )
        )


def ssl_hidden_dim(cfg: ModelConfig, trunk_width: int) -> int:
    """`model.image_ssl.hidden_dim`, or SLIP's 4096 for ViT-B scaled by the trunk's width."""
    hidden = cfg.image_ssl.hidden_dim
    return hidden if hidden is not None else max(1, round(4096 * trunk_width / 768))


# Parameters that exist for training only: checkpoints keep them, exports leave them out.
TRAINING_ONLY = ("image_ssl_head.", "image_ssl_predictor.")


class CLIPModel(nn.Module):
    """Two towers and a learned temperature; `encode_*` match open_clip's signatures."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = ImageTower(cfg.image, cfg.embed_dim)
        self.text = TextTower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        # SigLIP's learned bias of the pairwise logits (open_clip's name); only when configured.
        if cfg.init_logit_bias is not None:
            self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias)))
        if cfg.image_ssl.enabled:  # a term reads two image views (simclr, byol)
            width = self.visual.trunk.num_features
            hidden = ssl_hidden_dim(cfg, width)
            self.image_ssl_head = ImageSSLHead(width, hidden, cfg.image_ssl.out_dim)
            if cfg.image_ssl.predictor:  # byol: trained here, so the optimizer and DDP see it
                self.image_ssl_predictor = BYOLPredictor(cfg.image_ssl.out_dim, hidden)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        self.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def forward(
        self,
        images: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
        text_views: int = 1,
        images_2: torch.Tensor | None = None,
    ) -> dict:
        """Normalised features and the temperature; `text_views=2` also encodes the captions a
        second time (`text_features_2`: another dropout mask, for SimCSE).

        `images_2` (a second augmented view of `images`) adds `image_ssl_1` and `image_ssl_2`:
        both views through the trunk and the image SSL head, normalised (for SimCLR), and, with
        BYOL's predictor, `image_pred_1` and `image_pred_2`: the head's output through the
        predictor, normalised. The two views go through the trunk as one batch;
        `image_features` come from the first."""
        out = {"logit_scale": self.logit_scale.exp()}
        if hasattr(self, "logit_bias"):
            out["logit_bias"] = self.logit_bias
        if images is not None and images_2 is not None:
            out.update(self._two_views(images, images_2))
        elif images is not None:
            out["image_features"] = self.encode_image(images, normalize=True)
        if tokens is not None:
            out["text_features"] = self.encode_text(tokens, normalize=True)
            if text_views == 2:
                out["text_features_2"] = self.encode_text(tokens, normalize=True)
        return out

    def _two_views(self, images: torch.Tensor, images_2: torch.Tensor) -> dict:
        if not hasattr(self, "image_ssl_head"):
            raise ValueError(
                "a second image view needs the image SSL head (model.image_ssl, which a simclr "
                "or byol loss term turns on)"
            )
        n = images.shape[0]
        pooled = self.visual.trunk(torch.cat([images, images_2]))
        projected = self.image_ssl_head(pooled)
        ssl = F.normalize(projected, dim=-1)
        out = {
            "image_features": F.normalize(self.visual.head(pooled[:n]), dim=-1),
            "image_ssl_1": ssl[:n],
            "image_ssl_2": ssl[n:],
        }
        if hasattr(self, "image_ssl_predictor"):
            predicted = F.normalize(self.image_ssl_predictor(projected), dim=-1)
            out.update(image_pred_1=predicted[:n], image_pred_2=predicted[n:])
        return out


def inference_state(model: CLIPModel) -> dict[str, torch.Tensor]:
    """The state dict without the training-only parameters (`TRAINING_ONLY`): what exports hold."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY)}


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without the training-only parts: the config of `inference_state`."""
    return dataclasses.replace(
        cfg, image_ssl=dataclasses.replace(cfg.image_ssl, enabled=False, predictor=False)
    )


def build_model(cfg: ModelConfig) -> CLIPModel:
    return CLIPModel(cfg)


def lock_towers(model: CLIPModel, cfg: ModelConfig) -> None:
    """Freeze the trunks chosen in `cfg` (as open_clip's lock-image/lock-text): their projections,
    and the temperature, keep training so the joint space can still align."""
    frozen = []
    if cfg.lock_image:
        frozen.append(model.visual.trunk)
    if cfg.lock_text:
        frozen += [m for name, m in model.text.named_children()]
        for name, p in model.text.named_parameters(recurse=False):
            p.requires_grad_(name == "text_projection")
    for module in frozen:
        module.requires_grad_(False)
        module.eval()


def locked_modules(model: CLIPModel, cfg: ModelConfig) -> list:
    """Modules that must stay in eval mode while the rest trains."""
    return ([model.visual.trunk] if cfg.lock_image else []) + (
        list(model.text.children()) if cfg.lock_text else []
    )
