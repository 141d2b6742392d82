"""The selective scan's Triton kernels (``visionlin.kernels.triton.scan``) against
:func:`visionlin.kernels.selective_scan_reference` in float64, forward (output and last state) and backward (every
input: ``u``, ``delta``, ``A``, ``B``, ``C``, ``D``, ``z``, ``delta_bias``, with a gradient on the last state too).

Errors are relative Frobenius norms against the float64 reference on the same (exactly upcast) inputs. The kernels
compute in float32 whatever the inputs' dtype, so the tolerance is float32's (2e-5, measured ~1e-7 on the interpreter)
plus, for half-precision inputs, four units of the dtype's rounding (``y`` and the input gradients are rounded to it
once). The ``gpu`` tests run on the GPU machine; the interpreter test runs the kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels import get_op, selective_scan, selective_scan_reference

FLOOR = {torch.float32: 2e-5, torch.float16: 2e-5 + 4 * 2.0**-11, torch.bfloat16: 2e-5 + 4 * 2.0**-8}


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref.cpu()).norm() / ref.cpu().norm().clamp_min(1e-30)).item()


def check_scan(
    b,
    length,
    d,
    n,
    dtype,
    device,
    *,
    groups=0,
    z=True,
    skip=True,
    bias=True,
    softplus=True,
    last=True,
    step_shift=-4.0,
    transposed=False,
    seed=0,
):
    """Run the Triton backend on ``device``; compare with the float64 reference, forward and backward.

    ``step_shift`` sets the step sizes' scale (softplus(x + shift): -4 is Mamba's initialisation, +2 trained-scale
    steps ~2); ``transposed`` passes ``u`` / ``delta`` / ``z`` as transposes of ``[B, D, L]`` tensors (Mamba's layout).
    """
    from visionlin.kernels.triton.scan import selective_scan_triton

    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).double()

    u = r(b, length, d)
    delta = r(b, length, d) + (step_shift if softplus else 0.0)
    if not softplus:
        delta = delta.abs()  # the effective step must be >= 0
    a_mat = -(torch.rand(d, n, generator=g, dtype=torch.float64) * 4 + 0.1)
    shape = (b, length, n) if not groups else (b, length, groups, n)
    bm, cm = r(*shape), r(*shape)
    dskip = r(d) if skip else None
    zz = r(b, length, d) if z else None
    dbias = r(d, scale=0.5) if bias else None
    gy, glast = r(b, length, d), r(b, d, n)
    inputs = dict(u=u, delta=delta, A=a_mat, B=bm, C=cm, D=dskip, z=zz, delta_bias=dbias)

    # The float64 reference runs on the device too (fast on the GPU).
    ref_in = {k: (t.to(device).clone().requires_grad_() if t is not None else None) for k, t in inputs.items()}
    y_ref, last_ref = selective_scan_reference(**ref_in, delta_softplus=softplus, return_last_state=True)
    ((y_ref * gy.to(device)).sum() + ((last_ref * glast.to(device)).sum() if last else 0)).backward()

    params = ("A", "D", "delta_bias")  # float32 by Mamba's convention
    ours_in = {}
    for k, t in inputs.items():
        if t is None:
            ours_in[k] = None
        elif k in params:
            ours_in[k] = t.to(device, torch.float32).requires_grad_()
        elif transposed and k in ("u", "delta", "z"):
            ours_in[k] = t.to(device, dtype).transpose(1, 2).contiguous().requires_grad_()
        else:
            ours_in[k] = t.to(device, dtype).requires_grad_()
    call = {k: (t.transpose(1, 2) if transposed and k in ("u", "delta", "z") and t is not None else t)
            for k, t in ours_in.items()}  # fmt: skip
    y, last_state = selective_scan_triton(**call, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == dtype and y.shape == (b, length, d) and last_state.dtype == torch.float32
    loss = (y.double() * gy.to(device)).sum()
    if last:
        loss = loss + (last_state.double() * glast.to(device)).sum()
    loss.backward()
    errors = {"y": _rel(y, y_ref.detach()), "last": _rel(last_state, last_ref.detach())}
    for k, t in ours_in.items():
        if t is not None:
            grad = t.grad.transpose(1, 2) if transposed and k in ("u", "delta", "z") else t.grad
            ref_grad = ref_in[k].grad
            if ref_grad is None:  # at L = 1 the decay exp(delta A) only multiplies the zero initial state: the
                # reference's graph never reaches A, whose gradient is exactly zero (ours must be too)
                assert k == "A" and length == 1, (k, length)
                ref_grad = torch.zeros_like(ref_in[k])
            errors[f"d{k}"] = _rel(grad, ref_grad)
    bound = FLOOR[dtype]
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e <= bound}
    assert not bad, ((b, length, d, n, groups), dtype, bound, bad)
    return errors


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_triton_scan import check_scan
    from visionlin.kernels.triton import scan
    scan.TUNING.update(chunk=8, block_d=4)  # several chunks and channel blocks at interpreter-sized shapes
    f32 = torch.float32
    check_scan(2, 19, 6, 4, f32, "cpu")                                   # partial last chunk, partial channel block
    check_scan(1, 8, 4, 3, f32, "cpu", z=False, skip=False, bias=False, softplus=False, last=False)
    check_scan(2, 13, 8, 2, f32, "cpu", groups=2, step_shift=2.0)          # grouped B / C, trained-scale steps
    check_scan(1, 5, 3, 1, f32, "cpu", transposed=True)                    # N = 1, Mamba's [B, D, L] layout
    check_scan(2, 11, 4, 4, torch.float16, "cpu")
    for length in (1, 2, 17):  # one position (A's gradient is exactly 0), two, one past two chunks
        check_scan(3, length, 5, 8, f32, "cpu")
        check_scan(3, length, 5, 8, f32, "cpu", z=False, skip=False, bias=False, softplus=False)
    check_scan(3, 1, 5, 8, torch.float16, "cpu", groups=1)
    scan.TUNING.update(bc_slices=2)  # dB / dC over two copies (3 channel blocks: 0 and 2 share one)
    check_scan(2, 19, 10, 4, f32, "cpu")
    check_scan(2, 13, 8, 2, f32, "cpu", groups=2)                          # grouped: one copy whatever the setting
    print("interpreter ok")
    """
)


