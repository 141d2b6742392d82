"""Triton pooled (linear) InfSA against its float64 reference, forward and backward (``rho`` included).

Tolerance: the kernels compute in float32 on the inputs' values, as the float32 ``"torch"`` backend does, so the
relative error (``||x - ref|| / ||ref||`` over the context and each gradient, against float64 on the same inputs) is
held to four units of the output dtype's rounding in half precision (the result is rounded once to that dtype), and
in float32 to twice the ``"torch"`` backend's error plus 1e-6. The plain half-precision computation is no yardstick
here: the pooled form cancels (the energy weights sum to one) and reaches ~8% gradient error in bfloat16.

The ``gpu`` tests run on the GPU machine; ``test_interpreter_*`` runs the same kernels on the CPU through Triton's
interpreter (float32 and float16) in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels import infsa

FLOOR = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(b, n, m, h, d, dv, seed=0, non_contiguous=False, std=1.0):
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # views of one fused [B, N, 3, H, D] projection, as the layers produce them
        q, k, v = (std * torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)).unbind(2)
        return q, k, v
    q = std * torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    k = std * torch.randn(b, m, h, d, generator=g, dtype=torch.float64)
    return q, k, std * torch.randn(b, m, h, dv, generator=g, dtype=torch.float64)


def check_pooled(shape, dtype, device, direct=False, non_contiguous=False, std=1.0, rho_per_head=True):
    """Context and the gradients of q, k, v and a per-head ``rho`` against float64 (``direct``: call the backend
    function itself, as the interpreter runs it on the CPU; else the public op with ``backend="triton"``)."""
    q, k, v = _inputs(*shape, non_contiguous=non_contiguous, std=std)
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the values the kernels see, exactly
    h = shape[3]
    rho = torch.linspace(0.5, 0.95, h, dtype=torch.float64) if rho_per_head else torch.tensor(0.9, dtype=torch.float64)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v, rho)]
    ref = infsa.linear_infsa_context_reference(*ref_in[:3], rho=ref_in[3])
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref.backward(grad)
    refs = [ref.detach(), *(t.grad for t in ref_in)]

    def run(fn):
        ins = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
        r = rho.to(device=device, dtype=torch.float32).requires_grad_()
        out = fn(*ins, rho=r)
        assert out.dtype == dtype and tuple(out.shape) == tuple(ref.shape)
        out.backward(grad.to(device=device, dtype=dtype))
        return [_rel(x.cpu(), y) for x, y in zip([out, *(t.grad for t in ins), r.grad], refs, strict=True)]

    if direct:
        ours = run(infsa._context_triton)
    else:
        ours = run(lambda q, k, v, rho: infsa.linear_infsa_context(q, k, v, rho=rho, backend="triton"))
    if dtype == torch.float32:
        base = run(infsa._context_native)
        bound = [2 * e + 1e-6 for e in base]
    else:
        bound = [FLOOR[dtype]] * 5
    names = ["ctx", "dq", "dk", "dv", "drho"]
    bad = {n: f"{e:.2e} > {b:.2e}" for n, e, b in zip(names, ours, bound, strict=True) if not e <= b}
    assert not bad, (shape, dtype, bad)
    return ours


gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "shape",
    [(1, 49, 49, 2, 32, 32), (3, 197, 197, 6, 64, 64), (3, 3136, 3136, 3, 32, 32), (1, 197, 100, 4, 80, 80),
     (1, 65536, 65536, 2, 128, 128), (2, 1, 7, 3, 16, 24)],
)  # fmt: skip
def test_triton_pooled_infsa_shapes(shape, dtype):
    check_pooled(shape, dtype, "cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_pooled_infsa_views_and_magnitudes(dtype):
    check_pooled((2, 197, 197, 6, 64, 64), dtype, "cuda", non_contiguous=True)
    check_pooled((1, 8192, 8192, 2, 64, 64), dtype, "cuda", std=30.0, rho_per_head=False)


@gpu
def test_triton_pooled_infsa_compiles_fullgraph():
    q, k, v = (t.to("cuda", torch.bfloat16).requires_grad_() for t in _inputs(2, 197, 197, 3, 32, 32))
    fn = torch.compile(lambda q, k, v: infsa.linear_infsa_context(q, k, v, rho=0.9, backend="triton"), fullgraph=True)
    out = fn(q, k, v)
    out.float().square().sum().backward()
    torch.testing.assert_close(out, infsa.linear_infsa_context(q, k, v, rho=0.9, backend="triton"))
    assert q.grad is not None and k.grad is not None and v.grad is not None


@gpu
def test_triton_pooled_infsa_is_chosen_in_models_and_matches_the_reference():
    import timm

    import visionlin
    from visionlin.kernels import get_op

    q = torch.randn(1, 4, 1, 8, device="cuda", dtype=torch.bfloat16)
    assert get_op("linear_infsa_context").select(q, q, q).name == "triton"
    torch.manual_seed(0)
    model = timm.create_model("infvit_tiny").cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    grads = []
    for backend in ("triton", "reference"):
        visionlin.set_backend(model, backend)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    (fast, fast_g), (ref, ref_g) = grads
    assert _rel(fast, ref.double()) < 1e-4
    assert max(_rel(a, b.double()) for a, b in zip(fast_g, ref_g, strict=True)) < 1e-3


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_infsa import check_pooled
    for shape in [(2, 37, 45, 3, 20, 24), (1, 300, 130, 2, 32, 16), (2, 1, 5, 1, 16, 16)]:
        for dtype in (torch.float32, torch.float16):
            check_pooled(shape, dtype, "cpu", direct=True)
    check_pooled((2, 70, 70, 3, 16, 16), torch.float16, "cpu", direct=True, non_contiguous=True, rho_per_head=False)
    # 16 (batch, head) pairs fill the interpreter's 4 "SMs" x 4: one program per pair over several row blocks, its sums
    # stored (no zero fill) and its context written by the key pass; the shapes above run split passes too
    from visionlin.kernels.triton import infsa as tri
    assert tri._splits(200, tri.ROWS, 16, torch.device("cpu")) == (1, 4)
    check_pooled((4, 200, 150, 4, 16, 16), torch.float32, "cpu", direct=True)
    # empty query or key sets: zero context, no garbage from unfilled buffers
    from visionlin.kernels import infsa
    for n, m in ((0, 7), (7, 0), (0, 0)):
        q, k, v = torch.randn(2, n, 3, 16), torch.randn(2, m, 3, 16), torch.randn(2, m, 3, 16)
        got = infsa._context_triton(q, k, v, rho=0.9)
        assert torch.equal(got, infsa._context_native(q, k, v, rho=0.9)) and not got.abs().sum(), (n, m, got)
    print("interpreter ok")
    """
)


def test_interpreter_pooled_infsa_matches_reference():
    """The pooled InfSA kernels' math on the CPU (Triton's interpreter), float32 and float16."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


def test_pooled_context_backends_agree_on_cpu_and_decline_with_reasons():
    q, k, v = (t.float() for t in _inputs(2, 50, 40, 3, 16, 16))
    ref = infsa.linear_infsa_context_reference(q, k, v, rho=0.8)
    torch.testing.assert_close(infsa.linear_infsa_context(q, k, v, rho=0.8), ref)  # auto: the float32 "torch" path
    full = infsa.linear_infsa_attention(q, k, v, rho=0.8)
    assert full.shape == (2, 50, 3, 16) and full.stride(1) == 0  # a broadcast view, not N copies
    torch.testing.assert_close(full, infsa.linear_infsa_attention_reference(q, k, v, rho=0.8))
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        infsa.linear_infsa_context(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="rho"):
        infsa.linear_infsa_context(q, k, v, rho=torch.ones(5))
