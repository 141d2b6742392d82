"""Token-layout depthwise convolution (``visionlin.kernels.conv``): the reference against a loop written from the
definition, every backend forward and backward against the float64 reference, and bad input.

Tolerance: float32 1e-5 relative (the kernels accumulate the ``k * k`` taps in float32 like the reference); in half
precision four units of the dtype's rounding (each output is one rounding of a float32 sum; the ``"torch"`` backend's
error is reported next to ours in the failure message). The ``gpu`` tests run on the GPU machine; the interpreter test
runs the Triton kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels.conv import token_depthwise_conv2d, token_depthwise_conv2d_reference

FLOOR = {torch.float32: 1e-5, torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
# (B, H, W, C, k, P, per-sample kernels, bias, residual)
CASES = [
    (2, 5, 7, 20, 3, 1, False, True, True),
    (2, 4, 9, 38, 5, 0, True, False, True),
    (2, 6, 6, 24, 3, 2, True, True, False),
    (1, 1, 1, 8, 5, 1, False, True, True),  # a 1 x 1 grid under a 5 x 5 kernel
    (2, 3, 4, 16, 1, 0, False, False, False),
    (1, 9, 11, 24, 7, 1, False, True, False),  # k = 7: the one-pass weight gradient's tap groups 32 + 16 + 1
]


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _inputs(b, hh, ww, c, k, p, per_sample, bias, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = p + hh * ww
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    w = torch.randn(*((b,) if per_sample else ()), c, k, k, generator=g, dtype=torch.float64)
    bb = torch.randn(c, generator=g, dtype=torch.float64) if bias else None
    r = torch.randn(b, n, c, generator=g, dtype=torch.float64) if residual else None
    return x, w, bb, r


def _by_definition(x, w, bias, residual, hh, ww, p):
    out = torch.zeros_like(x) if residual is None else residual.clone()
    k = w.shape[-1]
    for b in range(x.shape[0]):
        wb = w[b] if w.ndim == 4 else w
        for y in range(hh):
            for xx in range(ww):
                acc = torch.zeros(x.shape[2], dtype=x.dtype) if bias is None else bias.clone()
                for dy in range(k):
                    for dx in range(k):
                        sy, sx = y + dy - k // 2, xx + dx - k // 2
                        if 0 <= sy < hh and 0 <= sx < ww:
                            acc = acc + wb[:, dy, dx] * x[b, p + sy * ww + sx]
                out[b, p + y * ww + xx] += acc
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_definition(case):
    b, hh, ww, c, k, p, *_ = case
    x, w, bias, res = _inputs(*case)
    ref = token_depthwise_conv2d_reference(x, w, bias, feat_size=(hh, ww), num_prefix_tokens=p, residual=res)
    torch.testing.assert_close(ref, _by_definition(x, w, bias, res, hh, ww, p))


def check_backend(case, dtype, device, backend, direct=False):
    """Forward and every gradient of ``backend`` against float64 on the same rounded inputs (``direct``: the Triton
    backend function itself, as the interpreter runs it on the CPU)."""
    b, hh, ww, c, k, p, *_ = case
    ins = [None if t is None else t.to(dtype).double() for t in _inputs(*case)]
    ref_in = [None if t is None else t.clone().requires_grad_() for t in ins]
    ref = token_depthwise_conv2d_reference(
        ref_in[0], ref_in[1], ref_in[2], feat_size=(hh, ww), num_prefix_tokens=p, residual=ref_in[3]
    )
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref.backward(grad)
    ours = [None if t is None else t.to(device=device, dtype=dtype).requires_grad_() for t in ins]
    kw = dict(feat_size=(hh, ww), num_prefix_tokens=p, residual=ours[3])
    if direct:
        from visionlin.kernels.triton.conv import token_depthwise_conv2d_triton

        out = token_depthwise_conv2d_triton(ours[0], ours[1], ours[2], **kw)
    else:
        out = token_depthwise_conv2d(ours[0], ours[1], ours[2], backend=backend, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    out.backward(grad.to(device=device, dtype=dtype))
    errs = {"out": _rel(out, ref.detach())}
    for name, a, r in zip(["dx", "dweight", "dbias", "dresidual"], ours, ref_in, strict=True):
        if a is not None:
            errs[name] = _rel(a.grad, r.grad)
    bad = {n: f"{e:.2e}" for n, e in errs.items() if not e <= FLOOR[dtype]}
    assert not bad, (case, dtype, backend, bad)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cpu_backends(case, backend):
    check_backend(case, torch.float32, "cpu", backend)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_conv import CASES, check_backend
    from visionlin.kernels.triton import conv
    # every weight-gradient kernel with the tile forward (the strip kernels: _STRIP_SCRIPT): the one-pass tile (shipped
    # above the strips' largest kernel) at every case; the opt-in ones (writing dx too, the stacked rows, the per-tap
    # walks) at per-sample kernels, a grid under its kernel and k = 7
    conv.TUNING["conv"] = "tile"
    for kernel in ("tile", "fused", "rows", "taps"):
        conv.TUNING["weight_grad"] = kernel
        for case in CASES if kernel == "tile" else (CASES[1], CASES[3], CASES[5]):
            check_backend(case, torch.float32, "cpu", "triton", direct=True)
        check_backend((1, *CASES[1][1:]), torch.float16, "cpu", "triton", direct=True)  # batch 1: fp32 ran batch 2
        if kernel == "tile":
            check_backend(CASES[2], torch.float16, "cpu", "triton", direct=True)
    conv.TUNING["weight_grad"] = "tile"
    conv.I32_OFFSETS = 0  # the one-pass kernels' int64 token offsets (a sample spanning 2^31 elements)
    for kernel in ("tile", "fused", "rows"):
        conv.TUNING["weight_grad"] = kernel
        check_backend(CASES[1], torch.float32, "cpu", "triton", direct=True)
    conv.TUNING["weight_grad"], conv.I32_OFFSETS = "tile", 2**31
    # the backward op's real outputs have the strides its fake promises (torch.compile checks them)
    from interpreter_utils import assert_fakes_match
    from visionlin.kernels.triton.conv import token_dwconv_bwd
    for w in (torch.randn(8, 3, 3), torch.randn(2, 8, 5, 5)):
        args = (torch.randn(2, 1 + 20, 8), torch.randn(2, 1 + 20, 8), w, True, 4, 5, 1)
        assert_fakes_match(lambda args=args: token_dwconv_bwd(*args))
    # empty channels or samples, shared and per-sample kernels: empty results and gradients, forward and backward
    for shape, w in (((2, 13, 0), torch.randn(0, 3, 3)), ((0, 13, 4), torch.randn(4, 3, 3)),
                     ((2, 13, 0), torch.randn(2, 0, 3, 3))):
        x, w = torch.randn(shape, requires_grad=True), w.requires_grad_()
        out = conv.token_depthwise_conv2d_triton(x, w, None, feat_size=(3, 4), num_prefix_tokens=1)
        out.sum().backward()
        assert out.shape == x.grad.shape == shape and w.grad.shape == w.shape
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter), float32 and float16."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


_STRIP_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_conv import CASES, check_backend
    from visionlin.kernels.triton import conv
    # the strip kernels (forward, input and weight gradients) at every case: kernel sizes 1-7, grids narrower than a
    # strip and not a multiple of it, prefix tokens, per-sample kernels; then strips of 2 and 8 columns, 2-8 per
    # program (several strip tiles per program: the weight gradient's walk)
    conv.TUNING.update(conv="strip", weight_grad="strip")
    for case in CASES:
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    check_backend(CASES[2], torch.float16, "cpu", "triton", direct=True)
    for ss, sr, case in ((2, 2, CASES[0]), (8, 4, CASES[2]), (2, 8, CASES[5])):
        conv.TUNING.update(strip_s=ss, strip_r=sr, wg_strip_s=ss, wg_strip_r=sr)
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    conv.TUNING.update(strip_s=None, strip_r=None, wg_strip_s=None, wg_strip_r=None)
    conv.TUNING["wg_strip_c"] = 64  # the weight gradient over channel blocks of 64 (20 and 38 channels: partial blocks)
    check_backend(CASES[0], torch.float32, "cpu", "triton", direct=True)
    check_backend(CASES[1], torch.float32, "cpu", "triton", direct=True)
    conv.TUNING["wg_strip_c"] = None
    conv.I32_OFFSETS = 0  # the int64 token offsets (a sample spanning 2^31 elements), at the shipped settings
    check_backend(CASES[0], torch.float32, "cpu", "triton", direct=True)
    check_backend(CASES[2], torch.float32, "cpu", "triton", direct=True)
    print("interpreter ok")
    """
)


