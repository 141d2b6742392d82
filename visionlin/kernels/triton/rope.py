"""2-D RoPE of queries and keys in one Triton pass (forward and backward); the math is
:func:`visionlin.kernels.rope.apply_rope_2d`.

``rope(x)[2m] = x[2m] cos[2m] - x[2m+1] sin[2m]``, ``rope(x)[2m+1] = x[2m+1] cos[2m+1] + x[2m] sin[2m+1]`` per token
row of the ``[N, D]`` tables; its gradient is the transposed rotation, ``dx[2m] = g[2m] cos[2m] + g[2m+1] sin[2m+1]``,
``dx[2m+1] = g[2m+1] cos[2m+1] - g[2m] sin[2m]`` (any tables, not only the pair-equal ones of
:func:`visionlin.kernels.rope.rope_2d_tables`). One launch rotates both the queries and the keys (program axis 1), each
program a block of ``(batch, token)`` rows with all heads, in float32 from the float32 tables, rounded once to the
inputs' dtype.

Why a kernel: the softmax stages of MAViT / RAVLT / NaLaFormer rotate ``q`` and ``k`` with a chain of PyTorch ops.
Under ``torch.compile`` Inductor fused their backward (the tables recomputed per element with ``sin`` / ``cos``) with
the ``qkvo`` projection's bias-gradient sum into one outer reduction, 2.07 ms of a RAVLT-T training step of 33 ms on
the H200 (``benchmarks/results/h200/s38/``). As a custom op the rotation is one opaque pass each way and the bias sum a
reduction of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._eager import eager_call, eager_op
from ._launch import cdiv, launch

__all__ = ["rope_2d_pair_triton"]

#: Elements per program (rows x heads x channels, padded to powers of two), and warps.
ELEMENTS, WARPS = 4096, 4


@triton.jit
def _rotate(X, OUT, SIN, COS, r, rmask, N, HH, sx_b, sx_n, sx_h, so_b, so_n, so_h, D: tl.constexpr,
            BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):  # fmt: skip
    """One block of rows of one input: loads ``[BLOCK_R, heads, D]``, splits the channel pairs, rotates, stores."""
    b, n = r // N, r % N
    h = tl.arange(0, BLOCK_H).to(tl.int64)  # (a heads-major view's head stride times the heads may pass 2^31)
    d = tl.arange(0, BLOCK_D)
    mask = rmask[:, None, None] & (h < HH)[None, :, None] & (d < D)[None, None, :]
    x_off = (b * sx_b + n * sx_n)[:, None, None] + (h * sx_h)[None, :, None] + d[None, None, :]
    x = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, (BLOCK_R, BLOCK_H, BLOCK_D // 2, 2)))  # channels 2m, 2m + 1
    t_off = n[:, None] * D + d[None, :]
    t_mask = rmask[:, None] & (d < D)[None, :]
    s_e, s_o = tl.split(tl.reshape(tl.load(SIN + t_off, mask=t_mask, other=0.0), (BLOCK_R, BLOCK_D // 2, 2)))
    c_e, c_o = tl.split(tl.reshape(tl.load(COS + t_off, mask=t_mask, other=0.0), (BLOCK_R, BLOCK_D // 2, 2)))
    s_e, s_o, c_e, c_o = s_e[:, None, :], s_o[:, None, :], c_e[:, None, :], c_o[:, None, :]
    if BACKWARD:
        ye = xe * c_e + xo * s_o
        yo = xo * c_o - xe * s_e
    else:
        ye = xe * c_e - xo * s_e
        yo = xo * c_o + xe * s_o
    y = tl.reshape(tl.join(ye, yo), (BLOCK_R, BLOCK_H, BLOCK_D))
    o_off = (b * so_b + n * so_n)[:, None, None] + (h * so_h)[None, :, None] + d[None, None, :]
    tl.store(OUT + o_off, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_pair_kernel(
    Q, K, OQ, OK, SIN, COS, ROWS, N, HH, sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, so_b, so_n, so_h,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr,
):  # fmt: skip
    """Rotates (``BACKWARD``: back-rotates) a block of ``BLOCK_R`` ``(batch, token)`` rows of ``Q`` (program axis 1 =
    0) or ``K`` (1) into the contiguous ``OQ`` / ``OK``; the tables are float32 ``[N, D]``, contiguous."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # a tensor may pass 2^31 elements
    rmask = r < ROWS
    if tl.program_id(1) == 0:
        _rotate(Q, OQ, SIN, COS, r, rmask, N, HH, sq_b, sq_n, sq_h, so_b, so_n, so_h, D, BLOCK_R, BLOCK_H, BLOCK_D,
                BACKWARD)  # fmt: skip
    else:
        _rotate(K, OK, SIN, COS, r, rmask, N, HH, sk_b, sk_n, sk_h, so_b, so_n, so_h, D, BLOCK_R, BLOCK_H, BLOCK_D,
                BACKWARD)  # fmt: skip


