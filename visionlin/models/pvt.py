"""FLatten-PVT and Agent-PVT: PVT v1 (Wang et al., ICCV 2021) with focused linear attention (FLatten, Han et al.,
ICCV 2023, arXiv 2308.00442) or agent attention (Han et al., ECCV 2024, arXiv 2312.08874) in every block.

Both are :class:`~visionlin.models.hierarchical.HierarchicalBackbone`: a 4x4 patch stem and 2x2 patch-embedding
downsamplers (convolution, then LayerNorm with eps 1e-5), a learned position embedding per stage added after its patch
embedding (``stage_pos_embed``), pre-norm blocks (LayerNorm eps 1e-6, MLP ratios 8-8-4-4, widths 64-128-320-512 with
1-2-5-8 heads), no final norm, average pooling and a linear classifier. The entrypoints pin the authors'
configurations (LeapLabTHU/FLatten-Transformer ``models/flatten_pvt.py``, LeapLabTHU/Agent-Attention
``agent_transformer/models/agent_pvt.py`` with their ``config.py`` defaults):

* every block is linear (``LLLL`` / ``AAAA``) and attends over its whole stage map. The authors' configurations set
  ``PVT_LA_SR_RATIOS`` / ``agent_sr_ratios`` to ``1111``: no spatial reduction of keys and values (the ``sr_ratios``
  8-4-2-1 they also pass belong to the softmax PVT and are unused); a checkpoint with a reduction branch (``sr.*``) is
  refused with the keys named;
* FLatten-PVT builds a final ``norm`` and never applies it (the lines are commented out): its keys are dropped on
  loading; Agent-PVT has none;
* position tables (the stages' ``pos_embed``, FLatten's key ``positional_encoding``, Agent's ``ah/aw/ha/wa`` biases)
  are sized for the stage grids at ``img_size`` and resampled to any other grid, so any input whose sides are
  multiples of 32 runs (the authors' code is locked to 224 px).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from . import hierarchical
from ._common import pretrained_cfg
from .hierarchical import HierarchicalBackbone, create_hierarchical
from .vit import _unwrap

__all__ = ["checkpoint_filter_fn"]


# Checkpoint conversion ------------------------------------------------------------------------------------------------
def _rename(key: str) -> str | None:
    """One of the authors' PVT keys -> ours (``None``: dropped)."""
    if key.startswith("norm."):  # FLatten-PVT's final norm, built but never applied
        return None
    if m := re.match(r"^patch_embed(\d+)\.(.+)$", key):
        stage = int(m.group(1)) - 1
        return f"stem.{m.group(2)}" if stage == 0 else f"stages.{stage}.downsample.{m.group(2)}"
    if m := re.match(r"^pos_embed(\d+)$", key):
        return f"stages.{int(m.group(1)) - 1}.pos_embed"
    if m := re.match(r"^block(\d+)\.(.+)$", key):
        return f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}"
    return key


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: HierarchicalBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' FLatten-PVT / Agent-PVT checkpoints onto ours, then fit them to ``model``.

    ``patch_embed1.*`` -> ``stem.*``; ``patch_embed{k}.*`` -> ``stages.{k-1}.downsample.*``; ``pos_embed{k}`` ->
    ``stages.{k-1}.pos_embed``; ``block{k}.j.*`` -> ``stages.{k-1}.blocks.j.*`` (the attention's separate ``q`` and
    ``kv`` projections fused into ``qkv`` by the layers); FLatten-PVT's unused ``norm.*`` dropped. Position tables
    saved for other grids are resampled. Our own checkpoints pass through unchanged.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
        NotImplementedError: an Agent-PVT checkpoint with spatial reduction (``sr_ratio > 1``).
    """
    state_dict = _unwrap(state_dict)
    if any(k.startswith(("patch_embed1.", "block1.")) for k in state_dict):
        state_dict = {new: v for k, v in state_dict.items() if (new := _rename(k)) is not None}
    return hierarchical.checkpoint_filter_fn(state_dict, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(pretrained_cfg, first_conv="stem.proj")


_FLATTEN = {"paper_ids": "arXiv:2308.00442", "origin_url": "https://github.com/LeapLabTHU/FLatten-Transformer"}
_AGENT = {"paper_ids": "arXiv:2312.08874", "origin_url": "https://github.com/LeapLabTHU/Agent-Attention"}
_NO_WEIGHTS = {"notes": ("no released weights (the authors' README lists FLatten-PVT-T only)",)}
# The authors' README links (TsinghuaCloud).
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"

default_cfgs = generate_default_cfgs(
    {
        "flatten_pvt_tiny.in1k": _cfg(_TSINGHUA.format("3ab1d773f19d45648690"), **_FLATTEN),
        "flatten_pvt_small.in1k": _cfg(**_FLATTEN, **_NO_WEIGHTS),
        "flatten_pvt_medium.in1k": _cfg(**_FLATTEN, **_NO_WEIGHTS),
        "flatten_pvt_large.in1k": _cfg(**_FLATTEN, **_NO_WEIGHTS),
        "agent_pvt_tiny.in1k": _cfg(_TSINGHUA.format("13fdf0e0a7c5498c934f"), **_AGENT),
        "agent_pvt_small.in1k": _cfg(_TSINGHUA.format("36b8be9a8863456685a3"), **_AGENT),
        "agent_pvt_medium.in1k": _cfg(_TSINGHUA.format("4d00ecacf18b45f9b88c"), **_AGENT),
        "agent_pvt_medium.in1k_256": _cfg(_TSINGHUA.format("654df734121643b19c52"), input_size=(3, 256, 256), **_AGENT),
        "agent_pvt_large.in1k": _cfg(_TSINGHUA.format("040cfe0cfbbe4762ad09"), **_AGENT),
    }
)


def _create_pvt(
    variant: str, pretrained: bool, kwargs: dict[str, Any], agent_num: Sequence[int] | None = None, **defaults: Any
) -> HierarchicalBackbone:
    """Build a PVT variant: the published settings (``defaults``), each overridable by the caller's ``kwargs``.
    ``agent_num`` (one per stage) becomes the agent blocks' ``attn_kwargs`` unless ``attn_kwargs`` is given."""
    args = dict(
        embed_dim=(64, 128, 320, 512),
        num_heads=(1, 2, 5, 8),
        mlp_ratio=(8.0, 8.0, 4.0, 4.0),
        qkv_bias=True,
        stem_type="patch",
        downsample_type="patch",
        stage_pos_embed=True,
        norm_eps=1e-6,
        embed_norm_layer=nn.LayerNorm,
        head_norm_layer=nn.Identity,
        **defaults,
    )
    args.update(kwargs)
    if "agent_num" in kwargs and "attn_kwargs" in kwargs:  # (a TypeError from the backbone's constructor)
        raise ValueError(f"{variant}: give agent_num inside attn_kwargs, or agent_num without attn_kwargs, not both")
    if agent_num is not None and "attn_kwargs" not in kwargs:
        agents = args.pop("agent_num", agent_num)
        if isinstance(agents, Sequence) and not isinstance(agents, str):
            args["attn_kwargs"] = [{"agent_num": n} for n in agents]
        else:
            args["attn_kwargs"] = {"agent_num": agents}
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **args)


