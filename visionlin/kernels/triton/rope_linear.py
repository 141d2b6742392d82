"""Fused MALA, RALA, NaLa (2-D RoPE inside the kernels) and Efficient Attention in Triton, forward and backward.

The four ops share one form. Per (batch, head), with key features ``f_j`` (``F`` channels), their RoPE-rotated copy
``r_j = R_j f_j`` (``r = f`` without RoPE), per-key weights ``w_j`` and values ``v_j``, one pass over the keys adds the
float32 sums::

    S = sum_j w_j r_j v_j^T  [F, Dv],   z = sum_j w_j f_j  [F],   u = sum_j v_j  [Dv],   W = sum_j w_j

and one pass over the queries reads them out with the query features ``f_i``, ``r_i = R_i f_i`` and ``t_i = f_i . zb``:

* MALA: ELU + 1 features (``F = D``), ``w_j = 1``, ``P = s S / W``, ``zb = s z / W``,
  ``out_i = (r_i P) (1 + 1 / (t_i + eps)) - t_i u / M``;
* RALA: ELU + 1 features, ``w_j = exp(l_j - max_j l_j)``, ``P = S / W``, ``zb = z / W``,
  ``out_i = (r_i P) / (t_i + eps)``;
* NaLa: query features ``(relu(+-q) / ||q||) ** p``, key features ``relu(+-k ** 3)`` (``F = 2 D``: two halves),
  ``w_j = 1``, ``P = S / W``, ``zb = z / W``, ``out_i = (r_i P) / (t_i + eps)``;
* Efficient Attention: query features ``softmax_D(q)``, key features ``exp(k - max_j k)`` per channel, no RoPE,
  ``w_j = 1``, ``P = S / z`` (row by row), ``out_i = f_i P``.

RALA's ``l_j = s qbar . f_j`` with ``qbar = mean_i f_i`` (a query pass before the key passes, then a pass for
``max_j l_j``), so ``w_j / W`` is its softmax over the keys; Efficient Attention's per-channel key maximum is a pass of
its own. The maxima are shifts the outputs do not depend on, constants for autograd. RoPE rotates channel pairs inside
the kernels (``r = f cos + rot(f) sin``, ``rot(f)_{2m, 2m+1} = (-f_{2m+1}, f_{2m})``; NaLa rotates each ``D``-channel
half); the ``(sin, cos)`` tables are read per token beside the features. Between the passes, ``(P, zb, u / M)`` are
formed in PyTorch from the small ``[B*H, F*Dv]`` state (no program has to hold both ``S`` and ``P``).

Backward, two kernels as :mod:`.linear`'s: the read-out backward writes ``dq`` and adds the gradients of
``(P, zb, u / M)`` (float32 atomics); PyTorch turns them into those of ``(S, z, u, W)``; the state backward writes
``dk`` and ``dv`` (RALA also adds ``d qbar``, whose share ``phi'(q_i) d qbar / N`` of ``dq`` a third kernel adds
after). All sums and feature maps in float32; the products run through :func:`.linear._mm` (tensor cores with float32
accumulation in half precision, power-of-two operand scaling in float16, so 65k-token sums never overflow). One
custom-op pair (``visionlin::rope_linear_attention_fwd`` / ``_bwd``) with fake and autograd registrations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tile_dim, tuned
from .linear import _mm, _phi, _phi_backward, _pow2_scale, _splits

__all__ = ["MECHANISM_IDS", "efficient_attention_triton", "rope_linear_attention_triton"]

MECHANISM_IDS = {"magnitude": 0, "rank_augmented": 1, "norm_aware": 2, "efficient": 3}


@triton.jit
def _mm_unit(a, b, DTYPE: tl.constexpr, HALF: tl.constexpr, SPLIT: tl.constexpr, SCALE: tl.constexpr):
    """:func:`.linear._mm` for a loop-invariant right operand ``b`` the caller has already scaled into [-1, 1] by a
    power of two: only ``a`` is scaled here (no reduction over the large ``b`` in every loop step)."""
    if HALF:
        if SCALE:
            sa = _pow2_scale(a)
            a = a / sa
        ah = a.to(DTYPE)
        bh = b.to(DTYPE)
        out = tl.dot(ah, bh)
        if SPLIT:
            out += tl.dot(ah, (b - bh.to(tl.float32)).to(DTYPE))
        if SCALE:
            out = out * sa
        return out
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _rot(x, R: tl.constexpr, C: tl.constexpr):
    """``rot(x)``: each channel pair ``(x_2m, x_2m+1)`` of float32 rows ``[R, C]`` becomes ``(-x_2m+1, x_2m)``."""
    a, b = tl.split(tl.reshape(x, (R, C // 2, 2)))
    return tl.reshape(tl.join(-b, a), (R, C))


@triton.jit
def _tables(SIN, COS, offs, ch, mask, D):
    """The RoPE ``(sin, cos)`` of rows ``offs`` and channels ``ch`` (float32 ``[N, D]`` tables; 0 where masked)."""
    idx = offs[:, None] * D + ch[None, :]
    return tl.load(SIN + idx, mask=mask, other=0.0), tl.load(COS + idx, mask=mask, other=0.0)


@triton.jit
def _query_features(x, mask, sgn, norm_eps, MECH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Query features of float32 rows ``x`` ``[R, F]`` (NaLa: ``x`` loaded twice side by side, ``sgn`` +-1 per half);
    0 where ``mask`` is False."""
    if MECH == 2:
        n = tl.sqrt(tl.sum(x * x, axis=1) * 0.5)  # the tile holds every channel twice
        p = 3.0 * (0.5 + 1.0 - 2.0 / (tl.exp(2.0 * n) + 1.0))  # 3 (0.5 + tanh n), n >= 0
        c = x * sgn[None, :]
        a = tl.where(c > 0, c / (n + norm_eps)[:, None], 0.0)
        f = tl.where(a > 0, tl.exp2(p[:, None] * tl.log2(tl.maximum(a, 1e-30))), 0.0)
    elif MECH == 3:
        xm = tl.where(mask, x, float("-inf"))
        e = tl.where(mask, tl.exp(xm - tl.max(xm, axis=1)[:, None]), 0.0)
        f = e / tl.maximum(tl.sum(e, axis=1), 1e-30)[:, None]
    else:
        f = _phi(x, mask, 2)
    return tl.where(mask, f, 0.0)


