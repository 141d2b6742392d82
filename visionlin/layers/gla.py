"""ViG's token mixer: bidirectional gated linear attention with 2-D gating locality injection (Liao et al., AAAI 2025,
arXiv 2405.18425), with the authors' parameter names (``in_proj``, ``qkv_proj``, ``gk_proj``, ``g_proj``, ``g_norm``,
``l_norm``, ``o_proj``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import RmsNorm
from torch import nn

from ..kernels.rms_mix import rms_gate_mix
from ..kernels.scan import (
    bidirectional_gated_linear_attention,
    bidirectional_gated_linear_attention_qkv,
    gla_packed_views,
)
from ._base import (
    TokenDepthwiseConv2d,
    TokenMixer,
    check_tokens,
    map_to_tokens,
    merge_heads,
    split_heads,
    tokens_to_map,
)
from ._registry import register_attn

__all__ = ["FAST_PATHS", "GatedLinearAttention2D"]

#: Process-wide switches (written at s48 without a GPU; ``benchmarks/toggle_speed.py``'s configs ``gla_split`` /
#: ``gla_token_conv`` time them against the default):
#:
#: * ``qkv_packed`` (**on** since s51): the projections' outputs go to
#:   :func:`~visionlin.kernels.bidirectional_gated_linear_attention_qkv` packed (the Triton backward writes one gradient
#:   for ``qkv_proj``'s output and one for the gates, instead of the two directions' ten that autograd sums and
#:   concatenates): the op's gpu tests and ViG-T's model parity passed on an H100 (s49-s51), and ViG-S's CUDA-graph
#:   training step took 1.023x with it (``benchmarks/results/h100/s51/toggle_speed_gla_229372b.json``); off, the split
#:   call.
#: * ``token_conv`` (off): the locality convolution on the token layout
#:   (:func:`~visionlin.kernels.token_depthwise_conv2d`: one Triton pass on CUDA) instead of the ``Conv2d`` between
#:   ``tokens_to_map`` and ``map_to_tokens``, whose channel-major output each of the three projections copies (36
#:   ``clone`` ops in ViG-S's compiled forward, traced on meta tensors, ``benchmarks/graph_audit.py``; on a GPU the
#:   layout depends on the convolution cuDNN / ATen picks). GPU-tested (ViG-T's parity, s49-s50), but 1.003x on
#:   ViG-S's CUDA-graph step at s51, within the sweeps' spread: nothing to ship.
FAST_PATHS: dict[str, bool] = {"qkv_packed": True, "token_conv": False}


@register_attn("gla")
class GatedLinearAttention2D(TokenMixer):
    """ViG's bidirectional gated linear attention (BiGLA) over the row-major token sequence.

    1. Locality: ``local = act(DWConv3x3(x))`` on the ``H x W`` grid (``act`` = SiLU if ``use_act_in_conv``; with
       :data:`FAST_PATHS` ``["token_conv"]`` on the token layout, in autocast's dtype as a ``Conv2d``'s); prefix
       tokens (class / register tokens, when used in an isotropic ViT) skip the convolution and lead the sequence.
    2. ``q, k, v = qkv_proj(local)`` (key width ``expand_k * C``, value width ``expand_v * C = C``); direction-wise
       forget gates ``g_fwd, g_bwd = logsigmoid(gk_proj(local)) / gate_logit_normalizer`` (a rank-16 projection).
    3. ``o = (GLA_fwd + GLA_bwd) / 4``: the bidirectional average of
       :func:`~visionlin.kernels.bidirectional_gated_linear_attention`, halved again as the authors' inference code
       does (their training code does not; ``g_norm`` below is scale-free, so the factor only moves its ``eps``).
       With :data:`FAST_PATHS` ``["qkv_packed"]`` the projections' outputs go to
       :func:`~visionlin.kernels.bidirectional_gated_linear_attention_qkv` as they are (the same function).
    4. 2-D gating locality injection: ``o = g_norm(o) * s + l_norm(local) * (1 - s)`` per head with
       ``s = sigmoid(g_proj(local))``; ``SiLU`` if ``use_out_act``; ``o_proj``. (The second halving of step 3 is
       ``g_norm``'s ``eps`` times 4, ``4 * norm_eps``: the same function with one op fewer.) Step 4 is one op,
       :func:`~visionlin.kernels.rms_gate_mix` (one Triton pass forward and one backward on CUDA).

    Constructor compatible with timm's ``Attention``; ``norm_layer`` does not apply (the head norms are RMSNorms, as
    the authors') and is ignored; ``qk_norm`` and ``attn_drop`` raise ``NotImplementedError``.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H`` (key and value widths divisible by it).
        qkv_bias: Bias on ``qkv_proj`` (the authors: none).
        qk_norm: Must be ``False``.
        attn_drop: Must be 0.
        proj_drop: Dropout after ``o_proj``.
        norm_layer: Ignored.
        expand_k: Key width / ``C`` (ViG: 0.5).
        expand_v: Value width / ``C``; must be 1 (the locality branch mixes ``C`` channels into the values).
        gate_low_rank_dim: Rank of the gate projection (ViG: 16).
        gate_logit_normalizer: Divides the log gates (ViG: 16).
        norm_eps: Epsilon of ``l_norm`` and of ``g_norm`` on the halved output (``g_norm.eps`` is ``4 * norm_eps``:
            it takes the output unhalved, the same function).
        use_act_in_conv: SiLU after the depthwise convolution (ViG-T: yes, S/B: no).
        use_out_act: SiLU before ``o_proj`` (ViG-T: yes, S/B: no).
        conv_bias: Bias on the depthwise convolution (the authors: none).
    """

    kernel_ops = ("bidirectional_gated_linear_attention",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-6,
        use_act_in_conv: bool = True,
        use_out_act: bool = True,
        conv_bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("GatedLinearAttention2D does not support qk_norm=True")
        if attn_drop:
            raise NotImplementedError(f"GatedLinearAttention2D has no attention matrix to drop ({attn_drop=})")
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        if value_dim != dim:
            raise ValueError(
                f"GatedLinearAttention2D: the value width int(dim * expand_v) = {value_dim} must equal {dim=} "
                f"(the locality branch is mixed into the values), got {expand_v=}"
            )
        if key_dim < num_heads or key_dim % num_heads:
            raise ValueError(
                f"GatedLinearAttention2D: the key width int(dim * expand_k) = {key_dim} must be a positive multiple "
                f"of {num_heads=} ({expand_k=})"
            )
        if isinstance(gate_low_rank_dim, bool) or not isinstance(gate_low_rank_dim, int) or gate_low_rank_dim < 1:
            raise ValueError(f"GatedLinearAttention2D: {gate_low_rank_dim=} must be an integer >= 1")
        if not gate_logit_normalizer > 0:
            raise ValueError(f"GatedLinearAttention2D: {gate_logit_normalizer=} must be > 0")
        dd = {"device": device, "dtype": dtype}
        self.key_dim, self.value_dim = key_dim, value_dim
        self.head_k_dim, self.head_v_dim = key_dim // num_heads, value_dim // num_heads
        self.gate_logit_normalizer = float(gate_logit_normalizer)
        self.use_out_act = use_out_act
        # (a depthwise Conv2d with the authors' keys that can also convolve the token layout: FAST_PATHS["token_conv"])
        self.in_proj = nn.Sequential(
            TokenDepthwiseConv2d(dim, 3, bias=conv_bias, **dd),
            nn.SiLU() if use_act_in_conv else nn.Identity(),
        )
        self.qkv_proj = nn.Linear(dim, 2 * key_dim + value_dim, bias=qkv_bias, **dd)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False, **dd),
            nn.Linear(gate_low_rank_dim, 2 * key_dim, bias=True, **dd),
        )
        self.o_proj = nn.Linear(value_dim, dim, bias=False, **dd)
        # g_norm(o / 2) with eps: RMSNorm is scale-free but for its eps, so the halving is eps x 4 (one op fewer)
        self.g_norm = RmsNorm(self.head_v_dim, eps=4 * norm_eps, **dd)
        self.l_norm = RmsNorm(self.head_v_dim, eps=norm_eps, **dd)
        self.g_proj = nn.Linear(dim, value_dim, bias=True, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f"key_dim={self.key_dim}, value_dim={self.value_dim}, use_out_act={self.use_out_act}"

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Tokens ``[B, num_prefix_tokens + H*W, C]`` (grid row-major) in and out."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        p = num_prefix_tokens
        conv, act = self.in_proj
        if FAST_PATHS["token_conv"]:
            local = conv(x, feat_size, num_prefix_tokens=p, backend=self.helper_backend("token_depthwise_conv2d"))
            if p:  # prefix tokens skip the convolution (its output has zeros there)
                local = torch.cat([x[:, :p].to(local.dtype), local[:, p:]], dim=1)
            local = act(local)
        else:
            local = act(map_to_tokens(conv._conv_forward(tokens_to_map(x[:, p:], feat_size), conv.weight, conv.bias)))
            if p:
                local = torch.cat([act(x[:, :p]), local], dim=1)
        qkv = self.qkv_proj(local)
        gates = F.logsigmoid(self.gk_proj(local)).to(qkv.dtype) / self.gate_logit_normalizer
        h, scale = self.num_heads, self.head_k_dim**-0.5
        if FAST_PATHS["qkv_packed"]:  # the projections' outputs as they are (one gradient each in the backward)
            o = bidirectional_gated_linear_attention_qkv(qkv, gates, h, scale=scale, backend=self.backend)
        else:  # q, k, v and the two directions' gates as views of the projections' outputs
            views = gla_packed_views(qkv, gates, h)
            o = bidirectional_gated_linear_attention(*views, scale=scale, backend=self.backend)
        # o: [B, L, H, Dv]
        # g_norm(o / 2) * s + l_norm(local) * (1 - s), SiLU'd with use_out_act (elementwise: per head or merged alike)
        o = rms_gate_mix(
            o, split_heads(local, h), split_heads(self.g_proj(local), h), self.g_norm.weight, self.l_norm.weight,
            self.g_norm.eps, self.l_norm.eps, silu=self.use_out_act, backend=self.helper_backend("rms_gate_mix"),
        )  # fmt: skip
        return self.proj_drop(self.o_proj(merge_heads(o)))
