"""Infinite Self-Attention (Roffo & Palmer, 2026), both forms, non-causal (bidirectional), heads-last ``[B, N, H, D]``.

Pure InfSA (``O(N^2)``)::

    A   = relu(Q K^T / D)                      # note 1/D: the authors scale q and k by D^-1/2 each
    A   = A / (||A||_F + eps)                  # Frobenius norm over the whole N x M matrix of each (batch, head)
    out = rho * A V

Linear InfSA (``O(N D)``), as the authors' code computes it::

    e_n  = ||q_n|| / sqrt(D);   w_n = e_n / (sum_n e_n + eps)
    qbar = sum_n w_n q_n / sqrt(D)             # one energy-weighted query summary per (batch, head)
    a_m  = relu(qbar . k_m / sqrt(D));   a_m = a_m / (sum_m a_m + eps)
    out_n = rho * sum_m a_m v_m                # the SAME vector for every query n (rank-1 attention)

``per_query=True`` is our option (not in the authors' code) that keeps the relu kernel but makes the output depend on
the query: ``out_n = rho * sum_m relu(q_n).relu(k_m) v_m / (sum_m relu(q_n).relu(k_m) + eps)`` (scores scaled by 1/D).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._common import (
    check_flag,
    check_heads_last,
    check_real,
    fp32_reference,
    pow2_floor,
    reference_dtype,
    same_floating_dtype,
    supports_floating,
)
from ._dispatch import Op
from .linear import feature_dtype, linear_attention_triton, scaled_linear_attention, triton_linear_supports

__all__ = [
    "linear_infsa_attention",
    "linear_infsa_attention_reference",
    "linear_infsa_context",
    "linear_infsa_context_reference",
    "pure_infsa_attention",
    "pure_infsa_attention_reference",
]

Rho = float | torch.Tensor


def _check(
    op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rho: Any, eps: Any, per_query: Any = False
) -> None:
    """Shared argument checks of the InfSA ops and their references (``ValueError`` naming the offending values)."""
    check_heads_last(op, q, k, v, same_length=False)
    check_real(op, "eps", eps)
    check_flag(op, "per_query", per_query)
    heads = q.shape[2]
    if isinstance(rho, torch.Tensor):
        if not rho.is_floating_point():
            raise ValueError(f"{op}: rho must be a floating-point tensor, got {rho.dtype=}")
        if tuple(rho.shape) not in ((), (1,), (heads,)):
            raise ValueError(
                f"{op}: rho must be a scalar or one value per head (shape () or [H]=({heads},)), "
                f"got shape {tuple(rho.shape)}"
            )
        if rho.device != q.device and (rho.ndim or rho.device.type != "cpu"):  # (a CPU scalar goes anywhere)
            raise ValueError(f"{op}: rho is on {rho.device} but the queries are on {q.device}")
    else:
        check_real(op, "rho", rho, low=None)


def _rho(rho: Rho, dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """``rho`` (checked by :func:`_check`) as a tensor broadcastable to ``[B, N, H, Dv]``: ``[]`` or ``[H, 1]``."""
    r = torch.as_tensor(rho, dtype=dt, device=device)
    return r[:, None] if r.ndim == 1 else r


def pure_infsa_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rho: Rho = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """Specification of pure InfSA (module docstring), materialised in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rho: Discount ``rho`` (a float, a 0-dim tensor or one value per head ``[H]``).
        eps: Added to the Frobenius norm.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check("pure_infsa_attention", q, k, v, rho, eps)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        d = q.shape[-1]
        a = F.relu(torch.einsum("bnhd,bmhd->bhnm", q.to(dt), k.to(dt)) / d)  # [B, H, N, M]
        # ||A||_F as the norm of the row norms: one float32 norm over all N * M entries drifts by ~1e-4 at N = 3136
        # on CPU; the two-level form stays at float32 resolution.
        fro = torch.linalg.vector_norm(torch.linalg.vector_norm(a, dim=-1, keepdim=True), dim=-2, keepdim=True)
        a = a / (fro + eps)
        out = torch.einsum("bhnm,bmhe->bnhe", a, v.to(dt)) * _rho(rho, dt, q.device)
    return out.to(q.dtype)


