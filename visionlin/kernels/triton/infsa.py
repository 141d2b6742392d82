"""Fused pooled (linear) InfSA in Triton, forward and backward: the authors' rank-1 form of
:func:`visionlin.kernels.linear_infsa_context_reference`, per (batch, head) with ``s = D^-1/2``::

    e_n = ||s q_n||,  E = sum_n e_n + eps,  P = sum_n e_n s q_n,  qbar = P / E        (query pass)
    t_m = qbar . s k_m,  a_m = relu(t_m),  A = sum_m a_m + eps,  C = sum_m a_m v_m      (key pass)
    ctx = C / A                                                                        ([Dv], the same for every query)

Every product is a matrix-vector product, so the kernels are bound by reading q, k and v once (no tensor cores); all
math is float32 on the inputs' values, as the float32 reference computes it (the pooled form cancels: ``w_n`` sums to
one, so its q / k gradients are differences of near-equal terms, and relu boundaries of ``t_m`` flip if ``qbar`` is
rounded to half precision). The passes are split over row chunks to fill the GPU; chunks meet by float32 atomic adds
(sums may differ between runs in the last bits). When the (batch, head) pairs alone fill the GPU (224 px, batch 256)
each pair is one program: its sums are stored, not added into a zeroed buffer, and the key pass writes ``ctx`` itself
(two zero fills and two small ops fewer per call: the forwards there are bound by the host's launches).

Backward, for the gradient ``g`` of ``ctx`` (``p_m = a_m / A``; ``sum_m p_m (v_m . g) = ctx . g``)::

    dv_m = p_m g;   dt_m = [t_m > 0] (v_m . g - ctx . g) / A;   dk_m = s dt_m qbar;   dqbar = sum_m dt_m s k_m
    dP = dqbar / E;   dE = -(dqbar . qbar) / E;   de_n = s q_n . dP + dE
    dq_n = s (e_n dP + de_n s q_n / e_n)                                               (0 where e_n = 0)

as the key-backward kernel (``dk``, ``dv``, ``dqbar``) followed by the query-backward kernel (``dq``). Together one
custom-op pair (``visionlin::pooled_infsa_fwd`` / ``_bwd``) with fake and autograd registrations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import launch, tile_dim
from .linear import _splits

__all__ = ["pooled_infsa_context_triton"]


@triton.jit
def _query_kernel(
    Q, ACC, N, H, D, per, s_b, s_n, s_h, s_d, scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Adds ``P`` (``[BLOCK_D]``) and ``E - eps`` of rows ``[start, start + per * BLOCK_N)`` to ``ACC[bh]``; without
    ``SPLIT`` (one program per (batch, head) covers every row) stores them: ``ACC`` needs no zero fill."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    p = tl.zeros([BLOCK_D], dtype=tl.float32)
    e_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    start = tl.program_id(1) * per * BLOCK_N
    for i in range(per):
        rows = (start + i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < N)[:, None] & dmask[None, :]
        q = tl.load(Q + b * s_b + h * s_h + rows[:, None] * s_n + offs_d[None, :] * s_d, mask=mask, other=0.0)
        qs = q.to(tl.float32) * scale
        e = tl.sqrt(tl.sum(qs * qs, axis=1))
        e_sum += e
        p += tl.sum(e[:, None] * qs, axis=0)
    if SPLIT:
        tl.atomic_add(ACC + bh * (BLOCK_D + 1) + offs_d, p, mask=dmask)
        tl.atomic_add(ACC + bh * (BLOCK_D + 1) + BLOCK_D, tl.sum(e_sum, axis=0))
    else:
        tl.store(ACC + bh * (BLOCK_D + 1) + offs_d, p, mask=dmask)
        tl.store(ACC + bh * (BLOCK_D + 1) + BLOCK_D, tl.sum(e_sum, axis=0))


@triton.jit
def _key_kernel(
    K, V, ACC_Q, ACC_K, CTX, M, H, D, DV, per, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, scale, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """Adds ``C`` (``[BLOCK_DV]``) and ``A - eps`` of key rows ``[start, start + per * BLOCK_M)`` to ``ACC_K[bh]``;
    without ``SPLIT`` (one program per (batch, head) covers every key) stores them and ``ctx = C / A`` in ``CTX[bh]``
    (``[DV]``): no zero fill, no division launched afterwards."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    dmask, emask = offs_d < D, offs_e < DV
    p = tl.load(ACC_Q + bh * (BLOCK_D + 1) + offs_d, mask=dmask, other=0.0)
    qbar = p / (tl.load(ACC_Q + bh * (BLOCK_D + 1) + BLOCK_D) + eps)
    c = tl.zeros([BLOCK_DV], dtype=tl.float32)
    a_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    start = tl.program_id(1) * per * BLOCK_M
    for i in range(per):
        rows = (start + i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        k = tl.load(
            K + b * sk_b + h * sk_h + rows[:, None] * sk_n + offs_d[None, :] * sk_d,
            mask=rmask[:, None] & dmask[None, :],
            other=0.0,
        )
        t = tl.sum(k.to(tl.float32) * scale * qbar[None, :], axis=1)
        a = tl.where(rmask, tl.maximum(t, 0.0), 0.0)
        v = tl.load(
            V + b * sv_b + h * sv_h + rows[:, None] * sv_n + offs_e[None, :] * sv_d,
            mask=rmask[:, None] & emask[None, :],
            other=0.0,
        )
        a_sum += a
        c += tl.sum(a[:, None] * v.to(tl.float32), axis=0)
    if SPLIT:
        tl.atomic_add(ACC_K + bh * (BLOCK_DV + 1) + offs_e, c, mask=emask)
        tl.atomic_add(ACC_K + bh * (BLOCK_DV + 1) + BLOCK_DV, tl.sum(a_sum, axis=0))
    else:
        a_tot = tl.sum(a_sum, axis=0)
        tl.store(ACC_K + bh * (BLOCK_DV + 1) + offs_e, c, mask=emask)
        tl.store(ACC_K + bh * (BLOCK_DV + 1) + BLOCK_DV, a_tot)
        tl.store(CTX + bh * DV + offs_e, c / (a_tot + eps), mask=emask)


@triton.jit
def _key_backward_kernel(
    K, V, ACC_Q, ACC_K, CTX, G, DK, DVv, DQBAR, M, H, D, DV, per,
    sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
    scale, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Writes ``dk``, ``dv`` of its key rows and adds their share of ``dqbar`` to ``DQBAR[bh]``."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    dmask, emask = offs_d < D, offs_e < DV
    qbar = tl.load(ACC_Q + bh * (BLOCK_D + 1) + offs_d, mask=dmask, other=0.0)
    qbar = qbar / (tl.load(ACC_Q + bh * (BLOCK_D + 1) + BLOCK_D) + eps)
    a_tot = tl.load(ACC_K + bh * (BLOCK_DV + 1) + BLOCK_DV) + eps
    g = tl.load(G + bh * DV + offs_e, mask=emask, other=0.0)
    ctx_g = tl.sum(tl.load(CTX + bh * DV + offs_e, mask=emask, other=0.0) * g, axis=0)
    dqbar = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.program_id(1) * per * BLOCK_M
    for i in range(per):
        rows = (start + i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        kmask = rmask[:, None] & dmask[None, :]
        vmask = rmask[:, None] & emask[None, :]
        ks = tl.load(K + b * sk_b + h * sk_h + rows[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kmask, other=0.0)
        ks = ks.to(tl.float32) * scale
        v = tl.load(V + b * sv_b + h * sv_h + rows[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
        t = tl.sum(ks * qbar[None, :], axis=1)
        dv = (tl.maximum(t, 0.0) / a_tot)[:, None] * g[None, :]
        dt = tl.where(rmask & (t > 0), (tl.sum(v.to(tl.float32) * g[None, :], axis=1) - ctx_g) / a_tot, 0.0)
        dqbar += tl.sum(dt[:, None] * ks, axis=0)
        dk = (dt * scale)[:, None] * qbar[None, :]
        dk_ptr = DK + b * sdk_b + h * sdk_h + rows[:, None] * sdk_n + offs_d[None, :] * sdk_d
        tl.store(dk_ptr, dk.to(DK.dtype.element_ty), kmask)
        dv_ptr = DVv + b * sdv_b + h * sdv_h + rows[:, None] * sdv_n + offs_e[None, :] * sdv_d
        tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), vmask)
    tl.atomic_add(DQBAR + bh * BLOCK_D + offs_d, dqbar, mask=dmask)


@triton.jit
def _query_backward_kernel(
    Q, ACC_Q, DQBAR, DQ, N, H, D, per, sq_b, sq_n, sq_h, sq_d, sdq_b, sdq_n, sdq_h, sdq_d, scale, eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Writes ``dq`` of its query rows from ``dqbar``."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    e_tot = tl.load(ACC_Q + bh * (BLOCK_D + 1) + BLOCK_D) + eps
    qbar = tl.load(ACC_Q + bh * (BLOCK_D + 1) + offs_d, mask=dmask, other=0.0) / e_tot
    dqbar = tl.load(DQBAR + bh * BLOCK_D + offs_d, mask=dmask, other=0.0)
    dp = dqbar / e_tot
    de_tot = -tl.sum(dqbar * qbar, axis=0) / e_tot
    start = tl.program_id(1) * per * BLOCK_N
    for i in range(per):
        rows = (start + i * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < N)[:, None] & dmask[None, :]
        qs = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask, other=0.0)
        qs = qs.to(tl.float32) * scale
        e = tl.sqrt(tl.sum(qs * qs, axis=1))
        de = tl.sum(qs * dp[None, :], axis=1) + de_tot
        dq = e[:, None] * dp[None, :] + tl.where(e > 0, de / tl.where(e > 0, e, 1.0), 0.0)[:, None] * qs
        dq_ptr = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :] * sdq_d
        tl.store(dq_ptr, (dq * scale).to(DQ.dtype.element_ty), mask)


# Launch helpers -------------------------------------------------------------------------------------------------------
#: Rows per program step; the row chunks per program are chosen by ``linear._splits`` (about four programs per SM).
ROWS = 64


def _block(d: int) -> int:
    return tile_dim(d)


def _warps(block: int) -> int:
    return 8 if block >= 128 else 4


@torch.library.custom_op("visionlin::pooled_infsa_fwd", mutates_args=())
def pooled_infsa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ctx [B, H, Dv] float32, the query sums [B*H, BD + 1], the key sums [B*H, BDV + 1])`` (sums float32)."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    bd, bdv = _block(d), _block(dv)
    # splits 0: the pass does not run (its sums stay zero); 1: one program per (batch, head) stores its sums (no zero
    # fill) and the key pass its context (no division launched here); more: atomic adds into zeroed sums.
    splits_q, per_q = _splits(n, ROWS, b * h, q.device) if b * h and n else (0, 0)
    splits_k, per_k = _splits(m, ROWS, b * h, q.device) if b * h and m else (0, 0)
    f32 = dict(device=q.device, dtype=torch.float32)
    acc_q = (torch.empty if splits_q == 1 else torch.zeros)(b * h, bd + 1, **f32)
    acc_k = (torch.empty if splits_k == 1 else torch.zeros)(b * h, bdv + 1, **f32)
    ctx = torch.empty(b * h, dv, **f32) if splits_k == 1 else None
    scale = d**-0.5
    if splits_q:
        launch(_query_kernel, (b * h, splits_q),
            q, acc_q, n, h, d, per_q, *q.stride(), scale, BLOCK_N=ROWS, BLOCK_D=bd, SPLIT=splits_q > 1,
            num_warps=_warps(bd),
        )  # fmt: skip
    if splits_k:
        launch(_key_kernel, (b * h, splits_k),
            k, v, acc_q, acc_k, acc_k if ctx is None else ctx, m, h, d, dv, per_k, *k.stride(), *v.stride(), scale,
            eps, BLOCK_M=ROWS, BLOCK_D=bd, BLOCK_DV=bdv, SPLIT=splits_k > 1, num_warps=_warps(max(bd, bdv)),
        )  # fmt: skip
    if ctx is None:
        ctx = acc_k[:, :dv] / (acc_k[:, bdv:] + eps)
    return ctx.view(b, h, dv), acc_q, acc_k


@pooled_infsa_fwd.register_fake
def _(q, k, v, eps):
    b, _, h, d = q.shape
    dv = v.shape[-1]
    f32 = torch.float32
    return (
        q.new_empty(b, h, dv, dtype=f32),
        q.new_empty(b * h, _block(d) + 1, dtype=f32),
        q.new_empty(b * h, _block(dv) + 1, dtype=f32),
    )


@torch.library.custom_op("visionlin::pooled_infsa_bwd", mutates_args=())
def pooled_infsa_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: torch.Tensor,
    acc_q: torch.Tensor,
    acc_k: torch.Tensor,
    g: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`pooled_infsa_fwd`'s ``ctx`` for its gradient ``g`` ``[B, H, Dv]``."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    bd, bdv = _block(d), _block(dv)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if b * h == 0:
        return dq, dk, dvv
    g = g.float().contiguous()
    ctx = ctx.contiguous()
    dqbar = torch.zeros(b * h, bd, device=q.device, dtype=torch.float32)
    scale = d**-0.5
    if m:
        splits, per = _splits(m, ROWS, b * h, q.device)
        launch(_key_backward_kernel, (b * h, splits),
            k, v, acc_q, acc_k, ctx, g, dk, dvv, dqbar, m, h, d, dv, per,
            *k.stride(), *v.stride(), *dk.stride(), *dvv.stride(), scale, eps,
            BLOCK_M=ROWS, BLOCK_D=bd, BLOCK_DV=bdv, num_warps=_warps(max(bd, bdv)),
        )  # fmt: skip
    if n:
        splits, per = _splits(n, ROWS, b * h, q.device)
        launch(_query_backward_kernel, (b * h, splits),
            q, acc_q, dqbar, dq, n, h, d, per, *q.stride(), *dq.stride(), scale, eps,
            BLOCK_N=ROWS, BLOCK_D=bd, num_warps=_warps(bd),
        )  # fmt: skip
    return dq, dk, dvv


@pooled_infsa_bwd.register_fake
def _(q, k, v, ctx, acc_q, acc_k, g, eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, eps = inputs
    out, acc_q, acc_k = output
    ctx.mark_non_differentiable(acc_q, acc_k)
    ctx.save_for_backward(q, k, v, out, acc_q, acc_k)
    ctx.eps = eps


def _backward(ctx, g, _g_acc_q, _g_acc_k):
    q, k, v, out, acc_q, acc_k = ctx.saved_tensors
    dq, dk, dv = _pooled_infsa_bwd_call(q, k, v, out, acc_q, acc_k, g, ctx.eps)
    return dq, dk, dv, None


pooled_infsa_fwd.register_autograd(_backward, setup_context=_setup)
_pooled_infsa_bwd_call = eager_call(pooled_infsa_bwd)
_pooled_infsa_fwd_call = eager_op(pooled_infsa_fwd, _setup, _backward)


def pooled_infsa_context_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float) -> torch.Tensor:
    """The pooled InfSA context ``[B, H, Dv]`` in float32, without ``rho`` (module docstring)."""
    return _pooled_infsa_fwd_call(q, k, v, float(eps))[0]