def test_interpreter_scan_matches_reference():
    """The kernels' math on the CPU (Triton's interpreter): float32 and float16, forward and backward."""
    pytest.importorskip("triton")
    run_in_interpreter(_INTERPRETER_SCRIPT)


def test_scan_config_rule_and_overrides():
    """One warp per program below N = 64 (the chunk's time axis inside each thread); the backward's tile half the
    forward's; ``TUNING`` overrides the backward apart from the forward, and a forward override carries to it."""
    pytest.importorskip("triton")
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import scan

    assert tuple(scan.scan_config(8)) == (16, 4, 8, 1, 2, 1)
    assert tuple(scan.scan_config(16)) == (16, 2, 16, 1, 1, 1)
    assert tuple(scan.scan_config(64)) == (16, 1, 64, 2, 1, 4)
    assert tuple(scan.scan_config(1)) == (16, 16, 2, 1, 8, 1)
    with tuned(scan.TUNING, bwd_block_d=8, bwd_warps=4):
        assert tuple(scan.scan_config(8)) == (16, 4, 8, 1, 8, 4)
    with tuned(scan.TUNING, chunk=8, block_d=4):
        assert tuple(scan.scan_config(8)) == (8, 4, 8, 1, 4, 1)
    assert tuple(scan.scan_config(8)) == (16, 4, 8, 1, 2, 1)


def _args(b=2, length=5, d=4, n=3, dtype=torch.float32, device="cpu"):
    u, delta = (torch.randn(b, length, d, dtype=dtype, device=device) for _ in range(2))
    bm, cm = (torch.randn(b, length, n, dtype=dtype, device=device) for _ in range(2))
    return u, delta, bm, cm, -torch.rand(d, n, device=device)


def test_triton_supports_reasons():
    op = get_op("selective_scan")
    assert list(op.backends) == ["triton", "reference"]  # the Triton scan is preferred where it can run
    u, delta, bm, cm, a_mat = _args()
    kw = dict(A=a_mat, D=None, delta_bias=None, delta_softplus=False, return_last_state=False, chunk_size=64)
    assert "not on a CUDA device" in "; ".join(op.supports(u, delta, bm, cm, None, backend="triton", **kw))
    u, delta, bm, cm, a_mat = _args(n=80, dtype=torch.float64)
    reasons = "; ".join(op.supports(u, delta, bm, cm, None, backend="triton", **(kw | dict(A=a_mat))))
    assert "torch.float64" in reasons and "N=80 exceeds" in reasons
    with pytest.raises(NotImplementedError, match=r"backend 'triton' cannot run this call: .*CUDA"):
        selective_scan(u, delta, a_mat, bm, cm, backend="triton")


