"""The selective scan (Mamba S6) as a chunked Triton scan, forward and backward, with a float32 state.

Math: :func:`visionlin.kernels.scan.selective_scan_reference`, per batch, channel ``d`` and state ``n``::

    delta = softplus(delta_raw + delta_bias)   (each optional)
    a_t = delta_t A                            (<= 0: a log-decay)
    x_t = delta_t u_t B_t
    h_t = exp(a_t) h_{t-1} + x_t
    y_t = (<h_t, C_t>_N + D u_t) * silu(z_t)

A program owns one batch element and ``BLOCK_D`` channels, all ``N`` states (``[BLOCK_D, N]`` in float32 registers),
and walks the sequence in chunks of ``T`` positions: it loads a chunk's ``[T, BLOCK_D]`` activations and
``[T, BLOCK_D, N]`` projections at once, scans the pairs ``(a, x)`` inside the chunk with ``tl.associative_scan``
(``(a1, x1) then (a2, x2) = (a1 + a2, exp(a2) x1 + x2)``: every exponential is of a sum of log-decays <= 0, so
nothing overflows whatever the step sizes, as the reference) and carries the state to the next chunk. The forward
saves each chunk's entering state (``[B, L / T, D, N]`` float32) for the backward.

Backward, chunks from last to first: the chunk's states are recomputed from its saved entering state; the adjoint of
the state obeys the reverse recurrence ``dh_t = C_t dy'_t + exp(a_{t+1}) dh_{t+1}`` (``dy' = dy silu(z)``), scanned
with the same combine on the chunk loaded in reversed time order (then flipped back with ``tl.flip``), carrying
``exp(a_first) dh_first`` to the chunk before. Then ``dx = dh``, ``da = dh (h - x) = dh exp(a) h_{t-1}``::

    ddelta = sum_n (dx u B + da A);   du = sum_n dx delta B + dy' D;   dB = sum_d dx delta u;   dC = sum_d dy' h
    dA = sum_{b,t} da delta;   dD = sum_{b,t} dy' u;   dz = dy (<h, C> + D u) silu'(z);   softplus' = sigmoid

``dB`` / ``dC`` sum over the channel blocks with float32 atomics (one ``[T, N]`` row per program and chunk, or per
channel for grouped ``B`` / ``C``); ``dA``, ``dD``, ``ddelta_bias`` are per-batch float32 partial sums reduced by
PyTorch. A gradient reaching the returned last state joins the adjoint at the last position.

Inputs may be any float dtype among float32 / float16 / bfloat16 (loaded and computed in float32); outputs and input
gradients take the inputs' dtypes. ``N`` up to 64.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2

__all__ = ["MAX_STATE", "TUNING", "ScanConfig", "scan_config", "selective_scan_triton"]

#: Largest state size ``N`` the kernels hold in registers.
MAX_STATE = 64


@triton.jit
def _combine(a1, x1, a2, x2):
    """``(a1, x1)`` then ``(a2, x2)`` for ``h = exp(a) h' + x``."""
    return a1 + a2, tl.exp(a2) * x1 + x2


@triton.jit
def _softplus(x):
    """PyTorch's softplus (threshold 20): ``x`` above 20, ``log1p(exp(x))`` below."""
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _row(x, idx, WHICH: tl.constexpr):
    """Row ``WHICH`` of ``x`` ``[T, BD, BN]`` along axis 0 (``idx`` = ``arange(T)``), as ``[BD, BN]``."""
    return tl.sum(tl.where((idx == WHICH)[:, None, None], x, 0.0), axis=0)


