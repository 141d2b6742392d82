"""FLatten's joint-head focusing map as a Triton kernel (``visionlin.kernels.triton.focus``) against
:func:`visionlin.kernels.focused.focus` in float64, forward and backward (the input and the channel scale).

Tolerance: float32 1e-5 relative; half precision four units of the dtype's rounding (the kernel computes in float32 on
the inputs' values and rounds the features once). The ``gpu`` tests run on the GPU machine; the interpreter test runs
the kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels.focused import focus

FLOOR = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_focus(
    shape, dtype, device, p=3.0, scale=True, std=1.0, zero_token=False, non_contiguous=False, heads_strided=False
):
    from visionlin.kernels.triton.focus import focus_triton

    b, n, h, d = shape
    g = torch.Generator().manual_seed(0)
    if non_contiguous:  # a head-split view of a fused projection
        x = (std * torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64))[:, :, 1]
    else:
        x = std * torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    if zero_token:
        x[:, 0] = -1.0  # all negative: relu gives 0, only eps remains (or nothing with eps = 0)
    x = x.to(dtype).double()
    if heads_strided:  # heads not contiguous (stride(H) != D * stride(D)): the kernels' per-channel head / dim split
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # .to() below keeps these strides
    c = (torch.rand(h, d, generator=g, dtype=torch.float64) + 0.5) if scale else None
    grad = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    errors = {}
    for eps in (1e-6, 0.0):
        ref_in = [x.clone().requires_grad_(), None if c is None else c.clone().requires_grad_()]
        ref = focus(ref_in[0], p, channel_scale=ref_in[1], eps=eps)
        ref.backward(grad)
        ours_in = [x.to(device, dtype).requires_grad_(), None if c is None else c.to(device).float().requires_grad_()]
        out = focus_triton(ours_in[0], p, channel_scale=ours_in[1], eps=eps)
        assert out.dtype == dtype and out.shape == ref.shape
        g_out = grad.to(device, dtype)
        if heads_strided:  # and a gradient laid out the same way
            g_out = g_out.transpose(-1, -2).contiguous().transpose(-1, -2)
        out.backward(g_out)
        errors[f"f eps={eps}"] = _rel(out, ref.detach())
        errors[f"dx eps={eps}"] = _rel(ours_in[0].grad, ref_in[0].grad)
        if c is not None:
            errors[f"dc eps={eps}"] = _rel(ours_in[1].grad, ref_in[1].grad)
    floor = FLOOR[dtype] if dtype != torch.float32 else 1e-5
    # dc sums dt * t over every token: one float32 sum of B * N terms (atomics), held to 4x the float32 floor
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= (4 * floor if k.startswith("dc") else floor)}
    assert not bad, (shape, dtype, p, bad)
    return errors


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_focus import check_focus
    for dtype in (torch.float32, torch.float16):
        check_focus((2, 9, 3, 16), dtype, "cpu")
        check_focus((1, 5, 2, 24), dtype, "cpu", p=1.5, scale=False, zero_token=True)
    check_focus((2, 7, 6, 16), torch.float32, "cpu", p=4.0, std=30.0, non_contiguous=True)
    check_focus((2, 7, 3, 8), torch.float32, "cpu", heads_strided=True)
    print("interpreter ok")
    """
)


def test_interpreter_focus_matches_reference():
    """The focusing kernels' math on the CPU (Triton's interpreter), float32 and float16."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 197, 6, 64), (1, 3136, 3, 32), (2, 49, 12, 64), (1, 65536, 2, 32)])
def test_triton_focus(shape, dtype):
    check_focus(shape, dtype, "cuda")
    check_focus(shape, dtype, "cuda", p=2.0, scale=False, zero_token=True, non_contiguous=True)
    check_focus(shape, dtype, "cuda", heads_strided=True)


@gpu
def test_triton_focus_large_magnitudes_half():
    check_focus((2, 197, 6, 64), torch.float16, "cuda", std=300.0)
