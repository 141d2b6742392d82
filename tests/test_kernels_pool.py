"""Adaptive average pooling of a token grid (``visionlin.kernels.pool``, Agent attention's agents): the reference
against a loop written from the definition, every backend forward and backward against the float64 reference, the
``"torch"`` backend's three paths, the models' tracing through its matrix path, and bad input.

Tolerance: float32 2e-6 relative (a float32 sum over at most a few hundred tokens in another order than the reference);
in half precision the output is one rounding of a float32 mean: two units of the dtype's rounding relative to the
output's largest value, the same for the input gradient (one rounding of a sum of at most a few ``G / count``). The
``gpu`` tests run on the GPU machine; the interpreter test runs the Triton kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from interpreter_utils import run_in_interpreter

from visionlin.kernels import pool
from visionlin.kernels.pool import token_adaptive_avg_pool2d, token_adaptive_avg_pool2d_reference

FLOOR = {torch.float32: 2e-6, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}
# (B, H, W, C, oh, ow): equal bins, uneven bins (Agent-DeiT-S at 1024 px: 64 x 64 -> 7 x 7), neighbours sharing rows,
# more bins than tokens (a late stage at a small input), one bin, a channel count that is no power of two
CASES = [
    (2, 14, 14, 24, 7, 7),
    (2, 64, 64, 8, 7, 7),
    (3, 9, 5, 20, 3, 3),
    (2, 3, 2, 5, 7, 7),
    (1, 16, 16, 70, 1, 1),
    (2, 37, 50, 16, 7, 9),
]
# The interpreter runs each program in Python: the same kinds of bins on smaller grids (20 x 20 -> 7 x 7: uneven)
INTERPRETER_CASES = [CASES[0], (2, 20, 20, 8, 7, 7), CASES[2], CASES[3], CASES[4], (2, 23, 17, 16, 7, 5)]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _by_definition(x: torch.Tensor, grid, out) -> torch.Tensor:
    """The module docstring's formula, one bin at a time."""
    (hh, ww), (oh, ow) = grid, out
    m = x.reshape(x.shape[0], hh, ww, x.shape[2])
    cells = []
    for i in range(oh):
        for j in range(ow):
            ys, ye = (i * hh) // oh, -(-(i + 1) * hh // oh)
            xs, xe = (j * ww) // ow, -(-(j + 1) * ww // ow)
            cells.append(m[:, ys:ye, xs:xe].mean(dim=(1, 2)))
    return torch.stack(cells, dim=1)


def _inputs(b, hh, ww, c, seed=0):
    """A strided ``[B, H*W, C]`` view (the middle third of a ``qkv``-like tensor) and its base."""
    base = torch.randn(b, hh * ww, 3 * c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return base


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_definition(case):
    b, hh, ww, c, oh, ow = case
    x = _inputs(b, hh, ww, c)[..., c : 2 * c]
    got = token_adaptive_avg_pool2d_reference(x, (hh, ww), (oh, ow))
    torch.testing.assert_close(got, _by_definition(x, (hh, ww), (oh, ow)))


def check_backend(case, dtype, device, backend, direct=False):
    """Forward and input gradient of ``backend`` (``direct``: the Triton backend function itself, as the interpreter
    runs it on the CPU) against float64 on the same rounded inputs, from a strided view."""
    b, hh, ww, c, oh, ow = case
    base64 = _inputs(b, hh, ww, c).to(dtype).double()
    ref_base = base64.clone().requires_grad_()
    ref = token_adaptive_avg_pool2d_reference(ref_base[..., c : 2 * c], (hh, ww), (oh, ow))
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref.backward(grad)
    ours_base = base64.to(device=device, dtype=dtype).requires_grad_()
    x = ours_base[..., c : 2 * c]
    if direct:
        from visionlin.kernels.triton.pool import token_adaptive_avg_pool2d_triton

        out = token_adaptive_avg_pool2d_triton(x, (hh, ww), (oh, ow))
    else:
        out = token_adaptive_avg_pool2d(x, (hh, ww), (oh, ow), backend=backend)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(grad.to(device=device, dtype=dtype))
    errs = {"out": _rel(out, ref.detach()), "dx": _rel(ours_base.grad, ref_base.grad)}
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e <= FLOOR[dtype]}
    assert not bad, (case, dtype, backend, bad)
    assert (ours_base.grad[..., :c] == 0).all() and (ours_base.grad[..., 2 * c :] == 0).all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "torch-matrices", "reference"])
def test_cpu_backends(case, backend, monkeypatch):
    if backend == "torch-matrices":  # the averaging-matrix path for every uneven size
        monkeypatch.setattr(pool, "LARGE_POOL_BIN", 0)
        backend = "torch"
    check_backend(case, torch.float32, "cpu", backend)


