"""Our timm ViT image tower as open_clip's own `VisionTransformer`: the structural check and the
state-dict translation.

A timm ViT with one class token, position embeddings that cover it and plain pre-LN blocks (qkv
bias, exact GELU, no layer scale, no q/k norm) computes what open_clip's `VisionTransformer`
computes, under other parameter names: with `pre_norm` (ln_pre) as open_clip's default ViT, without
it as its `no_ln_pre` ViT. timm's patch bias, which open_clip's bias-free `conv1` lacks, is a
constant added to every patch token before the position embeddings, so it folds into the patch
positions' embeddings (exact up to float rounding). Exported that way, open_clip builds the model
at any size (its timm adapter only builds registered timm models at their registered sizes).
timm converts the other way (`checkpoint_filter_fn` reads open_clip checkpoints); nothing converts
a timm ViT into open_clip's layout, so the map is written here.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

# timm block parameter names -> open_clip residual-block names (weights and biases alike).
_BLOCK_NAMES = {
    "norm1": "ln_1",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.proj": "attn.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def has_ln_pre(trunk: nn.Module) -> bool:
    """Whether a timm ViT normalises its embedded tokens (timm's `pre_norm`, open_clip's
    `ln_pre`)."""
    return not isinstance(getattr(trunk, "norm_pre", nn.Identity()), nn.Identity)


def _layer_norm_eps(trunk: VisionTransformer) -> float | None:
    """The one eps of every LayerNorm in the trunk, or None if they differ or are not LayerNorms."""
    norms = [trunk.norm if trunk.global_pool == "token" else trunk.fc_norm]
    if has_ln_pre(trunk):
        norms.append(trunk.norm_pre)
    for block in trunk.blocks:
        norms += [block.norm1, block.norm2]
    if not all(isinstance(n, nn.LayerNorm) for n in norms):
        return None
    eps = {n.eps for n in norms}
    return eps.pop() if len(eps) == 1 else None


def incompatibility(trunk: nn.Module) -> str | None:
    """Why open_clip's `VisionTransformer` cannot compute what `trunk` computes, or None."""
    if not isinstance(trunk, VisionTransformer):
        return f"the trunk is a {type(trunk).__name__}, not a timm VisionTransformer"
    if trunk.cls_token is None or trunk.num_prefix_tokens != 1 or trunk.no_embed_class:
        return "open_clip's ViT has exactly one class token inside the position embeddings"
    if trunk.global_pool not in ("token", "avg") or trunk.attn_pool is not None:
        return f"open_clip's ViT pools by class token or average, not {trunk.global_pool!r}"
    if trunk.global_pool == "avg" and isinstance(trunk.fc_norm, nn.Identity):
        return "average pooling without the final LayerNorm after it"
    for block in trunk.blocks:
        plain = (
            type(block) is Block
            and isinstance(block.ls1, nn.Identity)
            and isinstance(block.ls2, nn.Identity)
            and isinstance(block.attn.q_norm, nn.Identity)
            and isinstance(block.attn.k_norm, nn.Identity)
            and isinstance(block.attn.norm, nn.Identity)
            and block.attn.qkv.bias is not None
            and type(block.mlp) is Mlp
            and isinstance(block.mlp.norm, nn.Identity)
            and type(block.mlp.act) is nn.GELU
            and block.mlp.act.approximate == "none"
        )
        if not plain:
            return (
                "the trunk's blocks differ from open_clip's "
                "(layer scale, q/k norm, activation or qkv bias)"
            )
    if _layer_norm_eps(trunk) is None:
        return "the trunk's LayerNorms differ in type or eps"
    return None


def vision_config(trunk: VisionTransformer) -> dict:
    """open_clip's `vision_cfg` for `trunk` (check `incompatibility` first)."""
    width = trunk.embed_dim
    block = trunk.blocks[0]
    return {
        "layers": len(trunk.blocks),
        "width": width,
        "head_width": width // block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / width,
        "patch_size": trunk.patch_embed.patch_size[0],
        "image_size": trunk.patch_embed.img_size[0],
        "pool_type": "tok" if trunk.global_pool == "token" else "avg",
        "final_ln_after_pool": trunk.global_pool == "avg",  # timm's fc_norm follows the average
        "norm_kwargs": {"eps": _layer_norm_eps(trunk)},
        "no_ln_pre": not has_ln_pre(trunk),
    }


def to_open_clip(
    state: dict[str, torch.Tensor], trunk: VisionTransformer
) -> dict[str, torch.Tensor]:
    """Our model's state dict in open_clip's `CustomTextCLIP` names with a native `visual` ViT.

    Keys outside the image tower (`text.*`, `logit_scale`) are already open_clip's. A patch bias
    is added to the patch positions' embeddings (rows 1:), where open_clip's bias-free conv1 adds
    nothing.
    """
    post = (
        "norm" if trunk.global_pool == "token" else "fc_norm"
    )  # the LayerNorm open_clip calls ln_post
    out = {}
    patch_bias = None
    for key, value in state.items():
        if not key.startswith("visual."):
            out[key] = value
            continue
        name = key[len("visual.") :]
        if name == "head.proj.weight":
            out["visual.proj"] = value.t().contiguous()
            continue
        name = name.removeprefix("trunk.")
        if name == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif name == "pos_embed":
            out["visual.positional_embedding"] = value.squeeze(0)
        elif name == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = value
        elif name == "patch_embed.proj.bias":
            patch_bias = value
        elif name.startswith("norm_pre."):
            out["visual.ln_pre." + name.split(".", 1)[1]] = value
        elif name.startswith(post + "."):
            out["visual.ln_post." + name.split(".", 1)[1]] = value
        elif name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            for ours, theirs in _BLOCK_NAMES.items():
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours) :]
                    break
            out[f"visual.transformer.resblocks.{index}.{rest}"] = value
        else:
            raise KeyError(f"no open_clip name for image-tower parameter {key!r}")
    if patch_bias is not None:
        pos = out["visual.positional_embedding"].clone()
        pos[1:] += patch_bias
        out["visual.positional_embedding"] = pos
    return out