def linear_infsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rho: Rho = 1.0,
    eps: float = 1e-6,
    per_query: bool = False,
) -> torch.Tensor:
    """Specification of linear InfSA (module docstring), in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rho: Discount ``rho`` (a float, a 0-dim tensor or one value per head ``[H]``).
        eps: Added to the energy sum and to the score sum.
        per_query: Our query-dependent option (module docstring); ``False`` reproduces the authors.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``; with ``per_query=False`` every query row is identical.
    """
    _check("linear_infsa_attention", q, k, v, rho, eps, per_query)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        scale = q.shape[-1] ** -0.5
        qs, ks, v = q.to(dt) * scale, k.to(dt) * scale, v.to(dt)
        r = _rho(rho, dt, q.device)
        if per_query:
            fq, fk = F.relu(qs), F.relu(ks)
            kv = torch.einsum("bmhd,bmhe->bhde", fk, v)  # [B, H, D, Dv]
            num = torch.einsum("bnhd,bhde->bnhe", fq, kv)
            den = torch.einsum("bnhd,bhd->bnh", fq, fk.sum(dim=1)).unsqueeze(-1)
            return (r * num / (den + eps)).to(q.dtype)
        out = (r * _pooled_context(qs, ks, v, eps)).expand(-1, q.shape[1], -1, -1)
    return out.to(q.dtype)


def _pooled_context(qs: torch.Tensor, ks: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The pooled form's context ``[B, 1, H, Dv]`` from scaled queries and keys (all float32), without ``rho``."""
    energy = torch.linalg.vector_norm(qs, dim=-1)  # [B, N, H]
    w = energy / (energy.sum(dim=1, keepdim=True) + eps)
    q_bar = torch.einsum("bnh,bnhd->bhd", w, qs)  # [B, H, D]
    a = F.relu(torch.einsum("bhd,bmhd->bmh", q_bar, ks))  # [B, M, H]
    a = a / (a.sum(dim=1, keepdim=True) + eps)
    return torch.einsum("bmh,bmhe->bhe", a, v).unsqueeze(1)  # [B, 1, H, Dv]


def linear_infsa_context_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, rho: Rho = 1.0, eps: float = 1e-6
) -> torch.Tensor:
    """The one context row ``[B, 1, H, Dv]`` that the authors' linear InfSA gives every query (module docstring), in
    float32: ``linear_infsa_attention_reference(...)`` is this row repeated ``N`` times.

    A layer applies its output projection to this row once and broadcasts the result, instead of projecting ``N``
    identical rows.
    """
    _check("linear_infsa_context", q, k, v, rho, eps)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        scale = q.shape[-1] ** -0.5
        ctx = _pooled_context(q.to(dt) * scale, k.to(dt) * scale, v.to(dt), eps)
        return (_rho(rho, dt, q.device) * ctx).to(q.dtype)


def _context_native(q, k, v, *, rho=1.0, eps=1e-6):
    """``"torch"`` backend of the pooled context: the reference's float32 math (the pooled form cancels: see
    :func:`_per_query_native`), without its checks."""
    scale = q.shape[-1] ** -0.5
    acc = reference_dtype(q.dtype)
    ctx = _pooled_context(q.to(acc) * scale, k.to(acc) * scale, v.to(acc), eps)
    return (_rho(rho, acc, q.device) * ctx).to(q.dtype)


def _context_triton(q, k, v, *, rho=1.0, eps=1e-6):
    """``"triton"`` backend of the pooled context: :mod:`visionlin.kernels.triton.infsa` (float32 math)."""
    from .triton.infsa import pooled_infsa_context_triton

    ctx = pooled_infsa_context_triton(q, k, v, eps=eps).unsqueeze(1)  # [B, 1, H, Dv] float32
    return (_rho(rho, torch.float32, q.device) * ctx).to(q.dtype)