@pytest.mark.parametrize("large", [False, True])
def test_torch_backend_half_precision_is_one_rounding(large, monkeypatch):
    """bfloat16 in (under autocast too) gives bfloat16 out, one rounding of the float32 mean on every path."""
    if large:
        monkeypatch.setattr(pool, "LARGE_POOL_BIN", 0)
    for grid, out in (((14, 14), (7, 7)), ((64, 64), (7, 7)), ((9, 5), (3, 3))):
        x = torch.randn(2, grid[0] * grid[1], 8).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = token_adaptive_avg_pool2d(x, grid, out, backend="torch")
        assert got.dtype == torch.bfloat16
        want = token_adaptive_avg_pool2d_reference(x.float(), grid, out)
        assert (got.float() - want).abs().max() <= 2**-8 * want.abs().max()


def test_torch_backend_picks_the_path_by_bins(monkeypatch):
    """Equal bins (every 224 px grid) are a mean over a view, uneven small bins ``F.adaptive_avg_pool2d``, uneven bins
    of at least ``LARGE_POOL_BIN`` tokens (a 1024 px stage-1 grid, 37 x 37) the averaging matrices."""
    calls = []
    adaptive, matmul = F.adaptive_avg_pool2d, torch.matmul
    monkeypatch.setattr(pool.F, "adaptive_avg_pool2d", lambda *a, **k: calls.append("pool") or adaptive(*a, **k))
    monkeypatch.setattr(pool.torch, "matmul", lambda *a, **k: calls.append("matmul") or matmul(*a, **k))
    run = lambda n: token_adaptive_avg_pool2d(torch.randn(1, n * n, 4), (n, n), (7, 7), backend="torch")  # noqa: E731
    run(56), run(14)
    assert calls == []
    run(64)  # 10 x 10 uneven bins
    assert calls == ["pool"]
    run(256)
    assert calls == ["pool", "matmul", "matmul"]


def test_auto_choice_on_cpu_and_empty_batch():
    from visionlin.kernels import get_op

    x = torch.randn(2, 49, 8)
    assert get_op("token_adaptive_avg_pool2d").select(x, (7, 7), (3, 3)).name == "torch"
    assert token_adaptive_avg_pool2d(x[:0], (7, 7), (3, 3)).shape == (0, 9, 8)
    assert token_adaptive_avg_pool2d(x[..., :0], (7, 7), (3, 3)).shape == (2, 9, 0)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.randn(2, 12, 4), (3, 5), (2, 2)), "x has 12 tokens, expected H\\*W for feat_size=\\(3, 5\\)"),
        ((torch.randn(12, 4), (3, 4), (2, 2)), r"must be a floating tensor \[B, H\*W, C\], got torch.Size"),
        ((torch.randint(0, 3, (2, 12, 4)), (3, 4), (2, 2)), "must be a floating tensor"),
        ((torch.randn(2, 12, 4), (3, 4), (0, 2)), r"out_size=\(0, 2\) must be a pair"),
        ((torch.randn(2, 12, 4), (3, 4), 2), "out_size=2 must be a pair"),
        ((torch.randn(2, 12, 4), (3.0, 4), (2, 2)), r"feat_size=\(3.0, 4\) must be a pair"),
        ((torch.randn(2, 12, 4), (3, 4), (True, 2)), "out_size=.* must be a pair"),
        (("tokens", (3, 4), (2, 2)), "must be a floating tensor"),
    ],
)
def test_bad_input_is_named(args, match):
    from visionlin.layers.agent import pool_tokens

    with pytest.raises(ValueError, match=match):
        token_adaptive_avg_pool2d(*args)
    with pytest.raises(ValueError, match=match):
        pool_tokens(*args)


def test_triton_refuses_batches_beyond_the_grid_limit():
    """More samples than a CUDA grid's third dimension holds: the Triton backend says so (the automatic choice then
    takes the ``"torch"`` backend); shapes only, on the meta device."""
    big = torch.empty(70_000, 4, 8, device="meta")
    assert any("batch 70000 > 65535" in r for r in pool._triton_supports(big, (2, 2), (1, 1)))
    assert not any("batch" in r for r in pool._triton_supports(big[:65535], (2, 2), (1, 1)))


def test_explicit_triton_off_cuda_names_the_reason():
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        token_adaptive_avg_pool2d(torch.randn(2, 12, 4), (3, 4), (2, 2), backend="triton")
    with pytest.raises(NotImplementedError, match="float64"):
        token_adaptive_avg_pool2d(torch.randn(2, 12, 4, dtype=torch.float64), (3, 4), (2, 2), backend="triton")


@pytest.mark.parametrize("batch", [1, 2])
def test_uneven_bins_compile_to_the_eager_layout(batch):
    """``F.adaptive_avg_pool2d`` on the channels-last view of the tokens returned a contiguous map on the CPU at batch 1
    while its meta function declared channels-last: a compiled graph (``aot_eager``) read the pooled agents with the
    declared strides, and Agent attention on them gave NaN / 1e37 (Agent models at non-square sizes)."""
    from visionlin.kernels.agent import agent_attention
    from visionlin.layers._base import split_heads

    torch.manual_seed(0)
    qkv = torch.nn.Linear(32, 96)

    def f(x):
        q, k, v = qkv(x).chunk(3, dim=-1)
        agents = token_adaptive_avg_pool2d(q[:, 1:], (7, 7), (3, 3), backend="torch")  # uneven bins
        heads = [split_heads(t, 2) for t in (q, k, v, agents)]
        return agent_attention(*heads, scale=0.25, backend="sdpa")

    x = torch.randn(batch, 50, 32)
    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
        torch.testing.assert_close(compiled, f(x))


