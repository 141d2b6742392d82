"""Pure-InfSA Triton kernels (no ``N x M`` score matrix) against the float64 reference, forward and backward.

Tolerance (DESIGN.md, flash-attention's rule): the kernel's relative error (``||x - ref|| / ||ref||`` over the output
and the gradients of q, k, v and, when it is learned, rho) against the float64 reference, run on the same rounded
inputs and output gradient, is at most twice that of the plain PyTorch computation in the same dtype (the native
``"torch"`` backend on the same inputs) plus a floor: four units of rounding in float16 / bfloat16, 1e-5 in float32
(IEEE float32 products in the kernels). Where the plain computation overflows (NaN / inf), the floor alone.

The ``gpu`` tests run on the GPU machine; ``test_interpreter_matches_reference`` runs the kernels on the CPU through
Triton's interpreter (float32 and float16: the interpreter's bfloat16 products are wrong, a Triton limitation) in a
subprocess, since the interpreter is chosen when the kernels are defined.
"""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels.infsa import _pure_native, pure_infsa_attention_reference

FLOOR = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8, torch.float32: 1e-5}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
RHO_KINDS = ["float", "per-head", "learned", "learned-scalar"]


def _inputs(b, n, m, h, d, dv, dtype, device, *, non_contiguous=False, std=1.0, seed=0):
    """``(q, k, v)`` in ``dtype``, or with ``non_contiguous`` one packed ``[B, N, 3, H, D]`` tensor whose ``unbind(2)``
    views are q, k, v (as the layers' fused projection produces them; needs ``N = M``, ``D = Dv``)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if non_contiguous:
        assert n == m and d == dv
        return (torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype)
    shapes = ((b, n, h, d), (b, m, h, d), (b, m, h, dv))
    return tuple(
        (torch.randn(s, generator=g, dtype=torch.float64) * std).to(device=device, dtype=dtype) for s in shapes
    )


def _growing_keys(dtype, device="cpu"):
    """Keys whose magnitudes grow 10^5-fold along M and queries spanning 10^3: each row's largest score arrives in a
    late key tile (the running row scales grow and rescale) and small scores sit far below the largest."""
    q, k, v = _inputs(1, 90, 200, 2, 32, 32, torch.float32, device, seed=1)
    k = k * torch.logspace(-3, 2, 200, device=device)[None, :, None, None]
    q = q * torch.logspace(-1, 2, 90, device=device)[None, :, None, None]
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _rho(kind, heads, device):
    """A ``rho`` of each accepted form; the ``learned`` ones require gradients."""
    if kind == "float":
        return 0.9
    if kind == "learned-scalar":
        return torch.tensor(0.8, device=device, requires_grad=True)
    per_head = torch.linspace(0.3, 1.0, heads, device=device)
    return per_head.requires_grad_() if kind == "learned" else per_head


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref|| / ||ref||``, both clamped to ``a``'s dtype range (a true value beyond float16 must come out as
    inf, and counts as exact where it does)."""
    big = torch.finfo(a.dtype).max
    a, ref = a.double().clamp(-big, big), ref.double().clamp(-big, big)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _run(fn, src, rho, grad, dtype=None):
    """``fn``'s output and the gradients of q, k, v (and of ``rho`` if it requires them), on copies of ``src`` (cast
    to ``dtype`` when given; a packed tensor stays packed, so q, k, v stay strided views)."""
    packed = isinstance(src, torch.Tensor)
    cast = (lambda t: t.detach().to(dtype)) if dtype else (lambda t: t.detach().clone())
    if packed:
        leaf = cast(src).requires_grad_()
        q, k, v = leaf.unbind(2)
    else:
        leaves = [cast(t).requires_grad_() for t in src]
        q, k, v = leaves
    learned = isinstance(rho, torch.Tensor) and rho.requires_grad
    if isinstance(rho, torch.Tensor):
        rho = rho.detach().to(dtype or rho.dtype).requires_grad_(learned)
    out = fn(q, k, v, rho=rho)
    out.backward(grad.to(out.dtype))
    grads = list(leaf.grad.unbind(2)) if packed else [t.grad for t in leaves]
    return [out, *grads, *([rho.grad] if learned else [])]


