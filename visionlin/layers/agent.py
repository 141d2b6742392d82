"""Agent attention token mixer (Han et al., ECCV 2024), with every part of the authors' module.

Parts: fused ``qkv``; ``n`` agents by adaptive average pooling of the grid tokens' queries to ``(sqrt(n), sqrt(n))``;
the aggregation bias (agents x keys) ``bilinear(an_bias) + ah_bias + aw_bias`` and the broadcast bias (queries x agents)
``bilinear(na_bias)^T + ha_bias + wa_bias``; ``ac_bias`` / ``ca_bias`` for prefix (class) tokens; a per-channel
depthwise convolution ``dwc`` on the grid tokens' value map; ``proj``. The math of the two softmaxes is
:func:`visionlin.kernels.agent_attention`.

The authors' ``ah/aw/ha/wa`` tables are sized by the window they were built for (``bias_size``). Where the forward grid
differs, ours resamples them along their spatial axis (linear, ``align_corners=False``) instead of failing; at
``bias_size`` nothing is resampled and the output is the authors'.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import torch
from timm.layers import register_notrace_function, trunc_normal_
from torch import nn

from ..kernels.agent import agent_attention
from ..kernels.agent_bias import agent_position_biases
from ..kernels.conv import token_depthwise_conv2d
from ..kernels.pool import token_adaptive_avg_pool2d
from ._base import TokenMixer, check_tokens, depthwise_taps, merge_heads, split_heads
from ._cache import cached, frozen_key
from ._recompute import call_recomputing
from ._registry import register_attn

__all__ = ["AgentAttention", "pool_tokens", "resample_agent_biases"]

#: Side of the ``an_bias`` / ``na_bias`` tables (bilinearly resized to the grid), as the authors.
BASE_BIAS_SIZE = 7

_POOL = "token_adaptive_avg_pool2d"
_BIASES = "agent_position_biases"

# Name -> (dim holding the spatial axis, index into (H, W)) of the grid-sized tables.
_AXIS_TABLES = {"ah_bias": (3, 0), "aw_bias": (4, 1), "ha_bias": (2, 0), "wa_bias": (3, 1)}


def _linear_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[n_out, n_in]``: ``F.interpolate(mode="linear", align_corners=False)`` from ``n_in`` to ``n_out`` samples as a
    matrix (PyTorch's source index ``max((i + 0.5) n_in / n_out - 0.5, 0)``, its two neighbours and weights)."""
    src = ((torch.arange(n_out, device=device, dtype=dtype) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.to(dtype)
    m = torch.zeros(n_out, n_in, device=device, dtype=dtype)
    m.scatter_add_(1, lo[:, None], (1 - frac)[:, None])
    return m.scatter_add_(1, hi[:, None], frac[:, None])


@register_notrace_function
def _resample_axis(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Linear (``align_corners=False``) resampling of the grid-sized table ``t`` along ``dim`` to ``size``, in float32
    (or ``t``'s wider dtype) with autocast off, returned in ``t``'s dtype. One matrix product: PyTorch's 1-D
    interpolation kernel runs a thread per output position over every row, 91 us per call for these ``h * n``-row tables
    at 1024 px on the H200 (3.7 of Agent-Swin-T's 100 ms forward, ``profile_agent_1024_e5191ee.log``)."""
    if t.shape[dim] == size:
        return t
    dt = torch.promote_types(t.dtype, torch.float32)
    # (no autocast on the meta device: a model built there and resized, or traced for its shapes)
    with torch.autocast(t.device.type, enabled=False) if t.device.type != "meta" else contextlib.nullcontext():
        out = torch.matmul(t.movedim(dim, -1).to(dt), _linear_matrix(t.shape[dim], size, t.device, dt).t())
    return out.to(t.dtype).movedim(-1, dim)


@register_notrace_function
def pool_tokens(
    x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int], *, backend: str | None = None
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of a token grid: ``x`` ``[B, H*W, C]`` (row-major, any strides) -> ``[B, oh*ow, C]``
    in ``x``'s dtype, by :func:`visionlin.kernels.pool.token_adaptive_avg_pool2d` (its backends: ``"triton"``,
    ``"torch"``, ``"reference"``; ``None`` picks the first that can run)."""
    return token_adaptive_avg_pool2d(x, feat_size, out_size, backend=backend)


# An FX leaf for timm's tracer: its backend choice inspects the tables.
register_notrace_function(agent_position_biases)


def resample_agent_biases(state_dict: Mapping[str, torch.Tensor], new_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Resample every ``ah_bias`` / ``aw_bias`` / ``ha_bias`` / ``wa_bias`` of a state dict to ``new_size``.

    Works on a layer's own state dict or on a whole model's (any key ending in ``.ah_bias`` etc.); every other entry
    is passed through. Resampling is linear along the table's spatial axis with ``align_corners=False`` (the same as
    :class:`AgentAttention` does on the fly); a table already of the new size is returned unchanged.

    Args:
        state_dict: Tensors keyed by parameter name; ``ah_bias`` is ``[1, h, n, H, 1]``, ``aw_bias``
            ``[1, h, n, 1, W]``, ``ha_bias`` ``[1, h, H, 1, n]``, ``wa_bias`` ``[1, h, 1, W, n]``.
        new_size: Target grid ``(H, W)``.

    Returns:
        A new dict with the resampled tables.

    Raises:
        ValueError: ``new_size`` is not two positive ints, or a table is not 5-D.
    """
    new_size = tuple(int(s) for s in new_size)
    if len(new_size) != 2 or min(new_size) < 1:
        raise ValueError(f"new_size must be (H, W) with H, W >= 1, got {new_size=}")
    out = {}
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name in _AXIS_TABLES:
            dim, axis = _AXIS_TABLES[name]
            if value.ndim != 5:
                raise ValueError(f"{key}: expected a 5-D agent bias table, got shape {tuple(value.shape)}")
            value = _resample_axis(value, new_size[axis], dim)
        out[key] = value
    return out


#: Largest ``heads x agents x H x W`` whose position biases :meth:`AgentAttention.position_biases` keeps between
#: inference forwards (8 MiB per float32 bias, 4 MiB in bfloat16: DeiT-S holds 57,624 at 224 px and 1,204,224 at
#: 1024 px, where its twelve layers keep 58 MiB of bfloat16 biases (peak 719 MiB at batch 16 before, the twin 858)
#: instead of rebuilding ~12 kernels' worth per layer and forward; 2048 px (4.8 M) rebuilds them).
_BIAS_CACHE_ELEMENTS = 1 << 21


@register_attn("agent")
class AgentAttention(TokenMixer):
    """Agent attention with the authors' position biases and depthwise convolution.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``h``.
        qkv_bias: Bias on ``qkv``.
        qk_norm: Not supported (``NotImplementedError``).
        attn_drop: Dropout on both attention weight matrices (as the authors).
        proj_drop: Dropout after ``proj``.
        norm_layer: Unused (``qk_norm`` is not supported).
        agent_num: Number of agents ``n``; must be a perfect square (pooled to ``sqrt(n) x sqrt(n)``).
        bias_size: Grid ``(H, W)`` the ``ah/aw/ha/wa`` tables are sized for (the authors' window).
        num_prefix_tokens: Prefix (class) tokens the layer is built for; ``> 0`` creates ``ac_bias`` ``[1, h, n, P]``
            and ``ca_bias`` ``[1, h, P, n]`` (Agent-DeiT's class-token biases for ``P = 1``).
        dwc_kernel: Kernel size of the per-channel depthwise convolution on the values (the authors: 3).
        device: Parameter device.
        dtype: Parameter dtype.
    """

    kernel_ops = ("agent_attention",)

    size_dependent = True
    grid_kwarg = "bias_size"
    prefix_kwarg = "num_prefix_tokens"

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
        agent_num: int = 49,
        bias_size: tuple[int, int] = (14, 14),
        num_prefix_tokens: int = 0,
        dwc_kernel: int = 3,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("AgentAttention does not support qk_norm=True")
        pool = math.isqrt(agent_num) if agent_num >= 1 else 0
        if agent_num < 1 or pool * pool != agent_num:
            raise ValueError(f"{agent_num=} must be a perfect square (the agents are pooled to a square grid)")
        bias_size = tuple(int(s) for s in bias_size)
        if len(bias_size) != 2 or min(bias_size) < 1:
            raise ValueError(f"bias_size must be (H, W) with H, W >= 1, got {bias_size=}")
        if num_prefix_tokens < 0:
            raise ValueError(f"{num_prefix_tokens=} must be >= 0")
        if dwc_kernel < 1 or dwc_kernel % 2 == 0:
            raise ValueError(f"{dwc_kernel=} must be a positive odd integer")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"{attn_drop=} must be in [0, 1)")
        dd = {"device": device, "dtype": dtype}
        h, n = num_heads, agent_num
        self.agent_num = agent_num
        self.pool_size = (pool, pool)
        self.bias_size = bias_size
        self.num_prefix_tokens = num_prefix_tokens
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, dwc_kernel, padding=dwc_kernel // 2, groups=dim, **dd)
        hb, wb = bias_size
        self.an_bias = nn.Parameter(torch.zeros(h, n, BASE_BIAS_SIZE, BASE_BIAS_SIZE, **dd))
        self.na_bias = nn.Parameter(torch.zeros(h, n, BASE_BIAS_SIZE, BASE_BIAS_SIZE, **dd))
        self.ah_bias = nn.Parameter(torch.zeros(1, h, n, hb, 1, **dd))
        self.aw_bias = nn.Parameter(torch.zeros(1, h, n, 1, wb, **dd))
        self.ha_bias = nn.Parameter(torch.zeros(1, h, hb, 1, n, **dd))
        self.wa_bias = nn.Parameter(torch.zeros(1, h, 1, wb, n, **dd))
        if num_prefix_tokens:
            self.ac_bias = nn.Parameter(torch.zeros(1, h, n, num_prefix_tokens, **dd))
            self.ca_bias = nn.Parameter(torch.zeros(1, h, num_prefix_tokens, n, **dd))
        else:
            self.register_parameter("ac_bias", None)
            self.register_parameter("ca_bias", None)
        self.reset_bias_parameters()

    def reset_bias_parameters(self) -> None:
        """Initialise every position bias as the authors: truncated normal, std 0.02."""
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            trunc_normal_(p, std=0.02)
        if self.ac_bias is not None:
            trunc_normal_(self.ac_bias, std=0.02)
            trunc_normal_(self.ca_bias, std=0.02)

    def position_biases(
        self, feat_size: tuple[int, int], num_prefix_tokens: int = 0, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two attention biases for a ``feat_size`` grid, in ``dtype`` when given (SDPA takes its float masks in
        the queries' dtype), by :func:`visionlin.kernels.agent_bias.agent_position_biases` (on CUDA one Triton kernel
        forward and one backward, the cast included; the layer's backend picks the op's where it has one of that name).

        They depend on the parameters and the grid only: without gradients, in plain eager mode, biases of at most
        ``_BIAS_CACHE_ELEMENTS`` elements are kept for the next forward of the same grid, prefix count and autocast
        state while no bias parameter has changed (their version counters and storages are part of the key). As ~20
        small PyTorch ops they cost ~0.25 ms of host time per layer and forward on the H200 host where the 224 px
        forwards were host-bound (``host_stacks_infer_82bd4d0.log``).

        Returns:
            ``agent_bias`` ``[1, h, n, P + H*W]`` (agents x keys) and ``query_bias`` ``[1, h, P + H*W, n]``
            (queries x agents), prefix tokens first.
        """
        key = self._bias_cache_key(feat_size, num_prefix_tokens)
        build = lambda: self._position_biases(feat_size, num_prefix_tokens, dtype)  # noqa: E731
        if dtype is None:
            return cached(self, "biases", key, build)
        return cached(self, "biases_cast", None if key is None else (*key, dtype), build)

    def _bias_cache_key(self, feat_size: tuple[int, int], num_prefix_tokens: int) -> tuple | None:
        """The cache key of :meth:`position_biases` (:func:`visionlin.layers._cache.frozen_key`), or ``None`` where
        nothing may be cached (gradients, tracing, compiling, CUDA-graph capture, large grids)."""
        hh, ww = feat_size
        if (
            not (type(hh) is int and type(ww) is int)
            or self.num_heads * self.agent_num * hh * ww > _BIAS_CACHE_ELEMENTS
        ):
            return None
        device = self.an_bias.device
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        params = (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias, self.ac_bias,
                  self.ca_bias)  # fmt: skip
        return frozen_key(*params, extra=(hh, ww, num_prefix_tokens, autocast))

    def _position_biases(
        self, feat_size: tuple[int, int], num_prefix_tokens: int, dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ah, aw, ha, wa = (
            _resample_axis(getattr(self, name), feat_size[axis], dim) for name, (dim, axis) in _AXIS_TABLES.items()
        )
        # built without prefix biases: prefix tokens attend and are attended unbiased (the op pads zeros)
        prefix = (self.ac_bias, self.ca_bias) if num_prefix_tokens and self.ac_bias is not None else (None, None)
        return agent_position_biases(
            self.an_bias, self.na_bias, ah, aw, ha, wa, *prefix, num_prefix_tokens=num_prefix_tokens, dtype=dtype,
            backend=self.helper_backend(_BIASES),
        )  # fmt: skip

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, P + H*W, C] -> [B, P + H*W, C]``; prefix tokens first, then the grid in row-major order.

        Raises:
            ValueError: The token count does not match ``feat_size`` and ``num_prefix_tokens``, or the layer was built
                with prefix-token biases for a different ``num_prefix_tokens``.
        """
        name = type(self).__name__
        check_tokens(x, feat_size, num_prefix_tokens, name, self.dim)
        if self.num_prefix_tokens and num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(
                f"{name}: built with prefix-token biases for {self.num_prefix_tokens} prefix tokens "
                f"(ac_bias/ca_bias), called with {num_prefix_tokens=}"
            )
        feat_size = (int(feat_size[0]), int(feat_size[1]))
        p = num_prefix_tokens
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, N, C] each

        pool_backend = self.helper_backend(_POOL)  # the backward's pooling takes the forward's backend

        def pool() -> torch.Tensor:
            return pool_tokens(q[:, p:], feat_size, self.pool_size, backend=pool_backend).contiguous()

        agents = pool()
        # SDPA takes its float masks in the queries' dtype; the automatic choice (the fused kernels in inference, SDPA
        # otherwise) gets them cast once here while they are kept (the fused kernels read half the bytes)
        cast = q.dtype if self.backend in (None, "sdpa") else None
        agent_bias, query_bias = self.position_biases(feat_size, p, dtype=cast)
        # the agents are pooled again in the backward instead of kept: the attention keeps q, which they come from
        out = call_recomputing(
            agents,
            pool,
            agent_attention,
            split_heads(q, self.num_heads),
            split_heads(k, self.num_heads),
            split_heads(v, self.num_heads),
            split_heads(agents, self.num_heads),
            agent_bias=agent_bias,
            query_bias=query_bias,
            scale=self.head_dim**-0.5,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )
        # the kernel in the values' dtype, as autocast gives a Conv2d
        weight, bias = depthwise_taps(self, self.dwc, v.dtype, name="dwc")
        out = token_depthwise_conv2d(
            v,
            weight,
            bias,
            feat_size=feat_size,
            num_prefix_tokens=p,
            residual=merge_heads(out),
            backend=self.helper_backend("token_depthwise_conv2d"),
        )  # attention output + depthwise conv of the value map (prefix rows: attention output only)
        return self.proj_drop(self.proj(out))

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Resample a loaded state dict's ``ah/aw/ha/wa`` tables to this layer's ``bias_size`` (each table's shape
        names its own axis length, so ``old_grid`` is not needed)."""
        return resample_agent_biases(state_dict, self.bias_size)

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Identity for the DeiT / Swin forms; the PVT form's ``q`` + ``kv`` Linears are fused into ``qkv``.

        Raises:
            NotImplementedError: The checkpoint has a spatial-reduction branch (``sr.*``, PVT ``sr_ratio > 1``;
                the authors' configurations use 1).
        """
        sd = dict(state_dict)
        if any(k.startswith(("sr.", "norm.")) for k in sd):
            raise NotImplementedError(
                "AgentAttention does not implement PVT's spatial reduction (sr_ratio > 1): found "
                f"{sorted(k for k in sd if k.startswith(('sr.', 'norm.')))}"
            )
        if "q.weight" in sd and "kv.weight" in sd:
            for kind in ("weight", "bias"):
                if f"q.{kind}" in sd:
                    sd[f"qkv.{kind}"] = torch.cat([sd.pop(f"q.{kind}"), sd.pop(f"kv.{kind}")], dim=0)
        return sd