def _launch_pair(q, k, oq, ok, sin, cos, backward: bool) -> None:
    b, n, hh, d = q.shape
    block_h, block_d = triton.next_power_of_2(hh), max(2, triton.next_power_of_2(d))
    block_r = max(1, min(64, ELEMENTS // (block_h * block_d)))
    launch(_rope_pair_kernel, (cdiv(b * n, block_r), 2),
        q, k, oq, ok, sin, cos, b * n, n, hh, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), oq.stride(0), oq.stride(1), oq.stride(2),
        D=d, BLOCK_R=block_r, BLOCK_H=block_h, BLOCK_D=block_d, BACKWARD=backward, num_warps=WARPS,
    )  # fmt: skip


def _pair(q, k, sin, cos, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sin, cos = (t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in (sin, cos))
    q, k = _unit_last(q), _unit_last(k)  # (the ops called directly, not through rope_2d_pair_triton, too)
    oq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    ok = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    if q.numel():
        _launch_pair(q, k, oq, ok, sin, cos, backward)
    return oq, ok


@torch.library.custom_op("visionlin::rope_2d_pair", mutates_args=())
def rope_2d_pair(
    q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rope(q), rope(k))``, contiguous, in the inputs' dtype."""
    return _pair(q, k, sin, cos, backward=False)


@torch.library.custom_op("visionlin::rope_2d_pair_bwd", mutates_args=())
def rope_2d_pair_bwd(
    gq: torch.Tensor, gk: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`rope_2d_pair`'s inputs: the back-rotated output gradients."""
    return _pair(gq, gk, sin, cos, backward=True)


def _pair_fake(a, b, sin, cos):
    """Both ops' outputs: contiguous tensors shaped and typed as their two inputs."""
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (a, b))


rope_2d_pair.register_fake(_pair_fake)
rope_2d_pair_bwd.register_fake(_pair_fake)


def _setup(ctx, inputs, output):
    _, _, sin, cos = inputs
    ctx.save_for_backward(sin, cos)


def _backward(ctx, gq, gk):
    sin, cos = ctx.saved_tensors
    if gq is None or gk is None:  # one output unused: its gradient is zero (q and k have one shape)
        ref = gq if gq is not None else gk
        gq = torch.zeros(ref.shape, device=ref.device, dtype=ref.dtype) if gq is None else gq
        gk = torch.zeros(ref.shape, device=ref.device, dtype=ref.dtype) if gk is None else gk
    dq, dk = _rope_2d_pair_bwd_call(gq, gk, sin, cos)  # (_pair gives them unit channel strides)
    return dq, dk, None, None


rope_2d_pair.register_autograd(_backward, setup_context=_setup)
_rope_2d_pair_bwd_call = eager_call(rope_2d_pair_bwd)
_rope_2d_pair_call = eager_op(rope_2d_pair, _setup, _backward)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit channel stride (the kernel reads channels as contiguous pairs)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def rope_2d_pair_triton(
    q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of :func:`visionlin.kernels.rope.apply_rope_2d_pair` (checked there): float32 contiguous
    tables, unit channel strides."""
    tables = [t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous() for t in (sin, cos)]
    return _rope_2d_pair_call(q, k, *tables)  # (tables saved for the backward: float32)