def _check(src, rho, dtype, *, eps=1e-6):
    """Forward and backward of the Triton kernels against the float64 reference, bounded by the native backend's
    error (module docstring). Returns the kernel's and the native backend's errors by name."""
    from visionlin.kernels.triton.infsa_pure import pure_infsa_triton

    q, k, v = src.unbind(2) if isinstance(src, torch.Tensor) else src
    with torch.no_grad():  # an output gradient partly along the output, so drho = sum(dout * out) / rho does not cancel
        out = pure_infsa_attention_reference(q.double(), k.double(), v.double(), rho=1.0, eps=eps)
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        grad = (noise.to(q.device) + out / out.std().clamp_min(1e-30)).to(dtype).double()
    reference = lambda q, k, v, rho: pure_infsa_attention_reference(q, k, v, rho=rho, eps=eps)  # noqa: E731
    ref = _run(reference, src, rho, grad, torch.float64)
    ours = _run(lambda q, k, v, rho: pure_infsa_triton(q, k, v, rho=rho, eps=eps), src, rho, grad)
    assert ours[0].dtype == dtype and ours[0].shape == ref[0].shape
    base = _run(lambda q, k, v, rho: _pure_native(q, k, v, rho=rho, eps=eps), src, rho, grad)
    names = ["out", "dq", "dk", "dv", "drho"][: len(ref)]
    errors = {n: _rel(x, r) for n, x, r in zip(names, ours, ref, strict=True)}
    native = {n: _rel(x, r) for n, x, r in zip(names, base, ref, strict=True)}
    bound = {n: 2 * e + FLOOR[dtype] if math.isfinite(e) else FLOOR[dtype] for n, e in native.items()}
    bad = {n: f"{errors[n]:.2e} > {bound[n]:.2e} (native {native[n]:.2e})" for n in names if not errors[n] <= bound[n]}
    assert not bad, bad
    return errors, native


gpu = pytest.mark.gpu

# Every head dim of {32, 64, 80, 128}, batch 1 and 3, N = 49 / 197 / 3136, keys fewer and more than queries.
SHAPES = [
    (1, 49, 49, 2, 64, 64),
    (3, 197, 197, 3, 32, 32),
    (3, 3136, 3136, 2, 80, 80),
    (1, 197, 100, 4, 128, 128),
    (3, 49, 197, 2, 80, 80),
    (1, 3136, 3136, 1, 128, 128),
]