def _supports_context_triton(q, k, v, **kwargs):
    from .triton import head_dim_reasons, triton_unavailable

    return triton_unavailable(q, k, v) + same_floating_dtype(q, k, v) + head_dim_reasons(q, v)


_context_op = Op("linear_infsa_context")
_context_op.register("triton", _context_triton, _supports_context_triton)
_context_op.register("torch", _context_native, supports_floating)
_context_op.register("reference", linear_infsa_context_reference, supports_floating)


def _pure_native(q, k, v, *, rho=1.0, eps=1e-6):
    """``"torch"`` backend of pure InfSA: scores materialised in the inputs' dtype (bf16/fp16: half the reference's
    float32 memory), every normalisation factor in float32.

    ``relu`` is positively homogeneous, so with ``c_n = ||q_n|| max_m ||k_m|| / D`` the scores are computed as
    ``a'_nm = relu(q_n / ||q_n|| . k_m / max_m ||k_m||) = a_nm / c_n`` in ``[0, 1]``; the values are divided by their
    largest magnitude per channel ``h`` and by ``M^1/2``, so each output row ``a'_n V'`` is at most ``M^1/2``. (Each
    factor is rounded down to a power of two, so the rescaling itself rounds nothing; the bounds grow by 2 or 4.)
    ``||A||_F`` is accumulated in float32 from the row norms of ``A'`` times ``c_n``, and the output is
    ``rho c_n h M^1/2 / (||A||_F + eps) * a'_n V'``, formed in float32. The textbook order (``A / ||A||_F`` in half,
    or ``V * rho / ||A||_F`` in half) puts ``rho / ||A||_F`` (~1e-6 at N = 8192 with std-30 inputs) into float16's
    subnormal range: 2-5% error. ``c``, ``h`` are exact rescalings undone in float32, constants for autograd.
    """
    acc = reference_dtype(q.dtype)
    d, m = q.shape[-1], k.shape[1]
    with torch.no_grad():  # powers of two: the rescaled inputs round exactly as the inputs
        qn = pow2_floor(torch.linalg.vector_norm(q, dim=-1, keepdim=True, dtype=acc))  # [B, N, H, 1]
        kmax = pow2_floor(torch.linalg.vector_norm(k, dim=-1, keepdim=True, dtype=acc).amax(dim=1, keepdim=True))
        h = pow2_floor(v.abs().amax(dim=1, keepdim=True).to(acc))  # [B, 1, H, Dv]
    a = F.relu(torch.einsum("bnhd,bmhd->bhnm", (q.to(acc) / qn).to(q.dtype), (k.to(acc) / kmax).to(q.dtype)))
    c = qn * kmax / d  # [B, N, H, 1]: a_nm = c_n * a'_nm
    rows = torch.linalg.vector_norm(a, dim=-1, dtype=acc).transpose(1, 2).unsqueeze(-1)  # [B, N, H, 1]
    fro = torch.linalg.vector_norm(rows * c, dim=1, keepdim=True)  # [B, 1, H, 1] = ||A||_F
    r = 2.0 ** math.floor(math.log2(m) / -2)  # ~M^-1/2, a power of two
    out = torch.einsum("bhnm,bmhe->bnhe", a, (v.to(acc) * (r / h)).to(q.dtype)).to(acc)  # [B, N, H, Dv]
    return (out * (c * h / r / (fro + eps)) * _rho(rho, acc, q.device)).to(q.dtype)


def _per_query_native(q, k, v, *, rho=1.0, eps=1e-6, per_query=False):
    """``"torch"`` backend of the ``per_query`` form: the shared native core
    (:func:`~visionlin.kernels.linear.scaled_linear_attention`) on relu features.

    The authors' pooled form has no half-precision path: its q / k gradients cancel (the energy weights sum to one)
    and relu boundaries of ``qbar . k`` flip under bf16 rounding, giving ~8% gradient error; its backends compute in
    float32 (:func:`_context_native`, and the Triton kernels on the inputs' values).
    """
    fdt = feature_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    fq, fk = F.relu(q.to(fdt) * scale), F.relu(k.to(fdt) * scale)
    # The reference divides sums by (sum + eps); the core divides means, so eps scales by 1/M (in float32: at
    # M = 65536, 1e-6 / M is below float16's smallest subnormal and a non-positive query gave 0 / 0).
    out = scaled_linear_attention(fq, fk, v, normalize="divide", scale=1.0, eps=eps / k.shape[1])
    return (_rho(rho, out.dtype, q.device) * out).to(q.dtype)


