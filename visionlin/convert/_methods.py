"""Converter methods: option validation and the per-layer cores that call :mod:`visionlin.kernels`.

A core is an ``nn.Module`` registered on the converted attention module as ``visionlin_core``: its trained parameters
(SLA's projection) live on the attention module, so a later processor swap (LoRA, IP-Adapter,
``set_default_attn_processor``) cannot drop them. No attention math lives here: each core calls one kernel op.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels import block_sparse_attention, softmax_attention, sparse_linear_attention
from ..kernels.sparse_linear import SLA_FEATURE_MAPS, SLA_VARIANTS

__all__ = ["CORE_ATTR", "METHODS", "build_core", "validate_options"]

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
}


def _block_pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, value
    if (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)
    ):
        return int(value[0]), int(value[1])
    raise ValueError(
        f"block_size={value!r} must be a positive int or a (block_q, block_k) pair of positive ints "
        "(the SLA paper uses 64; its code 64 or 128 queries and 64 keys)"
    )


def _fraction(name: str, value: Any, *, high_open: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
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
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
            raise ValueError(f"dense_above_timestep={t!r} must be a finite number (the model's timestep units) or None")
        out["dense_above_timestep"] = float(t)
    if method == "sla":
        if out["variant"] not in SLA_VARIANTS:
            raise ValueError(f"unknown variant={out['variant']!r}; choose one of {SLA_VARIANTS}")
        if out["feature_map"] not in SLA_FEATURE_MAPS:
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


def build_core(method: str, options: dict[str, Any], head_dim: int, device: torch.device | None) -> _Core:
    """A fresh core for one layer (options already validated)."""
    if method == "sla":
        return SLACore(options, head_dim, device)
    return {"dense": DenseCore, "sparse": SparseCore}[method](options)
