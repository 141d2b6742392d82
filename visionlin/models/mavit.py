"""MAViT (MALA, "Rectifying Magnitude Neglect in Linear Attention", ICCV 2025) and the backbone it shares with RAVLT
(RALA) and NaLaFormer (NaLa): :class:`RoPEHybridBackbone`.

The authors' three repositories (qhfan/MALA ``classfication_release/model.py``, qhfan/RALA ``classfication/RALA.py``,
ZacharyMeng/NaLaFormer ``NaLaformer/NALA.py``) build one network and differ in the linear token mixer:

* stem: conv 3x3 s2 (``C/2``) -> BN -> GELU -> conv 3x3 -> BN -> GELU -> conv 3x3 -> BN -> GELU -> conv 3x3 s2 (``C``)
  -> BN (stride 4);
* downsampling between stages: conv 3x3 s2 (bias) -> BN;
* blocks: ``x += cpe1(x)`` (depthwise 3x3), ``x += gamma_1 * attn(LN(x))``, [NaLa: ``x += cpe2(x)``],
  ``x += gamma_2 * FFN(LN(x))``, FFN = Linear -> GELU -> ``y + dwconv3x3(y)`` -> Linear; LayerNorm eps 1e-6,
  LayerScale in every block;
* every model's stages 1-2 use the linear mixer, stages 3-4 full softmax attention with the same 2-D RoPE, LePE and
  gate (the authors' ``flagss`` default, not overridden by any variant);
* head: a per-token projection to ``projection`` channels -> BN -> Swish, then average pooling and the classifier.
  The projection belongs to ``forward_features`` here (as timm's EfficientNet ``conv_head``): ``num_features`` is
  ``projection``; ``forward_intermediates`` / ``features_only`` give the four stage outputs.

The hierarchical skeleton's contract (pooling, ``forward_intermediates``, grad checkpointing, classifier reset) is
inherited from :class:`~visionlin.models.hierarchical.HierarchicalBackbone`; stem, stages and head are this family's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..kernels.rope import apply_rope_2d_pair
from ..kernels.softmax import softmax_attention
from ..layers import MagnitudeAwareAttention, NormAwareAttention, PreNorm, RankAugmentedAttention
from ..layers._base import TokenDepthwiseConv2d, check_tokens, merge_heads, split_heads
from ..layers.magnitude import GatedRoPELinearAttention
from ..layers.norm import FAST_PATHS, stem_memory_format
from ._common import check_bool, check_depths, check_int, check_pair, check_positive, check_rate, pretrained_cfg
from .hierarchical import HierarchicalBackbone, TokenBatchNorm, create_hierarchical
from .hierarchical import checkpoint_filter_fn as _hierarchical_filter
from .vit import _unwrap

__all__ = [
    "GatedRoPESoftmaxAttention",
    "NormGatedRoPESoftmaxAttention",
    "RoPEHybridBackbone",
    "checkpoint_filter_fn",
    "mavit_base",
    "mavit_large",
    "mavit_small",
    "mavit_tiny",
]


# Softmax mixers of stages 3-4 -----------------------------------------------------------------------------------------
def rope_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor],
    scale: float | None = None,
    eps: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Softmax attention on 2-D-RoPE-rotated queries and keys, heads-last ``[B, N, H, D]`` (``eps`` unused)."""
    sin, cos = rope
    q, k = apply_rope_2d_pair(q, k, sin, cos, fused=FAST_PATHS["rope_fused"])
    return softmax_attention(q, k, v, scale=scale, backend=backend)


class GatedRoPESoftmaxAttention(GatedRoPELinearAttention):
    """The authors' ``VanillaSelfAttention`` of MAViT / RAVLT: ``proj((softmax(RoPE(q) RoPE(k)^T / sqrt(d)) v +
    lepe(v)) * o)`` with the fused ``qkvo`` projection and the output gate of the linear mixers."""

    kernel = staticmethod(rope_softmax_attention)
    kernel_ops = ("softmax_attention",)


class NormGatedRoPESoftmaxAttention(NormAwareAttention):
    """NaLaFormer's softmax mixer: ``out_proj(LN(softmax(RoPE(q) RoPE(k)^T / sqrt(d)) v + lepe(v)) * SiLU(g))``."""

    kernel_ops = ("softmax_attention",)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, prefix + H*W, C] -> [B, prefix + H*W, C]`` (grid tokens row-major)."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v, g = self.qkvg(x).chunk(4, dim=-1)
        rope = self.rope_tables(feat_size, num_prefix_tokens, x.device, x.dtype)
        out = rope_softmax_attention(
            *(split_heads(t, self.num_heads) for t in (q, k, v)), rope=rope, backend=self.backend
        )
        out = self.add_lepe(merge_heads(out), v, feat_size, num_prefix_tokens)
        return self.proj_drop(self.out_proj(self.gate_norm(out, g)))


