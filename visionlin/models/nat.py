"""NAT and DiNAT: hierarchical backbones with (dilated) neighborhood attention in every block.

* NAT (Hassani et al., CVPR 2023, arXiv 2204.07143): 7x7 neighborhood attention with relative positional bias.
* DiNAT (Hassani & Shi, 2022, arXiv 2209.15001): NAT whose blocks alternate dilation 1 and a stage dilation chosen
  for 224 px (56/7 = 8, 28/7 = 4, 14/7 = 2, then 1).

Both are :class:`~visionlin.models.hierarchical.HierarchicalBackbone` with NAT's convolutional stem and downsampler
and the ``"neighborhood"`` mixer; the entrypoints pin the configurations of the authors' ``classification/nat.py``
and ``classification/dinat.py`` (SHI-Labs/Neighborhood-Attention-Transformer). Any input whose sides are multiples
of 32 runs: where a stage's grid is smaller than ``kernel_size * dilation`` the window is clamped to it (see
``visionlin.kernels.effective_window``), so DiNAT's large dilations shrink to fit small inputs instead of failing.
The authors' checkpoints load through :func:`checkpoint_filter_fn`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from . import hierarchical
from ._common import check_depths, pretrained_cfg
from .hierarchical import HierarchicalBackbone
from .vit import _unwrap

__all__ = ["checkpoint_filter_fn", "dinat_dilations", "nat_attn_kwargs"]


def nat_attn_kwargs(
    depths: Sequence[int], kernel_size: int = 7, dilations: Sequence[Sequence[int]] | None = None
) -> list[list[dict[str, Any]]]:
    """Per-block ``attn_kwargs`` of a NAT / DiNAT model: ``kernel_size`` everywhere, ``dilations[i][j]`` for block
    ``j`` of stage ``i`` (all 1 when ``None``).

    Raises:
        ValueError: ``dilations`` does not have one list per stage with one entry per block.
    """
    if dilations is None:
        return [[{"kernel_size": kernel_size}] * d for d in depths]
    ok = (
        isinstance(dilations, Sequence)
        and len(dilations) == len(depths)
        and all(isinstance(s, Sequence) and len(s) == d for s, d in zip(dilations, depths, strict=False))
    )
    if not ok:
        raise ValueError(
            f"dilations={dilations!r} must hold one list per stage with one dilation per block ({depths=}); "
            "give dilations along with new depths"
        )
    return [[{"kernel_size": kernel_size, "dilation": d} for d in stage] for stage in dilations]


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_NAT_KEYS = [
    (r"^patch_embed\.", "stem."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma1$", r"stages.\1.blocks.\2.ls1.gamma"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma2$", r"stages.\1.blocks.\2.ls2.gamma"),
    (r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks."),
]


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: HierarchicalBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' NAT / DiNAT checkpoints (``patch_embed.*``, ``levels.i.blocks.j.{attn.rpb, gamma1, ...}``,
    ``levels.i.downsample.*`` at the END of level ``i``) onto ours (``stem.*``, ``stages.i.blocks.j.{attn.rpb,
    ls1.gamma, ...}``, ``stages.{i+1}.downsample.*`` at the START of the next stage), then fit it to ``model``
    (``rpb`` resized bicubically to another kernel size). Our own checkpoints pass through unchanged.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
    """
    state_dict = _unwrap(state_dict)
    if any(k.startswith("levels.") for k in state_dict):
        state_dict = hierarchical.rename_level_keys(
            state_dict,
            _NAT_KEYS,
            downsample=r"^levels\.(\d+)\.downsample\.(.+)$",
            downsample_to="stages.{stage}.downsample.{rest}",
        )
    return hierarchical.checkpoint_filter_fn(state_dict, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(pretrained_cfg, first_conv="stem.proj.0")


_NAT = {"paper_ids": "arXiv:2204.07143", "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer"}
_DINAT = {
    "paper_ids": "arXiv:2209.15001",
    "origin_url": "https://github.com/SHI-Labs/Neighborhood-Attention-Transformer",
}
_NAT_URL = "https://shi-labs.com/projects/nat/checkpoints/CLS/{}.pth"
_DINAT_URL = "https://shi-labs.com/projects/dinat/checkpoints/imagenet1k/{}.pth"

default_cfgs = generate_default_cfgs(
    {
        "nat_mini.in1k": _cfg(_NAT_URL.format("nat_mini"), **_NAT),
        "nat_tiny.in1k": _cfg(_NAT_URL.format("nat_tiny"), **_NAT),
        "nat_small.in1k": _cfg(_NAT_URL.format("nat_small"), **_NAT),
        "nat_base.in1k": _cfg(_NAT_URL.format("nat_base"), **_NAT),
        "dinat_mini.in1k": _cfg(_DINAT_URL.format("dinat_mini_in1k_224"), **_DINAT),
        "dinat_tiny.in1k": _cfg(_DINAT_URL.format("dinat_tiny_in1k_224"), **_DINAT),
        "dinat_small.in1k": _cfg(_DINAT_URL.format("dinat_small_in1k_224"), **_DINAT),
        "dinat_base.in1k": _cfg(_DINAT_URL.format("dinat_base_in1k_224"), **_DINAT),
        "dinat_large.in22k_ft_in1k": _cfg(_DINAT_URL.format("dinat_large_in22k_in1k_224"), **_DINAT),
        # Fine-tuned at 384 px (classification/configs/dinat_large_384.yml: crop_pct 1.0), dilations for its grids.
        "dinat_large.in22k_ft_in1k_384": _cfg(
            _DINAT_URL.format("dinat_large_in22k_in1k_384"), input_size=(3, 384, 384), crop_pct=1.0, **_DINAT
        ),
    }
)


def _create_nat(
    variant: str,
    pretrained: bool = False,
    kernel_size: int = 7,
    dilations: Sequence[Sequence[int]] | None = None,
    **kwargs: Any,
) -> HierarchicalBackbone:
    """Build a NAT / DiNAT variant; ``kernel_size`` and ``dilations`` become the blocks' ``attn_kwargs`` (unless
    ``attn_kwargs`` is given)."""
    if "attn_kwargs" not in kwargs:
        kwargs["attn_kwargs"] = nat_attn_kwargs(kwargs["depths"], kernel_size, dilations)
    kwargs.setdefault("attn_layer", "neighborhood")
    return hierarchical.create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


def _args(kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """An entrypoint's published settings, each overridable by the caller's keywords (``depths`` checked first: the
    per-block settings are built from it)."""
    args = {**defaults, **kwargs}
    args["depths"] = check_depths(args["depths"])
    return args


_MINI = dict(embed_dim=64, depths=(3, 4, 6, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_TINY = dict(embed_dim=64, depths=(3, 4, 18, 5), num_heads=(2, 4, 8, 16), mlp_ratio=3.0, drop_path_rate=0.2)
_SMALL = dict(embed_dim=96, depths=(3, 4, 18, 5), num_heads=(3, 6, 12, 24), mlp_ratio=2.0, drop_path_rate=0.3)
_BASE = dict(embed_dim=128, depths=(3, 4, 18, 5), num_heads=(4, 8, 16, 32), mlp_ratio=2.0, drop_path_rate=0.5)
_LARGE = dict(embed_dim=192, depths=(3, 4, 18, 5), num_heads=(6, 12, 24, 48), mlp_ratio=2.0, drop_path_rate=0.35)
# DiNAT at 224 px: the stage grids 56, 28, 14, 7 divided by the kernel size 7.
_STAGE_DILATIONS = (8, 4, 2, 1)


def dinat_dilations(depths: Sequence[int], stage_dilations: Sequence[int] = _STAGE_DILATIONS) -> list[list[int]]:
    """DiNAT's layout: in stage ``i`` the blocks alternate dilation 1 (even blocks) and ``stage_dilations[i]`` (odd
    blocks). For the published depths this is exactly the authors' tables, e.g. ``[1, 8, 1]``, ``[1, 4, 1, 4]``,
    ``[1, 2, ..., 1, 2]``, ``[1] * 5`` for DiNAT-Mini.

    Raises:
        ValueError: ``stage_dilations`` does not have one entry per stage.
    """
    if len(stage_dilations) != len(depths):
        raise ValueError(f"{stage_dilations=} needs one dilation per stage ({depths=})")
    return [[1 if j % 2 == 0 else d for j in range(depth)] for depth, d in zip(depths, stage_dilations, strict=True)]


def _dinat(variant: str, kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """DiNAT settings: alternating dilations (:func:`dinat_dilations`) for the depths in use, unless the caller
    gives ``dilations`` or ``attn_kwargs``. A tag trained at another size (``dinat_large.in22k_ft_in1k_384``) takes
    the authors' rule for its grids, stage grid // 7 (``dinat_large_384``: 13, 6, 3, 1)."""
    args = _args(kwargs, **defaults)
    if "dilations" not in kwargs and "attn_kwargs" not in kwargs:
        depths = args["depths"]
        if isinstance(depths, Sequence) and len(depths) == len(_STAGE_DILATIONS):
            size = hierarchical.tag_input_size(variant, kwargs)[0]
            stage = _STAGE_DILATIONS if size == 224 else tuple(max(1, (size // 4 >> i) // 7) for i in range(4))
            args["dilations"] = dinat_dilations(depths, stage)
        # other stage counts: the model's own checks (or nat_attn_kwargs) name the mismatch
    return args


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def nat_mini(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """NAT-Mini: 64 wide, depths 3-4-6-5, 7x7 neighborhood attention with rpb (20M params, 2.7 GMACs)."""
    return _create_nat("nat_mini", pretrained, **_args(kwargs, **_MINI))


@register_model
def nat_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """NAT-Tiny: 64 wide, depths 3-4-18-5 (28M params, 4.3 GMACs)."""
    return _create_nat("nat_tiny", pretrained, **_args(kwargs, **_TINY))


@register_model
def nat_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """NAT-Small: 96 wide, depths 3-4-18-5, MLP ratio 2, LayerScale 1e-5 (51M params, 7.8 GMACs)."""
    return _create_nat("nat_small", pretrained, **_args(kwargs, **_SMALL, init_values=1e-5))


@register_model
def nat_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """NAT-Base: 128 wide, depths 3-4-18-5, MLP ratio 2, LayerScale 1e-5 (90M params, 13.7 GMACs)."""
    return _create_nat("nat_base", pretrained, **_args(kwargs, **_BASE, init_values=1e-5))


@register_model
def dinat_mini(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """DiNAT-Mini: NAT-Mini with dilations 1/8, 1/4, 1/2, 1 alternating per block (20M params, 2.7 GMACs)."""
    return _create_nat("dinat_mini", pretrained, **_dinat("dinat_mini", kwargs, **_MINI))


@register_model
def dinat_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """DiNAT-Tiny: NAT-Tiny with alternating dilations (28M params, 4.3 GMACs)."""
    return _create_nat("dinat_tiny", pretrained, **_dinat("dinat_tiny", kwargs, **_TINY))


@register_model
def dinat_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """DiNAT-Small: NAT-Small with alternating dilations and no LayerScale (51M params, 7.8 GMACs)."""
    return _create_nat("dinat_small", pretrained, **_dinat("dinat_small", kwargs, **_SMALL))


@register_model
def dinat_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """DiNAT-Base: NAT-Base with alternating dilations, LayerScale 1e-5 (90M params, 13.7 GMACs)."""
    return _create_nat("dinat_base", pretrained, **_dinat("dinat_base", kwargs, **_BASE, init_values=1e-5))


@register_model
def dinat_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """DiNAT-Large (ImageNet-22k, fine-tuned on 1k at 224 px): 192 wide, 6-12-24-48 heads (200M params, 30.6 GMACs)."""
    return _create_nat("dinat_large", pretrained, **_dinat("dinat_large", kwargs, **_LARGE))