@gpu
@pytest.mark.parametrize("rho", ["float", "learned"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(("b", "n", "m", "h", "d", "dv"), SHAPES)
def test_triton_pure_infsa_shapes(b, n, m, h, d, dv, dtype, rho):
    """Bound: 2 x native error + floor (module docstring), for out, dq, dk, dv and drho."""
    _check(_inputs(b, n, m, h, d, dv, dtype, "cuda"), _rho(rho, h, "cuda"), dtype)


@gpu
@pytest.mark.parametrize("rho", RHO_KINDS)
def test_triton_pure_infsa_every_rho(rho):
    """Every form of ``rho`` (float, per-head constant, learned per head, learned 0-dim); same bound."""
    _check(_inputs(3, 197, 197, 3, 64, 64, torch.bfloat16, "cuda"), _rho(rho, 3, "cuda"), torch.bfloat16)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_pure_infsa_long(dtype):
    """N = M = 16384 (the float64 reference needs ~30 GB); same bound."""
    _check(_inputs(1, 16384, 16384, 2, 64, 64, dtype, "cuda"), _rho("learned", 2, "cuda"), dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_pure_infsa_non_contiguous_views(dtype):
    """q, k, v as ``unbind(2)`` views of a packed ``[B, N, 3, H, D]`` tensor, read through their strides; same bound."""
    _check(_inputs(2, 197, 197, 3, 64, 64, dtype, "cuda", non_contiguous=True), _rho("learned", 3, "cuda"), dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_pure_infsa_large_magnitudes(dtype):
    """Std-30 inputs at N = 8192: scores in the hundreds, ``rho / ||A||_F`` ~1e-6 (float16 subnormal if it were ever
    an operand), ``||A||_F^2`` ~1e11; same bound."""
    _check(_inputs(1, 8192, 8192, 2, 64, 64, dtype, "cuda", std=30.0), _rho("learned", 2, "cuda"), dtype)


@gpu
def test_triton_pure_infsa_compiles_fullgraph():
    from visionlin.kernels.triton.infsa_pure import pure_infsa_triton

    q, k, v = (t.requires_grad_() for t in _inputs(2, 197, 197, 3, 32, 32, torch.bfloat16, "cuda"))
    rho = _rho("learned", 3, "cuda")
    fn = torch.compile(pure_infsa_triton, fullgraph=True)
    out = fn(q, k, v, rho=rho)
    out.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v, rho)]
    for t in (q, k, v, rho):
        t.grad = None
    eager = pure_infsa_triton(q, k, v, rho=rho)
    eager.float().square().sum().backward()
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, (q.grad, k.grad, v.grad, rho.grad), strict=True):
        torch.testing.assert_close(a, e)
    const = torch.compile(pure_infsa_triton, fullgraph=True)(q, k, v, rho=0.7)
    torch.testing.assert_close(const, pure_infsa_triton(q, k, v, rho=0.7))


@gpu
def test_triton_pure_infsa_memory_is_linear_in_n():
    """Forward + backward at N = 32768: the score matrix alone would be N^2 float32 = 4 GiB per head; the kernels
    keep a few [N, D] buffers, and doubling N at most doubles the peak (plus slack)."""
    from visionlin.kernels.triton.infsa_pure import pure_infsa_triton

    def peak(n):
        q, k, v = (t.requires_grad_() for t in _inputs(1, n, n, 2, 64, 64, torch.bfloat16, "cuda"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        pure_infsa_triton(q, k, v, rho=_rho("learned", 2, "cuda")).float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    small, large = peak(16384), peak(32768)
    assert large < 256 * 2**20, f"{large / 2**20:.0f} MiB at N = 32768"
    assert large < 2.5 * small, f"{small / 2**20:.1f} MiB -> {large / 2**20:.1f} MiB when N doubles"


def test_triton_pure_infsa_supports_reasons():
    pytest.importorskip("triton")
    from visionlin.kernels.triton.infsa_pure import triton_pure_infsa_supports

    q = torch.randn(1, 4, 2, 8)
    assert "tensors are not on a CUDA device" in triton_pure_infsa_supports(q, q, q)
    reasons = triton_pure_infsa_supports(q.double(), q.double(), q.double())
    assert any("torch.float64" in r for r in reasons)
    wide = torch.randn(1, 4, 2, 256)
    assert any("D=256" in r and "allowed: 1 to 128" in r for r in triton_pure_infsa_supports(wide, wide, wide))


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_infsa_pure import _check, _growing_keys, _inputs, _rho
    f32, f16 = torch.float32, torch.float16
    cases = [
        (_inputs(2, 37, 45, 2, 20, 24, f32, "cpu"), _rho("learned", 2, "cpu"), f32),
        (_inputs(1, 70, 130, 2, 32, 16, f32, "cpu"), 0.9, f32),
        (_inputs(2, 45, 33, 1, 80, 80, f32, "cpu"), torch.tensor([0.0], requires_grad=True), f32),
        (_inputs(1, 70, 130, 2, 32, 16, f16, "cpu"), _rho("per-head", 2, "cpu"), f16),
        (_inputs(1, 100, 100, 2, 64, 64, f16, "cpu", non_contiguous=True), _rho("learned-scalar", 2, "cpu"), f16),
        (_inputs(1, 130, 130, 1, 128, 128, f16, "cpu", std=30.0), _rho("learned", 1, "cpu"), f16),
        (_growing_keys(f16), _rho("learned", 2, "cpu"), f16),
    ]
    for src, rho, dtype in cases:
        errors, native = _check(src, rho, dtype)
        print(dtype, {n: f"{e:.1e} (native {native[n]:.1e})" for n, e in errors.items()})
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The kernels' math on the CPU (Triton's interpreter), float32 and float16: M != N, D = 20 / 32 / 64 / 80 / 128,
    strided views, rho as float / per head / learned (0 included), std-30 float16; same bound as the GPU tests."""
    pytest.importorskip("triton")
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)