# Blocks and stages ----------------------------------------------------------------------------------------------------
class ConvFFN(nn.Module):
    """``fc2(y + dwconv(y))`` with ``y = GELU(fc1(x))``; tokens ``[B, H*W, C]`` on ``feat_size``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, **dd: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = nn.GELU()
        self.dwconv = TokenDepthwiseConv2d(hidden, 3, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        y = self.act(self.fc1(x))
        return self.drop(self.fc2(self.dwconv(y, feat_size, y)))  # y + dwconv(y), one pass


class RoPEHybridBlock(nn.Module):
    """``x += cpe1(x)``; ``x += gamma_1 * attn(norm1(x))``; [``x += cpe2(x)``]; ``x += gamma_2 * ffn(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_cls: type[nn.Module],
        mlp_ratio: float,
        drop_path: float,
        init_values: float,
        two_cpe: bool,
        proj_drop: float = 0.0,
        norm_eps: float = 1e-6,
        **dd: Any,
    ) -> None:
        super().__init__()
        self.cpe1 = TokenDepthwiseConv2d(dim, 3, **dd)
        self.norm1 = PreNorm(dim, eps=norm_eps, **dd)  # feeds only the mixer's projections
        self.attn = attn_cls(dim, num_heads, qkv_bias=True, proj_drop=proj_drop, **dd)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
        self.cpe2 = TokenDepthwiseConv2d(dim, 3, **dd) if two_cpe else None
        self.norm2 = PreNorm(dim, eps=norm_eps, **dd)  # feeds only the ConvFFN's first Linear
        self.ffn = ConvFFN(dim, int(mlp_ratio * dim), drop=proj_drop, **dd)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values), **dd))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, H*W, C]`` on ``feat_size`` in and out."""
        x = self.cpe1(x, feat_size, x)  # x + cpe1(x), one pass
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x), feat_size, 0))
        if self.cpe2 is not None:
            x = self.cpe2(x, feat_size, x)
        return x + self.drop_path(self.gamma_2 * self.ffn(self.norm2(x), feat_size))


class ConvBNStem(nn.Module):
    """Images ``[B, C_in, H, W]`` -> ``[B, H/4, W/4, C]``: four 3x3 convolutions (strides 2, 1, 1, 2) with BN."""

    stride = 4

    def __init__(self, in_chans: int, dim: int, **dd: Any) -> None:
        super().__init__()
        half = dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1, **dd),
            nn.BatchNorm2d(half, **dd),
            nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1, **dd),
            nn.BatchNorm2d(half, **dd),
            nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1, **dd),
            nn.BatchNorm2d(half, **dd),
            nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1, **dd),
            nn.BatchNorm2d(dim, **dd),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(stem_memory_format(x)).permute(0, 2, 3, 1)


class ConvBNDownsample(nn.Module):
    """Conv 3x3 s2 (bias) -> BN, ``[B, H, W, C_in] -> [B, ceil(H/2), ceil(W/2), C]`` (the authors' PatchMerging)."""

    def __init__(self, dim_in: int, dim: int, **dd: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim_in, dim, 3, 2, 1, **dd)
        self.norm = nn.BatchNorm2d(dim, **dd)

    @staticmethod
    def output_size(size: tuple[int, int]) -> tuple[int, int]:
        return (size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the permuted [B, H, W, C] tokens are a channels-last view: the convolution and BatchNorm run channels-last
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class RoPEHybridStage(nn.Module):
    """Optional :class:`ConvBNDownsample`, then ``depth`` :class:`RoPEHybridBlock` on the stage's grid."""

    def __init__(self, dim_in: int, dim: int, depth: int, downsample: bool, drop_path: Sequence[float], **kw: Any):
        super().__init__()
        dd = {"device": kw.get("device"), "dtype": kw.get("dtype")}
        self.downsample = ConvBNDownsample(dim_in, dim, **dd) if downsample else None
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(RoPEHybridBlock(dim, drop_path=drop_path[j], **kw) for j in range(depth))

    def output_size(self, feat_size: tuple[int, int]) -> tuple[int, int]:
        return feat_size if self.downsample is None else self.downsample.output_size(feat_size)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``[B, H*W, C_in]`` on ``feat_size`` -> tokens ``[B, H'*W', C]`` on :meth:`output_size`."""
        if self.downsample is not None:
            x = self.downsample(x.unflatten(1, (feat_size[0], feat_size[1]))).flatten(1, 2)
        grid = self.output_size(feat_size)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = checkpoint(blk, x, grid, use_reentrant=False)
            else:
                x = blk(x, grid)
        return x


class ProjectionHead(nn.Module):
    """Per-token ``proj`` (Linear) -> BatchNorm -> Swish: ``[B, N, C] -> [B, N, P]`` (before pooling)."""

    def __init__(self, dim: int, projection: int, **dd: Any) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, projection, **dd)
        self.bn = TokenBatchNorm(projection, **dd)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.proj(x)))


MIXERS: dict[str, dict[str, type[nn.Module]]] = {
    "mala": {"linear": MagnitudeAwareAttention, "softmax": GatedRoPESoftmaxAttention},
    "rala": {"linear": RankAugmentedAttention, "softmax": GatedRoPESoftmaxAttention},
    "nala": {"linear": NormAwareAttention, "softmax": NormGatedRoPESoftmaxAttention},
}


# Model ----------------------------------------------------------------------------------------------------------------
class RoPEHybridBackbone(HierarchicalBackbone):
    """MAViT / RAVLT / NaLaFormer: four stages, the linear mixer where ``stage_types`` says ``"linear"``, RoPE softmax
    attention where it says ``"softmax"``.

    Args:
        img_size: Nominal input size.
        in_chans: Input channels.
        num_classes: Classifier outputs (0 = none).
        global_pool: ``"avg"``, ``"max"``, ``"avgmax"`` or ``""``.
        mixer: Key of :data:`MIXERS` (``"mala"``, ``"rala"``, ``"nala"``).
        embed_dim: Width per stage.
        depths: Blocks per stage.
        num_heads: Heads per stage (``C / heads`` a multiple of 4 for the 2-D RoPE).
        mlp_ratio: FFN width / ``C``, one or per stage.
        stage_types: ``"linear"`` or ``"softmax"`` per stage (the authors: linear, linear, softmax, softmax).
        init_values: LayerScale init, one or per stage.
        projection: Channels of the projection head (``num_features``).
        two_cpe: A second CPE before the FFN (NaLaFormer).
        dynamic_img_size: Accept any input whose sides are multiples of 32.
        dynamic_img_pad: Pad inputs at the bottom / right to multiples of 32 (any size runs without).
        drop_rate: Dropout before the classifier.
        proj_drop_rate: Dropout after attention / FFN projections.
        drop_path_rate: Stochastic depth, linear over all blocks.
        device: Parameter device.
        dtype: Parameter dtype.
    """

    input_multiple = 1  # every stride-2 convolution rounds up, as the authors'

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        mixer: str = "mala",
        embed_dim: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratio: float | Sequence[float] = 3.5,
        stage_types: Sequence[str] = ("linear", "linear", "softmax", "softmax"),
        init_values: float | Sequence[float] = 1.0,
        projection: int = 1024,
        two_cpe: bool = False,
        dynamic_img_size: bool = True,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)
        dd = {"device": device, "dtype": dtype}
        n = len(depths) if isinstance(depths, Sequence) else 0
        if mixer not in MIXERS:
            raise ValueError(f"{mixer=} is not one of {sorted(MIXERS)}")
        per_stage = {}
        for name, value in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("mlp_ratio", mlp_ratio),
            ("stage_types", stage_types),
            ("init_values", init_values),
        ):
            values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name}={value!r} needs one entry per stage ({n} stages, from {depths=})")
            per_stage[name] = values
        bad = [t for t in per_stage["stage_types"] if t not in ("linear", "softmax")]
        if bad:
            raise ValueError(f"stage_types={stage_types!r}: {bad} not in ('linear', 'softmax')")
        if global_pool not in ("", "avg", "avgmax", "max"):
            raise ValueError(f"{global_pool=} is not one of ('', 'avg', 'avgmax', 'max')")
        depths = check_depths(depths)
        dims = per_stage["embed_dim"]
        for i, (c, h) in enumerate(zip(dims, per_stage["num_heads"], strict=True)):
            check_int(f"embed_dim[{i}]", c, minimum=2)
            check_int(f"num_heads[{i}]", h, minimum=1)
            if c % h or (c // h) % 4:
                raise ValueError(f"stage {i}: width {c} / {h} heads must give a head dim that is a multiple of 4")
            check_positive(f"mlp_ratio[{i}]", per_stage["mlp_ratio"][i])
            check_positive(f"init_values[{i}]", per_stage["init_values"][i])
        check_int("in_chans", in_chans, minimum=1)
        check_int("num_classes", num_classes, minimum=0)
        check_int("projection", projection, minimum=1)
        check_bool("two_cpe", two_cpe)
        check_bool("dynamic_img_size", dynamic_img_size)  # ("no" is truthy: it padded and resized)
        check_bool("dynamic_img_pad", dynamic_img_pad)
        for name, value in (("drop_rate", drop_rate), ("proj_drop_rate", proj_drop_rate)):
            check_rate(name, value)
        check_rate("drop_path_rate", drop_path_rate)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dims = tuple(dims)
        self.num_features = self.head_hidden_size = projection
        self.num_prefix_tokens = 0
        self.in_chans = in_chans
        self.img_size = check_pair("img_size", img_size)
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.grad_checkpointing = False
        self._grid_layers: list[str] = []  # (no grid-sized tables: RoPE and the convolutional encodings take any grid)

        self.stem = ConvBNStem(in_chans, dims[0], **dd)
        self.pos_drop = nn.Identity()
        self.stride = self.stem.stride * 2 ** (n - 1)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.stages = nn.ModuleList(
            RoPEHybridStage(
                dims[i - 1] if i else dims[0],
                dims[i],
                depths[i],
                downsample=i > 0,
                drop_path=dpr[sum(depths[:i]) : sum(depths[: i + 1])],
                num_heads=per_stage["num_heads"][i],
                attn_cls=MIXERS[mixer][per_stage["stage_types"][i]],
                mlp_ratio=per_stage["mlp_ratio"][i],
                init_values=per_stage["init_values"][i],
                two_cpe=two_cpe,
                proj_drop=proj_drop_rate,
                **dd,
            )
            for i in range(n)
        )
        self.feature_info = [
            dict(num_chs=dims[i], reduction=self.stem.stride * 2**i, module=f"stages.{i}") for i in range(n)
        ]
        self.norm = ProjectionHead(dims[-1], projection, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(projection, num_classes, **dd) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, **kwargs: Any):
        """Stage outputs as maps (see the skeleton); ``norm`` is ignored: the family has no final norm of the last
        stage (the projection head changes the width), and the final output is :meth:`forward_features`'."""
        kwargs["norm"] = False
        return super().forward_intermediates(x, indices, **kwargs)


# Checkpoint conversion ------------------------------------------------------------------------------------------------
_BLOCK_RENAMES = (("norm1.norm.", "norm1."), ("norm2.norm.", "norm2."), ("pos.", "cpe1."))


def _flat(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1) if v.ndim == 4 else v


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: RoPEHybridBackbone, strict: bool = True
) -> dict[str, torch.Tensor]:
    """The authors' checkpoints of MAViT (qhfan/MALA), RAVLT (qhfan/RALA) and NaLaFormer (ZacharyMeng/NaLaFormer)
    -> our names (our own checkpoints pass through): ``patch_embed.proj`` -> ``stem.proj``; ``layers.i.blocks.j``
    -> ``stages.i.blocks.j`` (``pos`` -> ``cpe1``, ``normX.norm`` -> ``normX``, 1x1 convolutions -> Linear,
    ``gamma_X`` ``[1, C, 1, 1]`` -> ``[C]``); ``layers.i.downsample.reduction`` / ``.norm`` ->
    ``stages.{i+1}.downsample.conv`` / ``.norm``; ``proj`` / ``norm`` -> ``norm.proj`` / ``norm.bn``; the 1x1 conv
    ``head`` -> Linear. ``layers.i.RoPE.angle`` is dropped (the layers build their tables). EMA / ``model`` wrappers
    are unwrapped.

    Raises:
        ValueError: unknown, missing or mis-shaped keys after mapping (all named).
    """
    sd = _unwrap(state_dict)
    if not any(k.startswith(("layers.", "patch_embed.")) for k in sd):
        return _hierarchical_filter(sd, model, strict)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k.startswith("patch_embed."):
            out["stem." + k[len("patch_embed.") :]] = v
        elif m := re.match(r"^layers\.(\d+)\.RoPE\.angle$", k):
            continue
        elif m := re.match(r"^layers\.(\d+)\.downsample\.(reduction|norm)\.(.+)$", k):
            sub = "conv" if m.group(2) == "reduction" else "norm"
            out[f"stages.{int(m.group(1)) + 1}.downsample.{sub}.{m.group(3)}"] = v
        elif m := re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", k):
            rest = m.group(3)
            for old, new in _BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
            if rest.startswith("gamma_"):
                v = v.flatten()
            elif rest.startswith("ffn.fc"):
                v = _flat(v)
            out[f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"] = v
        elif k.startswith("proj."):
            out["norm." + k] = _flat(v)
        elif k.startswith("norm."):
            out["norm.bn." + k[len("norm.") :]] = v
        elif k.startswith("head."):
            out[k] = _flat(v)
        else:
            out[k] = v
    return _hierarchical_filter(out, model, strict)


# Configurations -------------------------------------------------------------------------------------------------------
_cfg = partial(pretrained_cfg, first_conv="stem.proj.0", pool_size=(7, 7), crop_pct=0.9)


_MAVIT = {
    "paper_ids": "arXiv:2507.00698",
    "origin_url": "https://github.com/qhfan/MALA",
    "hf_hub_id": "aldjalkdf/MAViT",
}


# The authors' ImageNet-1k checkpoints on the Hugging Face hub (qhfan/MALA README: "All models here", the
# aldjalkdf/MAViT repository): MAViT_S.pth and MAViT_L.pth are named in its upload commits; MAViT_T.pth and
# MAViT_B.pth follow the same naming (their commits are not in the sources read). Full training checkpoints (the
# weights under "model", with optimizer and EMA); checkpoint_filter_fn maps the key names.
def hub_cfgs(prefix: str, stem: str, meta: dict) -> dict:
    """``<prefix>_{tiny,small,base,large}.in1k`` configs of the authors' hub files ``<stem>_{T,S,B,L}.pth`` (MAViT and
    RAVLT release theirs alike)."""
    sizes = ("tiny", "small", "base", "large")
    return generate_default_cfgs(
        {f"{prefix}_{s}.in1k": _cfg(hf_hub_filename=f"{stem}_{s[0].upper()}.pth", **meta) for s in sizes}
    )


default_cfgs = hub_cfgs("mavit", "MAViT", _MAVIT)


def create_rope_hybrid(variant: str, pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """Build a MAViT / RAVLT / NaLaFormer variant (``features_only`` gives the four stages)."""
    return create_hierarchical(variant, pretrained, checkpoint_filter_fn, RoPEHybridBackbone, **kwargs)


# Published configurations (the authors' MALA_T/S/B/L; RALA and NaLaFormer use the same shapes).
TINY = dict(embed_dim=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.1)
SMALL = dict(embed_dim=(64, 128, 320, 512), depths=(3, 5, 9, 3), num_heads=(1, 2, 5, 8), drop_path_rate=0.15)
BASE = dict(
    embed_dim=(96, 192, 384, 512),
    depths=(4, 6, 12, 6),
    num_heads=(1, 2, 6, 8),
    drop_path_rate=0.4,
    init_values=(1.0, 1.0, 1e-6, 1e-6),
)
LARGE = dict(
    embed_dim=(96, 192, 448, 640),
    depths=(4, 7, 19, 8),
    num_heads=(1, 2, 7, 10),
    drop_path_rate=0.55,
    init_values=1e-6,
)


@register_model
def mavit_tiny(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """MAViT-T (MALA_T): 64-512 wide, depths 2-2-6-2, MALA in stages 1-2 (16M params, 2.5 GMACs)."""
    return create_rope_hybrid("mavit_tiny", pretrained, **{**TINY, "mixer": "mala", "projection": 2048, **kwargs})


@register_model
def mavit_small(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """MAViT-S (MALA_S): 64-512 wide, depths 3-5-9-3 (27M params, 4.6 GMACs)."""
    return create_rope_hybrid("mavit_small", pretrained, **{**SMALL, "mixer": "mala", "projection": 2048, **kwargs})


@register_model
def mavit_base(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """MAViT-B (MALA_B): 96-512 wide, depths 4-6-12-6 (50M params, 9.9 GMACs)."""
    return create_rope_hybrid("mavit_base", pretrained, **{**BASE, "mixer": "mala", "projection": 2048, **kwargs})


@register_model
def mavit_large(pretrained: bool = False, **kwargs: Any) -> RoPEHybridBackbone:
    """MAViT-L (MALA_L): 96-640 wide, depths 4-7-19-8, projection 2560 (98M params, 16.1 GMACs)."""
    return create_rope_hybrid("mavit_large", pretrained, **{**LARGE, "mixer": "mala", "projection": 2560, **kwargs})