def test_interpreter_strip_kernels_match_reference():
    """The strip kernels' math on the CPU (Triton's interpreter)."""
    run_in_interpreter(_STRIP_SCRIPT, timeout=600)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case", [*CASES, (3, 14, 14, 384, 3, 1, True, False, True), (2, 64, 64, 64, 5, 1, False, True, True)]
)
@pytest.mark.parametrize("weight_grad", ["tile", "fused", "rows", "taps", "strip"])
def test_triton_matches_reference(case, dtype, weight_grad, monkeypatch):
    from visionlin.kernels.triton import conv

    monkeypatch.setitem(conv.TUNING, "weight_grad", weight_grad)
    monkeypatch.setitem(conv.TUNING, "conv", "strip" if weight_grad == "strip" else "tile")
    check_backend(case, dtype, "cuda", "triton")


@gpu
@pytest.mark.parametrize("strip", [(2, 4), (4, 8), (4, 16), (8, 8), (8, 32)], ids=lambda s: f"s{s[0]}r{s[1]}")
def test_triton_strip_settings(strip, monkeypatch):
    """Every strip setting ``benchmarks/conv_op.py --strip`` times, forward and weight gradient, at k = 1-7 with
    prefix tokens, per-sample kernels and a grid of 64 x 64 (the walk over many strip tiles), float32 and bfloat16."""
    from visionlin.kernels.triton import conv

    ss, sr = strip
    for key, value in dict(conv="strip", weight_grad="strip", strip_s=ss, strip_r=sr, wg_strip_s=ss).items():
        monkeypatch.setitem(conv.TUNING, key, value)
    monkeypatch.setitem(conv.TUNING, "wg_strip_r", min(sr, 16))
    for case in (*CASES, (2, 64, 64, 64, 5, 1, False, True, True), (3, 56, 56, 96, 5, 0, False, True, True)):
        for dtype in (torch.float32, torch.bfloat16):
            check_backend(case, dtype, "cuda", "triton")


