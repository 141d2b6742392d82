"""Infinite Self-Attention token mixers (pure and linear), with the authors' parameters.

The authors' module (``infsa.attention.InfSAAttention``) has separate ``q_proj/k_proj/v_proj/out_proj`` Linears with
bias and a scalar ``rho_logit``; we fuse q/k/v into timm's ``qkv`` and rename ``out_proj`` to ``proj``
(:meth:`convert_official_state_dict` does both). The authors detach ``rho = sigmoid(rho_logit)`` (via ``.item()``), so
``rho`` never trains although it is a parameter: our default reproduces that by keeping ``rho_logit`` as a buffer
(a value that is not trained is not a parameter; the state-dict key is the same, so checkpoints load either way);
``learn_rho=True`` makes it a parameter that trains (a tensor op, no host sync, no graph break).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..kernels.infsa import linear_infsa_attention, linear_infsa_context, pure_infsa_attention
from ._base import TokenMixer, check_tokens, merge_heads, split_heads
from ._cache import cached, frozen_key
from ._registry import register_attn

__all__ = ["LinearInfSAAttention", "PureInfSAAttention"]


class _InfSABase(TokenMixer):
    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        rho_init: float = 0.95,
        learn_rho: bool = False,
        eps: float = 1e-6,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if isinstance(rho_init, bool) or not isinstance(rho_init, (int, float)) or not 0.0 < rho_init < 1.0:
            raise ValueError(f"{rho_init=} must be a number in (0, 1) (rho = sigmoid(rho_logit))")
        if attn_drop:
            raise NotImplementedError(f"{type(self).__name__} does not support attention-score dropout ({attn_drop=})")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or nn.LayerNorm
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.learn_rho = learn_rho
        self.eps = eps
        logit = torch.tensor(math.log(rho_init / (1.0 - rho_init)), device=device, dtype=dtype)
        if learn_rho:
            self.rho_logit = nn.Parameter(logit)
        else:
            self.register_buffer("rho_logit", logit)

    def rho(self) -> torch.Tensor:
        """``sigmoid(rho_logit)`` in float32 (a constant unless ``learn_rho``: the authors never train it); kept
        between inference forwards (:mod:`visionlin.layers._cache`)."""
        return cached(self, "rho", frozen_key(self.rho_logit), lambda: torch.sigmoid(self.rho_logit.float()))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = split_heads(self.qkv(x), 3 * self.num_heads).chunk(3, dim=2)
        return self.q_norm(q), self.k_norm(k), v

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fuse the authors' ``q_proj/k_proj/v_proj`` into ``qkv`` and rename ``out_proj`` to ``proj``."""
        sd = dict(state_dict)
        if "q_proj.weight" in sd:
            for kind in ("weight", "bias"):
                parts = [sd.pop(f"{n}_proj.{kind}", None) for n in "qkv"]
                if all(p is not None for p in parts):
                    sd[f"qkv.{kind}"] = torch.cat(parts, dim=0)
        for kind in ("weight", "bias"):
            if f"out_proj.{kind}" in sd:
                sd[f"proj.{kind}"] = sd.pop(f"out_proj.{kind}")
        return sd


@register_attn("infsa")
class LinearInfSAAttention(_InfSABase):
    """Linear InfSA (``O(N D)``): an energy-weighted query summary scores the keys once; see ``kernels.infsa``.

    With the default ``per_query=False`` every token receives the same context vector (the authors' code); token
    identity survives only through the residual path. ``per_query=True`` is our query-dependent option.

    Args:
        dim: Channels ``C``.
        num_heads: Heads ``H``.
        qkv_bias: Bias on ``qkv`` (the authors: always).
        qk_norm: Normalise q and k per head with ``norm_layer``.
        attn_drop: Must be 0 (no attention matrix exists to drop from).
        proj_drop: Dropout after ``proj``.
        norm_layer: Norm used by ``qk_norm``.
        rho_init: Initial ``rho``.
        learn_rho: Let gradients reach ``rho_logit`` (the authors' code does not).
        eps: The authors' ``1e-6`` in both normalisations.
        per_query: Query-dependent output (not in the authors' code).
    """

    kernel_ops = ("linear_infsa_attention", "linear_infsa_context")

    def __init__(self, dim: int, num_heads: int = 8, *args, per_query: bool = False, **kwargs) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        self.per_query = per_query

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, N, C] -> [B, N, C]``; position-free, ``feat_size`` is only validated."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v = self._qkv(x)
        if not self.per_query:
            # Every token gets the same context row: project it once and broadcast (proj is per-token affine, so
            # this equals projecting N copies), then drop out per token as usual.
            ctx = linear_infsa_context(q, k, v, rho=self.rho(), eps=self.eps, backend=self.backend)
            return self.proj_drop(self.proj(merge_heads(ctx)).expand(-1, x.shape[1], -1))
        out = linear_infsa_attention(q, k, v, rho=self.rho(), eps=self.eps, per_query=True, backend=self.backend)
        return self.proj_drop(self.proj(merge_heads(out)))


@register_attn("infsa_pure")
class PureInfSAAttention(_InfSABase):
    """Pure InfSA (``O(N^2)``): ``rho * relu(QK^T/D) / ||.||_F @ V``; see ``kernels.infsa``.

    Args: as :class:`LinearInfSAAttention`, without ``per_query``.
    """

    kernel_ops = ("pure_infsa_attention",)

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """``[B, N, C] -> [B, N, C]``; position-free, ``feat_size`` is only validated."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        q, k, v = self._qkv(x)
        out = pure_infsa_attention(q, k, v, rho=self.rho(), eps=self.eps, backend=self.backend)
        return self.proj_drop(self.proj(merge_heads(out)))
