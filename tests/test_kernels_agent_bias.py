"""Agent attention's position biases (``visionlin.kernels.agent_bias``): the reference against the formula written out
with PyTorch's bilinear weights, every backend forward and backward against the float64 reference, the layer's use of
the op, and bad input.

Tolerance: float32 outputs 2e-6 relative to the largest value (four weighted table entries and two adds, in another
order than ``F.interpolate``); table gradients 1e-5 (float32 sums of a few thousand products); half-precision outputs
are one rounding of the float32 value: one unit of the dtype's rounding relative to the largest value. The ``gpu``
tests run on the GPU machine; the interpreter test runs the Triton kernels on the CPU in a subprocess.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

from visionlin.kernels import get_op
from visionlin.kernels.agent_bias import agent_position_biases, agent_position_biases_reference

FLOOR = {torch.float32: 2e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
GRAD_FLOOR = 1e-5
# (heads, agents, H, W, prefix tokens, prefix tables, base side): Agent-DeiT (14 x 14 grid, a class token with its
# tables), a grid smaller than the 7 x 7 tables (a late stage), a wide grid of no power of two, prefix tokens without
# tables (zero columns), no prefix, another base side, more than one agent block (n > 64)
CASES = [
    (2, 9, 14, 14, 1, True, 7),
    (3, 49, 3, 2, 0, False, 7),
    (1, 4, 20, 37, 0, False, 7),
    (2, 16, 9, 5, 2, False, 7),
    (2, 4, 6, 10, 3, True, 5),
    (1, 81, 8, 8, 1, True, 7),
]
# One token, a 1 x 1 base table, one-row and one-column grids, a base table smaller than its side elsewhere
EDGE_CASES = [(1, 1, 1, 1, 0, False, 1), (2, 3, 1, 5, 1, True, 7), (2, 3, 6, 1, 0, False, 7), (2, 4, 2, 2, 2, True, 3)]
#: The agents' dim of each table (an, na, ah, aw, ha, wa, ac, ca).
AGENT_DIM = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 2, 7: 3}
# The interpreter runs each program in Python: the same kinds of case on smaller grids (several agent blocks on 3 x 4)
INTERPRETER_CASES = [CASES[0], CASES[1], (1, 4, 9, 21, 0, False, 7), CASES[3], CASES[4], (1, 81, 3, 4, 1, True, 7)]


def make_tables(h, n, hh, ww, p, with_prefix, side, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(h, n, side, side), (h, n, side, side), (1, h, n, hh, 1), (1, h, n, 1, ww), (1, h, hh, 1, n),
              (1, h, 1, ww, n)]  # fmt: skip
    if with_prefix:
        shapes += [(1, h, n, p), (1, h, p, n)]
    tables = [torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]
    return tables + [None, None] if not with_prefix else tables


def _by_definition(tables, p):
    """The module docstring's formula, with PyTorch's bilinear source index written out (float64)."""
    an, na, ah, aw, ha, wa, ac, ca = (None if t is None else t.detach().double() for t in tables)
    h, n, sh, sw = an.shape
    hh, ww = ah.shape[3], aw.shape[4]

    def weights(size, out):
        m = torch.zeros(out, size, dtype=torch.float64)
        for i in range(out):
            src = max((i + 0.5) * size / out - 0.5, 0.0)
            lo = int(src)
            hi = min(lo + 1, size - 1)
            m[i, lo] += 1 - (src - lo)
            m[i, hi] += src - lo
        return m

    wy, wx = weights(sh, hh), weights(sw, ww)
    agent = torch.zeros(1, h, n, p + hh * ww, dtype=torch.float64)
    query = torch.zeros(1, h, p + hh * ww, n, dtype=torch.float64)
    up_a, up_q = wy @ an @ wx.T, wy @ na @ wx.T  # [h, n, H, W]
    for y in range(hh):
        for x in range(ww):
            t = p + y * ww + x
            agent[0, :, :, t] = up_a[:, :, y, x] + ah[0, :, :, y, 0] + aw[0, :, :, 0, x]
            query[0, :, t, :] = up_q[:, :, y, x] + ha[0, :, y, 0, :] + wa[0, :, 0, x, :]
    if ac is not None:
        agent[..., :p], query[..., :p, :] = ac, ca
    return agent, query


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref.double().cpu()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def check_backend(case, out_dtype, device, backend, direct=False, table_dtype=torch.float32):
    """Forward and backward of ``backend`` against the float64 reference (``direct``: the Triton wrapper itself, for
    the interpreter, which has no CUDA tensors for the automatic choice)."""
    h, n, hh, ww, p, with_prefix, side = case
    ref_tables = make_tables(*case)
    tables = [None if t is None else t.detach().to(device, table_dtype).requires_grad_() for t in ref_tables]
    want = agent_position_biases_reference(*ref_tables, num_prefix_tokens=p)
    if direct:
        from visionlin.kernels.triton.agent_bias import agent_position_biases_triton

        got = agent_position_biases_triton(*tables, p, out_dtype)
    else:
        got = agent_position_biases(*tables, num_prefix_tokens=p, dtype=out_dtype, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == out_dtype and g.shape == w.shape
        assert _rel(g, w) <= FLOOR[out_dtype], (case, backend, _rel(g, w))
    seeds = torch.Generator().manual_seed(1)
    # the incoming gradients in the output dtype, the reference's the same values in float64
    grads = [torch.randn(w.shape, generator=seeds, dtype=torch.float64).to(out_dtype) for w in want]
    used = [t for t in ref_tables if t is not None]
    d_want = torch.autograd.grad(want, used, [g.double() for g in grads])
    d_got = torch.autograd.grad(got, [t for t in tables if t is not None], [g.to(device) for g in grads])
    for name, dg, dw in zip(("an", "na", "ah", "aw", "ha", "wa", "ac", "ca"), d_got, d_want, strict=False):
        assert dg.dtype == table_dtype and dg.shape == dw.shape
        assert _rel(dg, dw) <= GRAD_FLOOR, (case, backend, name, _rel(dg, dw))


@pytest.mark.parametrize("case", CASES)
def test_reference_is_the_formula(case):
    tables = make_tables(*case)
    p = case[4]
    for got, want in zip(
        agent_position_biases_reference(*tables, num_prefix_tokens=p), _by_definition(tables, p), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES + EDGE_CASES)
def test_torch_backend_matches_reference(case, dtype):
    check_backend(case, dtype, "cpu", "torch")


def test_dtypes_and_autocast():
    """Output dtype: the tables' by default, ``dtype`` when given; autocast changes neither (the reference turns it
    off, the torch backend's ops are not autocast ops)."""
    tables = make_tables(*CASES[0], dtype=torch.float32)
    for backend in ("torch", "reference"):
        out = agent_position_biases(*tables, num_prefix_tokens=1, backend=backend)
        assert {t.dtype for t in out} == {torch.float32}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = agent_position_biases(*tables, num_prefix_tokens=1, backend=backend)
            cast = agent_position_biases(*tables, num_prefix_tokens=1, dtype=torch.float16, backend=backend)
        for a, b in zip(out, auto, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert {t.dtype for t in cast} == {torch.float16}


def test_automatic_choice_on_cpu_is_torch_and_triton_says_why():
    tables = make_tables(*CASES[0], dtype=torch.float32)
    assert get_op("agent_position_biases").select(*tables, num_prefix_tokens=1).name == "torch"
    with pytest.raises(NotImplementedError, match="not on a CUDA device"):
        agent_position_biases(*tables, num_prefix_tokens=1, backend="triton")
    from visionlin.kernels.triton.agent_bias import MAX_GRID_WIDTH, grid_reasons

    assert grid_reasons((7, 7), (64, MAX_GRID_WIDTH)) == []
    assert "grid width" in grid_reasons((7, 7), (4, MAX_GRID_WIDTH + 1))[0]
    assert "2^31" in grid_reasons((7, 7), (1024, 1024), 16, 128)[0]  # 2^31 elements: 32-bit offsets would wrap
    assert "wider than 16" in grid_reasons((7, 17), (8, 8))[0]  # the backward's tl.dot tiles are 16 wide
    assert "2 x heads = 65536" in grid_reasons((7, 7), (1, 1), 32768)[0]
    mixed = [t.detach() for t in tables[:6]]
    mixed[2] = mixed[2].half()
    reasons = get_op("agent_position_biases").supports(*mixed, backend="triton")
    assert any("several dtypes" in r for r in reasons)


def test_layer_uses_the_op_and_trains():
    """``AgentAttention.position_biases`` equals the op on the layer's tables (resampled to another grid first), and
    gradients reach every table."""
    from visionlin.layers.agent import AgentAttention, resample_agent_biases

    torch.manual_seed(0)
    layer = AgentAttention(32, 2, agent_num=9, bias_size=(8, 8), num_prefix_tokens=1)
    got = layer.position_biases((6, 10), 1)
    sd = resample_agent_biases({k: v for k, v in layer.state_dict().items() if k.endswith("_bias")}, (6, 10))
    names = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias", "ac_bias", "ca_bias")
    want = agent_position_biases_reference(*(sd[k] for k in names), num_prefix_tokens=1)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    (got[0].square().sum() + got[1].square().sum()).backward()
    for name in names:
        assert getattr(layer, name).grad is not None and getattr(layer, name).grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.__setitem__(0, t[0][:, :, :3]), "an_bias and na_bias"),
        (lambda t: t.__setitem__(4, t[4][:, :, :-1]), "ha_bias must be"),
        (lambda t: t.__setitem__(3, t[3][..., 0]), "5-D"),
        (lambda t: t.__setitem__(6, None), "both ac_bias and ca_bias"),
        (lambda t: t.__setitem__(2, t[2].long()), "ah_bias must be a floating tensor"),
        (lambda t: t.__setitem__(5, "wa"), "wa_bias must be a floating tensor"),
    ],
)
def test_bad_tables_are_refused(edit, match):
    tables = [t.detach() for t in make_tables(*CASES[0], dtype=torch.float32)]
    edit(tables)
    with pytest.raises(ValueError, match=match):
        agent_position_biases(*tables, num_prefix_tokens=1)