@triton.jit
def _query_features_backward(x, f, df, mask, sgn, norm_eps, MECH: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    """Gradient with respect to the raw query rows of ``sum(df * f)``; NaLa folds its two halves back (``[R, BD]``)."""
    if MECH == 2:
        # f = (c / ne)^p with c = +-x > 0, ne = ||q|| + norm_eps, p = 3 (0.5 + tanh ||q||); with fl = df * f:
        # df/dc = fl p / c, d/dne = -p sum(fl) / ne, d/dp = sum(fl log(c / ne)), and ||q|| moves ne and p.
        n = tl.sqrt(tl.sum(x * x, axis=1) * 0.5)
        th = 1.0 - 2.0 / (tl.exp(2.0 * n) + 1.0)
        p = 3.0 * (0.5 + th)
        ne = n + norm_eps
        ne = tl.where(ne > 0, ne, 1.0)
        c = x * sgn[None, :]
        pos = (c > 0) & mask
        fl = tl.where(pos, df * f, 0.0)
        s_fl = tl.sum(fl, axis=1)
        dp = tl.sum(fl * tl.log(tl.maximum(c, 1e-30)), axis=1) - tl.log(ne) * s_fl
        dn = dp * 3.0 * (1.0 - th * th) - p * s_fl / ne
        unit = x / tl.where(n > 0, n, 1.0)[:, None]
        dx = tl.where(pos, fl * p[:, None] / tl.where(pos, x, 1.0), 0.0) + 0.5 * unit * dn[:, None]
        dx = tl.where(mask, dx, 0.0)
        dx = tl.sum(tl.reshape(dx, (R, 2, BD)), axis=1)
    elif MECH == 3:
        dx = tl.where(mask, f * (df - tl.sum(f * df, axis=1)[:, None]), 0.0)
    else:
        dx = tl.where(mask, df * tl.minimum(f, 1.0), 0.0)  # ELU(x) + 1 has slope min(f, 1): x is not needed
    return dx


@triton.jit
def _key_features(x, mask, sgn, kmax, MECH: tl.constexpr):
    """Key features of float32 rows ``x`` ``[R, F]`` (``kmax``: Efficient Attention's per-channel maxima)."""
    if MECH == 2:
        c = x * sgn[None, :]
        f = tl.where(c > 0, c * c * c, 0.0)
    elif MECH == 3:
        f = tl.exp(tl.minimum(x - kmax[None, :], 0.0))
    else:
        f = _phi(x, mask, 2)
    return tl.where(mask, f, 0.0)


@triton.jit
def _key_features_backward(x, f, df, mask, sgn, MECH: tl.constexpr, R: tl.constexpr, BD: tl.constexpr):
    if MECH == 2:
        c = x * sgn[None, :]
        dx = tl.where(mask & (c > 0), 3.0 * x * x * sgn[None, :] * df, 0.0)
        dx = tl.sum(tl.reshape(dx, (R, 2, BD)), axis=1)
    elif MECH == 3:
        dx = tl.where(mask, f * df, 0.0)
    else:
        dx = _phi_backward(x, df, mask, 2)
    return dx


@triton.jit
def _rope(f, SIN, COS, offs, ch, mask, D, HAS_ROPE: tl.constexpr, R: tl.constexpr, BF: tl.constexpr):
    if HAS_ROPE:
        sn, cs = _tables(SIN, COS, offs, ch, mask, D)
        f = f * cs + _rot(f, R, BF) * sn
    return f


@triton.jit
def _rope_backward(dr, SIN, COS, offs, ch, mask, D, HAS_ROPE: tl.constexpr, R: tl.constexpr, BF: tl.constexpr):
    """``R^T dr``: ``rot`` is antisymmetric, so ``d f = dr cos - rot(dr sin)``."""
    if HAS_ROPE:
        sn, cs = _tables(SIN, COS, offs, ch, mask, D)
        dr = dr * cs - _rot(dr * sn, R, BF)
    return dr


@triton.jit
def _channels(MECH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """Feature column -> input channel, and the sign of NaLa's half (+1, then -1)."""
    offs_f = tl.arange(0, BLOCK_F)
    ch = offs_f % BLOCK_D
    sgn = tl.where(offs_f < BLOCK_D, 1.0, -1.0)
    return ch, sgn


@triton.jit
def _key_weights(f, qbar, lmax, mask_m, scale, MECH: tl.constexpr):
    """RALA's ``exp(l_j - max l)`` with ``l_j = s qbar . f_j``; 1 otherwise (0 for rows beyond ``M``)."""
    if MECH == 1:
        w = tl.exp(tl.minimum(tl.sum(f * qbar[None, :], axis=1) * scale - lmax, 0.0))
    else:
        w = tl.where(mask_m, 1.0, 0.0)
    return tl.where(mask_m, w, 0.0)


@triton.jit
def _aux(AUX, bh, inv_n, MECH: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """``(qbar [F], l_max, kmax [F])`` of RALA / Efficient Attention from ``AUX`` ``[BH, 2 BLOCK_D]``."""
    offs = tl.arange(0, BLOCK_F)
    if MECH == 1:
        qbar = tl.load(AUX + bh * 2 * BLOCK_D + offs) * inv_n
        lmax = tl.load(AUX + bh * 2 * BLOCK_D + BLOCK_D)
    else:
        qbar = tl.zeros((BLOCK_F,), tl.float32)
        lmax = 0.0
    kmax = tl.zeros((BLOCK_F,), tl.float32)
    if MECH == 3:
        kmax = tl.load(AUX + bh * 2 * BLOCK_D + BLOCK_D + offs % BLOCK_D)
    return qbar, lmax, kmax


@triton.jit
def _qsum_kernel(
    Q, AUX, N, H, D, per, sq_b, sq_n, sq_h, sq_d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """RALA: adds ``sum_i (ELU(q_i) + 1)`` of one split of the queries into ``AUX[bh, :D]``."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for i in range(per):
        rows = ((tl.program_id(1) * per + i) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask = (rows < N)[:, None] & (offs_d < D)[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask, other=0.0)
        acc += tl.sum(_phi(q.to(tl.float32), mask, 2), axis=0)
    tl.atomic_add(AUX + bh * 2 * BLOCK_D + offs_d, acc, sem="relaxed")


@triton.jit
def _kmax_kernel(
    K, AUX, M, H, D, per, inv_n, scale, sk_b, sk_n, sk_h, sk_d,
    MECH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """RALA: ``max_j l_j`` into ``AUX[bh, D']``; Efficient Attention: each channel's ``max_j k_j`` into
    ``AUX[bh, D':]`` (``D'`` = ``BLOCK_D``), over one split of the keys."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    qbar, _, _ = _aux(AUX, bh, inv_n, MECH, BLOCK_D, BLOCK_D)
    best = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    best_l = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for i in range(per):
        rows = ((tl.program_id(1) * per + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < M
        mask = mask_m[:, None] & mask_d[None, :]
        k = tl.load(K + b * sk_b + h * sk_h + rows[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask, other=0.0)
        k = k.to(tl.float32)
        if MECH == 1:
            logit = tl.sum(_phi(k, mask, 2) * qbar[None, :], axis=1) * scale
            best_l = tl.maximum(best_l, tl.where(mask_m, logit, float("-inf")))
        else:
            best = tl.maximum(best, tl.max(tl.where(mask, k, float("-inf")), axis=0))
    if MECH == 1:
        tl.atomic_max(AUX + bh * 2 * BLOCK_D + BLOCK_D, tl.max(best_l, axis=0), sem="relaxed")
    else:
        tl.atomic_max(AUX + bh * 2 * BLOCK_D + BLOCK_D + offs_d, best, mask=mask_d, sem="relaxed")


@triton.jit
def _state_kernel(
    K, V, SIN, COS, AUX, S,
    M, H, D, DV, per, inv_n, scale,
    sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d,
    MECH: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """Adds one split of the keys' ``(S, z, u, W)`` (module docstring) into a (batch, head)'s float32 state."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H  # offsets in int64: a tensor may span more than 2^31 elements
    ch, sgn = _channels(MECH, BLOCK_D, BLOCK_F)
    offs_f = tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_DV)
    qbar, lmax, kmax = _aux(AUX, bh, inv_n, MECH, BLOCK_D, BLOCK_F)
    acc = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    z = tl.zeros((BLOCK_F,), tl.float32)
    u = tl.zeros((BLOCK_DV,), tl.float32)
    wsum = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(per):
        rows = ((tl.program_id(1) * per + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask_m = rows < M
        kmask = mask_m[:, None] & (ch < D)[None, :]
        vmask = mask_m[:, None] & (offs_e < DV)[None, :]
        k = tl.load(K + b * sk_b + h * sk_h + rows[:, None] * sk_n + ch[None, :] * sk_d, mask=kmask, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + rows[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
        v = v.to(tl.float32)
        f = _key_features(k.to(tl.float32), kmask, sgn, kmax, MECH)
        w = _key_weights(f, qbar, lmax, mask_m, scale, MECH)
        r = _rope(f, SIN, COS, rows, ch, kmask, D, HAS_ROPE, BLOCK_M, BLOCK_F)
        acc += _mm(tl.trans(r * w[:, None]), v, k.dtype, HALF, False, SCALE)
        z += tl.sum(f * w[:, None], axis=0)
        u += tl.sum(v, axis=0)
        wsum += w
    base = S + bh * (BLOCK_F * BLOCK_DV + BLOCK_F + BLOCK_DV + 1)
    tl.atomic_add(base + offs_f[:, None] * BLOCK_DV + offs_e[None, :], acc, sem="relaxed")
    tl.atomic_add(base + BLOCK_F * BLOCK_DV + offs_f, z, sem="relaxed")
    tl.atomic_add(base + BLOCK_F * BLOCK_DV + BLOCK_F + offs_e, u, sem="relaxed")
    tl.atomic_add(base + BLOCK_F * BLOCK_DV + BLOCK_F + BLOCK_DV, tl.sum(wsum, axis=0), sem="relaxed")


@triton.jit
def _load_triple(BUF, bh, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``(matrix [F, Dv], vector [F], vector [Dv], scalar)`` of one (batch, head) in a ``[BH, F Dv + F + Dv + 1]``
    buffer (the state ``(S, z, u, W)``, the read-out's ``(P, zb, u / M)`` or the gradients of either)."""
    offs_f = tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_DV)
    base = BUF + bh * (BLOCK_F * BLOCK_DV + BLOCK_F + BLOCK_DV + 1)
    mat = tl.load(base + offs_f[:, None] * BLOCK_DV + offs_e[None, :])
    vec_f = tl.load(base + BLOCK_F * BLOCK_DV + offs_f)
    vec_e = tl.load(base + BLOCK_F * BLOCK_DV + BLOCK_F + offs_e)
    scalar = tl.load(base + BLOCK_F * BLOCK_DV + BLOCK_F + BLOCK_DV)
    return mat, vec_f, vec_e, scalar


@triton.jit
def _query_rows(
    Q, SIN, COS, b, h, rows, N, D, sq_b, sq_n, sq_h, sq_d, norm_eps,
    MECH: tl.constexpr, HAS_ROPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """``(x, f, r, mask, ch, sgn)`` of query rows ``rows``: raw float32 rows, features, rotated features."""
    ch, sgn = _channels(MECH, BLOCK_D, BLOCK_F)
    mask = (rows < N)[:, None] & (ch < D)[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + ch[None, :] * sq_d, mask=mask, other=0.0)
    x = q.to(tl.float32)
    f = _query_features(x, mask, sgn, norm_eps, MECH, BLOCK_D)
    r = _rope(f, SIN, COS, rows, ch, mask, D, HAS_ROPE, BLOCK_N, BLOCK_F)
    return x, f, r, mask, ch, sgn


@triton.jit
def _readout_kernel(
    Q, SIN, COS, MATS, Out,
    N, H, D, DV, eps, norm_eps,
    sq_b, sq_n, sq_h, sq_d, so_b, so_n, so_h, so_d,
    MECH: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One block of queries: ``out`` by the module docstring's table."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    p, zb, ub, p_scale = _load_triple(MATS, bh, BLOCK_F, BLOCK_DV)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    _, f, r, _, _, _ = _query_rows(
        Q, SIN, COS, b, h, rows, N, D, sq_b, sq_n, sq_h, sq_d, norm_eps, MECH, HAS_ROPE, BLOCK_N, BLOCK_D, BLOCK_F
    )
    out = _mm_unit(r, p, Q.dtype.element_ty, HALF, True, SCALE) * p_scale
    t = tl.sum(f * zb[None, :], axis=1)
    if MECH == 0:
        out = out * (1.0 + 1.0 / (t + eps))[:, None] - t[:, None] * ub[None, :]
    elif MECH != 3:
        out = out / (t + eps)[:, None]
    offs_e = tl.arange(0, BLOCK_DV)
    omask = (rows < N)[:, None] & (offs_e < DV)[None, :]
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_n + offs_e[None, :] * so_d, out.to(Out.dtype.element_ty),
             omask)  # fmt: skip


@triton.jit
def _readout_backward_kernel(
    Q, SIN, COS, G, MATS, DQ, GS,
    N, H, D, DV, eps, norm_eps, per,
    sq_b, sq_n, sq_h, sq_d, sg_b, sg_n, sg_h, sg_d, sdq_b, sdq_n, sdq_h, sdq_d,
    MECH: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dq`` for one split of the queries; adds that split's gradients of ``P``, ``zb`` and ``u / M`` into ``GS``."""
    bh = tl.program_id(0)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_f = tl.arange(0, BLOCK_F)
    offs_e = tl.arange(0, BLOCK_DV)
    offs_d = tl.arange(0, BLOCK_D)
    p, zb, ub, p_scale = _load_triple(MATS, bh, BLOCK_F, BLOCK_DV)
    p_t = tl.trans(p)
    dp = tl.zeros((BLOCK_F, BLOCK_DV), tl.float32)
    dzb = tl.zeros((BLOCK_F,), tl.float32)
    dub = tl.zeros((BLOCK_DV,), tl.float32)
    for i in range(per):
        rows = ((tl.program_id(1) * per + i) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rows < N
        x, f, r, mask, ch, sgn = _query_rows(
            Q, SIN, COS, b, h, rows, N, D, sq_b, sq_n, sq_h, sq_d, norm_eps, MECH, HAS_ROPE, BLOCK_N, BLOCK_D, BLOCK_F
        )
        emask = mask_n[:, None] & (offs_e < DV)[None, :]
        g = tl.load(G + b * sg_b + h * sg_h + rows[:, None] * sg_n + offs_e[None, :] * sg_d, mask=emask, other=0.0)
        g = g.to(tl.float32)
        if MECH == 3:
            dn = g
            dt = tl.sum(g, axis=1) * 0.0
        else:
            # Only the gradient of t needs r P (through g . r P): one half-precision part is enough there.
            num = _mm_unit(r, p, Q.dtype.element_ty, HALF, False, SCALE) * p_scale
            t = tl.sum(f * zb[None, :], axis=1)
            den = t + eps
            if MECH == 0:
                dn = g * (1.0 + 1.0 / den)[:, None]
                dt = -tl.sum(g * (num / (den * den)[:, None] + ub[None, :]), axis=1)
                dub -= tl.sum(t[:, None] * g, axis=0)
            else:
                dn = g / den[:, None]
                dt = -tl.sum(dn * num, axis=1) / den
        # The sums first: r is then no longer needed (register room for the feature-map backward).
        dp += _mm(tl.trans(r), dn, Q.dtype.element_ty, HALF, False, SCALE)
        dzb += tl.sum(dt[:, None] * f, axis=0)
        # NaLa's widest tiles, and float16's (whose operand scaling takes registers) above 64 x 64, keep P in one
        # half-precision part here (register room).
        split: tl.constexpr = (MECH != 2 and not SCALE) or BLOCK_F * BLOCK_DV <= 64 * 64
        dr = _mm_unit(dn, p_t, Q.dtype.element_ty, HALF, split, SCALE) * p_scale
        df = _rope_backward(dr, SIN, COS, rows, ch, mask, D, HAS_ROPE, BLOCK_N, BLOCK_F) + dt[:, None] * zb[None, :]
        dq = _query_features_backward(x, f, df, mask, sgn, norm_eps, MECH, BLOCK_N, BLOCK_D)
        if MECH == 2:
            dmask = mask_n[:, None] & (offs_d < D)[None, :]
            dq_ptr = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + offs_d[None, :] * sdq_d
        else:
            dmask = mask
            dq_ptr = DQ + b * sdq_b + h * sdq_h + rows[:, None] * sdq_n + ch[None, :] * sdq_d
        tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), dmask)
    base = GS + bh * (BLOCK_F * BLOCK_DV + BLOCK_F + BLOCK_DV + 1)
    tl.atomic_add(base + offs_f[:, None] * BLOCK_DV + offs_e[None, :], dp, sem="relaxed")
    if MECH != 3:
        tl.atomic_add(base + BLOCK_F * BLOCK_DV + offs_f, dzb, sem="relaxed")
    if MECH == 0:
        tl.atomic_add(base + BLOCK_F * BLOCK_DV + BLOCK_F + offs_e, dub, sem="relaxed")


@triton.jit
def _state_backward_kernel(
    K, V, SIN, COS, AUX, GS, DK, DVv, DQBAR,
    M, H, D, DV, scale, inv_n,
    sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
    MECH: tl.constexpr, HAS_ROPE: tl.constexpr, HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dk`` and ``dv`` for one block of keys from the gradients ``GS`` of ``(S, z, u, W)``; RALA adds its
    ``d qbar``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_e = tl.arange(0, BLOCK_DV)
    offs_f = tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    ds, dz, du, dw_total = _load_triple(GS, bh, BLOCK_F, BLOCK_DV)
    qbar, lmax, kmax = _aux(AUX, bh, inv_n, MECH, BLOCK_D, BLOCK_F)
    ch, sgn = _channels(MECH, BLOCK_D, BLOCK_F)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = rows < M
    kmask = mask_m[:, None] & (ch < D)[None, :]
    vmask = mask_m[:, None] & (offs_e < DV)[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + rows[:, None] * sk_n + ch[None, :] * sk_d, mask=kmask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + rows[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
    v = v.to(tl.float32)
    x = k.to(tl.float32)
    f = _key_features(x, kmask, sgn, kmax, MECH)
    w = _key_weights(f, qbar, lmax, mask_m, scale, MECH)
    r = _rope(f, SIN, COS, rows, ch, kmask, D, HAS_ROPE, BLOCK_M, BLOCK_F)
    # [BLOCK_M, Dv]: dS^T r_j per key; RALA at the widest tiles keeps dS in one half-precision part (register room)
    split: tl.constexpr = MECH != 1 or BLOCK_F * BLOCK_DV <= 64 * 64
    ds_scale = _pow2_scale(ds)  # once for both products
    ds = ds / ds_scale
    rds = _mm_unit(r, ds, K.dtype.element_ty, HALF, split, SCALE) * ds_scale
    rv = tl.sum(rds * v, axis=1)  # r_j . dS v_j (RALA), so r is no longer needed
    dv = w[:, None] * rds + du[None, :]
    vds = _mm_unit(v, tl.trans(ds), K.dtype.element_ty, HALF, True, SCALE) * ds_scale  # [BLOCK_M, F]: dS v_j
    df = _rope_backward(w[:, None] * vds, SIN, COS, rows, ch, kmask, D, HAS_ROPE, BLOCK_M, BLOCK_F)
    df += w[:, None] * dz[None, :]
    if MECH == 1:
        dl = w * (rv + tl.sum(f * dz[None, :], axis=1) + dw_total)
        df += (scale * dl)[:, None] * qbar[None, :]
        tl.atomic_add(DQBAR + bh * BLOCK_F + offs_f, tl.sum((scale * dl)[:, None] * f, axis=0), sem="relaxed")
    dk = _key_features_backward(x, f, df, kmask, sgn, MECH, BLOCK_M, BLOCK_D)
    if MECH == 2:
        dkmask = mask_m[:, None] & (offs_d < D)[None, :]
        dk_ptr = DK + b * sdk_b + h * sdk_h + rows[:, None] * sdk_n + offs_d[None, :] * sdk_d
    else:
        dkmask = kmask
        dk_ptr = DK + b * sdk_b + h * sdk_h + rows[:, None] * sdk_n + ch[None, :] * sdk_d
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), dkmask)
    dv_ptr = DVv + b * sdv_b + h * sdv_h + rows[:, None] * sdv_n + offs_e[None, :] * sdv_d
    tl.store(dv_ptr, dv.to(DVv.dtype.element_ty), vmask)


@triton.jit
def _qbar_share_kernel(
    Q, DQ, DQBAR, OUT, NR, N, H, D, inv_n, sq_b, sq_n, sq_h, sq_d,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """RALA's last ``dq`` term in one pass: ``OUT = DQ + phi'(q) (d qbar / N)`` with ``phi'(q) = 1`` for ``q > 0``,
    else ``exp(q)`` (ELU + 1), rounded once to ``OUT``'s dtype. ``NR`` rows ``r = (b, i, h)`` of ``[B, N, H, D]``:
    ``Q`` at its strides, ``DQ`` (float32) and ``OUT`` contiguous, ``d qbar`` per ``(b, h)`` in rows of ``BLOCK_F``."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_D)
    mask = (r < NR)[:, None] & (c < D)[None, :]
    h = r % H
    b = r // H // N
    i = r // H % N
    q = tl.load(Q + (b * sq_b + i * sq_n + h * sq_h)[:, None] + c[None, :] * sq_d, mask=mask, other=0.0)
    q = q.to(tl.float32)
    dq = tl.load(DQ + r[:, None] * D + c[None, :], mask=mask, other=0.0)
    bar = tl.load(DQBAR + (b * H + h)[:, None] * BLOCK_F + c[None, :], mask=mask, other=0.0)
    dphi = tl.where(q > 0, 1.0, tl.exp(tl.minimum(q, 0.0)))
    tl.store(OUT + r[:, None] * D + c[None, :], (dq + dphi * (bar * inv_n)).to(OUT.dtype.element_ty), mask=mask)


# Launch helpers -------------------------------------------------------------------------------------------------------
def _blocks(mech: int, d: int, dv: int) -> tuple[int, int, int]:
    """``(BLOCK_D, BLOCK_F, BLOCK_DV)``: padded head dims and the feature width (NaLa: two halves)."""
    bd, bdv = tile_dim(d), tile_dim(dv)
    return bd, (2 * bd if mech == MECHANISM_IDS["norm_aware"] else bd), bdv


#: Warps per program of the forward's and the backward's kernels on half-precision inputs up to :data:`SEARCHED`
#: (padded ``F * Dv``): 4 was the fastest forward and backward of every case of the graph-timed search (bf16, B 128,
#: head dim 64; ``rope_settings_grid_6e8d144.json``: the former 8 took 1.3-1.6x the best forward time, 1.07-1.3x the
#: backward's). At head dim 32 (no shipped model) 4 warps came within 7% of the best found (2 warps) and took 0.6x the
#: former 8's time (``rope_settings_grid_af3eef6.json``). Larger tiles (head dim 128) and float32 inputs keep the former
#: settings (:data:`WARPS_LARGE`, :data:`ROWS_FLOAT32`), unsearched: float32 tiles of the new sizes need more shared
#: memory than an H100 / H200 block has (NaLa's state kernel at head dim 64: 256 KiB).
WARPS = 4
WARPS_LARGE = 8
SEARCHED = 128 * 64
SEARCHED_BACKWARD = 64 * 64
#: Launch settings, ``None`` for the defaults (:data:`WARPS`, :data:`ROWS`' rule, Triton's pipeline stages, about four
#: programs per SM); benchmarks sweep them (``benchmarks/linear_settings_ab.py --grid --family rope``). ``warps`` /
#: ``stages`` of the forward's state and read-out kernels (RALA's / Efficient Attention's key-max and query-sum passes
#: run at Triton's defaults), ``warps_backward`` / ``stages_backward`` of the backward's two; ``rows_<kernel>`` per
#: :data:`ROWS` key; ``per_sm`` / ``backward_per_sm`` the programs per SM of the forward's and the backward's splits.
TUNING: dict[str, int | None] = {
    "warps": None, "stages": None, "warps_backward": None, "stages_backward": None, "rows_state": None,
    "rows_readout": None, "rows_readout_backward": None, "rows_state_backward": None, "per_sm": None,
    "backward_per_sm": None,
}  # fmt: skip
#: Largest tile size ``F * Dv`` (padded) at which each kernel runs 64, then 32 rows per step; 16 above. The forward's
#: from the same search (64 rows fastest up to NaLa's 128 x 64 features at head dim 64; 16 above, as before); the
#: backward's read-out the largest without register spills for sm_90 at 8 warps, which the search kept (32 rows at
#: 64); its key pass 64 rows at head dim 64, and 32 for NaLa's 128 x 64 features, which run the backward at 8 warps
#: (:data:`SEARCHED_BACKWARD`): 1.56 ms against 1.82 at 4 warps, 16 rows (1.92 at the former 8 warps, 16 rows), the best
#: found 1.54 (``rope_settings_grid_af3eef6.json``). tests/test_kernels_sm90_compile.py compiles every kernel at its
#: rows and holds the measured spills.
ROWS = {"state": (128 * 64, 128 * 64), "readout": (128 * 64, 128 * 64), "readout_backward": (32 * 32, 64 * 64),
        "state_backward": (64 * 64, 128 * 64)}  # fmt: skip
#: :data:`ROWS` for float32 inputs: the former rule (the largest tiles without register spills at 8 warps).
ROWS_FLOAT32 = {"state": (16 * 32, 64 * 64), "readout": (64 * 64, 64 * 128), "readout_backward": (32 * 32, 64 * 64),
                "state_backward": (64 * 64, 64 * 64)}  # fmt: skip
#: Elements per program of RALA's final ``dq`` pass (:func:`_qbar_share_kernel`, elementwise, Triton's 4 warps).
QBAR_ELEMENTS = 1024


def _knob(key: str, default: int, pow2: bool = False) -> int:
    """``TUNING[key]`` if set (checked), else ``default``."""
    return tuned(TUNING, __name__, key, default, pow2)


def _rows(kernel: str, bf: int, bdv: int, half: bool = True) -> int:
    """Rows per step of ``kernel`` (a key of :data:`ROWS`) at padded feature width ``bf`` and value width ``bdv``, for
    half-precision (else float32, :data:`ROWS_FLOAT32`) inputs."""
    at_64, at_32 = (ROWS if half else ROWS_FLOAT32)[kernel]
    size = bf * bdv
    return _knob(f"rows_{kernel}", 64 if size <= at_64 else 32 if size <= at_32 else 16, pow2=True)


def _per_sm(backward: bool = False) -> int:
    return _knob("backward_per_sm" if backward else "per_sm", 4)


def _meta(mech: int, q: torch.Tensor, v: torch.Tensor, has_rope: bool, backward: bool = False) -> dict:
    """Constexprs and launch options of the forward's (or, with ``backward``, the backward's) kernels."""
    bd, bf, bdv = _blocks(mech, q.shape[-1], v.shape[-1])
    half = q.dtype in (torch.float16, torch.bfloat16)
    # the backward of NaLa's 128-wide features: 8 warps with 16 / 32-row tiles as fast as 4 with 16 / 64 (1.56 vs
    # 1.58 ms) and without 3.5 KB of register spills a thread
    warps = WARPS if half and bf * bdv <= (SEARCHED_BACKWARD if backward else SEARCHED) else WARPS_LARGE
    meta = dict(
        MECH=mech, HAS_ROPE=has_rope, HALF=half, SCALE=q.dtype == torch.float16, BLOCK_D=bd, BLOCK_F=bf, BLOCK_DV=bdv,
        num_warps=_knob("warps_backward" if backward else "warps", warps, pow2=True),
    )  # fmt: skip
    stages = _knob("stages_backward" if backward else "stages", 0)
    if stages:
        meta["num_stages"] = stages
    return meta


def _state_size(bf: int, bdv: int) -> int:
    return bf * bdv + bf + bdv + 1


def _unpack(buf: torch.Tensor, bf: int, bdv: int) -> tuple[torch.Tensor, ...]:
    """``(matrix [BH, F, Dv], vector [BH, F], vector [BH, Dv], scalar [BH, 1])`` views of a packed buffer."""
    n = bf * bdv
    return buf[:, :n].view(-1, bf, bdv), buf[:, n : n + bf], buf[:, n + bf : n + bf + bdv], buf[:, -1:]


def _pack(mat: torch.Tensor, vec_f: torch.Tensor, vec_e: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    return torch.cat([mat.flatten(1), vec_f, vec_e, scalar], dim=1).contiguous()


def _readout_mats(state: torch.Tensor, mech: int, scale: float, inv_m: float, bf: int, bdv: int) -> torch.Tensor:
    """``(P / c, zb, u / M, c)`` (module docstring; ``c`` a power of two at or above ``max |P|``) from the float32
    state ``(S, z, u, W)``; ``O(B H F Dv)`` work."""
    s_mat, z, u, w = _unpack(state, bf, bdv)
    if mech == MECHANISM_IDS["magnitude"]:
        c = scale / w
        p, zb = s_mat * c[:, :, None], z * c
    elif mech == MECHANISM_IDS["efficient"]:
        p, zb = s_mat / torch.where(z > 0, z, 1.0)[:, :, None], torch.zeros_like(z)
    else:
        p, zb = s_mat / w[:, :, None], z / w
    # P in [-1, 1] with its power-of-two scale in the scalar slot (the kernels' products need not rescale it per step)
    p_scale = torch.exp2(torch.ceil(torch.log2(p.abs().amax((1, 2)).clamp_min(1e-30))))[:, None]
    return _pack(p / p_scale[:, :, None], zb, u * inv_m, p_scale)


def _state_grads(
    state: torch.Tensor, grads: torch.Tensor, mech: int, scale: float, inv_m: float, bf: int, bdv: int
) -> torch.Tensor:
    """The gradients of ``(S, z, u, W)`` from those of the read-out's ``(P, zb, u / M)``."""
    s_mat, z, _, w = _unpack(state, bf, bdv)
    dp, dzb, dub, _ = _unpack(grads, bf, bdv)
    dw = torch.zeros_like(w)
    du = torch.zeros_like(dub)
    if mech == MECHANISM_IDS["magnitude"]:
        c = scale / w
        ds, dz, du = dp * c[:, :, None], dzb * c, dub * inv_m
    elif mech == MECHANISM_IDS["efficient"]:
        zs = torch.where(z > 0, z, 1.0)
        ds = dp / zs[:, :, None]
        dz = -(ds * s_mat).sum(-1) / zs
    else:
        ds, dz = dp / w[:, :, None], dzb / w
        dw = -((dp * s_mat).sum((1, 2))[:, None] + (dzb * z).sum(1, keepdim=True)) / (w * w)
    return _pack(ds, dz, du, dw)


# Custom ops -----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("visionlin::rope_linear_attention_fwd", mutates_args=())
def rope_linear_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sin: torch.Tensor | None,
    cos: torch.Tensor | None,
    mech: int,
    scale: float,
    eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, Dv] in q's dtype, float32 state [B*H, F*Dv' + F + Dv' + 1] = (S, z, u, W), float32 aux
    [B*H, 2 BLOCK_D] = (sum_i f_i, max_j l_j) for RALA or (-, max_j k_j) for Efficient Attention)``; ``sin`` / ``cos``:
    contiguous float32 ``[N, D]`` tables or ``None``."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    meta = _meta(mech, q, v, sin is not None)
    bd, bf, bdv = meta["BLOCK_D"], meta["BLOCK_F"], meta["BLOCK_DV"]
    out = torch.empty(b, n, h, dv, device=q.device, dtype=q.dtype)
    state = torch.zeros(b * h, _state_size(bf, bdv), device=q.device, dtype=torch.float32)
    aux = torch.zeros(b * h, 2 * bd, device=q.device, dtype=torch.float32)
    if b * h == 0 or m == 0:
        return out, state, aux
    sin_t, cos_t = (sin, cos) if sin is not None else (q, q)
    rows, rows_out = _rows("state", bf, bdv, meta["HALF"]), _rows("readout", bf, bdv, meta["HALF"])
    inv_n = 1.0 / max(n, 1)
    if mech in (MECHANISM_IDS["rank_augmented"], MECHANISM_IDS["efficient"]):
        aux[:, bd:] = float("-inf")
        if mech == MECHANISM_IDS["rank_augmented"] and n:
            splits, per = _splits(n, rows, b * h, q.device, per_sm=_per_sm())
            launch(_qsum_kernel, (b * h, splits), q, aux, n, h, d, per, *q.stride(), BLOCK_N=rows, BLOCK_D=bd)
        splits, per = _splits(m, rows, b * h, q.device, per_sm=_per_sm())
        launch(_kmax_kernel, (b * h, splits),
            k, aux, m, h, d, per, inv_n, scale, *k.stride(), MECH=mech, BLOCK_M=rows, BLOCK_D=bd
        )  # fmt: skip
    splits, per = _splits(m, rows, b * h, q.device, per_sm=_per_sm())
    launch(_state_kernel, (b * h, splits),
        k, v, sin_t, cos_t, aux, state, m, h, d, dv, per, inv_n, scale, *k.stride(), *v.stride(), BLOCK_M=rows, **meta
    )  # fmt: skip
    if n:
        mats = _readout_mats(state, mech, scale, 1.0 / m, bf, bdv)
        launch(_readout_kernel, (cdiv(n, rows_out), b * h),
            q, sin_t, cos_t, mats, out, n, h, d, dv, eps, norm_eps, *q.stride(), *out.stride(), BLOCK_N=rows_out, **meta
        )  # fmt: skip
    return out, state, aux


@rope_linear_attention_fwd.register_fake
def _(q, k, v, sin, cos, mech, scale, eps, norm_eps):
    b, n, h, d = q.shape
    bd, bf, bdv = _blocks(mech, d, v.shape[-1])
    return (
        q.new_empty(b, n, h, v.shape[-1]),
        q.new_empty(b * h, _state_size(bf, bdv), dtype=torch.float32),
        q.new_empty(b * h, 2 * bd, dtype=torch.float32),
    )


@torch.library.custom_op("visionlin::rope_linear_attention_bwd", mutates_args=())
def rope_linear_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sin: torch.Tensor | None,
    cos: torch.Tensor | None,
    state: torch.Tensor,
    aux: torch.Tensor,
    g: torch.Tensor,
    mech: int,
    scale: float,
    eps: float,
    norm_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`rope_linear_attention_fwd`'s output for its gradient ``g``."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    meta = _meta(mech, q, v, sin is not None, backward=True)
    bf, bdv = meta["BLOCK_F"], meta["BLOCK_DV"]
    rala = mech == MECHANISM_IDS["rank_augmented"]
    # RALA's dq gets a second term after the key pass: its first part is kept in float32 until then.
    dq = torch.zeros(b, n, h, d, device=q.device, dtype=torch.float32 if rala else q.dtype)
    dk = torch.zeros(b, m, h, d, device=k.device, dtype=k.dtype)
    dvv = torch.zeros(b, m, h, dv, device=v.device, dtype=v.dtype)
    if b * h == 0 or m == 0:
        return dq.to(q.dtype), dk, dvv
    sin_t, cos_t = (sin, cos) if sin is not None else (q, q)
    grads = torch.zeros_like(state)
    mats = _readout_mats(state, mech, scale, 1.0 / m, bf, bdv)
    dqbar = torch.zeros(b * h, bf, device=q.device, dtype=torch.float32)
    rows, rows_k = _rows("readout_backward", bf, bdv, meta["HALF"]), _rows("state_backward", bf, bdv, meta["HALF"])
    inv_n = 1.0 / max(n, 1)
    if n:
        splits, per = _splits(n, rows, b * h, q.device, per_sm=_per_sm(backward=True))
        launch(_readout_backward_kernel, (b * h, splits),
            q, sin_t, cos_t, g, mats, dq, grads, n, h, d, dv, eps, norm_eps, per,
            *q.stride(), *g.stride(), *dq.stride(), BLOCK_N=rows, **meta,
        )  # fmt: skip
    grads = _state_grads(state, grads, mech, scale, 1.0 / m, bf, bdv)
    launch(_state_backward_kernel, (cdiv(m, rows_k), b * h),
        k, v, sin_t, cos_t, aux, grads, dk, dvv, dqbar, m, h, d, dv, scale, inv_n,
        *k.stride(), *v.stride(), *dk.stride(), *dvv.stride(), BLOCK_M=rows_k, **meta,
    )  # fmt: skip
    if rala and n:
        # d qbar reaches every query through qbar = mean_i (ELU(q_i) + 1): dq_i += phi'(q_i) d qbar / N, one pass
        # (as eight PyTorch ops inside the custom op, which Inductor cannot fuse: in RAVLT-T's compiled step on the
        # H200 their `where` alone took 0.26 ms and their float32 multiplies 0.29 ms)
        out = dq if q.dtype == torch.float32 else torch.empty(b, n, h, d, device=q.device, dtype=q.dtype)
        bd = meta["BLOCK_D"]
        rows_q = max(1, QBAR_ELEMENTS // bd)
        launch(_qbar_share_kernel, (cdiv(b * n * h, rows_q),),
            q, dq, dqbar, out, b * n * h, n, h, d, inv_n, *q.stride(), BLOCK_R=rows_q, BLOCK_D=bd, BLOCK_F=bf,
        )  # fmt: skip
        return out, dk, dvv
    return dq.to(q.dtype), dk, dvv


@rope_linear_attention_bwd.register_fake
def _(q, k, v, sin, cos, state, aux, g, mech, scale, eps, norm_eps):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, sin, cos, mech, scale, eps, norm_eps = inputs
    _, state, aux = output
    ctx.mark_non_differentiable(state, aux)
    ctx.save_for_backward(q, k, v, sin, cos, state, aux)
    ctx.args = (mech, scale, eps, norm_eps)


def _backward(ctx, g, _g_state=None, _g_aux=None):
    q, k, v, sin, cos, state, aux = ctx.saved_tensors
    dq, dk, dv = _rope_linear_bwd_call(q, k, v, sin, cos, state, aux, g, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


rope_linear_attention_fwd.register_autograd(_backward, setup_context=_setup)
_rope_linear_bwd_call = eager_call(rope_linear_attention_bwd)
_rope_linear_fwd_call = eager_op(rope_linear_attention_fwd, _setup, _backward)


def rope_linear_attention_triton(
    mechanism: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
    norm_eps: float = 0.0,
) -> torch.Tensor:
    """The ``"triton"`` backend of MALA (``mechanism="magnitude"``), RALA (``"rank_augmented"``) and NaLa
    (``"norm_aware"``): their ``*_reference`` with the feature maps, RoPE and normaliser fused into the kernels."""
    s = q.shape[-1] ** -0.5 if scale is None else float(scale)
    sin = cos = None
    if rope is not None:
        sin, cos = (t.to(torch.float32).contiguous() for t in rope)
    out, _, _ = _rope_linear_fwd_call(q, k, v, sin, cos, MECHANISM_IDS[mechanism], s, float(eps), float(norm_eps))
    return out


def efficient_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.efficient_attention`."""
    out, _, _ = _rope_linear_fwd_call(q, k, v, None, None, MECHANISM_IDS["efficient"], 1.0, 0.0, 0.0)
    return out
