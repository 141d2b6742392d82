"""MambaVision (Hatamizadeh & Kautz, CVPR 2025, arXiv 2407.08083): a hybrid Mamba-Transformer backbone.

* Stem: two 3x3 stride-2 convolutions with BatchNorm and ReLU (``in_dim``, then ``dim`` channels).
* Stages 1-2: MambaVision's residual conv blocks (conv-BN-GELU-conv-BN).
* Stages 3-4: pre-norm blocks on zero-padded windows (14 and 7 at 224 px, i.e. the whole map there); in a stage of
  ``d`` blocks the first ``ceil(d / 2)`` (odd ``d``: ``d // 2 + 1``) use the MambaVision mixer
  (:class:`~visionlin.layers.MambaVisionMixer`, a selective scan over the window's raster order next to a branch without
  SSM) and the rest multi-head softmax attention.
* Downsampling: 3x3 stride-2 convolution without bias or norm; head: BatchNorm, average pool, linear.

Every model is a :class:`~visionlin.models.hierarchical.HierarchicalBackbone`; the entrypoints pin the configurations
of the authors' ``mambavision/models/mamba_vision.py`` (NVlabs/MambaVision). Their checkpoints (key names
``patch_embed``, ``levels.i.blocks.j.mixer``, ``gamma_1/2``, ``levels.i.downsample``) load through
:func:`checkpoint_filter_fn`. The authors' code and weights are under the NVIDIA Source Code License-NC
(non-commercial); this implementation is written from the architecture description.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from . import hierarchical
from ._common import pretrained_cfg
from .hierarchical import HierarchicalBackbone, TokenBatchNorm
from .vit import _unwrap

__all__ = ["checkpoint_filter_fn", "mambavision_layout"]

_CONV_STAGES = 2


def mambavision_layout(depths: Sequence[int], conv_stages: int = _CONV_STAGES) -> list[list[str]]:
    """Per-block token mixers: conv stages get placeholders (their blocks have none); in a hybrid stage of ``d``
    blocks, blocks ``j < d // 2 + (d % 2)`` are ``"mambavision"`` and the rest ``"softmax"`` (the authors'
    ``transformer_blocks = range(d//2+1, d)`` for odd ``d``, ``range(d//2, d)`` for even ``d``)."""
    layout = []
    for i, d in enumerate(depths):
        first_attention = d // 2 + 1 if d % 2 else d // 2
        kind = (
            ["softmax"] * d
            if i < conv_stages
            else ["mambavision"] * first_attention + ["softmax"] * (d - first_attention)
        )
        layout.append(kind)
    return layout


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_KEYS = [
    (r"^patch_embed\.conv_down\.", "stem.conv_down."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.mixer\.", r"stages.\1.blocks.\2.attn."),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma_1$", r"stages.\1.blocks.\2.ls1.gamma"),
    (r"^levels\.(\d+)\.blocks\.(\d+)\.gamma_2$", r"stages.\1.blocks.\2.ls2.gamma"),
    (r"^levels\.(\d+)\.blocks\.", r"stages.\1.blocks."),
]


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: HierarchicalBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' MambaVision checkpoints onto ours, then fit them to ``model``.

    ``patch_embed.conv_down.*`` -> ``stem.conv_down.*``; ``levels.i.blocks.j.mixer.*`` -> ``stages.i.blocks.j.attn.*``
    (mixer and attention alike); ``gamma_1/2`` -> ``ls1/2.gamma`` (conv blocks keep ``gamma``);
    ``levels.i.downsample.reduction.0.weight`` (end of level ``i``) -> ``stages.{i+1}.downsample.reduction.weight``
    (start of the next stage); a ``module.`` prefix (DistributedDataParallel) is dropped. Our own checkpoints pass
    through unchanged.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
    """
    state_dict = dict(_unwrap(state_dict))
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    if any(k.startswith(("levels.", "patch_embed.")) for k in state_dict):
        state_dict = hierarchical.rename_level_keys(
            state_dict,
            _KEYS,
            downsample=r"^levels\.(\d+)\.downsample\.reduction\.0\.(.+)$",
            downsample_to="stages.{stage}.downsample.reduction.{rest}",
        )
    return hierarchical.checkpoint_filter_fn(state_dict, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(
    pretrained_cfg,
    first_conv="stem.conv_down.0",
    crop_pct=1.0,
    crop_mode="center",
    paper_ids="arXiv:2407.08083",
    origin_url="https://github.com/NVlabs/MambaVision",
    license="other",
    notes=("NVIDIA Source Code License-NC (non-commercial) for the authors' code and weights",),
)


# The authors' checkpoints (NVlabs/MambaVision README and mamba_vision.py default_cfgs): ImageNet-1k, and ImageNet-21k
# pretrained then fine-tuned on ImageNet-1k (B / L at 224 px, L2 at 512 px with windows 8-8-32-16).
_HF = "https://huggingface.co/nvidia/MambaVision-{}-1K/resolve/main/mambavision_{}_1k.pth.tar"
_HF21 = "https://huggingface.co/nvidia/MambaVision-{}-21K/resolve/main/{}.pth.tar"

default_cfgs = generate_default_cfgs(
    {
        "mambavision_tiny.in1k": _cfg(_HF.format("T", "tiny")),
        "mambavision_tiny2.in1k": _cfg(_HF.format("T2", "tiny2"), crop_pct=0.98),
        "mambavision_small.in1k": _cfg(_HF.format("S", "small"), crop_pct=0.93),
        "mambavision_base.in1k": _cfg(_HF.format("B", "base")),
        "mambavision_base.in21k_ft_in1k": _cfg(_HF21.format("B", "mambavision_base_21k")),
        "mambavision_large.in1k": _cfg(_HF.format("L", "large")),
        "mambavision_large.in21k_ft_in1k": _cfg(_HF21.format("L", "mambavision_large_21k")),
        "mambavision_large2.in1k": _cfg(_HF.format("L2", "large2")),
        "mambavision_large2.in21k_ft_in1k_512": _cfg(
            _HF21.format("L2-512", "mambavision_L2_21k_240m_512"),
            input_size=(3, 512, 512),
            crop_pct=0.93,
            crop_mode="squash",
        ),
    }
)


def _create_mambavision(variant: str, pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Build a MambaVision variant. ``in_dim`` is the stem's first width; ``window_size`` takes the authors' four
    entries (those of the conv stages are not used); ``depths`` sets the hybrid layout unless ``attn_layer`` is
    given."""
    depths = kwargs["depths"]
    kwargs["stem_kwargs"] = {"width": kwargs.pop("in_dim"), **kwargs.get("stem_kwargs", {})}
    if "window_size" not in kwargs:  # the authors': stages 3-4 window their whole map at the trained size
        h = hierarchical.tag_input_size(variant, kwargs)[0]
        kwargs["window_size"] = (8, 8, h // 16, h // 32)
    windows = kwargs["window_size"]
    if isinstance(windows, Sequence) and not isinstance(windows, str):
        kwargs["window_size"] = [None if i < _CONV_STAGES else w for i, w in enumerate(windows)]
    if isinstance(depths, Sequence) and all(isinstance(d, int) for d in depths):
        kwargs.setdefault("attn_layer", mambavision_layout(depths))
        kwargs.setdefault("block_type", ["conv" if i < _CONV_STAGES else "transformer" for i in range(len(depths))])
    return hierarchical.create_hierarchical(variant, pretrained, checkpoint_filter_fn, **kwargs)


def _args(kwargs: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """An entrypoint's published settings, each overridable by the caller's keywords."""
    common = dict(
        mlp_ratio=4.0,
        qkv_bias=True,
        stem_type="conv_bn",
        downsample_type="conv_nonorm",
        head_norm_layer=TokenBatchNorm,
        norm_eps=1e-5,
    )
    return {**common, **defaults, **kwargs}


_HEADS = (2, 4, 8, 16)
_HEADS_L = (4, 8, 16, 32)


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def mambavision_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-T: 80 wide (stem 32), depths 1-3-8-4, heads 2-4-8-16 (31.8M params, 4.4 GFLOPs, 82.3% top-1)."""
    args = _args(kwargs, embed_dim=80, in_dim=32, depths=(1, 3, 8, 4), num_heads=_HEADS, drop_path_rate=0.2)
    return _create_mambavision("mambavision_tiny", pretrained, **args)


@register_model
def mambavision_tiny2(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-T2: MambaVision-T with 11 blocks in stage 3 (35.1M params, 5.1 GFLOPs, 82.7% top-1)."""
    args = _args(kwargs, embed_dim=80, in_dim=32, depths=(1, 3, 11, 4), num_heads=_HEADS, drop_path_rate=0.2)
    return _create_mambavision("mambavision_tiny2", pretrained, **args)


@register_model
def mambavision_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-S: 96 wide (stem 64), depths 3-3-7-5 (50.1M params, 7.5 GFLOPs, 83.3% top-1)."""
    args = _args(kwargs, embed_dim=96, in_dim=64, depths=(3, 3, 7, 5), num_heads=_HEADS, drop_path_rate=0.2)
    return _create_mambavision("mambavision_small", pretrained, **args)


@register_model
def mambavision_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-B: 128 wide, depths 3-3-10-5, LayerScale 1e-5 (97.7M params, 15.0 GFLOPs, 84.2% top-1)."""
    args = _args(
        kwargs,
        embed_dim=128,
        in_dim=64,
        depths=(3, 3, 10, 5),
        num_heads=_HEADS,
        drop_path_rate=0.3,
        init_values=1e-5,
    )
    return _create_mambavision("mambavision_base", pretrained, **args)


@register_model
def mambavision_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-L: 196 wide, depths 3-3-10-5, heads 4-8-16-32, LayerScale 1e-5 (227.9M params, 34.9 GFLOPs,
    85.0% top-1)."""
    args = _args(
        kwargs,
        embed_dim=196,
        in_dim=64,
        depths=(3, 3, 10, 5),
        num_heads=_HEADS_L,
        drop_path_rate=0.3,
        init_values=1e-5,
    )
    return _create_mambavision("mambavision_large", pretrained, **args)


@register_model
def mambavision_large2(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """MambaVision-L2: MambaVision-L with 12 blocks in stage 3 (241.5M params, 37.5 GFLOPs, 85.3% top-1)."""
    args = _args(
        kwargs,
        embed_dim=196,
        in_dim=64,
        depths=(3, 3, 12, 5),
        num_heads=_HEADS_L,
        drop_path_rate=0.3,
        init_values=1e-5,
    )
    return _create_mambavision("mambavision_large2", pretrained, **args)
