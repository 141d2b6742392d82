"""Pure InfSA in Triton without the ``N x M`` score matrix (flash-style, memory linear in ``N``), forward and backward.

Math (:func:`visionlin.kernels.infsa.pure_infsa_attention_reference`), per (batch, head), heads-last ``[B, N, H, D]``::

    S = Q K^T / D;   A = relu(S);   F = ||A||_F (all N * M entries);   c = rho / (F + eps);   out = c A V

Forward: one kernel over query blocks (grid ``(cdiv(N, BLOCK_N), B * H)``) streams the key / value tiles once and keeps,
per query row ``n``, a power-of-two scale ``r_n`` at or above ``max_m A_nm`` seen so far (updated online as
flash-attention updates its softmax maximum; a larger scale rescales the accumulators by an exact power of two),
``ssq_n = sum_m (A_nm / r_n)^2`` and ``y_n = sum_m (A_nm / r_n) v_m`` (float32). ``A / r`` lies in ``[0, 1]``: it is
the tensor-core operand (float16 cannot overflow, bfloat16 / float32 do not need it) and its squares cannot overflow
float32 whatever the inputs' magnitude. Then ``F = r_max (sum_n (r_n / r_max)^2 ssq_n)^1/2`` per (batch, head) (a few
PyTorch ops on ``[B * H, N]``), and an epilogue kernel writes ``out_n = y_n r_n c`` in the inputs' dtype (one rounding).
One pass over the keys instead of a norm pass plus an output pass: the float32 ``y`` buffer (``[B, N, H, Dv]``) costs
less than recomputing ``Q K^T``.

Backward (``L = sum_n dout_n . out_n``)::

    dL/dA_nm  = c (dout_n . v_m) + (dL/dF) dF/dA_nm,   dF/dA_nm = A_nm / F
    dL/dF     = sum_n dout_n . d out_n / dF = -sum_n dout_n . out_n / (F + eps)   (d out / dF = -out / (F + eps))
    so  dA_nm = c (dP_nm + beta A_nm),  dP = dout V^T,  beta = -U / F,  U = sum_n dout_n . out_n / rho
    dS = dA [S > 0] / D;   dq = dS K;   dk = dS^T Q;   dv = c A^T dout;   drho = U (summed over the batch per head)

``U`` (per (batch, head)) is one PyTorch reduction over ``dout * out`` (flash-attention 2's ``rowsum(dO * O)``). The
kernels form ``dS' = (dP + beta A) [S > 0]`` without the factor ``c / D`` (``rho / ||A||_F`` is ~1e-6 at N = 8192 with
std-30 inputs: folded in, float16 operands would be subnormal) and apply it to the float32 sums. Two kernels,
FA2-style: over key blocks (``dk``, ``dv``; loops over the query blocks) and over query blocks (``dq``; loops over the
keys). The ``dq`` kernel recomputes ``Q K^T`` and ``dout V^T`` (7 products instead of 5) but needs no float32 ``dq``
buffer and no atomics: deterministic, and no contention at long ``M``. In float16 each row of a computed operand
(``A``, ``dS'``) is divided by a power of two at or above its largest magnitude before the product (no overflow, no
subnormals for the largest entries) and the product row multiplied back.

``rho`` is a constant to the custom ops (``rho * A V / (F + eps)`` in float32 before the one rounding); when ``rho``
requires a gradient, :func:`pure_infsa_triton` runs them with ``rho = 1`` and a float32 output and multiplies outside
(``drho = sum(dout * out)`` for every ``rho``, 0 included; costs a float32 ``[B, N, H, Dv]`` output kept for backward).

Precision: products run on the tensor cores in the inputs' half dtype with float32 accumulation; float32 inputs
multiply in IEEE float32 (no TF32: errors ~1e-6, as :mod:`visionlin.kernels.triton.linear`). Head dims up to 128
(padded to the next power of two >= 16, masked); ``N`` and ``M`` arbitrary; inputs may be strided views (e.g.
``qkv.unbind(2)`` of a fused ``[B, N, 3, H, D]`` projection), read in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import MAX_HEAD_DIM, heads_grid_reasons, triton_unavailable
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, tile_dim

__all__ = ["TUNING", "pure_infsa_triton", "triton_pure_infsa_supports"]

_TINY_LOG2 = tl.constexpr(-100.0)  # scales start at 2^-100: rows whose scores are all 0 stay finite


@triton.jit
def _log2_scale(x):
    """Exponent ``e`` (float32, integral) with ``2^e`` at or above each entry of ``x >= 0`` (``2^-100`` at least)."""
    return tl.ceil(tl.log2(tl.maximum(x, 7.888609052210118e-31)))


@triton.jit
def _dot(a, b, acc, HALF: tl.constexpr):
    """``acc + a @ b``: half operands on the tensor cores, float32 ones in IEEE precision; float32 accumulation."""
    if HALF:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _dot_rows(x, y, acc, HALF: tl.constexpr, SCALE: tl.constexpr):
    """``acc + x @ y`` for a computed float32 tile ``x`` and a loaded tile ``y`` (``x`` rounded to ``y``'s dtype).

    With ``SCALE`` (float16) each row of ``x`` is divided by a power of two at or above its largest magnitude before
    the rounding and the product row multiplied back in float32: exact rescalings, so float16's range never clips.
    """
    if SCALE:
        e = _log2_scale(tl.max(tl.abs(x), axis=1))
        xs = (x * tl.exp2(-e)[:, None]).to(y.dtype)
        return acc + tl.dot(xs, y) * tl.exp2(e)[:, None]
    return _dot(x.to(y.dtype), y, acc, HALF)


@triton.jit
def _forward_kernel(
    Q, K, V, Y, R, SSQ,
    N, M, H, D, DV, inv_d,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sy_b, sy_n, sy_h, sy_d,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One block of queries against every key: row scales ``r``, ``ssq = sum (A / r)^2`` and ``y = (A / r) V``."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_e = offs_e < DV
    q_ptr = Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d
    q = tl.load(q_ptr, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    e = tl.full((BLOCK_N,), _TINY_LOG2, tl.float32)  # r = 2^e
    ssq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k = tl.load(
            k_base + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        v = tl.load(
            v_base + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d, mask=mask_m[:, None] & mask_e[None, :], other=0.0
        )
        # Padded rows / columns are zeros in q and k, so their scores are 0 and add nothing.
        a = tl.maximum(_dot(q, tl.trans(k), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), HALF), 0.0) * inv_d
        e_new = tl.maximum(e, _log2_scale(tl.max(a, axis=1)))
        shrink = tl.exp2(e - e_new)
        p = a * tl.exp2(-e_new)[:, None]
        ssq = ssq * (shrink * shrink) + tl.sum(p * p, axis=1)
        acc = _dot(p.to(v.dtype), v, acc * shrink[:, None], HALF)
        e = e_new
    y_ptr = Y + b * sy_b + h * sy_h + offs_n[:, None] * sy_n + offs_e[None, :] * sy_d
    tl.store(y_ptr, acc, mask=mask_n[:, None] & mask_e[None, :])
    row = pid_bh.to(tl.int64) * N + offs_n
    tl.store(R + row, tl.exp2(e), mask=mask_n)
    tl.store(SSQ + row, ssq, mask=mask_n)


@triton.jit
def _epilogue_kernel(
    Y, R, C, Out,
    N, H, DV,
    sy_b, sy_n, sy_h, sy_d, so_b, so_n, so_h, so_d,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``out_n = y_n r_n c`` with ``c = rho / (F + eps)`` of the (batch, head), rounded once to the output dtype."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask = mask_n[:, None] & (offs_e < DV)[None, :]
    y = tl.load(Y + b * sy_b + h * sy_h + offs_n[:, None] * sy_n + offs_e[None, :] * sy_d, mask=mask, other=0.0)
    r = tl.load(R + pid_bh.to(tl.int64) * N + offs_n, mask=mask_n, other=0.0)
    c = tl.load(C + pid_bh)
    out = y * (r * c)[:, None]
    o_ptr = Out + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_e[None, :] * so_d
    tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kv_kernel(
    Q, K, V, G, C, BETA, DK, DVv,
    N, M, H, D, DV, inv_d,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sg_b, sg_n, sg_h, sg_d,
    sdk_b, sdk_n, sdk_h, sdk_d, sdv_b, sdv_n, sdv_h, sdv_d,
    HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dk = (c / D) dS'^T Q`` and ``dv = c A^T dout`` for one block of keys, looping over every query block
    (tiles transposed, ``[keys, queries]``)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_m = offs_m < M
    mask_d = offs_d < D
    mask_e = offs_e < DV
    kmask = mask_m[:, None] & mask_d[None, :]
    vmask = mask_m[:, None] & mask_e[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kmask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
    c = tl.load(C + pid_bh)
    beta = tl.load(BETA + pid_bh)
    q_base = Q + b * sq_b + h * sq_h
    g_base = G + b * sg_b + h * sg_h
    acc_k = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        q = tl.load(
            q_base + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d, mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        g = tl.load(
            g_base + offs_n[:, None] * sg_n + offs_e[None, :] * sg_d, mask=mask_n[:, None] & mask_e[None, :], other=0.0
        )
        st = _dot(k, tl.trans(q), zeros, HALF)  # D * S^T
        at = tl.maximum(st, 0.0) * inv_d
        dpt = _dot(v, tl.trans(g), zeros, HALF)
        dst = tl.where(st > 0, dpt + beta * at, 0.0)
        acc_v = _dot_rows(at, g, acc_v, HALF, SCALE)
        acc_k = _dot_rows(dst, q, acc_k, HALF, SCALE)
    dk_ptr = DK + b * sdk_b + h * sdk_h + offs_m[:, None] * sdk_n + offs_d[None, :] * sdk_d
    tl.store(dk_ptr, (acc_k * (c * inv_d)).to(DK.dtype.element_ty), mask=kmask)
    dv_ptr = DVv + b * sdv_b + h * sdv_h + offs_m[:, None] * sdv_n + offs_e[None, :] * sdv_d
    tl.store(dv_ptr, (acc_v * c).to(DVv.dtype.element_ty), mask=vmask)


@triton.jit
def _backward_q_kernel(
    Q, K, V, G, C, BETA, DQ,
    N, M, H, D, DV, inv_d,
    sq_b, sq_n, sq_h, sq_d, sk_b, sk_n, sk_h, sk_d, sv_b, sv_n, sv_h, sv_d, sg_b, sg_n, sg_h, sg_d,
    sdq_b, sdq_n, sdq_h, sdq_d,
    HALF: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """``dq = (c / D) dS' K`` for one block of queries, looping over every key block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n = offs_n < N
    mask_d = offs_d < D
    mask_e = offs_e < DV
    qmask = mask_n[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
    g_ptr = G + b * sg_b + h * sg_h + offs_n[:, None] * sg_n + offs_e[None, :] * sg_d
    g = tl.load(g_ptr, mask=mask_n[:, None] & mask_e[None, :], other=0.0)
    c = tl.load(C + pid_bh)
    beta = tl.load(BETA + pid_bh)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    zeros = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        k = tl.load(
            k_base + offs_m[:, None] * sk_n + offs_d[None, :] * sk_d, mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        v = tl.load(
            v_base + offs_m[:, None] * sv_n + offs_e[None, :] * sv_d, mask=mask_m[:, None] & mask_e[None, :], other=0.0
        )
        s = _dot(q, tl.trans(k), zeros, HALF)  # D * S
        dp = _dot(g, tl.trans(v), zeros, HALF)
        ds = tl.where(s > 0, dp + beta * (s * inv_d), 0.0)
        acc = _dot_rows(ds, k, acc, HALF, SCALE)
    dq_ptr = DQ + b * sdq_b + h * sdq_h + offs_n[:, None] * sdq_n + offs_d[None, :] * sdq_d
    tl.store(dq_ptr, (acc * (c * inv_d)).to(DQ.dtype.element_ty), mask=qmask)


# Launch helpers -------------------------------------------------------------------------------------------------------
#: Query / key rows per tile of the forward (``None``: 64 for half inputs, 32 for float32) and of the backward kernels
#: (``None``: 64 for half inputs with head dims up to 64, else 32), warps per program (``None``: 4 for head dims up to
#: 64, else 8) and pipeline stages (``None``: Triton's default). The defaults are the largest tiles ptxas compiles for
#: sm_90 without register spills; not yet timed on a GPU.
TUNING: dict[str, int | None] = {"rows": None, "rows_backward": None, "warps": None, "stages": None}


def _meta(q: torch.Tensor, v: torch.Tensor, backward: bool = False) -> dict[str, int | bool]:
    bd, bdv = tile_dim(q.shape[-1]), tile_dim(v.shape[-1])
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backward:
        rows = TUNING["rows_backward"] or (64 if half and max(bd, bdv) <= 64 else 32)
    else:
        rows = TUNING["rows"] or (64 if half else 32)
    meta: dict[str, int | bool] = dict(
        HALF=half, BLOCK_N=rows, BLOCK_M=rows, BLOCK_D=bd, BLOCK_DV=bdv,
        num_warps=TUNING["warps"] or (4 if max(bd, bdv) <= 64 else 8),
    )  # fmt: skip
    if backward:
        meta["SCALE"] = q.dtype == torch.float16
    if TUNING["stages"]:
        meta["num_stages"] = TUNING["stages"]
    return meta


def _per_bh(rho: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-head ``rho`` ``[H]`` repeated to one value per (batch, head) ``[B * H]`` (index ``b * H + h``)."""
    return rho.float().repeat(batch)


# Custom ops -----------------------------------------------------------------------------------------------------------
@torch.library.custom_op("visionlin::pure_infsa_fwd", mutates_args=())
def pure_infsa_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rho: torch.Tensor, eps: float, float32_out: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, N, H, Dv] in q's dtype or float32, ||A||_F [B * H] float32)`` for a constant per-head ``rho``
    ``[H]``."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    out = torch.empty(b, n, h, dv, device=q.device, dtype=torch.float32 if float32_out else q.dtype)
    fro = torch.zeros(b * h, device=q.device, dtype=torch.float32)
    if b * h == 0 or n == 0 or m == 0 or dv == 0:
        return out, fro  # nothing to write (M = 0 is refused before any backend runs)
    meta = _meta(q, v)
    y = torch.empty(b, n, h, dv, device=q.device, dtype=torch.float32)
    r = torch.empty(b * h, n, device=q.device, dtype=torch.float32)
    ssq = torch.empty_like(r)
    grid = (cdiv(n, meta["BLOCK_N"]), b * h)
    launch(_forward_kernel, grid,
        q, k, v, y, r, ssq, n, m, h, d, dv, 1.0 / d, *q.stride(), *k.stride(), *v.stride(), *y.stride(), **meta
    )  # fmt: skip
    # ||A||_F from the row scales and scaled sums: powers of two, nothing overflows or rounds in the rescaling.
    rmax = r.amax(dim=1, keepdim=True)
    fro = rmax.squeeze(1) * ((r / rmax).square() * ssq).sum(dim=1).sqrt()
    c = _per_bh(rho, b) / (fro + eps)
    launch(_epilogue_kernel, grid,
        y, r, c, out, n, h, dv, *y.stride(), *out.stride(),
        BLOCK_N=meta["BLOCK_N"], BLOCK_DV=meta["BLOCK_DV"], num_warps=4,
    )  # fmt: skip
    return out, fro


@pure_infsa_fwd.register_fake
def _(q, k, v, rho, eps, float32_out):
    b, n, h, _ = q.shape
    out = q.new_empty(b, n, h, v.shape[-1], dtype=torch.float32 if float32_out else q.dtype)
    return out, q.new_empty(b * h, dtype=torch.float32)


@torch.library.custom_op("visionlin::pure_infsa_bwd", mutates_args=())
def pure_infsa_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    fro: torch.Tensor,
    rho: torch.Tensor,
    g: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`pure_infsa_fwd`'s output for its gradient ``g`` (``rho`` held constant)."""
    b, n, h, d = q.shape
    m, dv = k.shape[1], v.shape[-1]
    dq, dk, dvv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if b * h == 0 or n == 0 or m == 0 or dv == 0:
        return dq.zero_(), dk.zero_(), dvv.zero_()  # empty output (Dv = 0: nothing depends on the inputs)
    g = g.to(q.dtype)
    meta = _meta(q, v, backward=True)
    rho_bh = _per_bh(rho, b)
    # U = sum_n dout_n . out_n / rho, per (batch, head); beta = -U / F; c = rho / (F + eps) (module docstring).
    dot = (g.float() * out.float()).sum(dim=(1, 3)).reshape(b * h)
    u = torch.where(rho_bh != 0, dot / torch.where(rho_bh != 0, rho_bh, 1.0), 0.0)
    beta = torch.where(fro > 0, -u / torch.where(fro > 0, fro, 1.0), 0.0)
    c = rho_bh / (fro + eps)
    strides = (*q.stride(), *k.stride(), *v.stride(), *g.stride())
    launch(_backward_kv_kernel, (cdiv(m, meta["BLOCK_M"]), b * h),
        q, k, v, g, c, beta, dk, dvv, n, m, h, d, dv, 1.0 / d, *strides, *dk.stride(), *dvv.stride(), **meta
    )  # fmt: skip
    launch(_backward_q_kernel, (cdiv(n, meta["BLOCK_N"]), b * h),
        q, k, v, g, c, beta, dq, n, m, h, d, dv, 1.0 / d, *strides, *dq.stride(), **meta
    )  # fmt: skip
    return dq, dk, dvv


@pure_infsa_bwd.register_fake
def _(q, k, v, out, fro, rho, g, eps):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup(ctx, inputs, output):
    q, k, v, rho, eps, _ = inputs
    out, fro = output
    ctx.mark_non_differentiable(fro)
    ctx.save_for_backward(q, k, v, out, fro, rho)
    ctx.eps = eps


def _backward(ctx, g, _g_fro):
    q, k, v, out, fro, rho = ctx.saved_tensors
    dq, dk, dv = _pure_infsa_bwd_call(q, k, v, out, fro, rho, g, ctx.eps)
    return dq, dk, dv, None, None, None  # rho is a constant here: pure_infsa_triton differentiates it outside


pure_infsa_fwd.register_autograd(_backward, setup_context=_setup)
_pure_infsa_bwd_call = eager_call(pure_infsa_bwd)
_pure_infsa_fwd_call = eager_op(pure_infsa_fwd, _setup, _backward)


# Public functions -----------------------------------------------------------------------------------------------------
def pure_infsa_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rho: float | torch.Tensor = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.pure_infsa_attention` (arguments checked there).

    Args:
        q: Queries ``[B, N, H, D]`` (any strides).
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        rho: A float, a 0-dim tensor or one value per head ``[H]``; gradients reach a tensor that requires them.
        eps: Added to the Frobenius norm.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    heads = q.shape[2]
    if isinstance(rho, torch.Tensor):
        learn = rho.requires_grad and torch.is_grad_enabled()
        per_head = rho.detach().to(device=q.device, dtype=torch.float32).reshape(-1).expand(heads).contiguous()
    else:
        learn = False
        per_head = torch.full((heads,), float(rho), device=q.device, dtype=torch.float32)
    if not learn:
        return _pure_infsa_fwd_call(q, k, v, per_head, float(eps), False)[0]
    # rho = 1 in the kernels, float32 output: out and drho = sum(dout * out) round once, as the reference's.
    out = _pure_infsa_fwd_call(q, k, v, torch.ones_like(per_head), float(eps), True)[0]
    r = rho.to(device=q.device, dtype=torch.float32)
    return (out * (r[:, None] if r.ndim else r)).to(q.dtype)


def triton_pure_infsa_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> list[str]:
    """Reasons the pure-InfSA Triton kernels cannot run these tensors (empty if they can)."""
    reasons = triton_unavailable(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(f"needs one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        reasons.append(
            f"head dims D={q.shape[-1]}, Dv={v.shape[-1]} exceed {MAX_HEAD_DIM} (allowed: 1 to {MAX_HEAD_DIM}, "
            "tiled as 16, 32, 64 or 128 lanes)"
        )
    return reasons + heads_grid_reasons(q)
