"""ViG (Liao et al., AAAI 2025, arXiv 2405.18425): isotropic vision backbones with bidirectional gated linear attention.

Every block is a pre-RMSNorm block with ViG's mixer (:class:`~visionlin.layers.GatedLinearAttention2D`: a 3x3
depthwise convolution for locality, bidirectional GLA over the raster order with direction-wise gates, and 2-D gating
locality injection) and a SwiGLU MLP (hidden width ``256 * ceil(int(8C/3) / 256)``). The patch embedding is the
authors' "v2" (conv k9 s8 -> LayerNorm2d -> SiLU -> conv k3 s2 -> LayerNorm2d, stride 16); a learned absolute
position embedding over the grid (no class token), a final RMSNorm and average pooling complete the model.

Every model is a :class:`~visionlin.models.vit.EfficientVisionTransformer` (ViG's patch embedding and MLP plug into
it); the entrypoints pin the configurations of the authors' ``classification/configs/vig/vig-{t,s,b}.yaml``
(hustvl/ViG). Names ``vig_{tiny,small,base}`` do not collide with timm's models (timm 1.0.31 registers no ``*vig*``).
The hierarchical ViG-H variants are not implemented yet (the authors release their weights too: hustvl/ViG
``vig_h_{t,s,b}_*.pth``). The authors' checkpoints (``blocks.i.attn_norm``,
``mlp_norm``, ``mlp.gate_proj`` / ``down_proj``) load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import GluMlp, LayerNorm2d, RmsNorm
from timm.models import generate_default_cfgs, register_model
from torch import nn

from . import vit
from ._common import check_pair, pretrained_cfg, take_indices
from ._pretrained import build_with_weights
from .vit import EfficientVisionTransformer, _unwrap

__all__ = ["ViGMlp", "ViGPatchEmbed", "checkpoint_filter_fn"]


class ViGPatchEmbed(nn.Module):
    """ViG's "v2" patch embedding: conv (``C/2``, kernel ``p/2 + 1``, stride ``p/2``, padding 1) -> LayerNorm2d ->
    SiLU -> conv (``C``, 3x3, stride 2, padding 1) -> LayerNorm2d. Images ``[B, C_in, H, W]`` -> ``[B, H/p, W/p, C]``
    for sides that are multiples of ``p``. Takes timm ``PatchEmbed``'s keywords (only ``NHWC`` output)."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        dynamic_img_pad: bool = False,
        output_fmt: str = "NHWC",
        norm_eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.img_size = check_pair("img_size", img_size)
        self.patch_size = check_pair("patch_size", patch_size)
        p = self.patch_size[0]
        if self.patch_size[1] != p or p % 4:
            raise ValueError(f"ViGPatchEmbed: patch_size={patch_size!r} must be square and a multiple of 4")
        if output_fmt != "NHWC":
            raise NotImplementedError(f"ViGPatchEmbed: {output_fmt=} (only 'NHWC')")
        if embed_dim < 2 or embed_dim % 2:
            raise ValueError(f"ViGPatchEmbed: {embed_dim=} must be even (the first convolution has embed_dim / 2)")
        self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim // 2, p // 2 + 1, stride=p // 2, padding=1, bias=bias, **dd),
            LayerNorm2d(embed_dim // 2, eps=norm_eps, **dd),
            nn.SiLU(),
            nn.Conv2d(embed_dim // 2, embed_dim, 3, stride=2, padding=1, bias=bias, **dd),
            LayerNorm2d(embed_dim, eps=norm_eps, **dd),
        )

    def set_input_size(self, img_size: int | tuple[int, int] | None = None, patch_size: Any = None) -> None:
        """The nominal input size and its grid (as timm ``PatchEmbed.set_input_size``; the patch size is fixed)."""
        if patch_size is not None and check_pair("patch_size", patch_size) != self.patch_size:
            raise NotImplementedError(f"ViGPatchEmbed: changing patch_size ({self.patch_size}) is not supported")
        if img_size is not None:
            self.img_size = check_pair("img_size", img_size)
            p = self.patch_size[0]
            self.grid_size = (self.img_size[0] // p, self.img_size[1] // p)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C_in, H, W]`` -> patches ``[B, H/p, W/p, C]`` (padded at the bottom / right to multiples of
        ``p`` first with ``dynamic_img_pad``)."""
        if self.dynamic_img_pad:
            p = self.patch_size[0]
            x = F.pad(x, (0, (-x.shape[-1]) % p, 0, (-x.shape[-2]) % p))
        return self.proj(x).permute(0, 2, 3, 1)


class ViGMlp(GluMlp):
    """ViG's SwiGLU MLP (``GLAMLP``): ``fc2(act(x1) * x2)`` with ``x1, x2 = fc1(x).chunk(2)``, no biases; hidden width
    ``multiple_of * ceil(int(2 * hidden_features / 3) / multiple_of)`` (LLaMA's rounding of ``hidden_features =
    mlp_ratio * C``). Parameters ``fc1`` / ``fc2`` (the authors' ``gate_proj`` / ``down_proj``)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: type[nn.Module] = nn.SiLU,
        drop: float = 0.0,
        multiple_of: int = 256,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        width = multiple_of * -(-int(2 * hidden_features / 3) // multiple_of)
        super().__init__(
            in_features,
            2 * width,
            act_layer=act_layer,
            bias=False,
            drop=drop,
            gate_last=False,
            device=device,
            dtype=dtype,
        )


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_KEYS = [
    (r"^blocks\.(\d+)\.attn_norm\.", r"blocks.\1.norm1."),
    (r"^blocks\.(\d+)\.mlp_norm\.", r"blocks.\1.norm2."),
    (r"^blocks\.(\d+)\.mlp\.gate_proj\.", r"blocks.\1.mlp.fc1."),
    (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
]


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: EfficientVisionTransformer, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' ViG checkpoints (``blocks.i.attn_norm`` / ``mlp_norm`` / ``mlp.gate_proj`` /
    ``mlp.down_proj``; the mixer's names are ours already) onto ours, then fit them to ``model`` with
    :func:`visionlin.models.vit.checkpoint_filter_fn` (position embedding resampled to the model's grid). Our own
    checkpoints pass through unchanged.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
    """
    state_dict = dict(_unwrap(state_dict))
    renamed = {}
    for k, v in state_dict.items():
        for pattern, repl in _KEYS:
            k, n = re.subn(pattern, repl, k)
            if n:
                break
        renamed[k] = v
    return vit.checkpoint_filter_fn(renamed, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(
    pretrained_cfg,
    first_conv="patch_embed.proj.0",
    paper_ids="arXiv:2405.18425",
    origin_url="https://github.com/hustvl/ViG",
)


# The authors' ImageNet-1k checkpoints (hustvl/ViG README: huggingface.co/hustvl/ViG; plain state dicts).
_HUB = {"hf_hub_id": "hustvl/ViG"}

default_cfgs = generate_default_cfgs(
    {
        "vig_tiny.in1k": _cfg(hf_hub_filename="vig_t_77p2acc.pth", **_HUB),
        "vig_small.in1k": _cfg(hf_hub_filename="vig_s_81p7acc.pth", **_HUB),
        "vig_base.in1k": _cfg(hf_hub_filename="vig_b_82p6acc.pth", **_HUB),
    }
)


def _create_vig(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    depth = kwargs.get("depth", 12)
    if kwargs.get("features_only") and isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1:
        take_indices(depth, out_indices)  # a ValueError naming bad out_indices (timm would assert)
    return build_with_weights(
        EfficientVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _args(kwargs: dict[str, Any], out_act: bool, **defaults: Any) -> dict[str, Any]:
    """ViG's settings (``use_out_act`` and ``use_act_in_conv`` both ``out_act``, as the authors' T vs S/B configs),
    each overridable by the caller's keywords; a caller's ``attn_kwargs`` dict goes on top of the mixer's."""
    mixer = {"use_out_act": out_act, "use_act_in_conv": out_act}
    given = kwargs.get("attn_kwargs")
    common = dict(
        patch_size=16,
        depth=12,
        mlp_ratio=4.0,
        qkv_bias=False,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        norm_layer=partial(RmsNorm, eps=1e-6),
        act_layer=nn.SiLU,
        embed_layer=ViGPatchEmbed,
        mlp_layer=ViGMlp,
        attn_layer="gla",
    )
    args = {**common, **defaults, **kwargs}
    if given is None or isinstance(given, Mapping):
        args["attn_kwargs"] = {**mixer, **(given or {})}
    return args


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def vig_tiny(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """ViG-T: 192 wide, 12 blocks, 3 heads (6M params, 77.2% top-1); SiLU after the local conv and before o_proj."""
    return _create_vig("vig_tiny", pretrained, **_args(kwargs, True, embed_dim=192, num_heads=3))


@register_model
def vig_small(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """ViG-S: 384 wide, 12 blocks, 6 heads, drop path 0.2 (23M params, 81.7% top-1)."""
    return _create_vig("vig_small", pretrained, **_args(kwargs, False, embed_dim=384, num_heads=6, drop_path_rate=0.2))


@register_model
def vig_base(pretrained: bool = False, **kwargs: Any) -> EfficientVisionTransformer:
    """ViG-B: 768 wide, 12 blocks, 12 heads, drop path 0.5 (89M params, 82.6% top-1)."""
    return _create_vig("vig_base", pretrained, **_args(kwargs, False, embed_dim=768, num_heads=12, drop_path_rate=0.5))
