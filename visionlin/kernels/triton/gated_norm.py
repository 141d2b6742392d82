"""Gated LayerNorm in Triton (forward and backward); the math is
:func:`visionlin.kernels.gated_norm.gated_layer_norm_reference`. The same kernels without the gate (``HAS_G`` off)
and with the output in another dtype are the ``"triton"`` backend of :func:`visionlin.kernels.gated_norm.layer_norm`
(:func:`~visionlin.kernels.gated_norm.layer_norm_reference`).

Forward: one program per block of ``BLOCK_M`` rows holds the whole (padded) row of ``C`` channels in registers, takes
the float32 mean and biased variance, normalises, applies the affine weight / bias and multiplies by ``SiLU(gate)``:
one read of ``x`` and ``gate``, one write of the output, plus the per-row float32 mean and ``1 / std`` kept for the
backward. Rows are addressed through a row stride (the channels must be contiguous): the gate is usually one of the
four ``chunk``\\ s of a fused ``Linear``'s output, a view with row stride ``4 C``, and is read in place.

Backward: recomputes the normalised row from ``x`` and the saved statistics and writes ``dx`` and ``dgate``; each
program walks a fixed run of row blocks and writes its float32 partial sums of ``dweight`` and ``dbias`` to its own
row of a ``[programs, C]`` buffer, summed afterwards (deterministic: no atomics).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..gated_norm import MAX_TRITON_CHANNELS as MAX_CHANNELS
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch, next_pow2
from .linear import _splits

__all__ = ["MAX_CHANNELS", "TUNING", "gated_layer_norm_triton", "layer_norm_triton"]

#: Elements of the ``[BLOCK_M, BLOCK_C]`` tile per thread: forward, backward (which holds more live tiles). At 32 per
#: thread the forward used all 255 registers for sm_90 (a quarter of the warps an SM can hold).
PER_THREAD, PER_THREAD_BACKWARD = 16, 8

#: Backward launch settings (``benchmarks/layer_norm_op.py`` times the choices side by side):
#:
#: * ``"backward_programs_per_sm"``: programs launched per SM (at most one per row block); each loops over its run
#:   of row blocks and writes one partial ``dweight`` / ``dbias`` row, summed afterwards. More programs hide more
#:   load latency; fewer make a smaller partial-sum buffer (``programs x C`` float32);
#: * ``"backward_per_thread"``: tile elements per thread (sets ``BLOCK_M``);
#: * ``"backward_stages"``: ``num_stages`` of the backward launch (``None``: Triton's default).
TUNING: dict[str, int | str | None] = {
    "backward_programs_per_sm": 4,
    "backward_per_thread": PER_THREAD_BACKWARD,
    "backward_stages": None,
}


@triton.jit
def _gated_norm_fwd_kernel(
    X, G, W, BIAS, OUT, MEAN, RSTD, M, NCH, inv_c, sx, sg, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    STATS: tl.constexpr,
):  # fmt: skip
    """``OUT[m] = (LN(X[m]) * W + BIAS) * SiLU(G[m])`` (without ``G``: the LayerNorm alone) for a block of rows, in
    ``OUT``'s dtype; with ``STATS``, ``MEAN`` / ``RSTD`` float32 ``[M]`` (for the backward)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * stride may pass 2^31
    cols = tl.arange(0, BLOCK_C)
    rmask, cmask = rows < M, cols < NCH
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C]
    # means as products with the host's 1 / C: `/` on float32 is an approximate division on the GPU, and a one-channel
    # row must normalise to exactly 0 (its mean equal to its value)
    mean = tl.sum(x, axis=1) * inv_c  # [BLOCK_M]
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) * inv_c + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
    if HAS_B:
        y = y + tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
    if HAS_G:
        g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = y * (g * tl.sigmoid(g))
    tl.store(OUT + rows[:, None] * NCH + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)
    if STATS:
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _gated_norm_bwd_kernel(
    DOUT, X, G, W, BIAS, MEAN, RSTD, DX, DG, DW, DB, M, NCH, inv_c, sdo, sx, sg, per,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``DX`` and ``DG`` (contiguous ``[M, C]``) for ``per`` row blocks, and this program's partial ``DW`` / ``DB``
    (float32 ``[programs, C]``, row ``program_id``)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < NCH
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(per):
        rows = ((pid * per + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + rows[:, None] * sx + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # [BLOCK_M, BLOCK_C]
        # weight and bias re-read per row block (from L1) rather than held across the loop: at 8192 channels the
        # held copies spilled
        if HAS_W:
            w = tl.load(W + cols, mask=cmask, other=0.0)
        do = tl.load(DOUT + rows[:, None] * sdo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            y = xhat
            if HAS_W:
                y = y * w[None, :]
            if HAS_B:
                y = y + tl.load(BIAS + cols, mask=cmask, other=0.0)[None, :]
            g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            # d SiLU(g) / dg = s (1 + g (1 - s))
            tl.store(DG + rows[:, None] * NCH + cols[None, :],
                     (do * y * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)  # fmt: skip
            dy = do * (g * s)  # zero outside the mask (do is)
        else:
            dy = do
        if HAS_W:
            dw += tl.sum(dy * xhat, axis=0)
            dxhat = dy * w[None, :]
        else:
            dxhat = dy
        if HAS_B:
            db += tl.sum(dy, axis=0)
        c1 = tl.sum(dxhat * xhat, axis=1) * inv_c  # [BLOCK_M]
        c2 = tl.sum(dxhat, axis=1) * inv_c  # for C = 1 exactly dxhat: dx exactly 0
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows[:, None] * NCH + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW + pid * NCH + cols, dw, mask=cmask)
    if HAS_B:
        tl.store(DB + pid * NCH + cols, db, mask=cmask)


def meta(c: int, backward: bool = False) -> dict[str, int]:
    """``BLOCK_M``, ``BLOCK_C`` and ``num_warps`` for rows of ``c`` channels (the whole row in one block)."""
    block_c = next_pow2(max(int(c), 1))
    warps = 4 if block_c <= 256 else 8 if block_c <= 512 else 16  # 8 warps on 2 x 1024 spilled for sm_90
    per_thread = int(TUNING["backward_per_thread"]) if backward else PER_THREAD
    block_m = max(1, min(64, per_thread * 32 * warps // block_c))
    return {"BLOCK_M": block_m, "BLOCK_C": block_c, "num_warps": warps}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[..., C]`` as ``[M, C]`` with contiguous channels, a view where the strides allow (a chunk of a wider
    ``Linear`` output keeps its row stride), else a copy."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    t = t.reshape(-1, t.shape[-1])
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _affine(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The weight / bias as a contiguous float32 ``[C]`` (a placeholder pointer when absent)."""
    return like.new_empty(0, dtype=torch.float32) if t is None else t.detach().float().contiguous()


@torch.library.custom_op("visionlin::gated_layer_norm_fwd", mutates_args=())
def gated_layer_norm_fwd(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, mean, rstd)``: the op's output ``[..., C]`` in ``out_dtype`` (default ``x``'s; without ``gate`` the
    LayerNorm alone) and float32 per-row statistics ``[M]``."""
    c = x.shape[-1]
    x2 = _rows(x)
    g2 = x2 if gate is None else _rows(gate)  # a placeholder pointer without a gate
    m = x2.shape[0]
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m:
        kw = meta(c)
        w32, b32 = _affine(weight, x), _affine(bias, x)
        launch(_gated_norm_fwd_kernel, (cdiv(m, kw["BLOCK_M"]),),
            x2, g2, w32, b32, out, mean, rstd, m, c, 1.0 / c, x2.stride(0), g2.stride(0), float(eps),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_G=gate is not None, STATS=True, **kw,
        )  # fmt: skip
    return out, mean, rstd


_META: dict[int, dict[str, int]] = {}


def layer_norm_inference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """The forward of :func:`layer_norm_triton` without autograd, statistics or checks, at a fraction of its host
    cost: for :func:`visionlin.kernels.gated_norm.inference_layer_norm`, which checks what this takes: a plain eager
    CUDA ``x`` of float16, bfloat16 or float32 with ``C <= MAX_CHANNELS`` channels, ``weight`` / ``bias`` ``[C]``
    tensors with unit stride (any float dtype; computed in float32) or ``None``, ``out_dtype`` float16, bfloat16 or
    float32. One kernel launch and one allocation (the output)."""
    c = x.shape[-1]
    x2 = _rows(x)
    m = x2.shape[0]
    out = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    if m:
        kw = _META.get(c)
        if kw is None:
            kw = _META[c] = meta(c)
        launch(_gated_norm_fwd_kernel, (cdiv(m, kw["BLOCK_M"]),),
            x2, x2, x2 if weight is None else weight, x2 if bias is None else bias, out, out, out, m, c, 1.0 / c,
            x2.stride(0), x2.stride(0), eps, HAS_W=weight is not None, HAS_B=bias is not None, HAS_G=False,
            STATS=False, **kw,
        )  # fmt: skip
    return out


@gated_layer_norm_fwd.register_fake
def _(x, gate, weight, bias, eps, out_dtype=None):
    m = math.prod(x.shape[:-1])
    stats = x.new_empty(m, dtype=torch.float32)
    out = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    return out, stats, torch.empty_like(stats)


@torch.library.custom_op("visionlin::gated_layer_norm_bwd", mutates_args=())
def gated_layer_norm_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dgate, dweight, dbias)``: ``dx`` in ``x``'s dtype, ``dgate`` in the gate's (empty without a gate),
    ``dweight`` / ``dbias`` float32 ``[C]`` (empty without a weight / bias)."""
    c = x.shape[-1]
    x2, do2 = _rows(x), _rows(dout)
    g2 = x2 if gate is None else _rows(gate)
    m = x2.shape[0]
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dg = x.new_empty(0) if gate is None else torch.empty(gate.shape, device=x.device, dtype=gate.dtype)
    nw, nb = (c if weight is not None else 0), (c if bias is not None else 0)
    if not m:
        return dx, dg, x.new_zeros(nw, dtype=torch.float32), x.new_zeros(nb, dtype=torch.float32)
    kw = meta(c, backward=True)
    programs, per = _splits(m, kw["BLOCK_M"], 1, x.device, per_sm=int(TUNING["backward_programs_per_sm"]))
    if TUNING["backward_stages"] is not None:
        kw["num_stages"] = int(TUNING["backward_stages"])
    dw = x.new_empty((programs, nw), dtype=torch.float32)
    db = x.new_empty((programs, nb), dtype=torch.float32)
    launch(_gated_norm_bwd_kernel, (programs,),
        do2, x2, g2, _affine(weight, x), _affine(bias, x), mean, rstd, dx, dx if gate is None else dg, dw, db, m, c,
        1.0 / c, do2.stride(0), x2.stride(0), g2.stride(0), per,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_G=gate is not None, **kw,
    )  # fmt: skip
    return dx, dg, dw.sum(0), db.sum(0)


@gated_layer_norm_bwd.register_fake
def _(dout, x, gate, weight, bias, mean, rstd):
    c = x.shape[-1]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty(0) if gate is None else torch.empty_like(gate, memory_format=torch.contiguous_format),
        x.new_empty(c if weight is not None else 0, dtype=torch.float32),
        x.new_empty(c if bias is not None else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    x, gate, weight, bias, *_ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, gate, weight, bias, mean, rstd)
    ctx.dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _backward(ctx, dout, dmean=None, drstd=None):
    x, gate, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dg, dw, db = _gated_layer_norm_bwd_call(dout, x, gate, weight, bias, mean, rstd)
    w_dt, b_dt = ctx.dtypes
    dw = None if w_dt is None else dw.to(w_dt)
    return dx, None if gate is None else dg, dw, None if b_dt is None else db.to(b_dt), None, None


gated_layer_norm_fwd.register_autograd(_backward, setup_context=_setup)
_gated_layer_norm_bwd_call = eager_call(gated_layer_norm_bwd)
_gated_layer_norm_fwd_call = eager_op(gated_layer_norm_fwd, _setup, _backward)


def layer_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.gated_norm.layer_norm`: ``x`` float16, bfloat16 or
    float32 ``[..., C]``, ``C <= MAX_CHANNELS``; output in ``out_dtype`` (default ``x``'s), written from the float32
    result in one pass."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"layer_norm (triton): x must be float16, bfloat16 or float32, got {x.dtype=}")
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"layer_norm (triton): C={x.shape[-1]} exceeds MAX_CHANNELS={MAX_CHANNELS}")
    return _gated_layer_norm_fwd_call(x, None, weight, bias, float(eps), out_dtype)[0]


def gated_layer_norm_triton(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.gated_norm.gated_layer_norm`: ``x`` and ``gate`` of one
    dtype (float16, bfloat16 or float32) and shape ``[..., C]``, ``C <= MAX_CHANNELS``; output in that dtype."""
    if x.dtype != gate.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"gated_layer_norm (triton): x and gate need one dtype of float16, bfloat16, float32; "
            f"got {x.dtype=}, {gate.dtype=}"
        )
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"gated_layer_norm (triton): C={x.shape[-1]} exceeds MAX_CHANNELS={MAX_CHANNELS}")
    return _gated_layer_norm_fwd_call(x, gate, weight, bias, float(eps), None)[0]
