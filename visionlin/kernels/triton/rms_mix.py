"""The gated mix of two RMS-normalised inputs in Triton (forward and backward); the math is
:func:`visionlin.kernels.rms_mix.rms_gate_mix_reference`.

Forward: one program per block of ``BLOCK_M`` rows holds the (padded) rows of ``x``, ``y`` and ``gate`` in registers,
takes both float32 mean squares, normalises, weights, mixes by ``sigmoid(gate)`` (and applies ``SiLU``): one read of
each input, one write of the output. Rows are addressed through row strides (the channels must be contiguous), so
per-head views of wider tensors are read in place.

Backward: recomputes the forward from the inputs (no statistics are saved: they cost a reduction over a row already
loaded) and writes ``dx``, ``dy`` and ``dgate``; each program walks a fixed run of row blocks and writes its float32
partial sums of the two weights' gradients to its own row of a ``[programs, C]`` buffer, summed afterwards
(deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rms_mix import MAX_TRITON_CHANNELS as MAX_CHANNELS
from ._eager import eager_call, eager_op
from ._launch import cdiv, launch
from .gated_norm import _affine, _rows, meta
from .linear import _splits

__all__ = ["MAX_CHANNELS", "rms_gate_mix_triton"]

#: Programs per SM of the backward (each loops over its run of row blocks; the gated LayerNorm's measured choice).
BACKWARD_PROGRAMS_PER_SM = 4


@triton.jit
def _normed(T, W, rows, cols, mask, cmask, st, inv_c, eps, HAS_W: tl.constexpr):
    """Rows of ``T`` in float32, ``1 / rms`` per row, and the normalised, weighted rows (``(t_hat, r, t_hat * w)``)."""
    t = tl.load(T + rows[:, None] * st + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # the mean square as a product with the host's 1 / C (`/` on float32 is an approximate division on the GPU)
    r = 1.0 / tl.sqrt(tl.sum(t * t, axis=1) * inv_c + eps)
    t_hat = t * r[:, None]
    tn = t_hat
    if HAS_W:
        tn = t_hat * tl.load(W + cols, mask=cmask, other=0.0)[None, :]
    return t_hat, r, tn


@triton.jit
def _rms_mix_fwd_kernel(
    X, Y, G, WX, WY, OUT, M, NCH, inv_c, sx, sy, sg, eps_x, eps_y,
    HAS_WX: tl.constexpr, HAS_WY: tl.constexpr, SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``OUT[m] = yn + (xn - yn) * sigmoid(G[m])`` (``SiLU`` of it with ``SILU``) for a block of rows, in ``OUT``'s
    dtype (contiguous ``[M, C]``)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # int64: M * stride may pass 2^31
    cols = tl.arange(0, BLOCK_C)
    rmask, cmask = rows < M, cols < NCH
    mask = rmask[:, None] & cmask[None, :]
    _, _, xn = _normed(X, WX, rows, cols, mask, cmask, sx, inv_c, eps_x, HAS_WX)
    _, _, yn = _normed(Y, WY, rows, cols, mask, cmask, sy, inv_c, eps_y, HAS_WY)
    g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out = yn + (xn - yn) * tl.sigmoid(g)
    if SILU:
        out = out * tl.sigmoid(out)
    tl.store(OUT + rows[:, None] * NCH + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rms_mix_bwd_kernel(
    DOUT, X, Y, G, WX, WY, DX, DY, DG, DWX, DWY, M, NCH, inv_c, sdo, sx, sy, sg, eps_x, eps_y, per,
    HAS_WX: tl.constexpr, HAS_WY: tl.constexpr, SILU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """``DX``, ``DY``, ``DG`` (contiguous ``[M, C]``, the inputs' dtypes) for ``per`` row blocks, and this program's
    partial weight gradients (float32 ``[programs, C]``, row ``program_id``)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < NCH
    dwx = tl.zeros([BLOCK_C], dtype=tl.float32)
    dwy = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(per):
        rows = ((pid * per + i) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        x_hat, rx, xn = _normed(X, WX, rows, cols, mask, cmask, sx, inv_c, eps_x, HAS_WX)
        y_hat, ry, yn = _normed(Y, WY, rows, cols, mask, cmask, sy, inv_c, eps_y, HAS_WY)
        g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dmix = tl.load(DOUT + rows[:, None] * sdo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if SILU:  # d SiLU(u) / du = sigmoid(u) (1 + u (1 - sigmoid(u)))
            u = yn + (xn - yn) * s
            su = tl.sigmoid(u)
            dmix = dmix * su * (1.0 + u * (1.0 - su))
        diff = xn - yn
        tl.store(DG + rows[:, None] * NCH + cols[None, :], (dmix * diff * s * (1.0 - s)).to(DG.dtype.element_ty),
                 mask=mask)  # fmt: skip
        dxn = dmix * s  # zero outside the mask (dmix is)
        dyn = dmix - dxn
        if HAS_WX:
            dwx += tl.sum(dxn * x_hat, axis=0)
            dxn = dxn * tl.load(WX + cols, mask=cmask, other=0.0)[None, :]
        if HAS_WY:
            dwy += tl.sum(dyn * y_hat, axis=0)
            dyn = dyn * tl.load(WY + cols, mask=cmask, other=0.0)[None, :]
        # RMSNorm: d t = r (d t_hat - t_hat mean(d t_hat * t_hat))
        dx = (dxn - x_hat * (tl.sum(dxn * x_hat, axis=1) * inv_c)[:, None]) * rx[:, None]
        dy = (dyn - y_hat * (tl.sum(dyn * y_hat, axis=1) * inv_c)[:, None]) * ry[:, None]
        tl.store(DX + rows[:, None] * NCH + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DY + rows[:, None] * NCH + cols[None, :], dy.to(DY.dtype.element_ty), mask=mask)
    if HAS_WX:
        tl.store(DWX + pid * NCH + cols, dwx, mask=cmask)
    if HAS_WY:
        tl.store(DWY + pid * NCH + cols, dwy, mask=cmask)


@torch.library.custom_op("visionlin::rms_gate_mix_fwd", mutates_args=())
def rms_gate_mix_fwd(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    x_weight: torch.Tensor | None,
    y_weight: torch.Tensor | None,
    x_eps: float,
    y_eps: float,
    silu: bool,
) -> torch.Tensor:
    """The mix ``[..., C]`` in ``x``'s dtype, contiguous."""
    c = x.shape[-1]
    x2, y2, g2 = _rows(x), _rows(y), _rows(gate)
    m = x2.shape[0]
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if m:
        kw = meta(c)
        launch(_rms_mix_fwd_kernel, (cdiv(m, kw["BLOCK_M"]),),
            x2, y2, g2, _affine(x_weight, x), _affine(y_weight, x), out, m, c, 1.0 / c, x2.stride(0), y2.stride(0),
            g2.stride(0), float(x_eps), float(y_eps), HAS_WX=x_weight is not None, HAS_WY=y_weight is not None,
            SILU=silu, **kw,
        )  # fmt: skip
    return out


@rms_gate_mix_fwd.register_fake
def _(x, y, gate, x_weight, y_weight, x_eps, y_eps, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("visionlin::rms_gate_mix_bwd", mutates_args=())
def rms_gate_mix_bwd(
    dout: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    x_weight: torch.Tensor | None,
    y_weight: torch.Tensor | None,
    x_eps: float,
    y_eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, dgate, dx_weight, dy_weight)``: the first three in the inputs' dtypes, the weights' float32 ``[C]``
    (empty without a weight)."""
    c = x.shape[-1]
    x2, y2, g2, do2 = _rows(x), _rows(y), _rows(gate), _rows(dout)
    m = x2.shape[0]
    dx, dy, dg = (torch.empty(t.shape, device=x.device, dtype=t.dtype) for t in (x, y, gate))
    nwx, nwy = (c if x_weight is not None else 0), (c if y_weight is not None else 0)
    if not m:
        return dx, dy, dg, x.new_zeros(nwx, dtype=torch.float32), x.new_zeros(nwy, dtype=torch.float32)
    kw = meta(c, backward=True)
    programs, per = _splits(m, kw["BLOCK_M"], 1, x.device, per_sm=BACKWARD_PROGRAMS_PER_SM)
    dwx = x.new_empty((programs, nwx), dtype=torch.float32)
    dwy = x.new_empty((programs, nwy), dtype=torch.float32)
    launch(_rms_mix_bwd_kernel, (programs,),
        do2, x2, y2, g2, _affine(x_weight, x), _affine(y_weight, x), dx, dy, dg, dwx, dwy, m, c, 1.0 / c,
        do2.stride(0), x2.stride(0), y2.stride(0), g2.stride(0), float(x_eps), float(y_eps), per,
        HAS_WX=x_weight is not None, HAS_WY=y_weight is not None, SILU=silu, **kw,
    )  # fmt: skip
    return dx, dy, dg, dwx.sum(0), dwy.sum(0)


@rms_gate_mix_bwd.register_fake
def _(dout, x, y, gate, x_weight, y_weight, x_eps, y_eps, silu):
    c = x.shape[-1]
    return (
        *(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, y, gate)),
        x.new_empty(c if x_weight is not None else 0, dtype=torch.float32),
        x.new_empty(c if y_weight is not None else 0, dtype=torch.float32),
    )


def _setup(ctx, inputs, output):
    x, y, gate, x_weight, y_weight, x_eps, y_eps, silu = inputs
    ctx.save_for_backward(x, y, gate, x_weight, y_weight)
    ctx.args = (x_eps, y_eps, silu)
    ctx.dtypes = tuple(None if w is None else w.dtype for w in (x_weight, y_weight))


def _backward(ctx, dout):
    x, y, gate, x_weight, y_weight = ctx.saved_tensors
    dx, dy, dg, dwx, dwy = _rms_gate_mix_bwd_call(dout, x, y, gate, x_weight, y_weight, *ctx.args)
    wx_dt, wy_dt = ctx.dtypes
    return (
        dx, dy, dg, None if wx_dt is None else dwx.to(wx_dt), None if wy_dt is None else dwy.to(wy_dt), None, None,
        None,
    )  # fmt: skip


rms_gate_mix_fwd.register_autograd(_backward, setup_context=_setup)
_rms_gate_mix_bwd_call = eager_call(rms_gate_mix_bwd)
_rms_gate_mix_fwd_call = eager_op(rms_gate_mix_fwd, _setup, _backward)


def rms_gate_mix_triton(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    x_weight: torch.Tensor | None = None,
    y_weight: torch.Tensor | None = None,
    x_eps: float = 1e-6,
    y_eps: float = 1e-6,
    silu: bool = False,
) -> torch.Tensor:
    """The ``"triton"`` backend of :func:`visionlin.kernels.rms_mix.rms_gate_mix`: ``x``, ``y`` and ``gate`` of one
    dtype (float16, bfloat16 or float32) and shape ``[..., C]``, ``C <= MAX_CHANNELS``; output in that dtype."""
    if not x.dtype == y.dtype == gate.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            "rms_gate_mix (triton): x, y and gate need one dtype of float16, bfloat16, float32; "
            f"got {x.dtype=}, {y.dtype=}, {gate.dtype=}"
        )
    if x.shape[-1] > MAX_CHANNELS:
        raise ValueError(f"rms_gate_mix (triton): C={x.shape[-1]} exceeds MAX_CHANNELS={MAX_CHANNELS}")
    return _rms_gate_mix_fwd_call(x, y, gate, x_weight, y_weight, float(x_eps), float(y_eps), bool(silu))