_FLATTEN_ARGS = {"attn_layer": "flatten", "attn_kwargs": {"focusing_factor": 3.0, "dwc_kernel": 5}}
_AGENT_NUM = (9, 16, 49, 49)
_T = {"depths": (2, 2, 2, 2), "drop_path_rate": 0.1}
_S = {"depths": (3, 4, 6, 3), "drop_path_rate": 0.1}
_M = {"depths": (3, 4, 18, 3), "drop_path_rate": 0.3}
_L = {"depths": (3, 8, 27, 3), "drop_path_rate": 0.3}


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def flatten_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-PVT-T: depths 2-2-2-2, focused linear attention everywhere (12.2M params, 2.0 GFLOPs, 77.8% top-1)."""
    return _create_pvt("flatten_pvt_tiny", pretrained, kwargs, **_T, **_FLATTEN_ARGS)


@register_model
def flatten_pvt_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-PVT-S: depths 3-4-6-3 (21.7M params, 4.0 GFLOPs, 81.7% top-1)."""
    return _create_pvt("flatten_pvt_small", pretrained, kwargs, **_S, **_FLATTEN_ARGS)


@register_model
def flatten_pvt_medium(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-PVT-M: depths 3-4-18-3 (about 7 GFLOPs in the paper's figure)."""
    return _create_pvt("flatten_pvt_medium", pretrained, kwargs, **_M, **_FLATTEN_ARGS)


@register_model
def flatten_pvt_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-PVT-L (the authors' ``flatten_pvt_large``, "PVT-B" in their README): depths 3-8-27-3."""
    return _create_pvt("flatten_pvt_large", pretrained, kwargs, **_L, **_FLATTEN_ARGS)


@register_model
def agent_pvt_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-PVT-T: depths 2-2-2-2, agent attention everywhere with 9-16-49-49 agents (11.6M params, 2.0 GFLOPs,
    78.4% top-1)."""
    return _create_pvt("agent_pvt_tiny", pretrained, kwargs, _AGENT_NUM, attn_layer="agent", **_T)


@register_model
def agent_pvt_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-PVT-S: depths 3-4-6-3 (20.6M params, 4.0 GFLOPs, 82.2% top-1)."""
    return _create_pvt("agent_pvt_small", pretrained, kwargs, _AGENT_NUM, attn_layer="agent", **_S)


@register_model
def agent_pvt_medium(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-PVT-M: depths 3-4-18-3 (35.9M params, 7.0 GFLOPs, 83.4% top-1)."""
    return _create_pvt("agent_pvt_medium", pretrained, kwargs, _AGENT_NUM, attn_layer="agent", **_M)


@register_model
def agent_pvt_large(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-PVT-L: depths 3-8-27-3 (48.7M params, 10.4 GFLOPs, 83.7% top-1)."""
    return _create_pvt("agent_pvt_large", pretrained, kwargs, _AGENT_NUM, attn_layer="agent", **_L)