def test_agent_model_with_matrix_pooling_traces_exports_and_compiles(monkeypatch):
    """The large-bin pooling path (autocast turned off inside) through FX, ``torch.export`` and
    ``torch.compile(fullgraph=True)``, equal to eager."""
    from test_models import _fx_equals_eager

    from visionlin.models.vit import EfficientVisionTransformer

    monkeypatch.setattr(pool, "LARGE_POOL_BIN", 0)
    torch.manual_seed(0)
    model = EfficientVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, attn_layer="agent",
        attn_kwargs={"agent_num": 4},
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 32, 48)
    want = model(x)
    _fx_equals_eager(model, x)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), want)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(x)).all()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), want)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), want)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_pool import INTERPRETER_CASES as CASES, check_backend
    from visionlin.kernels.pool import token_adaptive_avg_pool2d_reference
    from visionlin.kernels.triton import pool
    for case in CASES:
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    # half precision: float16 (the interpreter's tl.dot on bfloat16 tiles is wrong: 1.7e5 relative error, numpy has
    # no bfloat16; the gpu tests cover bfloat16)
    check_backend(CASES[2], torch.float16, "cpu", "triton", direct=True)
    check_backend(CASES[4], torch.float16, "cpu", "triton", direct=True)
    # bins' rows split over programs (float32 partial means summed by torch)
    pool.TUNING["per_sm"] = 1000
    for case, dt in ((CASES[2], torch.float32), ((1, 12, 10, 8, 2, 3), torch.float16), (CASES[4], torch.float16)):
        check_backend(case, dt, "cpu", "triton", direct=True)
    pool.TUNING["per_sm"] = 4
    # empty outputs: no sample, no channel
    for shape in ((0, 49, 8), (2, 49, 0)):
        x = torch.randn(shape, requires_grad=True)
        out = pool.token_adaptive_avg_pool2d_triton(x, (7, 7), (3, 3))
        assert out.shape == (shape[0], 9, shape[2])
        out.sum().backward()
        assert x.grad.shape == x.shape
    # non-finite input: the cells whose bin holds it are non-finite, the other bin rows exact (module docstring)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(2, 20 * 20, 8)
        x[1, 3 * 20 + 17, 5] = bad  # row 3, column 17: bin row 1 (rows 2-5), bin column 5 or 6
        got = pool.token_adaptive_avg_pool2d_triton(x, (20, 20), (7, 7))
        want = token_adaptive_avg_pool2d_reference(x, (20, 20), (7, 7))
        hit = ~torch.isfinite(want)
        assert hit.any() and not torch.isfinite(got[hit]).any(), bad
        rows = got.unflatten(1, (7, 7))[1, torch.arange(7) != 1]
        torch.testing.assert_close(rows, want.unflatten(1, (7, 7))[1, torch.arange(7) != 1])
        assert torch.isfinite(got[0]).all()
    # the ops' fakes match their real outputs, and the forward's autograd is registered (opcheck)
    x = torch.randn(2, 64 * 64 // 16, 8)
    torch.library.opcheck(pool.token_pool_fwd, (x, 16, 16, 7, 7), test_utils=("test_schema", "test_faketensor"))
    g = torch.randn(2, 49, 8)
    torch.library.opcheck(pool.token_pool_bwd, (g, 16, 16, 7, 7), test_utils=("test_schema", "test_faketensor"))
    # compiled (aot_eager: the custom op's registered autograd) equals eager, forward and backward
    x = torch.randn(2, 256, 8, requires_grad=True)
    fn = lambda t: pool.token_adaptive_avg_pool2d_triton(t, (16, 16), (7, 7))
    want = fn(x)
    (dwant,) = torch.autograd.grad(want.square().sum(), x)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    (dgot,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dgot, dwant)
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter), float32 and float16, split rows, empty outputs,
    the ops' fakes, compiled forward and backward."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", [*CASES, (16, 64, 64, 384, 7, 7), (3, 56, 56, 96, 3, 3), (1, 256, 256, 96, 3, 3)])
def test_triton_matches_reference(case, dtype):
    check_backend(case, dtype, "cuda", "triton")


@gpu
def test_triton_is_chosen_and_compiles():
    from visionlin.kernels import get_op

    x = torch.randn(2, 64 * 64, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert get_op("token_adaptive_avg_pool2d").select(x, (64, 64), (7, 7)).name == "triton"
    fn = torch.compile(lambda t: token_adaptive_avg_pool2d(t, (64, 64), (7, 7)), fullgraph=True)
    out = fn(x)
    out.float().sum().backward()
    torch.testing.assert_close(out, token_adaptive_avg_pool2d(x, (64, 64), (7, 7)))
    assert x.grad is not None