def test_bad_arguments_are_refused():
    tables = [t.detach() for t in make_tables(*CASES[0], dtype=torch.float32)]
    with pytest.raises(ValueError, match=r"num_prefix_tokens=2, ac_bias must be \[1, 2, 9, 2\]"):
        agent_position_biases(*tables, num_prefix_tokens=2)
    for bad in (-1, True, 1.0):
        with pytest.raises(ValueError, match="num_prefix_tokens"):
            agent_position_biases(*tables, num_prefix_tokens=bad)
    for bad in (torch.int32, "bfloat16"):
        with pytest.raises(ValueError, match="dtype"):
            agent_position_biases(*tables, num_prefix_tokens=1, dtype=bad)
    with pytest.raises(ValueError, match="unknown backend"):
        agent_position_biases(*tables, num_prefix_tokens=1, backend="cuda")


def test_empty_heads_and_agents():
    tables = [t.detach()[:0] if i < 2 else t.detach()[:, :0] for i, t in enumerate(make_tables(*CASES[0]))]
    for backend in ("torch", "reference"):
        agent, query = agent_position_biases(*tables, num_prefix_tokens=1, backend=backend)
        assert agent.shape == (1, 0, 9, 197) and query.shape == (1, 0, 197, 9)
    tables = [t.detach().narrow(AGENT_DIM[i], 0, 0) for i, t in enumerate(make_tables(*CASES[0]))]
    for backend in ("torch", "reference"):
        agent, query = agent_position_biases(*tables, num_prefix_tokens=1, backend=backend)
        assert agent.shape == (1, 2, 0, 197) and query.shape == (1, 2, 197, 0)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    from tests.test_kernels_agent_bias import AGENT_DIM, EDGE_CASES, check_backend, make_tables
    from tests.test_kernels_agent_bias import INTERPRETER_CASES as CASES
    from visionlin.kernels.agent_bias import agent_position_biases_reference
    from visionlin.kernels.triton import agent_bias as ab
    ab.TUNING["block_t"] = 64  # fewer, larger forward programs (the interpreter's cost is per program)
    for case in CASES:
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    ab.TUNING["block_t"] = 16  # the shipped setting
    for case in EDGE_CASES:
        check_backend(case, torch.float32, "cpu", "triton", direct=True)
    for case in CASES[:2]:  # float16 output (the interpreter's float32 -> bfloat16 cast truncates instead of
        check_backend(case, torch.float16, "cpu", "triton", direct=True)  # rounding: bfloat16 is a gpu test)
    # several backward tile rows per program (tile of 16 x 16): the row loop
    ab.TUNING["tile"] = 16
    check_backend((1, 4, 40, 9, 1, True, 7), torch.float32, "cpu", "triton", direct=True)
    ab.TUNING["tile"] = 2048
    # non-contiguous tables (transposed storage), half-precision tables
    tables = [t.detach().float() for t in make_tables(2, 9, 5, 6, 1, True, 7)]
    odd = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in tables]
    want = agent_position_biases_reference(*tables, num_prefix_tokens=1)
    for got, w in zip(ab.agent_position_biases_triton(*odd, 1, torch.float32), want):
        torch.testing.assert_close(got, w, rtol=2e-6, atol=2e-6)
    half = [t.half() for t in tables]
    got = ab.agent_position_biases_triton(*half, 1, torch.float32)
    for g, w in zip(got, agent_position_biases_reference(*half, num_prefix_tokens=1, dtype=torch.float32)):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    # one output used: the other's gradient arrives as None (eager path); its tables get None, as in the reference
    tables = [t.requires_grad_() for t in [t.detach().clone() for t in tables]]
    for side in (0, 1):
        out = ab.agent_position_biases_triton(*tables, 1, torch.float32)[side]
        grads = torch.autograd.grad(out.sum(), tables, allow_unused=True)
        ref = [t.detach().clone().requires_grad_() for t in tables]
        want = agent_position_biases_reference(*ref, num_prefix_tokens=1)[side]
        want_grads = torch.autograd.grad(want.sum(), ref, allow_unused=True)
        sides = (0, 1, 0, 0, 1, 1, 0, 1)  # an, na, ah, aw, ha, wa, ac, ca: the bias each table feeds
        assert [g is None for g in grads] == [w is None for w in want_grads] == [s != side for s in sides]
        for g, w in zip(grads, want_grads):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # no heads: empty outputs and gradients, no launch
    empty = [(t.detach()[:0] if i < 2 else t.detach()[:, :0]).requires_grad_() for i, t in enumerate(tables)]
    a, q = ab.agent_position_biases_triton(*empty, 1, torch.float32)
    assert a.shape == (1, 0, 9, 31) and q.shape == (1, 0, 31, 9)
    (a.sum() + q.sum()).backward()
    # no agents, and a NaN in a table: non-finite exactly where the reference's are
    none = [t.detach().narrow(AGENT_DIM[i], 0, 0) for i, t in enumerate(tables)]
    a, q = ab.agent_position_biases_triton(*none, 1, torch.float32)
    assert a.shape == (1, 2, 0, 31) and q.shape == (1, 2, 31, 0)
    bad = [t.detach().clone() for t in tables]
    bad[2][0, 1, 3, 2, 0] = float("nan")  # ah: one row of the agent bias (a grid row of one agent), not the query bias
    got = ab.agent_position_biases_triton(*bad, 1, torch.float32)
    want = agent_position_biases_reference(*bad, num_prefix_tokens=1)
    assert got[0].isnan().sum() == 6 and not got[1].isnan().any()
    assert all(torch.equal(g.isnan(), w.isnan()) for g, w in zip(got, want))
    # non-square base tables (7 x 4, 3 x 2) and a long prefix (the backward's prefix loop); base tables with different
    # strides (a channels-last na: the wrapper gives both the contiguous layout)
    for case in ((2, 3, 5, 6, 20, True, (7, 4)), (1, 2, 4, 9, 300, True, (3, 2))):
        *dims, (sh, sw) = case
        t = make_tables(*dims, 7)
        t[0], t[1] = (torch.randn(dims[0], dims[1], sh, sw, dtype=torch.float64).requires_grad_() for _ in range(2))
        ref = agent_position_biases_reference(*t, num_prefix_tokens=dims[4])
        ours = [x.detach().float().requires_grad_() for x in t]
        got = ab.agent_position_biases_triton(*ours, dims[4], torch.float32)
        for g, w in zip(got, ref):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
        gs = [torch.randn_like(w) for w in ref]
        for g, w in zip(torch.autograd.grad(got, ours, [x.float() for x in gs]), torch.autograd.grad(ref, t, gs)):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    mixed = [t.detach().clone() for t in tables]
    mixed[1] = mixed[1].contiguous(memory_format=torch.channels_last)
    assert mixed[1].stride() != mixed[0].stride()
    for g, w in zip(ab.agent_position_biases_triton(*mixed, 1, torch.float32),
                    agent_position_biases_reference(*mixed, num_prefix_tokens=1)):
        torch.testing.assert_close(g, w, rtol=2e-6, atol=2e-6)
    # the ops' fakes match their real outputs (opcheck), and compiled (aot_eager) equals eager forward and backward
    plain = [t.detach() for t in tables]
    torch.library.opcheck(ab.agent_bias_fwd, (*plain, 1, torch.bfloat16), test_utils=("test_schema", "test_faketensor"))
    g_a, g_q = torch.randn(1, 2, 9, 31), torch.randn(1, 2, 31, 9)
    torch.library.opcheck(ab.agent_bias_bwd, (g_a, g_q, 7, 7, 5, 6, 1, True, torch.float32),
                          test_utils=("test_schema", "test_faketensor"))
    fn = lambda *t: ab.agent_position_biases_triton(*t, 1, torch.float32)
    want = fn(*tables)
    d_want = torch.autograd.grad(want[0].square().sum() + want[1].sum(), tables)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*tables)
    d_got = torch.autograd.grad(got[0].square().sum() + got[1].sum(), tables)
    for g, w in zip((*got, *d_got), (*want, *d_want)):
        torch.testing.assert_close(g, w)
    print("interpreter ok")
    """
)


def test_interpreter_matches_reference():
    """The Triton kernels' math on the CPU (Triton's interpreter): float32 and float16 outputs, prefix
    tables and zero prefix columns, grids smaller than the tables, several agent blocks, the backward's row loop,
    non-contiguous and half-precision tables, non-square base tables, base tables of different strides, one output
    used, no heads or agents, a NaN entry, the ops' fakes, compiled forward and backward."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    # the test cases, Agent-DeiT-S at 1024 px (64 x 64), Agent-PVT-S's first stage (56 x 56, one head), a grid as
    # wide as the backward holds (1024)
    [*CASES, (6, 49, 64, 64, 1, True, 7), (1, 49, 56, 56, 0, False, 7), (2, 9, 20, 1024, 0, False, 7)],
)
def test_triton_matches_reference(case, dtype):
    check_backend(case, dtype, "cuda", "triton")


@gpu
def test_triton_is_chosen_and_compiles():
    tables = make_tables(*CASES[0], dtype=torch.float32, device="cuda")
    assert get_op("agent_position_biases").select(*tables, num_prefix_tokens=1).name == "triton"
    fn = torch.compile(lambda *t: agent_position_biases(*t, num_prefix_tokens=1, dtype=torch.bfloat16), fullgraph=True)
    got = fn(*tables)
    (got[0].float().sum() + got[1].float().sum()).backward()
    want = agent_position_biases(*[t.detach() for t in tables], num_prefix_tokens=1, dtype=torch.bfloat16)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert all(t.grad is not None for t in tables)