@gpu
@pytest.mark.parametrize("channels", [16, 32, 64])
def test_triton_weight_grad_strip_channel_blocks(channels, monkeypatch):
    """``TUNING["wg_strip_c"]``: the strip weight gradient over each channel block ``conv_op.py --strip`` sweeps, at
    every case and two model-sized grids, float32 and bfloat16."""
    from visionlin.kernels.triton import conv

    monkeypatch.setitem(conv.TUNING, "wg_strip_c", channels)
    for case in (*CASES, (2, 64, 64, 64, 5, 1, False, True, True), (3, 56, 56, 96, 3, 0, False, True, True)):
        for dtype in (torch.float32, torch.bfloat16):
            check_backend(case, dtype, "cuda", "triton")


WEIGHT_GRAD_SETTINGS = ["taps", "tile 4096", "tile 8192", "tile 16384", "fused 4096", "fused 8192", "rows 8192"]
WEIGHT_GRAD_SETTINGS += ["rows 16384"]


@gpu
@pytest.mark.parametrize("per_sm", [4, 16, 64])
@pytest.mark.parametrize("warps", [4, 8])
@pytest.mark.parametrize("setting", WEIGHT_GRAD_SETTINGS)
def test_triton_weight_grad_launch_settings(setting, warps, per_sm, monkeypatch):
    """Every launch setting ``benchmarks/conv_op.py --weight-grad-sweep`` times (programs per SM, warps, products per
    tile), against float64 at k = 3 / 5 / 7, with prefix tokens and per-sample kernels: whichever ships is tested."""
    from visionlin.kernels.triton import conv

    kernel, *rest = setting.split()
    elements = int(rest[0]) if rest else None
    for key, value in {"weight_grad": kernel, "wg_per_sm": per_sm, "wg_warps": warps, "wg_elements": elements}.items():
        monkeypatch.setitem(conv.TUNING, key, value)
    for case in (CASES[0], CASES[1], CASES[5], (2, 64, 64, 64, 5, 1, False, True, True)):
        for dtype in (torch.float32, torch.bfloat16):
            check_backend(case, dtype, "cuda", "triton")


