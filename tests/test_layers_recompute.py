"""``call_recomputing``: an intermediate recomputed in the backward instead of saved (Agent attention's pooled agents;
the layer tests run its attention through an op that keeps its inputs, as the GPU's fused op does).

What is checked: the forward's agents are freed once the forward returns (nothing keeps them for the backward), the
gradients are bitwise those of saving them, the recomputation runs in the forward's autocast state, a recomputation
that returns something else fails loudly, and every case where the hooks must stay out (no gradient, a view of a
larger tensor, other saved-tensor hooks: activation checkpointing) is a plain call.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import visionlin.layers.agent as agent_layer
from visionlin.kernels.agent import agent_attention_reference
from visionlin.layers._recompute import call_recomputing, observe_saved
from visionlin.layers.agent import AgentAttention


class _SavesInputs(torch.autograd.Function):
    """Agent attention whose autograd keeps exactly its inputs, as the fused Triton op does (on the CPU the SDPA
    backend copies the agents into its own layout, so what it saves is not the agents' storage)."""

    saved_agents: list = []  # weak references to the agents each forward saves

    @staticmethod
    def forward(ctx, q, k, v, agents, agent_bias, query_bias, scale):
        _SavesInputs.saved_agents.append(weakref.ref(agents))
        ctx.save_for_backward(q, k, v, agents, agent_bias, query_bias)
        ctx.scale = scale
        return agent_attention_reference(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias, scale=scale)

    @staticmethod
    def backward(ctx, g):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = agent_attention_reference(*inputs[:4], agent_bias=inputs[4], query_bias=inputs[5], scale=ctx.scale)
        need = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, need, g))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None)


@pytest.fixture(autouse=True)
def _op_keeps_its_inputs(monkeypatch):
    def attention(q, k, v, agents, *, agent_bias, query_bias, scale, dropout_p, backend):
        return _SavesInputs.apply(q, k, v, agents, agent_bias, query_bias, scale)

    monkeypatch.setattr(agent_layer, "agent_attention", attention)


def _layer_and_input(seed=0):
    torch.manual_seed(seed)
    layer = AgentAttention(32, 2, qkv_bias=True, agent_num=16, bias_size=(8, 8), num_prefix_tokens=1)
    x = torch.randn(2, 1 + 8 * 8, 32, requires_grad=True)
    return layer, x


def _track_agents(monkeypatch):
    """Weak references to every tensor the layer pools (the forward's agents, then the backward's recomputation)."""
    refs = []
    pool = agent_layer.pool_tokens

    def tracked(*args, **kwargs):
        out = pool(*args, **kwargs).contiguous()
        refs.append(weakref.ref(out))
        return out

    monkeypatch.setattr(agent_layer, "pool_tokens", tracked)
    return refs