# GPU ---------------------------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]

# (batch, L, D, N, groups): one position, partial chunks, MambaVision windows (196, N=8), odd channel counts, Vim's
# N=16 at 197 tokens, VMamba's 4 groups with N=1, a long sequence, N=64.
GPU_CASES = [
    (3, 1, 5, 8, 0),
    (1, 17, 3, 8, 0),
    (3, 196, 80, 8, 0),
    (1, 197, 192, 16, 0),
    (3, 64, 96, 1, 4),
    (1, 3136, 64, 16, 0),
    (3, 49, 33, 64, 3),
]
GPU_IDS = [f"b{b}_L{length}_D{d}_N{n}_G{g}" for b, length, d, n, g in GPU_CASES]


def _cuda_or_skip():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


# Every case in bfloat16; float32 and float16 on three (each dtype, option set and state size is one more Triton
# compilation).
DTYPE_CASES = [(c, torch.bfloat16) for c in range(len(GPU_CASES))] + [
    (c, dt) for dt in (torch.float32, torch.float16) for c in (1, 2, 4)
]


@gpu
@pytest.mark.parametrize(("case", "dtype"), DTYPE_CASES, ids=[f"{GPU_IDS[c]}-{str(dt)[6:]}" for c, dt in DTYPE_CASES])
def test_gpu_scan(case, dtype):
    """Every option (D, z, delta_bias + softplus), and on the first three cases none of them."""
    _cuda_or_skip()
    b, length, d, n, groups = GPU_CASES[case]
    check_scan(b, length, d, n, dtype, "cuda", groups=groups)
    if case < 3:
        check_scan(b, length, d, n, dtype, "cuda", groups=groups, z=False, skip=False, bias=False, softplus=False)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_scan_large_steps_and_layouts(dtype):
    """Trained-scale step sizes (softplus(x + 2) ~ 2: the stability case), Mamba's [B, D, L] layout, no last-state
    gradient."""
    _cuda_or_skip()
    check_scan(2, 512, 64, 16, dtype, "cuda", step_shift=2.0)
    check_scan(3, 100, 48, 8, dtype, "cuda", transposed=True, last=False)


@gpu
@pytest.mark.parametrize("slices", [4, 1 << 20], ids=["slices4", "slices_all"])
def test_gpu_scan_bc_slices(slices):
    """``dB`` / ``dC`` added into several float32 copies (``TUNING["bc_slices"]``): 4, and one per channel block."""
    _cuda_or_skip()
    from benchmarks._timing import tuned
    from visionlin.kernels.triton import scan

    with tuned(scan.TUNING, bc_slices=slices):
        check_scan(3, 196, 80, 8, torch.bfloat16, "cuda")
        check_scan(2, 49, 40, 16, torch.float32, "cuda", z=False, last=False)


@gpu
def test_gpu_automatic_backend_is_triton():
    _cuda_or_skip()
    u, delta, bm, cm, a_mat = _args(dtype=torch.bfloat16, device="cuda")
    kw = dict(A=a_mat, D=None, delta_bias=None, delta_softplus=True, return_last_state=False, chunk_size=64)
    assert get_op("selective_scan").select(u, delta, bm, cm, None, backend=None, **kw).name == "triton"


@gpu
def test_gpu_scan_torch_compile_fullgraph():
    _cuda_or_skip()
    u, delta, bm, cm, a_mat = (t.requires_grad_() for t in _args(3, 40, 24, 8, torch.bfloat16, "cuda"))

    def f(u, delta, a_mat, bm, cm):
        return selective_scan(u, delta, a_mat, bm, cm, delta_softplus=True, backend="triton")

    eager = f(u, delta, a_mat, bm, cm)
    eager.float().square().sum().backward()
    grads = [t.grad.clone() for t in (u, delta, a_mat, bm, cm)]
    for t in (u, delta, a_mat, bm, cm):
        t.grad = None
    compiled = torch.compile(f, fullgraph=True)(u, delta, a_mat, bm, cm)
    compiled.float().square().sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, b in zip((u.grad, delta.grad, a_mat.grad, bm.grad, cm.grad), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # dB / dC sum with atomics: order may differ