@gpu
def test_triton_is_chosen_and_compiles():
    from visionlin.kernels import get_op

    x = torch.randn(2, 1 + 49, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 3, 3, device="cuda", requires_grad=True)
    assert get_op("token_depthwise_conv2d").select(x, w, feat_size=(7, 7), num_prefix_tokens=1).name == "triton"
    fn = torch.compile(lambda x, w: token_depthwise_conv2d(x, w, feat_size=(7, 7), num_prefix_tokens=1), fullgraph=True)
    out = fn(x, w)
    out.float().sum().backward()
    torch.testing.assert_close(out, token_depthwise_conv2d(x, w, feat_size=(7, 7), num_prefix_tokens=1))
    assert x.grad is not None and w.grad is not None


def test_rows_kernel_beyond_its_kernel_size_takes_the_tile_kernel_at_the_tile_size(monkeypatch):
    """``"rows"`` runs up to ``ROWS_MAX_K`` at its own tile size; larger kernels take ``"tile"`` at the tile kernel's
    default size, not the rows kernel's."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import conv

    seen = []
    monkeypatch.setattr(conv, "launch", lambda fn, grid, *args, **meta: seen.append((fn, meta["BLOCK_T"])))
    monkeypatch.setitem(conv.TUNING, "weight_grad", "rows")
    for k in (conv.ROWS_MAX_K, conv.ROWS_MAX_K + 2):
        g = torch.zeros(1, 49, 64)
        conv._launch_weight_grad(g, g, torch.zeros(1, k * k, 64), torch.zeros(64), k, True, 7, 7, 0, 0)
    assert seen == [
        (conv._weight_grad_rows_kernel, conv.weight_grad_tile(conv.ROWS_MAX_K, conv.ROWS_ELEMENTS)[2]),
        (conv._weight_grad_tile_kernel, conv.weight_grad_tile(conv.ROWS_MAX_K + 2)[2]),
    ]


def test_strip_kernels_beyond_their_kernel_size_take_the_tile_kernels(monkeypatch):
    """``"strip"`` runs up to ``STRIP_MAX_K``, forward and weight gradient each at its settings for the kernel size
    (``STRIP[k]``, ``WG_STRIP[k]``: columns per strip, strips and channels per program); larger kernels take the tile
    kernels, forward and weight gradient."""
    pytest.importorskip("triton")
    from visionlin.kernels.triton import conv

    seen = []

    def record(fn, grid, *args, **meta):
        seen.append((fn, tuple(meta[m] for m in ("S", "BLOCK_R", "BLOCK_C")) if "S" in meta else None))

    monkeypatch.setattr(conv, "launch", record)
    monkeypatch.setitem(conv.TUNING, "weight_grad", "strip")
    monkeypatch.setitem(conv.TUNING, "conv", "strip")
    sizes = (1, 3, 5, conv.STRIP_MAX_K)
    for k in (*sizes, conv.STRIP_MAX_K + 2):
        g = torch.zeros(1, 49, 64)
        conv._launch_weight_grad(g, g, torch.zeros(1, k * k, 64), torch.zeros(64), k, True, 7, 7, 0, 0)
        conv._launch_conv(g, torch.zeros(1, k * k, 64), k, False, None, None, g, 7, 7, 0, False)
    want = [
        ((conv._weight_grad_strip_kernel, conv.WG_STRIP[k]), (conv._conv_strip_kernel, conv.STRIP[k])) for k in sizes
    ]
    assert seen == [
        *(c for pair in want for c in pair),
        (conv._weight_grad_tile_kernel, None),
        (conv._conv_kernel, None),
    ]
    assert set(conv.WG_STRIP) == set(conv.STRIP) == set(range(1, conv.STRIP_MAX_K + 1, 2))
    # the sizes' own settings, not one for all (s43's sweep: k = 5 differs from k = 3 in both kernels)
    assert conv.STRIP[5] != conv.STRIP[3] and conv.WG_STRIP[5] != conv.WG_STRIP[3]


def test_weight_grad_kernel_setting_is_checked(monkeypatch):
    """A ``TUNING["weight_grad"]`` naming no kernel raises, naming the value and the choices (it does not silently run
    one of them); the tile shapes cover the kernel sizes the models use."""
    from visionlin.kernels.triton import conv

    monkeypatch.setitem(conv.TUNING, "weight_grad", "row")
    match = r"TUNING\['weight_grad'\] = 'row': allowed \('tile', 'fused', 'rows', 'taps', 'strip'\)"
    with pytest.raises(ValueError, match=match):
        conv._launch_weight_grad(*[None] * 4, 3, True, 4, 4, 0, 0)
    monkeypatch.setitem(conv.TUNING, "weight_grad", "tile")
    monkeypatch.setitem(conv.TUNING, "conv", "strips")
    with pytest.raises(ValueError, match=r"TUNING\['conv'\] = 'strips': allowed \('tile', 'strip'\)"):
        conv._launch_conv(torch.empty(1, 4, 8), *[None] * 6, 2, 2, 0, False)
    monkeypatch.setitem(conv.TUNING, "conv", "tile")
    for key, value, message in (
        ("wg_warps", 3, r"TUNING\['wg_warps'\] = 3: must be a power of two"),
        ("wg_per_sm", 0, r"TUNING\['wg_per_sm'\] = 0: must be an integer >= 1 or None"),
        ("wg_elements", -8, r"TUNING\['wg_elements'\] = -8: must be an integer >= 1 or None"),
        ("wg_elements", 32768, r"TUNING\['wg_elements'\] = 32768: at most 16384"),
    ):
        with monkeypatch.context() as m:
            m.setitem(conv.TUNING, key, value)
            with pytest.raises(ValueError, match=message):
                conv._launch_weight_grad(None, torch.empty(1, 4, 8), *[None] * 2, 3, True, 2, 2, 0, 0)
    with monkeypatch.context() as m:
        m.setitem(conv.TUNING, "weight_grad", "strip")
        m.setitem(conv.TUNING, "wg_strip_c", 24)
        with pytest.raises(ValueError, match=r"conv\.TUNING\['wg_strip_c'\] = 24: must be a power of two"):
            conv._launch_weight_grad(None, torch.empty(1, 4, 8), *[None] * 2, 3, True, 2, 2, 0, 0)
    for k, groups, tokens in ((1, (0, 0), 64), (3, (8, 0), 8), (5, (16, 8), 4), (7, (32, 16), 2)):
        t1, t2, bt = conv.weight_grad_tile(k)
        assert (t1, t2, bt) == (*groups, tokens) and t1 + t2 + 1 == k * k
        assert k * k * bt * conv.BLOCK_C <= conv.WEIGHT_GRAD_ELEMENTS < 2 * k * k * bt * conv.BLOCK_C or bt == 64
    with pytest.raises(ValueError, match="kernel size 11: 121 taps are not two powers of two and one"):
        conv.weight_grad_tile(11)


def test_triton_refuses_batches_beyond_the_grid_limit():
    """More samples than a CUDA grid's third dimension holds: the Triton backend says so (the automatic choice then
    takes the ``"torch"`` backend); shapes only, on the meta device."""
    from visionlin.kernels.conv import _triton_supports

    x, w = torch.empty(70_000, 1 + 4, 8, device="meta"), torch.empty(8, 3, 3, device="meta")
    assert any("batch 70000 > 65535" in r for r in _triton_supports(x, w))
    assert not any("batch" in r for r in _triton_supports(x[:65535], w))


def test_bad_input_is_named():
    x = torch.randn(2, 10, 8)
    w = torch.randn(8, 3, 3)
    with pytest.raises(ValueError, match="10 tokens"):
        token_depthwise_conv2d(x, w, feat_size=(3, 4))
    with pytest.raises(ValueError, match="k odd"):
        token_depthwise_conv2d(x, torch.randn(8, 2, 2), feat_size=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match=r"must be \(8, 3, 3\)"):
        token_depthwise_conv2d(x, torch.randn(4, 3, 3), feat_size=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="bias"):
        token_depthwise_conv2d(x, w, torch.randn(()), feat_size=(3, 3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="residual"):
        token_depthwise_conv2d(x, w, feat_size=(3, 3), num_prefix_tokens=1, residual=torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="feat_size"):
        token_depthwise_conv2d(x, w, feat_size=(3, -3), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        token_depthwise_conv2d(x, w, feat_size=(3, 3), num_prefix_tokens=-1)
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        token_depthwise_conv2d(x, w, feat_size=(3, 3), num_prefix_tokens=1, backend="triton")
    empty = token_depthwise_conv2d(x[:0], w, feat_size=(3, 3), num_prefix_tokens=1)
    assert empty.shape == (0, 10, 8)
