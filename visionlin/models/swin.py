"""FLatten-Swin and Agent-Swin: Swin (Liu et al., ICCV 2021) with focused linear attention (FLatten, Han et al., ICCV
2023, arXiv 2308.00442) or agent attention (Han et al., ECCV 2024, arXiv 2312.08874) in the early stages and Swin's
shifted-window softmax attention in the late ones.

Both are :class:`~visionlin.models.hierarchical.HierarchicalBackbone`: a 4x4 patch stem (convolution, LayerNorm),
Swin's patch merging between stages, pre-norm blocks (LayerNorm eps 1e-5, MLP ratio 4), a final LayerNorm, average
pooling and a linear classifier. The authors' ``attn_type`` string says which mixer each stage uses
(LeapLabTHU/FLatten-Transformer ``models/flatten_swin.py``, LeapLabTHU/Agent-Attention
``agent_transformer/models/agent_swin.py``):

* ``L`` / ``A``: focused linear / agent attention. The authors give these blocks a window of 56 (``WINDOW_SIZE``),
  clipped to the stage map: at their 224-px configurations (and 96 at 384 px, 72 at 288 px) every such block attends
  over its whole stage map, without shift. Ours always attend over the whole stage map, at any input size, with their
  position tables (``positional_encoding``, ``ah/aw/ha/wa`` biases) sized for the stage grids at ``img_size`` and
  resampled to other grids.
* ``S`` / ``B``: Swin's window softmax attention with relative position bias (:class:`~visionlin.layers.
  ShiftedWindowAttention`), window 7, shifted by 3 in the odd blocks of the stage.
* ``M`` + a count ``n`` at the end of the string (Agent-Swin-B's ``AAMB2``): the stage's first ``n`` blocks linear, the
  rest window attention (shift by block index within the stage).

Inputs: any size whose sides are multiples of 32; window stages pad to multiples of the window (padding masked).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model

from . import hierarchical
from ._common import check_depths, pretrained_cfg
from .hierarchical import HierarchicalBackbone, create_hierarchical
from .vit import _unwrap

__all__ = ["checkpoint_filter_fn", "swin_layout"]

_LINEAR = ("L", "A")
_WINDOW = ("S", "B")


def swin_layout(
    attn_type: str,
    depths: Sequence[int],
    linear_layer: str,
    linear_kwargs: Sequence[Mapping[str, Any]] | None = None,
    window_size: int = 7,
) -> tuple[list[list[str]], list[list[dict[str, Any]]]]:
    """Per-block ``attn_layer`` / ``attn_kwargs`` for the authors' ``attn_type`` (e.g. ``"LLSS"``, ``"AAAB"``,
    ``"AAMB2"``).

    Args:
        attn_type: One letter per stage (``L``/``A`` linear, ``S``/``B`` window softmax, ``M`` mixed), then the count
            of linear blocks of the ``M`` stages.
        depths: Blocks per stage.
        linear_layer: Registered name of the linear mixer (``"flatten"``, ``"agent"``).
        linear_kwargs: Keywords of the linear mixer, one dict per stage (``None``: none).
        window_size: Window of the softmax blocks (the authors: 7 at 224 px).

    Raises:
        ValueError: ``attn_type`` has not one known letter per stage, or ``M`` without a count that fits its stage.
    """
    n = len(depths)
    if not isinstance(attn_type, str):  # (an int: "'int' object is not subscriptable")
        raise ValueError(f"{attn_type=} must be a str of one letter per stage (e.g. 'LLSS', 'AAMB2')")
    letters, rest = attn_type[:n], attn_type[n:]
    known = _LINEAR + _WINDOW + ("M",)
    if len(letters) != n or any(c not in known for c in letters) or (rest and not rest.isdigit()):
        raise ValueError(
            f"{attn_type=} must give one of {known} per stage ({n} stages), then the number of linear blocks of "
            "the 'M' stages (e.g. 'AAMB2')"
        )
    mixed = int(rest) if rest else None
    if "M" in letters and mixed is None:
        raise ValueError(f"{attn_type=}: an 'M' stage needs the number of its linear blocks at the end (e.g. 'AAMB2')")
    linear_kwargs = list(linear_kwargs) if linear_kwargs is not None else [{}] * n
    if len(linear_kwargs) != n:
        raise ValueError(f"linear_kwargs needs one dict per stage ({n} stages), got {len(linear_kwargs)}")
    layers, kwargs = [], []
    for i, (letter, depth) in enumerate(zip(letters, depths, strict=True)):
        linear = depth if letter in _LINEAR else 0 if letter in _WINDOW else mixed
        if linear > depth:
            raise ValueError(f"{attn_type=}: stage {i} has {depth} blocks, fewer than the {linear} linear ones asked")
        layers.append([linear_layer if j < linear else "window" for j in range(depth)])
        kwargs.append(
            [
                dict(linear_kwargs[i]) if j < linear else {"window_size": window_size, "shift": j % 2 == 1}
                for j in range(depth)
            ]
        )
    return layers, kwargs


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_KEYS = [
    (r"^patch_embed\.", "stem."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
]


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: HierarchicalBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Map the authors' FLatten-Swin / Agent-Swin checkpoints onto ours, then fit them to ``model``.

    ``patch_embed.*`` -> ``stem.*``; ``layers.i.blocks.j.*`` -> ``stages.i.blocks.j.*``; ``layers.i.downsample.*`` (end
    of level ``i``) -> ``stages.{i+1}.downsample.*`` (start of the next stage; the same neighbour order, no
    permutation); the ``attn_mask`` and ``relative_position_index`` buffers are dropped (ours are computed for the grid
    in use). Position tables saved for other grids are resampled. Our own checkpoints pass through unchanged.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
    """
    state_dict = _unwrap(state_dict)
    if any(k.startswith(("layers.", "patch_embed.")) for k in state_dict):
        state_dict = hierarchical.rename_level_keys(
            {k: v for k, v in state_dict.items() if not re.search(r"\.attn_mask$", k)},
            _KEYS,
            downsample=r"^layers\.(\d+)\.downsample\.(.+)$",
            downsample_to="stages.{stage}.downsample.{rest}",
        )
    return hierarchical.checkpoint_filter_fn(state_dict, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(pretrained_cfg, first_conv="stem.proj")


_FLATTEN = {"paper_ids": "arXiv:2308.00442", "origin_url": "https://github.com/LeapLabTHU/FLatten-Transformer"}
_AGENT = {"paper_ids": "arXiv:2312.08874", "origin_url": "https://github.com/LeapLabTHU/Agent-Attention"}
# The authors' README links (TsinghuaCloud, direct downloads with '?dl=1'): the 224-px weights and the ones fine-tuned
# at 384 / 288 px (their configs flatten_swin_b_384, agent_swin_b_384, agent_swin_s_288: TEST.CROP False).
_TSINGHUA = "https://cloud.tsinghua.edu.cn/f/{}/?dl=1"
_FT = {"crop_pct": 1.0}

default_cfgs = generate_default_cfgs(
    {
        "flatten_swin_tiny.in1k": _cfg(_TSINGHUA.format("e1518e76703e4e57a7f2"), **_FLATTEN),
        "flatten_swin_small.in1k": _cfg(_TSINGHUA.format("94188e52af354bf4a88b"), **_FLATTEN),
        "flatten_swin_base.in1k": _cfg(_TSINGHUA.format("7a9e5186bad04e7fb3a9"), **_FLATTEN),
        "flatten_swin_base.in1k_384": _cfg(
            _TSINGHUA.format("0d0330cf2e5249f1abb6"), input_size=(3, 384, 384), **_FT, **_FLATTEN
        ),
        "agent_swin_tiny.in1k": _cfg(_TSINGHUA.format("a2ddc1190c224f768a41"), **_AGENT),
        "agent_swin_small.in1k": _cfg(_TSINGHUA.format("f607172c9fea4d6e99bb"), **_AGENT),
        "agent_swin_small.in1k_288": _cfg(
            _TSINGHUA.format("09760394e93b4046a25e"), input_size=(3, 288, 288), **_FT, **_AGENT
        ),
        "agent_swin_base.in1k": _cfg(_TSINGHUA.format("4fcd2d0114bb490483c3"), **_AGENT),
        "agent_swin_base.in1k_384": _cfg(
            _TSINGHUA.format("bb84ee9058954706a557"), input_size=(3, 384, 384), **_FT, **_AGENT
        ),
    }
)


def softmax_window(linear_layer: str, img_size: int) -> int:
    """The window of the softmax stages the authors use at ``img_size`` (their ``WINDOW_SIZE`` is the stage-1 grid,
    ``img_size // 4``): FLatten 7, or 12 above 56 (``flatten_swin.py``: 384 px); Agent ``max(7, WINDOW_SIZE // 8)``
    (``agent_swin.py``: 9 at 288 px, 12 at 384 px)."""
    stage1 = img_size // 4
    if linear_layer == "agent":
        return max(7, stage1 // 8)
    return 7 if stage1 <= 56 else 12


def _create_swin(
    variant: str,
    pretrained: bool,
    kwargs: dict[str, Any],
    linear_layer: str,
    linear_kwargs: Mapping[str, Any] | None = None,
    **defaults: Any,
) -> HierarchicalBackbone:
    """Build a Swin variant: the published settings (``defaults``), each overridable by the caller's ``kwargs``.
    ``attn_type``, ``agent_num`` (Agent-Swin, one per stage) and ``softmax_window`` become the blocks' ``attn_layer`` /
    ``attn_kwargs`` (:func:`swin_layout`) unless those are given."""
    args = dict(
        mlp_ratio=4.0,
        qkv_bias=True,
        stem_type="patch",
        downsample_type="merge",
        norm_eps=1e-5,
        softmax_window=softmax_window(linear_layer, hierarchical.tag_input_size(variant, kwargs)[0]),
        **defaults,
    )
    args.update(kwargs)
    attn_type, window = args.pop("attn_type"), args.pop("softmax_window")
    depths = args["depths"] = check_depths(args["depths"])
    per_stage = [dict(linear_kwargs or {}) for _ in depths]
    if "agent_num" in args:
        agents = args.pop("agent_num")
        agents = list(agents) if isinstance(agents, Sequence) else [agents] * len(depths)
        if len(agents) != len(depths):
            raise ValueError(f"agent_num={agents} needs one entry per stage ({len(depths)} stages)")
        per_stage = [{**kw, "agent_num": n} for kw, n in zip(per_stage, agents, strict=True)]
    if "attn_layer" in kwargs:  # the caller's own layout: the published layout's settings do not apply to it
        given = sorted(k for k in ("agent_num", "attn_type") if k in kwargs)
        if given:
            raise ValueError(
                f"{variant}: {given} only apply to the published layout, which attn_layer replaces; give agent_num "
                "through attn_kwargs, or drop attn_layer"
            )
    else:
        # attn_kwargs without attn_layer: keywords for the layout's linear layers (it replaced the whole layout with
        # the backbone's default mixer, and agent_num went unused)
        extra = args.pop("attn_kwargs", None)
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise ValueError(
                    f"{variant}: attn_kwargs={extra!r} without attn_layer must be one dict of keywords for the "
                    f"published layout's {linear_layer!r} layers; per-block lists need attn_layer too"
                )
            per_stage = [{**kw, **extra} for kw in per_stage]
        args["attn_layer"], args["attn_kwargs"] = swin_layout(attn_type, depths, linear_layer, per_stage, window)
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, **args)


_FLATTEN_KW = {"focusing_factor": 3.0, "dwc_kernel": 5}
_AGENT_NUM = (9, 16, 49, 49)
_T = {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.2}
_S = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "drop_path_rate": 0.3}
_B = {"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "drop_path_rate": 0.5}


# Entrypoints ----------------------------------------------------------------------------------------------------------
@register_model
def flatten_swin_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-Swin-T: 96 wide, depths 2-2-6-2, ``LLSS`` (29M params, 4.5 GFLOPs, 82.1% top-1)."""
    return _create_swin("flatten_swin_tiny", pretrained, kwargs, "flatten", _FLATTEN_KW, attn_type="LLSS", **_T)


@register_model
def flatten_swin_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-Swin-S: 96 wide, depths 2-2-18-2, ``LLSS`` (51M params, 8.7 GFLOPs, 83.5% top-1)."""
    return _create_swin("flatten_swin_small", pretrained, kwargs, "flatten", _FLATTEN_KW, attn_type="LLSS", **_S)


@register_model
def flatten_swin_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """FLatten-Swin-B: 128 wide, depths 2-2-18-2, ``LLSS`` (89M params, 15.4 GFLOPs, 83.8% top-1)."""
    return _create_swin("flatten_swin_base", pretrained, kwargs, "flatten", _FLATTEN_KW, attn_type="LLSS", **_B)


@register_model
def agent_swin_tiny(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-Swin-T: 96 wide, depths 2-2-6-2, ``AAAB`` with 9-16-49 agents (29M params, 4.5 GFLOPs, 82.6% top-1)."""
    return _create_swin("agent_swin_tiny", pretrained, kwargs, "agent", attn_type="AAAB", agent_num=_AGENT_NUM, **_T)


@register_model
def agent_swin_small(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-Swin-S: 96 wide, depths 2-2-18-2, ``AABB`` (50M params, 8.7 GFLOPs, 83.7% top-1)."""
    return _create_swin("agent_swin_small", pretrained, kwargs, "agent", attn_type="AABB", agent_num=_AGENT_NUM, **_S)


@register_model
def agent_swin_base(pretrained: bool = False, **kwargs: Any) -> HierarchicalBackbone:
    """Agent-Swin-B: 128 wide, depths 2-2-18-2, ``AAMB2`` (stage 3: 2 agent blocks, then window attention; 88M
    params, 15.4 GFLOPs, 84.0% top-1)."""
    return _create_swin("agent_swin_base", pretrained, kwargs, "agent", attn_type="AAMB2", agent_num=_AGENT_NUM, **_B)
