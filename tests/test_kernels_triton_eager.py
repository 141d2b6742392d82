"""The eager fast path around the Triton custom ops (``visionlin.kernels.triton._eager``).

In eager mode a call on plain tensors goes to the op's Python implementation through an ``autograd.Function`` (the
custom-op dispatch costs ~0.6 ms of host time per forward + backward); anything traced, fake, functional or wrapped
goes through the custom op. Checked here: which path each kind of call takes, that both give the same values and
gradients (toy ops on the CPU, and the real kernels under Triton's interpreter in a subprocess), and that
``torch.compile(fullgraph=True)`` still sees the custom op.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from interpreter_utils import run_in_interpreter

pytest.importorskip("triton")

from visionlin.kernels.triton._eager import direct, eager_call, eager_op, plain_eager  # noqa: E402

IMPL_CALLS: list[str] = []
DIRECT: list[bool] = []  # direct() as each implementation saw it


@torch.library.custom_op("visionlin_test::scale_fwd", mutates_args=())
def scale_fwd(x: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    IMPL_CALLS.append("fwd")
    DIRECT.append(direct())
    return x * w * alpha, (x * w).sum().reshape(1)


@scale_fwd.register_fake
def _(x, w, alpha):
    return torch.empty_like(x), x.new_empty(1)


@torch.library.custom_op("visionlin_test::scale_bwd", mutates_args=())
def scale_bwd(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    IMPL_CALLS.append("bwd")
    DIRECT.append(direct())
    return g * w * alpha, (g * x * alpha).sum(0)


@scale_bwd.register_fake
def _(x, w, g, alpha):
    return torch.empty_like(x), torch.empty_like(w)


def _setup(ctx, inputs, output):
    x, w, alpha = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, w)
    ctx.alpha = alpha


_bwd = eager_call(scale_bwd)


def _backward(ctx, g, _g_sum):
    x, w = ctx.saved_tensors
    dx, dw = _bwd(x, w, g, ctx.alpha)
    return dx, dw, None


scale_fwd.register_autograd(_backward, setup_context=_setup)
fast = eager_op(scale_fwd, _setup, _backward)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(3, generator=g))
    return x, w


def test_plain_eager_tells_real_tensors_from_traced_ones():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w = _inputs()
    assert plain_eager((x, w, 2.0))
    assert plain_eager((1, None, "s"))
    assert not plain_eager((x, torch.empty(3, device="meta")))
    with FakeTensorMode() as mode:
        assert not plain_eager((mode.from_tensor(x),))
    seen = []
    torch.vmap(lambda t: seen.append(plain_eager((t,))) or t)(torch.randn(2, 3))
    assert seen == [False]

    @torch.compile(backend="eager", fullgraph=True)
    def traced(t):
        return t + 1 if plain_eager((t,)) else t - 1

    assert torch.equal(traced(torch.zeros(2)), -torch.ones(2))


def test_eager_path_matches_the_custom_op_and_skips_the_dispatcher():
    x, w = _inputs()
    out, total = fast(x, w, 1.5)
    assert "Eager_" in type(out.grad_fn).__name__
    assert not total.requires_grad
    (out.square().sum()).backward()
    gx, gw = x.grad.clone(), w.grad.clone()

    x2, w2 = _inputs()
    out2, total2 = torch.ops.visionlin_test.scale_fwd(x2, w2, 1.5)
    assert "GeneratedBackwardFor" in type(out2.grad_fn).__name__
    (out2.square().sum()).backward()
    assert torch.equal(out, out2) and torch.equal(total, total2)
    assert torch.equal(gx, x2.grad) and torch.equal(gw, w2.grad)


def test_direct_tells_the_eager_path_from_the_dispatcher():
    """Implementations see ``direct()`` True when called by the eager path (forward and backward, the backward on
    autograd's thread), False through the dispatcher (a compiled graph's forward and backward nodes), and never after
    a call (an exception included)."""
    x, w = _inputs()
    DIRECT.clear()
    out, _ = fast(x, w, 1.5)
    out.sum().backward()
    with torch.no_grad():
        fast(x, w, 1.5)
    assert DIRECT == [True, True, True]
    DIRECT.clear()
    out, _ = torch.ops.visionlin_test.scale_fwd(x, w, 1.5)
    out.sum().backward()  # the custom op's registered backward still calls the backward op through eager_call
    assert DIRECT == [False, True] and not direct()
    DIRECT.clear()
    compiled = torch.compile(lambda a, b: fast(a, b, 1.5)[0].sum(), backend="aot_eager", fullgraph=True)
    compiled(x, w).backward()  # both ops are nodes of the compiled graphs: reached through the dispatcher
    assert DIRECT == [False, False]
    with pytest.raises(RuntimeError):
        fast(x, torch.randn(4), 1.0)  # shapes that do not broadcast: the implementation raises
    assert not direct()


def test_eager_path_without_grad_and_with_unused_outputs():
    x, w = _inputs()
    with torch.no_grad():
        out, _ = fast(x, w, 2.0)
    assert out.grad_fn is None
    IMPL_CALLS.clear()
    out, total = fast(x, w, 2.0)
    total.backward() if total.requires_grad else None  # non-differentiable: no backward to run
    assert IMPL_CALLS == ["fwd"]
    out.sum().backward()
    assert IMPL_CALLS == ["fwd", "bwd"]
    IMPL_CALLS.clear()
    out, _ = fast(x, w, 2.0)
    assert out.grad_fn.apply(None, None) == (None, None, None)  # no output used: None per input, no backward run
    assert IMPL_CALLS == ["fwd"]


def test_compile_fullgraph_still_sees_the_custom_op():
    x, w = _inputs()
    ref, _ = fast(x, w, 0.5)
    ref.sum().backward()
    gx = x.grad.clone()
    x.grad = None
    w.grad = None
    compiled = torch.compile(lambda a, b: fast(a, b, 0.5)[0], backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, gx)


_INTERPRETER_SCRIPT = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from visionlin.kernels.triton import agent, conv, gla, infsa, linear, neighborhood, rope_linear, scan

    def both(fast, op, args, grads):
        res = []
        for fn in (fast, op):
            leaves = [a.detach().clone().requires_grad_(bool(g)) if isinstance(a, torch.Tensor) else a
                      for a, g in zip(args, grads)]
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            out.float().square().sum().backward()
            res.append([out] + [a.grad for a, g in zip(leaves, grads) if g])
        kinds = type(res[0][0].grad_fn).__name__, type(res[1][0].grad_fn).__name__
        assert kinds[0].startswith("Eager_") and kinds[1].startswith("GeneratedBackwardFor"), kinds
        for a, b in zip(*res):
            assert torch.equal(a, b), (fn, (a - b).abs().max())

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=g) for _ in range(3))
    elu, divide = linear.FEATURE_MAP_IDS["elu"], linear.NORMALIZATION_IDS["divide"]
    both(linear._linear_attention_fwd_call, linear.linear_attention_fwd,
         (q, k, v, elu, divide, 0.25, 1e-6, True), (1, 1, 1, 0, 0, 0, 0, 0))
    both(infsa._pooled_infsa_fwd_call, infsa.pooled_infsa_fwd, (q, k, v, 1e-6), (1, 1, 1, 0))
    x = torch.randn(2, 1 + 5 * 7, 8, generator=g)
    w, b = torch.randn(8, 3, 3, generator=g), torch.randn(8, generator=g)
    both(conv._token_dwconv_fwd_call, conv.token_dwconv_fwd, (x, w, b, x, 5, 7, 1), (1, 1, 1, 0, 0, 0, 0))
    qn, kn, vn = (torch.randn(1, 6, 5, 2, 16, generator=g) for _ in range(3))
    rpb = torch.randn(2, 5, 5, generator=g)
    both(neighborhood._na2d_fwd_call, neighborhood.na2d_fwd, (qn, kn, vn, rpb, 3, 3, 1, 1, 0.25),
         (1, 1, 1, 1, 0, 0, 0, 0, 0))
    qg, kg, gg = (torch.randn(2, 21, 2, 16, generator=g) for _ in range(3))
    vg = torch.randn(2, 21, 2, 16, generator=g)
    for reverse in (False, True):
        both(gla._gla_fwd_call, gla.gla_fwd, (qg, kg, vg, F.logsigmoid(gg), 0.25, reverse, False),
             (1, 1, 1, 1, 0, 0, 0))
    qkv = torch.randn(2, 21, 3 * 32, generator=g)  # the packed bidirectional op: 2 heads of 16, packed gradients
    gates = F.logsigmoid(torch.randn(2, 21, 2 * 32, generator=g))
    both(gla._bigla_qkv_fwd_call, gla.bigla_qkv_fwd, (qkv, gates, 2, 0.25), (1, 1, 0, 0))
    mala = rope_linear.MECHANISM_IDS["magnitude"]
    both(rope_linear._rope_linear_fwd_call, rope_linear.rope_linear_attention_fwd,
         (q, k, v, None, None, mala, 0.25, 1e-6, 0.0), (1, 1, 1, 0, 0, 0, 0, 0, 0))
    a_ag = torch.randn(2, 5, 3, 16, generator=g)
    ab, qb = torch.randn(1, 3, 5, 37, generator=g), torch.randn(1, 3, 37, 5, generator=g)
    both(agent._fwd_call, agent.agent_attention_fwd, (q, k, v, a_ag, ab, qb, 0.25), (1, 1, 1, 1, 1, 1, 0))
    u, dt = torch.randn(2, 9, 4, generator=g), torch.randn(2, 9, 4, generator=g)
    a_mat = -(torch.rand(4, 3, generator=g) + 0.1)
    bm, cm = torch.randn(2, 9, 3, generator=g), torch.randn(2, 9, 3, generator=g)
    both(scan._selective_scan_fwd_call, scan.selective_scan_fwd, (u, dt, a_mat, bm, cm, None, None, None, True),
         (1, 1, 1, 1, 1, 0, 0, 0, 0))
    # only the last state used: the eager path gets no output gradient and passes zeros
    res = []
    for fn in (scan._selective_scan_fwd_call, scan.selective_scan_fwd):
        uu = u.clone().requires_grad_()
        _, last, _ = fn(uu, dt, a_mat, bm, cm, None, None, None, True)
        last.square().sum().backward()
        res.append(uu.grad)
    assert torch.equal(*res), (res[0] - res[1]).abs().max()
    print("interpreter ok")
    """
)


def test_interpreter_eager_path_equals_custom_op_bitwise():
    """The real kernels (Triton's interpreter on the CPU): forward and backward through the eager path and through
    the custom op give identical tensors."""
    run_in_interpreter(_INTERPRETER_SCRIPT, timeout=600)