@triton.jit
def _fwd_kernel(
    U, DT, A, BM, CM, DP, Z, BIAS, YO, LAST, STATES,
    L, DCH, N, CPG,
    su_b, su_l, su_d, sd_b, sd_l, sd_d, sa_d, sa_n, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    sz_b, sz_l, sz_d, sy_b, sy_l, sy_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``y`` of one batch element and ``BLOCK_D`` channels; the entering state of every chunk; the last state."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(L, T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < DCH
    nmask = offs_n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    grp = offs_d // CPG
    a_mat = tl.load(A + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=dn_mask, other=0.0).to(tl.float32)
    if HAS_D:
        d_skip = tl.load(DP + offs_d, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=dmask, other=0.0).to(tl.float32)
    idx = tl.arange(0, T)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    state_base = STATES + (b * n_chunks) * DCH * N
    for c in range(0, n_chunks):
        t = c * T + idx
        tmask = t < L
        td = tmask[:, None] & dmask[None, :]
        tdn = td[:, :, None] & nmask[None, None, :]
        tl.store(state_base + c * DCH * N + offs_d[:, None] * N + offs_n[None, :], h, mask=dn_mask)
        u = tl.load(U + b * su_b + t[:, None] * su_l + offs_d[None, :] * su_d, mask=td, other=0.0).to(tl.float32)
        dl = tl.load(DT + b * sd_b + t[:, None] * sd_l + offs_d[None, :] * sd_d, mask=td, other=0.0)
        dl = dl.to(tl.float32)
        if HAS_BIAS:
            dl += bias[None, :]
        if SOFTPLUS:
            dl = _softplus(dl)
        dl = tl.where(td, dl, 0.0)
        bcol = b * sb_b + t[:, None, None] * sb_l + grp[None, :, None] * sb_g + offs_n[None, None, :] * sb_n
        bm = tl.load(BM + bcol, mask=tdn, other=0.0).to(tl.float32)
        ccol = b * sc_b + t[:, None, None] * sc_l + grp[None, :, None] * sc_g + offs_n[None, None, :] * sc_n
        cm = tl.load(CM + ccol, mask=tdn, other=0.0).to(tl.float32)
        a = dl[:, :, None] * a_mat[None, :, :]  # [T, BD, BN], <= 0; 0 on padding (identity steps)
        x = (dl * u)[:, :, None] * bm
        acum, hs = tl.associative_scan((a, x), 0, _combine)
        hh = hs + tl.exp(acum) * h[None, :, :]
        y = tl.sum(hh * cm, axis=2)  # [T, BD]
        if HAS_D:
            y += u * d_skip[None, :]
        if HAS_Z:
            z = tl.load(Z + b * sz_b + t[:, None] * sz_l + offs_d[None, :] * sz_d, mask=td, other=0.0)
            z = z.to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(YO + b * sy_b + t[:, None] * sy_l + offs_d[None, :] * sy_d, y.to(YO.dtype.element_ty), mask=td)
        h = _row(hh, idx, T - 1)  # padded rows are identity steps: row T - 1 holds the state at the last position
    tl.store(LAST + b * DCH * N + offs_d[:, None] * N + offs_n[None, :], h, mask=dn_mask)


@triton.jit
def _bwd_kernel(
    U, DT, A, BM, CM, DP, Z, BIAS, G, GLAST, STATES,
    DU, DDT, DZ, DBM, DCM, DA, DDP, DBIAS,
    L, DCH, N, CPG, SLICES,
    su_b, su_l, su_d, sd_b, sd_l, sd_d, sa_d, sa_n, sb_b, sb_l, sb_g, sb_n, sc_b, sc_l, sc_g, sc_n,
    sz_b, sz_l, sz_d, sg_b, sg_l, sg_d,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GLAST: tl.constexpr, GROUPED: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Gradients of one batch element and ``BLOCK_D`` channels, chunks from last to first."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n_chunks = tl.cdiv(L, T)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    dmask = offs_d < DCH
    nmask = offs_n < N
    dn_mask = dmask[:, None] & nmask[None, :]
    grp = offs_d // CPG
    a_mat = tl.load(A + offs_d[:, None] * sa_d + offs_n[None, :] * sa_n, mask=dn_mask, other=0.0).to(tl.float32)
    d_skip = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_D:
        d_skip = tl.load(DP + offs_d, mask=dmask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_d, mask=dmask, other=0.0).to(tl.float32)
    idx = tl.arange(0, T)
    ridx = T - 1 - idx  # reversed order inside a chunk
    # Adjoint entering the chunk's last position from later positions (exp(a_next) dh_next), and from the last state.
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    if HAS_GLAST:
        carry = tl.load(GLAST + b * DCH * N + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0)
    da_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dd_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    state_base = STATES + (b * n_chunks) * DCH * N
    for cc in range(0, n_chunks):
        c = n_chunks - 1 - cc
        t = c * T + idx
        tmask = t < L
        td = tmask[:, None] & dmask[None, :]
        tdn = td[:, :, None] & nmask[None, None, :]
        # Forward recomputation, normal order.
        h0 = tl.load(state_base + c * DCH * N + offs_d[:, None] * N + offs_n[None, :], mask=dn_mask, other=0.0)
        u = tl.load(U + b * su_b + t[:, None] * su_l + offs_d[None, :] * su_d, mask=td, other=0.0).to(tl.float32)
        raw = tl.load(DT + b * sd_b + t[:, None] * sd_l + offs_d[None, :] * sd_d, mask=td, other=0.0)
        raw = raw.to(tl.float32) + bias[None, :]
        dl = raw
        if SOFTPLUS:
            dl = _softplus(raw)
        dl = tl.where(td, dl, 0.0)
        bcol = b * sb_b + t[:, None, None] * sb_l + grp[None, :, None] * sb_g + offs_n[None, None, :] * sb_n
        bm = tl.load(BM + bcol, mask=tdn, other=0.0).to(tl.float32)
        ccol = b * sc_b + t[:, None, None] * sc_l + grp[None, :, None] * sc_g + offs_n[None, None, :] * sc_n
        cm = tl.load(CM + ccol, mask=tdn, other=0.0).to(tl.float32)
        a = dl[:, :, None] * a_mat[None, :, :]
        x = (dl * u)[:, :, None] * bm
        acum, hs = tl.associative_scan((a, x), 0, _combine)
        hh = hs + tl.exp(acum) * h0[None, :, :]
        gy = tl.load(G + b * sg_b + t[:, None] * sg_l + offs_d[None, :] * sg_d, mask=td, other=0.0).to(tl.float32)
        gyp = gy
        if HAS_Z:
            z = tl.load(Z + b * sz_b + t[:, None] * sz_l + offs_d[None, :] * sz_d, mask=td, other=0.0)
            z = z.to(tl.float32)
            sz = tl.sigmoid(z)
            y_pre = tl.sum(hh * cm, axis=2) + u * d_skip[None, :]
            dz = gy * y_pre * sz * (1.0 + z * (1.0 - sz))
            tl.store(DZ + b * sz_b + t[:, None] * sz_l + offs_d[None, :] * sz_d, dz.to(DZ.dtype.element_ty), mask=td)
            gyp = gy * z * sz
        # Adjoint of the state, reversed order: element i is position T - 1 - i, its decay that of position T - i
        # (0 for i = 0: the carry is already multiplied by its decay).
        tr = c * T + ridx
        trd = (tr < L)[:, None] & dmask[None, :]
        trdn = trd[:, :, None] & nmask[None, None, :]
        gy_r = tl.load(G + b * sg_b + tr[:, None] * sg_l + offs_d[None, :] * sg_d, mask=trd, other=0.0)
        gy_r = gy_r.to(tl.float32)
        if HAS_Z:
            z_r = tl.load(Z + b * sz_b + tr[:, None] * sz_l + offs_d[None, :] * sz_d, mask=trd, other=0.0)
            z_r = z_r.to(tl.float32)
            gy_r = gy_r * z_r * tl.sigmoid(z_r)
        ccol_r = b * sc_b + tr[:, None, None] * sc_l + grp[None, :, None] * sc_g + offs_n[None, None, :] * sc_n
        cm_r = tl.load(CM + ccol_r, mask=trdn, other=0.0).to(tl.float32)
        tn = tr + 1
        tnd = ((tn < L) & (idx > 0))[:, None] & dmask[None, :]
        raw_n = tl.load(DT + b * sd_b + tn[:, None] * sd_l + offs_d[None, :] * sd_d, mask=tnd, other=0.0)
        raw_n = raw_n.to(tl.float32) + bias[None, :]
        dl_n = raw_n
        if SOFTPLUS:
            dl_n = _softplus(raw_n)
        dl_n = tl.where(tnd, dl_n, 0.0)
        a_n = dl_n[:, :, None] * a_mat[None, :, :]
        g_r = gy_r[:, :, None] * cm_r
        bcum, dhs = tl.associative_scan((a_n, g_r), 0, _combine)
        dh_r = dhs + tl.exp(bcum) * carry[None, :, :]
        dh = tl.flip(dh_r, 0)  # normal order
        # Gradients of the chunk.
        # dh_t exp(a_t) h_{t-1}: h_t - x_t inside the chunk; at its first position the carried state itself, so a
        # zero state gives an exactly zero term (h_t - x_t left a rounding residue there: dA 9e-10 instead of 0 at
        # L = 1 in bfloat16 on the H200, dee6de5)
        da = tl.where((idx == 0)[:, None, None], dh * tl.exp(acum) * h0[None, :, :], dh * (hh - x))
        ddl = tl.sum(dh * u[:, :, None] * bm + da * a_mat[None, :, :], axis=2)
        du = tl.sum(dh * dl[:, :, None] * bm, axis=2) + gyp * d_skip[None, :]
        da_acc += tl.sum(da * dl[:, :, None], axis=0)
        if HAS_D:
            dd_acc += tl.sum(tl.where(td, gyp * u, 0.0), axis=0)
        if SOFTPLUS:
            ddl = ddl * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
        ddl = tl.where(td, ddl, 0.0)
        if HAS_BIAS:
            dbias_acc += tl.sum(ddl, axis=0)
        tl.store(DU + b * su_b + t[:, None] * su_l + offs_d[None, :] * su_d, du.to(DU.dtype.element_ty), mask=td)
        tl.store(DDT + b * sd_b + t[:, None] * sd_l + offs_d[None, :] * sd_d, ddl.to(DDT.dtype.element_ty),
                 mask=td)  # fmt: skip
        db = dh * (dl * u)[:, :, None]  # [T, BD, BN]
        dc = gyp[:, :, None] * hh
        # DBM / DCM are float32 [SLICES, B, L, G, N], contiguous: a channel block adds into slice pid_d % SLICES
        if GROUPED:
            ptr = ((b * L + t[:, None, None]) * (DCH // CPG) + grp[None, :, None]) * N + offs_n[None, None, :]
            tl.atomic_add(DBM + ptr, db, mask=tdn, sem="relaxed")
            tl.atomic_add(DCM + ptr, dc, mask=tdn, sem="relaxed")
        else:
            row = (pid_d % SLICES) * tl.num_programs(1) + b
            ptr = (row * L + t[:, None]) * N + offs_n[None, :]
            tn_mask = tmask[:, None] & nmask[None, :]
            tl.atomic_add(DBM + ptr, tl.sum(tl.where(tdn, db, 0.0), axis=1), mask=tn_mask, sem="relaxed")
            tl.atomic_add(DCM + ptr, tl.sum(tl.where(tdn, dc, 0.0), axis=1), mask=tn_mask, sem="relaxed")
        carry = _row(tl.exp(a) * dh, idx, 0)
    base = b * DCH * N
    tl.store(DA + base + offs_d[:, None] * N + offs_n[None, :], da_acc, mask=dn_mask)
    if HAS_D:
        tl.store(DDP + b * DCH + offs_d, dd_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(DBIAS + b * DCH + offs_d, dbias_acc, mask=dmask)


# Host side ------------------------------------------------------------------------------------------------------------
#: Tile settings, ``None`` for the defaults of :func:`scan_config`: ``chunk`` positions per chunk (shared by both
#: passes: the forward saves one state per chunk), ``block_d`` channels and ``warps`` per program of the forward, and
#: ``bwd_block_d`` / ``bwd_warps`` of the backward (``None``: the forward's where set, else the backward's rule).
#: ``bc_slices``: the float32 copies the backward's channel blocks add ``dB`` / ``dC`` into (block ``i`` into copy
#: ``i % bc_slices``; ``None``: one), summed after the kernel: fewer atomics on one address for more memory.
TUNING: dict[str, int | None] = {
    "chunk": None, "block_d": None, "warps": None, "bwd_block_d": None, "bwd_warps": None, "bc_slices": None,
}  # fmt: skip


class ScanConfig(NamedTuple):
    chunk: int
    block_d: int
    block_n: int
    warps: int
    bwd_block_d: int
    bwd_warps: int


#: Elements of one program's ``[T, BLOCK_D, N]`` tile per warp in the forward (16 a thread: the whole chunk's time
#: axis in each thread, so the chunk's scan runs without crossing threads) and in the backward (8 a thread: its dozen
#: live tiles spill at 16 with every option on).
TILE_PER_WARP = 512
BWD_TILE_PER_WARP = 256


def scan_config(n: int) -> ScanConfig:
    """The launch settings for ``N`` states: chunks of 16 positions; per program, ``BLOCK_D`` channels for a
    ``[T, BLOCK_D, N]`` tile of about ``TILE_PER_WARP`` (backward: ``BWD_TILE_PER_WARP``) float32 elements, and one
    warp per that many elements where one channel's tile is larger (``N`` = 64).

    Against the 2,048-element tiles at 4 / 8 warps shipped before, in one process on an H200
    (``benchmarks/results/h200/s38/scan_op_342b0bf.json``): the op's forward + backward 2.59x faster at 128 x 196
    tokens x 160 channels (N = 8), 2.04x at 2 x 16,384 x 192 (N = 16), a MambaVision-T forward + backward 32.3 vs
    39.7 ms. At 4 or 8 warps the chunk's time axis lies across warps and every scan step goes through shared memory.
    512-element backward tiles were 1.21x faster again at N = 8 (the same run, "f16d4w1") but spill with ``z`` on.
    """
    bn = max(2, next_pow2(n))
    t = TUNING["chunk"] or 16
    bd = TUNING["block_d"] or max(1, TILE_PER_WARP // (t * bn))
    warps = TUNING["warps"] or max(1, t * bd * bn // TILE_PER_WARP)
    bwd_bd = TUNING["bwd_block_d"] or TUNING["block_d"] or max(1, BWD_TILE_PER_WARP // (t * bn))
    bwd_warps = TUNING["bwd_warps"] or TUNING["warps"] or max(1, t * bwd_bd * bn // BWD_TILE_PER_WARP)
    return ScanConfig(t, bd, bn, warps, bwd_bd, bwd_warps)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t``, or a contiguous copy where a stride is 0 on a longer axis (a broadcast view: the backward writes its
    gradient with the input's strides)."""
    if t is None or all(st or n <= 1 for st, n in zip(t.stride(), t.shape, strict=True)):
        return t
    return t.contiguous()


def _bc(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """``[B, L, N]`` or ``[B, L, G, N]`` as a 4-D view's strides and its group count."""
    if x.ndim == 3:
        return x, (x.stride(0), x.stride(1), 0, x.stride(2)), 1
    return x, x.stride(), x.shape[2]


@torch.library.custom_op("visionlin::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y [B, L, D], last_state [B, D, N] float32, chunk states [B, L / T, D, N] float32)``."""
    b, length, d = u.shape
    n = A.shape[1]
    t, bd, bn, warps, _, _ = scan_config(n)
    y = torch.empty(b, length, d, device=u.device, dtype=u.dtype)
    last = torch.zeros(b, d, n, device=u.device, dtype=torch.float32)
    states = torch.empty(b, cdiv(length, t), d, n, device=u.device, dtype=torch.float32)
    if b * length * d == 0:
        return y, last, states
    bmat, sb, groups = _bc(B)
    cmat, sc, _ = _bc(C)
    zz = z if z is not None else u
    launch(_fwd_kernel, (cdiv(d, bd), b),
        u, delta, A, bmat, cmat, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
        y, last, states, length, d, n, d // groups,
        *u.stride(), *delta.stride(), *A.stride(), *sb, *sc, *zz.stride(), *y.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        T=t, BLOCK_D=bd, BLOCK_N=bn, num_warps=warps,
    )  # fmt: skip
    return y, last, states


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    b, length, d = u.shape
    n = A.shape[1]
    t = scan_config(n).chunk
    return (
        u.new_empty(b, length, d),
        u.new_empty(b, d, n, dtype=torch.float32),
        u.new_empty(b, -(-length // t), d, n, dtype=torch.float32),
    )


@torch.library.custom_op("visionlin::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    states: torch.Tensor,
    g: torch.Tensor,
    g_last: torch.Tensor | None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)``, each in its input's dtype and shape (zeros for an absent
    optional input)."""
    u, delta, z = _dense(u), _dense(delta), _dense(z)
    b, length, d = u.shape
    n = A.shape[1]
    t, _, bn, _, bd, warps = scan_config(n)
    du = torch.empty(b, length, d, device=u.device, dtype=u.dtype)
    ddelta = torch.empty(b, length, d, device=u.device, dtype=delta.dtype)
    dz = torch.empty(b, length, d, device=u.device, dtype=z.dtype if z is not None else u.dtype)
    bmat, sb, groups = _bc(B)
    cmat, sc, _ = _bc(C)
    # dB / dC of the channel blocks add into `slices` float32 copies, summed after the kernel (grouped: one copy)
    slices = 1 if groups > 1 else max(1, min(TUNING["bc_slices"] or 1, cdiv(d, bd)))
    db = torch.zeros(slices, b, length, groups, n, device=u.device, dtype=torch.float32)
    dc = torch.zeros_like(db)
    da = torch.zeros(b, d, n, device=u.device, dtype=torch.float32)
    dd = torch.zeros(b, d, device=u.device, dtype=torch.float32)
    dbias = torch.zeros(b, d, device=u.device, dtype=torch.float32)
    if b * length * d:
        g = g.contiguous()
        zz = z if z is not None else u
        # du / ddelta / dz are written with u's / delta's / z's strides: give them those layouts.
        du = torch.empty_strided(u.shape, u.stride(), device=u.device, dtype=u.dtype)
        ddelta = torch.empty_strided(delta.shape, delta.stride(), device=u.device, dtype=delta.dtype)
        dz = torch.empty_strided(zz.shape, zz.stride(), device=u.device, dtype=zz.dtype)
        launch(_bwd_kernel, (cdiv(d, bd), b),
            u, delta, A, bmat, cmat, D if D is not None else A, zz, delta_bias if delta_bias is not None else A,
            g, g_last if g_last is not None else da, states,
            du, ddelta, dz, db, dc, da, dd, dbias,
            length, d, n, d // groups, slices,
            *u.stride(), *delta.stride(), *A.stride(), *sb, *sc, *zz.stride(), *g.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
            HAS_GLAST=g_last is not None, GROUPED=groups > 1, T=t, BLOCK_D=bd, BLOCK_N=bn, num_warps=warps,
        )  # fmt: skip
    else:
        du.zero_(), ddelta.zero_(), dz.zero_()
    return (
        du.contiguous(),
        ddelta.contiguous(),
        da.sum(0).to(A.dtype),
        (db[0] if slices == 1 else db.sum(0)).view(B.shape).to(B.dtype),
        (dc[0] if slices == 1 else dc.sum(0)).view(C.shape).to(C.dtype),
        dd.sum(0).to(D.dtype) if D is not None else dd.sum(0),
        dz.contiguous(),
        dbias.sum(0).to(delta_bias.dtype) if delta_bias is not None else dbias.sum(0),
    )


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states, g, g_last):
    d = u.shape[2]
    return (
        torch.empty_like(u, memory_format=torch.contiguous_format),
        torch.empty_like(delta, memory_format=torch.contiguous_format),
        torch.empty_like(A, memory_format=torch.contiguous_format),
        torch.empty_like(B, memory_format=torch.contiguous_format),
        torch.empty_like(C, memory_format=torch.contiguous_format),
        torch.empty_like(D, memory_format=torch.contiguous_format)
        if D is not None
        else u.new_empty(d, dtype=torch.float32),
        torch.empty_like(z if z is not None else u, memory_format=torch.contiguous_format),
        torch.empty_like(delta_bias, memory_format=torch.contiguous_format)
        if delta_bias is not None
        else u.new_empty(d, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus = inputs
    _, _, states = output
    ctx.mark_non_differentiable(states)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, g, g_last=None, _g_states=None):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    if g is None:  # only the last state used
        g = torch.zeros_like(u, memory_format=torch.contiguous_format)
    if g_last is not None:
        g_last = g_last.float().contiguous()
    grads = _selective_scan_bwd_call(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, states, g, g_last)
    du, ddelta, da, db, dc, dd, dz, dbias = grads
    return (
        du,
        ddelta,
        da,
        db,
        dc,
        dd if D is not None else None,
        dz if z is not None else None,
        dbias if delta_bias is not None else None,
        None,
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup)
_selective_scan_bwd_call = eager_call(selective_scan_bwd)
_selective_scan_fwd_call = eager_op(selective_scan_fwd, _setup, _backward)


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The ``"triton"`` backend of :func:`visionlin.kernels.selective_scan` (arguments checked there).

    Returns:
        ``y`` ``[B, L, D]`` in ``u``'s dtype, or ``(y, last_state [B, D, N] float32)``.
    """
    y, last, _ = _selective_scan_fwd_call(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
    return (y, last) if return_last_state else y