def _per_query_triton(q, k, v, *, rho=1.0, eps=1e-6, per_query=True):
    """``"triton"`` backend of the ``per_query`` form: the fused linear-attention kernels with the relu map.
    ``relu(q / sqrt(D)) . relu(k / sqrt(D)) = relu(q) . relu(k) / D`` (scale ``1/D``), and the kernels divide means,
    so the reference's ``eps`` on sums becomes ``eps / M``."""
    out = linear_attention_triton(
        q, k, v, feature_map="relu", normalize="divide", scale=1.0 / q.shape[-1], eps=eps / k.shape[1]
    )
    return (_rho(rho, torch.float32, q.device) * out.float()).to(q.dtype)


def _supports_triton(q, k, v, **kwargs):
    return triton_linear_supports(q, k, v, feature_map="relu")


def _native_supports(q, k, v, **kwargs):
    return same_floating_dtype(q, k, v)


def _pure_triton(q, k, v, **kwargs):
    """``"triton"`` backend: :mod:`visionlin.kernels.triton.infsa_pure` (flash-style, memory linear in N)."""
    from .triton.infsa_pure import pure_infsa_triton

    return pure_infsa_triton(q, k, v, **kwargs)


def _pure_triton_supports(q, k, v, **kwargs):
    from .triton import triton_unavailable

    if reasons := triton_unavailable(q, k, v) + same_floating_dtype(q, k, v):  # never import the kernels then
        return reasons
    from .triton.infsa_pure import triton_pure_infsa_supports

    return triton_pure_infsa_supports(q, k, v, **kwargs)


_pure_op = Op("pure_infsa_attention")
_pure_op.register("triton", _pure_triton, _pure_triton_supports)
_pure_op.register("torch", _pure_native, same_floating_dtype)
_pure_op.register("reference", pure_infsa_attention_reference, supports_floating)

# The per-query form (the pooled form is the context op above, broadcast).
_linear_op = Op("linear_infsa_attention")
_linear_op.register("triton", _per_query_triton, _supports_triton)
_linear_op.register("torch", _per_query_native, _native_supports)
_linear_op.register("reference", linear_infsa_attention_reference, supports_floating)


def pure_infsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rho: Rho = 1.0,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """Pure (quadratic) InfSA; see :func:`pure_infsa_attention_reference`."""
    _check("pure_infsa_attention", q, k, v, rho, eps)
    return _pure_op(q, k, v, rho=rho, eps=eps, backend=backend)


def linear_infsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rho: Rho = 1.0,
    eps: float = 1e-6,
    per_query: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Linear InfSA; see :func:`linear_infsa_attention_reference`. With ``per_query=False`` (the authors' form) the
    result is :func:`linear_infsa_context` broadcast over the ``N`` queries (a stride-0 view, not ``N`` copies)."""
    _check("linear_infsa_attention", q, k, v, rho, eps, per_query)
    if not per_query:
        ctx = _context_op(q, k, v, rho=rho, eps=eps, backend=backend, caller="linear_infsa_attention")
        return ctx.expand(-1, q.shape[1], -1, -1)
    return _linear_op(q, k, v, rho=rho, eps=eps, per_query=True, backend=backend)


def linear_infsa_context(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rho: Rho = 1.0,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """The context row ``[B, 1, H, Dv]`` that the authors' linear InfSA gives every query; see
    :func:`linear_infsa_context_reference`."""
    _check("linear_infsa_context", q, k, v, rho, eps)
    return _context_op(q, k, v, rho=rho, eps=eps, backend=backend)
