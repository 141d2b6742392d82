"""Converter methods: option validation and the per-layer cores that call :mod:`visionlin.kernels`.

A core is an ``nn.Module`` registered on the converted attention module as ``visionlin_core``: its trained parameters
(SLA's projection, hybrid's mix, LinFusion's input MLPs) live on the attention module, so a later processor swap
(LoRA, IP-Adapter, ``set_default_attn_processor``) cannot drop them. No attention math lives here: each core calls one
kernel op.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    block_sparse_attention,
    hybrid_attention,
    linear_attention,
    pooled_agent_attention,
    softmax_attention,
    sparse_linear_attention,
)
from ..kernels.sparse_linear import SLA_FEATURE_MAPS, SLA_VARIANTS

__all__ = ["CORE_ATTR", "METHODS", "build_core", "linfusion_filter_fn", "validate_options"]

CORE_ATTR = "visionlin_core"

# Per method: option -> default. ``None`` defaults are resolved by :func:`validate_options`.
METHODS: dict[str, dict[str, Any]] = {
    "dense": {},
    "sparse": {"sparsity": 0.5, "block_size": 64, "dense_above_timestep": None},
    "sla": {
        "sparsity": 0.95,
        "k_low": None,
        "variant": "paper",
        "block_size": 64,
        "feature_map": "softmax",
        "dense_above_timestep": None,
    },
    "hybrid": {"kernel_size": 7, "dilation": 1, "feature_map": "elu", "dense_above_timestep": None},
    "linear": {"feature_map": "elu", "eps": 1e-4, "mid_dim_scale": 1},
    "agent": {"pool": 2, "k_scale2": 0.3, "k_shortcut": 0.075, "dense_above_timestep": None},
}
# Feature maps of the linear parts that are positive (the "divide" normalisation needs positive scores).
_POSITIVE_MAPS = ("elu", "relu", "sigmoid")


def _finite(x: numbers.Real) -> bool:
    """``math.isfinite`` that answers False for an int too large for a float (it raised OverflowError)."""
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _ints(name: str, value: Any, *, odd: bool = False) -> int | list[int]:
    """An int >= 1 or a list of 1 to 3 such (one per grid axis), JSON-ready; odd where ``odd``."""
    values = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    ok = (
        isinstance(values, list | tuple)
        and 1 <= len(values) <= 3
        and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 and (x % 2 == 1 or not odd)
            for x in values
        )
    )
    if not ok:
        kind = "an odd int >= 1" if odd else "an int >= 1"
        raise ValueError(f"{name}={value!r} must be {kind} or a list of 1 to 3 such (one per token-grid axis)")
    return int(value) if isinstance(value, numbers.Integral) else [int(x) for x in values]


def _block_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1:
        return int(value), int(value)
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1 for x in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(
        f"block_size={value!r} must be a positive int or a (block_q, block_k) pair of positive ints "
        "(the SLA paper uses 64; its code 64 or 128 queries and 64 keys)"
    )


def _fraction(name: str, value: Any, *, high_open: bool = True) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)
    if not ok or value < 0 or (value >= 1 if high_open else value > 1):
        raise ValueError(f"{name}={value!r} must be a number in [0, 1{')' if high_open else ']'}")
    return float(value)


def validate_options(method: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The complete, JSON-serialisable option dict for ``method`` (defaults filled in).

    Raises:
        ValueError: unknown method or option, or a value out of range (named in the message).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method={method!r}; choose one of {sorted(METHODS)}")
    allowed = METHODS[method]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method={method!r}; it takes {sorted(allowed) or 'none'}")
    out = {**allowed, **options}
    if "sparsity" in out:
        out["sparsity"] = _fraction("sparsity", out["sparsity"])
    if "block_size" in out:
        out["block_size"] = list(_block_pair(out["block_size"]))
    t = out.get("dense_above_timestep")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not _finite(t):
            raise ValueError(f"dense_above_timestep={t!r} must be a finite number (the model's timestep units) or None")
        out["dense_above_timestep"] = float(t)
    if method == "hybrid":
        out["kernel_size"] = _ints("kernel_size", out["kernel_size"], odd=True)
        out["dilation"] = _ints("dilation", out["dilation"])
    if method in ("hybrid", "linear") and out["feature_map"] not in _POSITIVE_MAPS:
        raise ValueError(f"unknown feature_map={out['feature_map']!r} for method={method!r}; choose one of "
                         f"{list(_POSITIVE_MAPS)}")  # fmt: skip
    if method == "linear":
        e = out["eps"]
        if isinstance(e, bool) or not isinstance(e, numbers.Real) or not _finite(e) or e <= 0:
            raise ValueError(f"eps={e!r} must be a finite number > 0 (added to the mean-normalised denominator)")
        out["eps"] = float(e)
        m = out["mid_dim_scale"]
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"mid_dim_scale={m!r} must be an int >= 1 (MLP width = input channels // mid_dim_scale)")
        out["mid_dim_scale"] = int(m)
    if method == "agent":
        out["pool"] = _ints("pool", out["pool"])
        for name in ("k_scale2", "k_shortcut"):
            x = out[name]
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not _finite(x):
                raise ValueError(f"{name}={x!r} must be a finite number")
            out[name] = float(x)
        # (k_scale2=-1e10 overflowed scale ** k_scale2 at the first forward; k_shortcut=1e308 is inf in float32)
        if abs(out["k_scale2"]) > 16:
            raise ValueError(
                f"k_scale2={out['k_scale2']!r} must be in [-16, 16]: the broadcast logits are scaled by "
                "scale ** k_scale2 (scale = head_dim ** -0.5), which overflows beyond (the authors use 0.3)"
            )
        if abs(out["k_shortcut"]) > torch.finfo(torch.float32).max:
            raise ValueError(f"k_shortcut={out['k_shortcut']!r} is not representable in float32")
    if method == "sla":
        if out["variant"] not in SLA_VARIANTS:
            raise ValueError(f"unknown variant={out['variant']!r}; choose one of {SLA_VARIANTS}")
        if not isinstance(out["feature_map"], str) or out["feature_map"] not in SLA_FEATURE_MAPS:  # ([] unhashable)
            raise ValueError(f"unknown feature_map={out['feature_map']!r}; choose one of {sorted(SLA_FEATURE_MAPS)}")
        if out["k_low"] is None:
            out["k_low"] = min(0.10, out["sparsity"]) if out["variant"] == "paper" else 0.0
        out["k_low"] = _fraction("k_low", out["k_low"])
        if out["variant"] == "code" and out["k_low"] != 0:
            raise ValueError(
                f"variant='code' skips no blocks (linear attention over all keys); got k_low={out['k_low']}"
            )
        if out["k_low"] > out["sparsity"] + 1e-12:
            raise ValueError(
                f"k_low={out['k_low']} (skipped blocks) must not exceed sparsity={out['sparsity']} "
                "(the non-critical blocks)"
            )
    return out


class _Core(nn.Module):
    """Holds one layer's method and options; ``grid`` is set by the family's pre-forward hook (Python ints).

    ``forward(q, k, v, scale, additional_keys=None, additional_values=None)``: heads-last image tokens, plus keys
    attended densely by every query (joint attention's text tokens), merged exactly into the softmax part.
    """

    method = ""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__()
        self.options = dict(options)
        self.grid: tuple[int, ...] | None = None
        self.text_len = 0  # joint attention: text tokens in the sequence (Flux single blocks cannot see it)
        self.dense_now = False  # dense warm-up: set per forward from the timestep (option dense_above_timestep)

    def check_tokens(self, n: int, name: str) -> None:
        if self.grid is not None and math.prod(self.grid) != n:
            raise ValueError(
                f"{name}: {n} tokens do not match the token grid {self.grid} the model's forward published; call the "
                "converted attention through its model's forward (the grid comes from the model inputs)"
            )

    def require_grid(self) -> tuple[int, ...]:
        if self.grid is None:
            raise ValueError(
                f"method={self.method!r} needs the token grid, which the model's pre-forward hook publishes; call the "
                "converted attention through its model's forward"
            )
        return self.grid

    def qk_delta(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What this method adds to the stock query and key projections of the tokens ``x`` ``[B, N, C]`` (before
        q / k norms and RoPE), as ``[B, N, heads * head_dim]`` each; ``None``: nothing (every method but
        ``linear``)."""
        return None

    def extra_repr(self) -> str:
        return f"method={self.method!r}, options={self.options}"


def _dense(q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
    if additional_keys is not None:
        k, v = torch.cat([k, additional_keys], 1), torch.cat([v, additional_values], 1)
    return softmax_attention(q, k, v, scale=scale)


class DenseCore(_Core):
    """The stock computation, routed through the converter: softmax attention."""

    method = "dense"

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        return _dense(q, k, v, scale, additional_keys, additional_values)


class SparseCore(_Core):
    """Training-free block top-k sparse attention (keeps ``1 - sparsity`` of the key blocks per query block)."""

    method = "sparse"

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        if self.dense_now:
            return _dense(q, k, v, scale, additional_keys, additional_values)
        bq, bk = self.options["block_size"]
        return block_sparse_attention(
            q, k, v, topk=1.0 - self.options["sparsity"], block_q=bq, block_k=bk, scale=scale,
            additional_keys=additional_keys, additional_values=additional_values,
        )  # fmt: skip


class SLACore(_Core):
    """Sparse-linear attention with its learnable, zero-initialised projection ``proj`` (``head_dim -> head_dim``,
    shared by the heads, float32 as in the released code)."""

    method = "sla"

    def __init__(self, options: dict[str, Any], head_dim: int, device: torch.device | None = None) -> None:
        super().__init__(options)
        self.proj = nn.Linear(head_dim, head_dim, device=device, dtype=torch.float32)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        if self.dense_now:  # dense warm-up: the stock attention, no linear branch
            return _dense(q, k, v, scale, additional_keys, additional_values)
        o = self.options
        bq, bk = o["block_size"]
        return sparse_linear_attention(
            q, k, v, self.proj.weight, self.proj.bias, topk=1.0 - o["sparsity"], k_low=o["k_low"], block_q=bq,
            block_k=bk, feature_map=o["feature_map"], variant=o["variant"], scale=scale,
            additional_keys=additional_keys, additional_values=additional_values,
        )  # fmt: skip


def _per_axis(
    name: str, value: int | list[int], grid: tuple[int, ...], *, spatial_int: bool = False
) -> tuple[int, ...]:
    """An option given as one int or one per grid axis, for this grid; with ``spatial_int`` an int leaves a video
    grid's time axis at 1."""
    if isinstance(value, int):
        if spatial_int and len(grid) == 3:
            return (1, value, value)
        return (value,) * len(grid)
    if len(value) != len(grid):
        raise ValueError(f"{name}={value} gives {len(value)} axes but the token grid {grid} has {len(grid)}")
    return tuple(value)


class HybridCore(_Core):
    """Neighbourhood softmax on the token grid plus global linear attention, mixed per head by ``gate`` ``[H]``
    (float32, zero-initialised: a fresh conversion is local attention only)."""

    method = "hybrid"

    def __init__(self, options: dict[str, Any], heads: int, device: torch.device | None = None) -> None:
        super().__init__(options)
        self.gate = nn.Parameter(torch.zeros(heads, device=device, dtype=torch.float32))

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        if self.dense_now:
            return _dense(q, k, v, scale, additional_keys, additional_values)
        grid = self.require_grid()
        o = self.options
        kernel, dilation = _per_axis("kernel_size", o["kernel_size"], grid), _per_axis("dilation", o["dilation"], grid)
        return hybrid_attention(
            q, k, v, grid, kernel, self.gate, dilation=dilation, feature_map=o["feature_map"], scale=scale,
            additional_keys=additional_keys, additional_values=additional_values,
        )  # fmt: skip


def _mlp(dim: int, mid: int, device) -> nn.Sequential:
    """LinFusion's non-linear projection (``to_q_`` / ``to_k_``): Linear, LayerNorm, LeakyReLU, Linear; the last
    layer zero-initialised here, so a fresh conversion uses the stock projections unchanged."""
    mlp = nn.Sequential(
        nn.Linear(dim, mid, device=device), nn.LayerNorm(mid, device=device), nn.LeakyReLU(),
        nn.Linear(mid, dim, device=device),
    )  # fmt: skip
    nn.init.zeros_(mlp[3].weight)
    nn.init.zeros_(mlp[3].bias)
    return mlp


def _qk_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock query and key projection matrices ``[inner, C]`` (split from a fused ``to_qkv`` where fused)."""
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        w = attn.to_qkv.weight
        inner = w.shape[0] // 3
        return w[:inner], w[inner : 2 * inner]
    return attn.to_q.weight, attn.to_k.weight


class LinearCore(_Core):
    """LinFusion's generalised linear attention (arXiv 2409.02097): ``q = to_q(x + mlp_q(x))``, ``k = to_k(x +
    mlp_k(x))`` with the module's own (stock) projections, elu + 1 features, mean-normalised
    (:func:`~visionlin.kernels.linear_attention`, ``normalize="divide"``, ``eps`` 1e-4). The MLPs' parameters are
    float32; with half-precision activations they compute in that dtype under autocast, else in float32."""

    method = "linear"

    def __init__(self, options: dict[str, Any], dim: int, device: torch.device | None = None) -> None:
        super().__init__(options)
        mid = max(1, dim // options["mid_dim_scale"])
        self.mlp_q = _mlp(dim, mid, device)
        self.mlp_k = _mlp(dim, mid, device)

    def qk_delta(self, attn, x):
        # to_q is affine: to_q(x + m(x)) = to_q(x) + W_q m(x), so the stock (possibly fused) projection is reused.
        wq, wk = _qk_weights(attn)
        if x.dtype in (torch.float16, torch.bfloat16):
            # Half-precision activations: the products in their dtype (tensor cores; autocast keeps the LayerNorm's
            # statistics in float32). In float32 the two MLPs and W_q, W_k cost more than dense attention itself at
            # Wan2.1's 32,760 tokens (its linear step was 0.73x dense).
            with torch.autocast(x.device.type, dtype=x.dtype):
                dq, dk = F.linear(self.mlp_q(x), wq), F.linear(self.mlp_k(x), wk)
            return dq.to(x.dtype), dk.to(x.dtype)
        dt = self.mlp_q[0].weight.dtype  # float32 unless the user cast the model
        xf = x.to(dt)
        dq = F.linear(self.mlp_q(xf), wq.to(dt)).to(x.dtype)
        dk = F.linear(self.mlp_k(xf), wk.to(dt)).to(x.dtype)
        return dq, dk

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        # Joint attention: the text keys join the linear attention's keys (there is no softmax part to merge into).
        if additional_keys is not None:
            k, v = torch.cat([k, additional_keys], 1), torch.cat([v, additional_values], 1)
        o = self.options
        return linear_attention(q, k, v, feature_map=o["feature_map"], normalize="divide", scale=1.0, eps=o["eps"])


def linfusion_filter_fn(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map one LinFusion ``GeneralizedLinearAttention``'s keys (``to_q_.0.weight``, ...) onto a :class:`LinearCore`
    (``mlp_q.0.weight``, ...); the stock ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` keys belong to the attention
    module and are dropped."""
    out = {}
    for key, value in state_dict.items():
        head, _, rest = key.partition(".")
        if head in ("to_q_", "to_k_"):
            out[f"mlp_{head[3]}.{rest}"] = value
    return out


class AgentCore(_Core):
    """AgentSD's training-free agent attention: agents pooled from the queries over ``pool`` cells of the grid
    (an int pools the spatial axes and keeps video frames apart), broadcast logits scaled by ``scale ** k_scale2``,
    plus ``k_shortcut * v`` (:func:`~visionlin.kernels.pooled_agent_attention`)."""

    method = "agent"

    def forward(self, q, k, v, scale, additional_keys=None, additional_values=None) -> torch.Tensor:
        if self.dense_now:
            return _dense(q, k, v, scale, additional_keys, additional_values)
        grid = self.require_grid()
        o = self.options
        return pooled_agent_attention(
            q, k, v, grid, _per_axis("pool", o["pool"], grid, spatial_int=True), scale=scale,
            broadcast_scale=scale ** o["k_scale2"], shortcut=o["k_shortcut"], additional_keys=additional_keys,
            additional_values=additional_values,
        )  # fmt: skip


def _proj_in_features(attn: nn.Module) -> int:
    proj = attn.to_q if getattr(attn, "to_q", None) is not None else attn.to_qkv
    return int(proj.in_features)


def build_core(
    method: str,
    options: dict[str, Any],
    head_dim: int,
    device: torch.device | None,
    attn: nn.Module | None = None,
) -> _Core:
    """A fresh core for one layer (options already validated); ``attn`` (the attention module) sizes the
    ``hybrid`` gate (its heads) and the ``linear`` MLPs (its input channels)."""
    if method == "sla":
        return SLACore(options, head_dim, device)
    if method in ("hybrid", "linear") and attn is None:
        raise ValueError(f"method={method!r} needs the attention module to size its parameters")
    if method == "hybrid":
        return HybridCore(options, int(attn.heads), device)
    if method == "linear":
        return LinearCore(options, _proj_in_features(attn), device)
    return {"dense": DenseCore, "sparse": SparseCore, "agent": AgentCore}[method](options)