def _grads(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    layer(x, (8, 8), 1).backward(g)
    return [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


def test_agents_are_not_kept_for_the_backward(monkeypatch):
    refs = _track_agents(monkeypatch)
    saved = _SavesInputs.saved_agents
    saved.clear()
    layer, x = _layer_and_input()
    out = layer(x, (8, 8), 1)
    gc.collect()
    assert len(refs) == 1 and refs[0]() is None and saved[0]() is None  # freed: nothing kept them
    out.sum().backward()
    assert len(refs) == 2  # pooled again by the backward
    # the same forward under another saved-tensor hook (identity) keeps them: the check above can fail
    refs.clear(), saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = layer(x, (8, 8), 1)
    gc.collect()
    assert saved[0]() is not None
    out.sum().backward()
    assert len(refs) == 1


def test_gradients_equal_those_of_saving_the_agents():
    layer, x = _layer_and_input(1)
    g = torch.randn(2, 65, 32)
    recomputed = _grads(layer, x, g)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # hooks active: plain call, agents saved
        saved = _grads(layer, x, g)
    for a, b in zip(recomputed, saved, strict=True):
        assert torch.equal(a, b)


def _ours_active() -> bool:
    """Whether the innermost saved-tensor hooks now are ``call_recomputing``'s."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and hooks[0].__qualname__.startswith("call_recomputing.")


def test_plain_calls_where_the_hooks_must_stay_out():
    t = torch.randn(3, 4, requires_grad=True) * 2.0
    assert call_recomputing(t, lambda: t, lambda u: _ours_active(), t)  # (the probe sees them when they are on)
    with torch.no_grad():
        assert not call_recomputing(t, lambda: t, lambda u: _ours_active(), t)
    whole = torch.randn(4, 6, requires_grad=True) * 1.0
    assert not call_recomputing(whole[:2], lambda: t, lambda u: _ours_active(), whole[:2])  # a view of a larger one
    with torch.autograd.graph.disable_saved_tensors_hooks("off here"):
        assert not call_recomputing(t, lambda: t, lambda u: _ours_active(), t)
    with torch.autograd.graph.save_on_cpu():
        assert not call_recomputing(t, lambda: t, lambda u: _ours_active(), t)
    with observe_saved(lambda s: None):
        assert call_recomputing(t, lambda: t, lambda u: _ours_active(), t)


def test_a_tensor_written_in_place_is_saved_as_it_is():
    """A view saved after an in-place write holds values ``recompute()`` no longer gives: saved, not recomputed."""
    a = torch.randn(3, 4, requires_grad=True)

    def fn(u):
        u.mul_(3)
        return (u * u).sum()

    t = a * 2.0
    call_recomputing(t, lambda: a * 2.0, fn, t).backward()
    torch.testing.assert_close(a.grad, 72 * a.detach())


def test_other_layouts_are_saved_as_they_are():
    a = torch.randn(3, 4, requires_grad=True)
    sparse = torch.eye(3).to_sparse().requires_grad_()
    t = a * 2.0
    call_recomputing(t, lambda: a * 2.0, lambda u: torch.sparse.mm(sparse, u).sum() + u.sin().sum(), t).backward()
    torch.testing.assert_close(a.grad, 2 * (1 + (2 * a.detach()).cos()))


def test_no_recomputation_without_a_gradient_or_for_a_view(monkeypatch):
    refs = _track_agents(monkeypatch)
    layer, x = _layer_and_input()
    with torch.no_grad():
        layer(x, (8, 8), 1)
    assert len(refs) == 1
    base = torch.randn(4, 6, requires_grad=True)
    view = base[:2] * 1.0  # owns its storage: hooked
    calls = []

    def recompute():
        calls.append(1)
        return base[:2] * 1.0

    call_recomputing(view, recompute, lambda t: t.sin().sum(), view).backward()  # sin saves its input once
    assert calls == [1]
    whole = base * 1.0
    part = whole[:2]  # a view of a larger tensor: its storage stays alive anyway, so no recipe
    call_recomputing(part, recompute, lambda t: t.sin().sum(), part).backward()
    assert calls == [1]


def test_a_wrong_recomputation_raises():
    a = torch.randn(3, 4, requires_grad=True)
    t = a * 2.0
    out = call_recomputing(t, lambda: torch.zeros(4, 3), lambda u: (u * u).sum(), t)
    with pytest.raises(RuntimeError, match=r"recomputed tensor is \(4, 3\) torch.float32 .* forward's was \(3, 4\)"):
        out.backward()
    t = a * 2.0
    out = call_recomputing(t, lambda: torch.zeros(3, 4, dtype=torch.float64), lambda u: (u * u).sum(), t)
    with pytest.raises(RuntimeError, match="torch.float64"):
        out.backward()
    t = a * 2.0  # the right values, but at an offset into a larger storage (as_strided would read the wrong ones)
    out = call_recomputing(t, lambda: torch.cat([torch.zeros(5), (a * 2.0).flatten()])[5:].view(3, 4),
                           lambda u: (u * u).sum(), t)  # fmt: skip
    with pytest.raises(RuntimeError, match="storage offset 5"):
        out.backward()


def test_recomputation_runs_in_the_forward_autocast_state():
    a = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8)
    seen = []

    def product():
        seen.append(torch.is_autocast_enabled("cpu"))
        return a @ w

    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = product()  # bfloat16 under autocast
        out = call_recomputing(t, product, lambda u: u.sin().float().sum(), t)
    out.backward()  # the recomputation gives bfloat16 again (outside autocast it would be float32 and raise)
    assert seen == [True, True]


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_unaffected(reentrant):
    """Non-reentrant checkpointing installs its own saved-tensor hooks: inside it the layer makes a plain call
    (checked by what is active when the attention runs); reentrant checkpointing runs the forward without a
    gradient, then again in the backward with one. Either way the gradients equal the plain layer's."""
    layer, x = _layer_and_input(2)
    g = torch.randn(2, 65, 32)
    plain = _grads(layer, x, g)
    active = []
    apply = _SavesInputs.apply

    def probe(*args):
        active.append(_ours_active())
        return apply(*args)

    _SavesInputs.apply = probe
    try:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        checkpoint(layer, x, (8, 8), 1, use_reentrant=reentrant).backward(g)
    finally:
        _SavesInputs.apply = apply
    assert active == ([False, False] if not reentrant else [False, True])  # the forward, then the backward's rerun
    for a, b in zip(plain, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        assert torch.equal(a, b)


def test_observers_see_what_is_saved_and_keep_the_recipes(monkeypatch):
    """Under :func:`observe_saved` (a memory measurement: ``benchmarks/saved_memory.py``, the gpu memory test) the
    agents are still recomputed, and the observer sees every other saved tensor but not them."""
    refs = _track_agents(monkeypatch)
    saved = _SavesInputs.saved_agents
    saved.clear()
    layer, x = _layer_and_input()
    looked: list[int] = []
    with observe_saved(lambda t: looked.append(t.untyped_storage().data_ptr())):
        out = layer(x, (8, 8), 1)
    gc.collect()
    assert saved[0]() is None and refs[0]() is None
    assert looked and x.untyped_storage().data_ptr() in looked  # e.g. the input the qkv projection keeps
    out.sum().backward()
    assert len(refs) == 2
    # nested: the innermost observer is the one composed with
    outer, inner = [], []
    with observe_saved(lambda t: outer.append(1)), observe_saved(lambda t: inner.append(1)):
        layer(x, (8, 8), 1).sum().backward()
    assert inner and not outer
