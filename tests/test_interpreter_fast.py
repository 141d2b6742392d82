"""``tests/interpreter_fast.py`` (the slice-wise custom-combine reductions and scans the interpreter scripts run with)
gives bitwise the values of Triton's own element-by-element fallback, on the shapes and forms the kernels use: tuple
reductions along either axis, a reduction keeping its axis, a 1-D reduction to a scalar, and
tuple scans forward and in reverse."""

from __future__ import annotations

import textwrap

from interpreter_utils import run_in_interpreter

_SCRIPT = textwrap.dedent(
    """
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as ti

    import interpreter_fast

    @triton.jit
    def _add_max(a0, a1, b0, b1):
        return a0 + b0, tl.maximum(a1, b1)

    @triton.jit
    def _affine(a0, x0, a1, x1):
        return a0 * a1, x0 * a1 + x1

    @triton.jit
    def _kernel(X, Y, R0, R1, C0, C1, S0, S1, W, AXIS: tl.constexpr, REVERSE: tl.constexpr):
        i = tl.arange(0, 8)[:, None] * 4 + tl.arange(0, 4)[None, :]
        x = tl.load(X + i)
        y = tl.load(Y + i)
        r0, r1 = tl.reduce((x, y), AXIS, _add_max)
        if AXIS == 0:
            tl.store(R0 + tl.arange(0, 4), r0)
            tl.store(R1 + tl.arange(0, 4), r1)
        else:
            tl.store(R0 + tl.arange(0, 8), r0)
            tl.store(R1 + tl.arange(0, 8), r1)
        c0, c1 = tl.associative_scan((x, y), AXIS, _affine, reverse=REVERSE)
        tl.store(C0 + i, c0)
        tl.store(C1 + i, c1)
        w0, w1 = tl.reduce((x, y), 1, _add_max, keep_dims=True)
        tl.store(W + tl.arange(0, 8)[:, None], w0 + w1)
        v0, v1 = tl.reduce((tl.sum(x, axis=1), tl.max(y, axis=1)), 0, _add_max)
        tl.store(S0, v0)
        tl.store(S1, v1)

    def run():
        g = torch.Generator().manual_seed(0)
        x = torch.rand(32, generator=g) + 0.5
        y = torch.randn(32, generator=g)
        outs = []
        for axis in (0, 1):
            for reverse in (False, True):
                bufs = [torch.zeros(8) for _ in range(2)] + [torch.zeros(32) for _ in range(2)]
                bufs += [torch.zeros(1), torch.zeros(1), torch.zeros(8)]
                _kernel[(1,)](x, y, *bufs, AXIS=axis, REVERSE=reverse)
                outs += bufs
        return outs

    slow = run()
    assert interpreter_fast.install()
    assert ti.ReduceOps.generic_reduce.__module__ == "interpreter_fast"
    fast = run()
    for a, b in zip(slow, fast, strict=True):
        assert torch.equal(a, b), (a, b)
    assert any(t.abs().sum() > 0 for t in fast)
    print("interpreter ok")
    """
)


def test_slice_wise_reduce_and_scan_equal_the_interpreters_own():
    run_in_interpreter(_SCRIPT, timeout=300, fast=False)
