"""Every public kernel op under hostile input: a ValueError naming the offending value, or a correct result.

Covers issue 5's items A and B: hyper-parameters (``eps``, ``scale``, ``focusing_factor``, ``dropout_p``, ``rho``,
``channel_scale``) checked once in ``kernels._common`` by every op and its reference; non-floating and mixed dtypes;
empty batch / queries / heads / value channels (an empty output, forward and backward, in every backend) and no keys
or no channels (a ValueError naming M or D); side tensors that do not broadcast; wrong ranks, devices, flags, feature
maps, RoPE tables and ``feat_size``. The eager-only value check (``channel_scale``) is shown to stay out of
``torch.compile(fullgraph=True)`` and fake-tensor tracing.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from visionlin.kernels import (
    agent_attention,
    agent_attention_reference,
    apply_rope_2d,
    efficient_attention,
    efficient_attention_reference,
    focused_linear_attention,
    focused_linear_attention_reference,
    get_op,
    linear_attention,
    linear_attention_reference,
    linear_infsa_attention,
    linear_infsa_attention_reference,
    list_ops,
    magnitude_aware_linear_attention,
    magnitude_aware_linear_attention_reference,
    norm_aware_linear_attention,
    norm_aware_linear_attention_reference,
    pure_infsa_attention,
    pure_infsa_attention_reference,
    rank_augmented_linear_attention,
    rank_augmented_linear_attention_reference,
    rope_2d_tables,
    softmax_attention,
    softmax_attention_reference,
)
from visionlin.kernels._common import values_are_checkable

N_AGENTS = 3


def _agents(q):
    return (
        q[:, :1].expand(-1, N_AGENTS, -1, -1).clone() if q.shape[1] else q.new_ones(q.shape[0], N_AGENTS, *q.shape[2:])
    )


# name -> (public op, reference, registry name, extra positional args from q)
OPS = {
    "softmax": (softmax_attention, softmax_attention_reference, "softmax_attention", None),
    "linear": (linear_attention, linear_attention_reference, "linear_attention", None),
    "efficient": (efficient_attention, efficient_attention_reference, "efficient_attention", None),
    "focused": (focused_linear_attention, focused_linear_attention_reference, "focused_linear_attention", None),
    "agent": (agent_attention, agent_attention_reference, "agent_attention", _agents),
    "mala": (
        magnitude_aware_linear_attention,
        magnitude_aware_linear_attention_reference,
        "magnitude_aware_linear_attention",
        None,
    ),
    "nala": (norm_aware_linear_attention, norm_aware_linear_attention_reference, "norm_aware_linear_attention", None),
    "rala": (
        rank_augmented_linear_attention,
        rank_augmented_linear_attention_reference,
        "rank_augmented_linear_attention",
        None,
    ),
    "infsa-pure": (pure_infsa_attention, pure_infsa_attention_reference, "pure_infsa_attention", None),
    "infsa-linear": (linear_infsa_attention, linear_infsa_attention_reference, "linear_infsa_attention", None),
}
# Extra keyword sets that select other code paths of the same op (every backend is exercised for each).
VARIANTS = {
    "linear": [{}, {"normalize": "subtract"}, {"normalize": "none", "feature_map": "cosine"}],
    "infsa-linear": [{}, {"per_query": True}],
}
CASES = [(name, kw) for name in OPS for kw in VARIANTS.get(name, [{}])]
CASE_IDS = [name + "".join(f"-{v}" for v in kw.values()) for name, kw in CASES]


def _args(name, q, k, v):
    extra = OPS[name][3]
    return (q, k, v) if extra is None else (q, k, v, extra(q))


def _backends(name, **kw):
    """The backends that can run this op with these keywords (on a plain float32 call)."""
    q, k, v = _qkv()
    op = get_op(OPS[name][2])
    return [b for b in list_ops()[OPS[name][2]] if not op.supports(*_args(name, q, k, v), backend=b, **kw)]


def _qkv(b=2, n=5, m=6, h=2, d=8, dv=None, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    shapes = ((b, n, h, d), (b, m, h, d), (b, m, h, d if dv is None else dv))
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(grad) for s in shapes]


# A: scalar hyper-parameters -------------------------------------------------------------------------------------------
NOT_A_NUMBER = [float("nan"), float("inf"), True, "1e-6", torch.tensor(1e-6), [1e-6]]
EPS_OPS = ["linear", "focused", "mala", "nala", "rala", "infsa-pure", "infsa-linear"]


@pytest.mark.parametrize("reference", [False, True], ids=["public", "reference"])
@pytest.mark.parametrize("bad", [-1e-6, *NOT_A_NUMBER], ids=repr)
@pytest.mark.parametrize("name", EPS_OPS)
def test_eps_must_be_a_finite_non_negative_number(name, bad, reference):
    fn = OPS[name][1 if reference else 0]
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"eps=.* must be a finite real number >= 0"):
        fn(*_args(name, q, k, v), eps=bad)
    if name == "nala":
        with pytest.raises(ValueError, match=r"norm_eps=.* must be a finite real number >= 0"):
            fn(q, k, v, norm_eps=bad)


def test_negative_or_nan_eps_no_longer_gives_nan_or_flipped_signs():
    """The InfSA ops took eps < 0 (a denominator through zero) and eps = NaN silently."""
    q, k, v = _qkv()
    for fn in (pure_infsa_attention, linear_infsa_attention, linear_attention):
        for eps in (-0.5, float("nan")):
            with pytest.raises(ValueError, match="eps="):
                fn(q, k, v, eps=eps)


SCALE_RULES = {  # op: (values refused, values accepted)
    "softmax": ([float("nan"), float("inf"), "1", True], [-1.0, 0.0, 0.3]),
    "agent": ([float("nan"), -float("inf"), "1", True], [-1.0, 0.0, 0.3]),
    "rala": ([float("nan"), float("inf"), "1", True], [-1.0, 0.0, 0.3]),
    "mala": ([float("nan"), float("inf"), 0.0, -0.1, "1"], [0.3, 2]),
}


@pytest.mark.parametrize("name", sorted(SCALE_RULES))
def test_scale(name):
    bad, good = SCALE_RULES[name]
    pub, ref, *_ = OPS[name]
    q, k, v = _qkv()
    for s in bad:
        for fn in (pub, ref):
            with pytest.raises(ValueError, match=r"scale="):
                fn(*_args(name, q, k, v), scale=s)
    for s in good:
        torch.testing.assert_close(pub(*_args(name, q, k, v), scale=s), ref(*_args(name, q, k, v), scale=s))


def test_linear_scale_rules():
    q, k, v = _qkv()
    for s in (0.0, -1.0, float("nan")):  # "divide" divides by s * row_sum + eps: s <= 0 crosses zero
        with pytest.raises(ValueError, match=r"scale=.* > 0"):
            linear_attention(q, k, v, scale=s)
    for norm in ("subtract", "none"):
        linear_attention(q, k, v, normalize=norm, scale=-0.5)  # a sign flip is well defined there
        with pytest.raises(ValueError, match=r"scale=inf"):
            linear_attention_reference(q, k, v, normalize=norm, scale=float("inf"))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "3"], ids=repr)
def test_focusing_factor(bad):
    q, k, v = _qkv()
    for fn in (focused_linear_attention, focused_linear_attention_reference):
        with pytest.raises(ValueError, match=r"focusing_factor=.* must be a finite real number > 0"):
            fn(q, k, v, focusing_factor=bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), True, "0.1", None], ids=repr)
@pytest.mark.parametrize("name", ["softmax", "agent"])
def test_dropout_p(name, bad):
    pub, ref, *_ = OPS[name]
    q, k, v = _qkv()
    for fn in (pub, ref):
        with pytest.raises(ValueError, match=r"dropout_p=.* must be a finite real number >= 0.0 and < 1.0"):
            fn(*_args(name, q, k, v), dropout_p=bad)


@pytest.mark.parametrize(
    "flag,op", [("joint_heads", focused_linear_attention), ("per_query", linear_infsa_attention)], ids=["jh", "pq"]
)
def test_flags_must_be_bools(flag, op):
    q, k, v = _qkv()
    for bad in ("no", 1, None):
        with pytest.raises(ValueError, match=rf"{flag}=.* must be True or False"):
            op(q, k, v, **{flag: bad})


# A: channel_scale -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fill", [0.0, -1.0, float("nan"), float("inf")], ids=repr)
def test_channel_scale_values(fill):
    """A zero channel_scale gave all-NaN outputs: now a ValueError in eager mode (its values are read there only)."""
    q, k, v = _qkv()
    cs = torch.full((2, 8), 0.7)
    cs[1, 3] = fill
    for fn in (focused_linear_attention, focused_linear_attention_reference):
        with pytest.raises(ValueError, match=r"every entry of channel_scale must be positive and finite; 1 of 16"):
            fn(q, k, v, channel_scale=cs)
    with pytest.raises(ValueError, match=r"channel_scale=.* > 0"):
        focused_linear_attention(q, k, v, channel_scale=fill)
    # check_values=False (the FLatten layer: softplus of a parameter) reads no values: no host sync, no error
    out = focused_linear_attention(q, k, v, channel_scale=cs, check_values=False)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match=r"check_values='no' must be True or False"):
        focused_linear_attention(q, k, v, channel_scale=cs, check_values="no")


@pytest.mark.parametrize("shape", [(2, 7), (3, 8), (1, 2, 8), (2, 8, 1), (16,)], ids=str)
def test_channel_scale_must_broadcast_to_heads_and_dims(shape):
    q, k, v = _qkv()  # H = 2, D = 8
    with pytest.raises(ValueError, match=r"channel_scale of shape .* is not broadcastable to \[H, D\]=\(2, 8\)"):
        focused_linear_attention(q, k, v, channel_scale=torch.ones(shape))


def test_channel_scale_accepted_forms():
    q, k, v = _qkv()
    full = focused_linear_attention(q, k, v, channel_scale=torch.full((2, 8), 0.5))
    for cs in (0.5, torch.tensor(0.5), torch.full((8,), 0.5), torch.full((2, 1), 0.5)):
        torch.testing.assert_close(focused_linear_attention(q, k, v, channel_scale=cs), full)
    with pytest.raises(ValueError, match=r"channel_scale must be floating point"):
        focused_linear_attention(q, k, v, channel_scale=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"channel_scale must be None, a positive number or a floating-point torch"):
        focused_linear_attention(q, k, v, channel_scale=[[0.5] * 8] * 2)


def test_channel_scale_value_check_is_eager_only():
    """The value check needs a host sync: it is skipped under torch.compile(fullgraph=True) and fake tensors."""
    q, k, v = _qkv()
    cs = torch.full((2, 8), 0.7, requires_grad=True)

    def f(q, k, v, cs):
        return focused_linear_attention(q, k, v, channel_scale=torch.nn.functional.softplus(cs))

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, cs), f(q, k, v, cs))
    compiled(q, k, v, cs).sum().backward()
    assert cs.grad is not None

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert not values_are_checkable(fq)
        out = focused_linear_attention(fq, fk, fv, channel_scale=mode.from_tensor(torch.zeros(2, 8)))
        assert out.shape == q.shape
    assert values_are_checkable(q)
    assert not values_are_checkable(torch.zeros(2, 8, device="meta"))


# A: non-floating inputs -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_non_floating_inputs_are_refused_everywhere(case, dtype):
    name, kw = case
    pub, ref, opname, _ = OPS[name]
    q, k, v = (t.to(dtype) for t in _qkv())
    args = _args(name, q, k, v)
    for fn in (pub, ref):
        with pytest.raises(ValueError, match="must be floating point"):
            fn(*args, **kw)
    for backend in list_ops()[opname]:  # and every backend's own supports(), for direct Op calls
        with pytest.raises(ValueError, match="must be floating point"):
            pub(*args, backend=backend, **kw)
        reasons = get_op(opname).supports(*args, backend=backend, **kw)
        assert any(str(dtype) in r for r in reasons), (backend, reasons)  # refused, naming the dtype


def test_softmax_int64_no_longer_returns_truncated_integers():
    q = k = v = torch.arange(2 * 4 * 1 * 8).reshape(2, 4, 1, 8) % 3
    with pytest.raises(ValueError, match=r"q.dtype=torch.int64"):
        softmax_attention(q, k, v, backend="reference")


# B: mixed dtypes ------------------------------------------------------------------------------------------------------
def test_softmax_mixed_dtypes_run_in_the_reference():
    q, k, v = _qkv(dtype=torch.float64)
    bias = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    mixed = (q.half(), k.float(), v)
    op = get_op("softmax_attention")
    assert op.select(*mixed).name == "reference"
    assert op.supports(*mixed, backend="sdpa") == ["mixed dtypes torch.float16, torch.float32, torch.float64"]
    with pytest.raises(NotImplementedError, match="mixed dtypes"):
        softmax_attention(*mixed, backend="sdpa")
    out = softmax_attention(*mixed, attn_bias=bias.float())
    assert out.dtype == torch.float16
    expected = softmax_attention_reference(*(t.float() for t in (q.half(), k.float(), v.float())), attn_bias=bias)
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-3, atol=1e-3)
    # A bias of another dtype is cast to q's dtype for SDPA (its requirement) and runs.
    sdpa = softmax_attention(q.float(), k.float(), v.float(), attn_bias=bias, backend="sdpa")
    ref = softmax_attention(q.float(), k.float(), v.float(), attn_bias=bias, backend="reference")
    torch.testing.assert_close(sdpa, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keys", [1, 9, 15, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_backends_keep_a_nan_query_and_match_the_reference(keys, dtype):
    """PyTorch's fused CPU attention returned 0 for a query row holding a NaN when there were fewer than 16 keys (or
    agents): the ``"sdpa"`` backends hid it. The NaN row must come out NaN and every other row match the reference,
    forward and backward; a row whose every key is masked still gets 0."""
    torch.manual_seed(0)
    q = torch.randn(2, 7, 3, 16, dtype=dtype)
    k, v = (torch.randn(2, keys, 3, 16, dtype=dtype) for _ in range(2))
    q[1, 4, 2, 5] = float("nan")
    bias = torch.randn(2, 3, 7, keys)
    bias[0, 1, 3] = float("-inf")
    agents = torch.randn(2, keys, 3, 16, dtype=dtype)
    calls = {
        "softmax": (softmax_attention, softmax_attention_reference, (q, k, v), {"attn_bias": bias}),
        "agent": (
            agent_attention,
            agent_attention_reference,
            (q, torch.randn_like(q), torch.randn_like(q), agents),
            {},
        ),
    }
    for name, (fn, ref_fn, args, kw) in calls.items():
        leaves = [t.detach().requires_grad_() for t in args]
        out = fn(*leaves, **kw, backend="sdpa")
        assert out[1, 4, 2].isnan().all(), (name, out[1, 4, 2])
        finite = torch.ones_like(out, dtype=torch.bool)
        finite[1, 4, 2] = False
        ref = ref_fn(*leaves, **kw)
        torch.testing.assert_close(out[finite].float(), ref[finite].float(), rtol=2e-2, atol=2e-2)
        if name == "softmax":
            assert (out[0, 3, 1] == 0).all()
        grads = torch.autograd.grad(out[finite].float().sum(), leaves[1:3])
        ref_grads = torch.autograd.grad(ref[finite].float().sum(), leaves[1:3])
        for g, r in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g.float(), r.float(), rtol=5e-2, atol=5e-2, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mixed_dtypes_fall_back_to_a_backend_that_takes_them(case):
    name, kw = case
    pub, *_ = OPS[name]
    q, k, v = _qkv()
    out = pub(*_args(name, q.double(), k, v.half()), **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), pub(*_args(name, q, k, v.half().float()), **kw), rtol=2e-3, atol=2e-3)


# B: empty tensors -----------------------------------------------------------------------------------------------------
EMPTY = {"B=0": dict(b=0), "N=0": dict(n=0), "H=0": dict(h=0), "Dv=0": dict(dv=0), "B=0,N=0": dict(b=0, n=0)}


@pytest.mark.parametrize("empty", list(EMPTY))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empty_batch_queries_heads_values_give_empty_outputs(case, empty):
    """Forward and backward in every backend: an empty output of the right shape, zero-size gradients, no error."""
    name, kw = case
    pub, *_ = OPS[name]
    for backend in _backends(name, **kw):
        q, k, v = _qkv(grad=True, **EMPTY[empty])
        out = pub(*_args(name, q, k, v), backend=backend, **kw)
        assert out.shape == (*q.shape[:3], v.shape[-1]) and out.numel() == 0, (backend, out.shape)
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


@pytest.mark.parametrize("name", ["mala", "nala", "rala"])
def test_empty_batch_with_rope(name):
    pub, ref, *_ = OPS[name]
    q, k, v = _qkv(b=0, n=16, m=16, grad=True)
    rope = rope_2d_tables((4, 4), 8)
    for fn in (pub, ref):
        out = fn(q, k, v, rope=rope)
        assert out.shape == (0, 16, 2, 8)
        out.sum().backward()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_no_keys_or_no_channels_raise_naming_m_or_d(case):
    """M = 0 is attention over nothing (every normalisation divides by zero): undefined, a ValueError naming M in
    every op, even when there is no query either. D = 0 leaves nothing to score with."""
    name, kw = case
    pub, ref, *_ = OPS[name]
    for fn in (pub, ref):
        for n in (4, 0):
            q, k, v = _qkv(n=n, m=0)
            with pytest.raises(ValueError, match=r"no keys \(k.shape\[1\]=0, i.e. M = 0\)"):
                fn(*_args(name, q, k, v), **kw)
        q, k, v = _qkv(d=0, dv=3)
        with pytest.raises(ValueError, match=r"head dim D = 0 must be >= 1"):
            fn(*_args(name, q, k, v), **kw)


# B: side tensors that do not broadcast --------------------------------------------------------------------------------
def test_softmax_attn_bias():
    q, k, v = _qkv()  # B=2, N=5, M=6, H=2
    for backend in ("sdpa", "reference", None):
        for shape in [(2, 2, 5, 7), (3, 1, 1, 1), (2, 2, 5, 6, 1), (6, 5)]:
            with pytest.raises(ValueError, match=r"attn_bias of shape .* is not broadcastable to \[B, H, N, M\]"):
                softmax_attention(q, k, v, attn_bias=torch.zeros(shape), backend=backend)
        with pytest.raises(ValueError, match=r"attn_bias is ADDED to the logits and must be floating point"):
            softmax_attention(q, k, v, attn_bias=torch.ones(5, 6, dtype=torch.bool), backend=backend)
        with pytest.raises(ValueError, match=r"attn_bias must be a floating-point torch.Tensor"):
            softmax_attention(q, k, v, attn_bias=[[0.0] * 6] * 5, backend=backend)
    with pytest.raises(ValueError, match="attn_bias of shape"):
        softmax_attention_reference(q, k, v, attn_bias=torch.zeros(2, 2, 5, 7))
    for shape in [(6,), (5, 6), (2, 1, 5, 6), (1, 2, 1, 6)]:  # broadcastable shapes run
        bias = torch.randn(shape)
        torch.testing.assert_close(
            softmax_attention(q, k, v, attn_bias=bias, backend="sdpa"),
            softmax_attention(q, k, v, attn_bias=bias, backend="reference"),
            rtol=1e-5,
            atol=1e-5,
        )


def test_agent_biases():
    q, k, v = _qkv()
    agents = _agents(q)
    with pytest.raises(ValueError, match=r"agent_bias of shape \(2, 2, 3, 5\) is not broadcastable to \[B, H, n, M\]"):
        agent_attention(q, k, v, agents, agent_bias=torch.zeros(2, 2, 3, 5))
    with pytest.raises(ValueError, match=r"query_bias must be floating point"):
        agent_attention(q, k, v, agents, query_bias=torch.zeros(2, 2, 5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"agents must be floating point"):
        agent_attention(q, k, v, agents.long())
    with pytest.raises(ValueError, match=r"agents must be a torch.Tensor"):
        agent_attention(q, k, v, None)


@pytest.mark.parametrize(
    "rho,match",
    [
        (torch.ones(3), r"rho must be a scalar or one value per head \(shape \(\) or \[H\]=\(2,\)\), got shape \(3,\)"),
        (torch.ones(2, 1), r"got shape \(2, 1\)"),
        (torch.ones(1, 2), r"got shape \(1, 2\)"),
        (torch.ones(2, dtype=torch.long), r"rho must be a floating-point tensor"),
        ("0.9", r"rho='0.9' must be a finite real number, got str"),
        ([0.9, 0.8], r"rho=\[0.9, 0.8\] must be a finite real number, got list"),
        (None, r"rho=None must be a finite real number, got NoneType"),
        (True, r"rho=True must be a finite real number, got bool"),
        (float("nan"), r"rho=nan must be a finite real number"),
    ],
    ids=["H+1", "Hx1", "1xH", "int", "str", "list", "None", "bool", "nan"],
)
@pytest.mark.parametrize("fn", [pure_infsa_attention, linear_infsa_attention, pure_infsa_attention_reference])
def test_rho(fn, rho, match):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, rho=rho)


def test_rho_accepted_forms():
    q, k, v = _qkv(h=1)  # one head: a [3] rho used to broadcast to 3 heads silently
    with pytest.raises(ValueError, match="got shape"):
        linear_infsa_attention(q, k, v, rho=torch.ones(3), per_query=True)
    for rho in (0.5, 1, torch.tensor(0.5), torch.tensor([0.5]), torch.tensor([0.5], dtype=torch.float64)):
        out = pure_infsa_attention(q, k, v, rho=rho)
        assert out.shape == q.shape
        torch.testing.assert_close(out, pure_infsa_attention(q, k, v, rho=0.5) * (2.0 if rho == 1 else 1.0))


# B: the rest of a hostile user's list ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_wrong_rank_type_and_device(case):
    name, kw = case
    pub, ref, *_ = OPS[name]
    q, k, v = _qkv()
    for fn in (pub, ref):
        with pytest.raises(ValueError, match=r"expected heads-last \[B, N, H, D\] tensors, got q.shape=torch.Size"):
            fn(*_args(name, q[:, :, 0], k, v), **kw) if name != "agent" else fn(q[:, :, 0], k, v, _agents(q), **kw)
        with pytest.raises(ValueError, match=r"q must be a torch.Tensor, got list"):
            fn(q.tolist(), k, v, *_args(name, q, k, v)[3:], **kw)
        with pytest.raises(ValueError, match=r"on one device, got q.device=device\(type='cpu'\), k.device=.*meta"):
            fn(q, k.to("meta"), v, *_args(name, q, k, v)[3:], **kw)


def test_linear_arguments():
    q, k, v = _qkv()
    for bad in (None, 3, "softmax"):
        with pytest.raises(ValueError, match=r"unknown feature_map="):
            linear_attention(q, k, v, feature_map=bad)
    for bad in (None, "Divide"):
        with pytest.raises(ValueError, match=r"unknown normalize="):
            linear_attention_reference(q, k, v, normalize=bad)
    with pytest.raises(ValueError, match=r"feature_map must map q \(2, 5, 2, 8\) to a floating \[B, L, H, D'\] tensor"):
        linear_attention(q, k, v, feature_map=lambda x: x.sum(-2))
    with pytest.raises(ValueError, match=r"feature_map gave q and k different widths"):
        linear_attention(q, k, v, feature_map=lambda x: x[..., : x.shape[1]])
    # A callable that changes the width consistently (random features) is fine.
    out = linear_attention(q, k, v, feature_map=lambda x: torch.cat([x.relu(), (-x).relu()], -1))
    assert out.shape == (2, 5, 2, 8)


def test_rope_tables_and_feat_size():
    q, k, v = _qkv(n=16, m=16)
    sin, cos = rope_2d_tables((4, 4), 8)
    for bad, match in [
        ((sin[:15], cos[:15]), r"rope tables must be \[N, D\] = \(16, 8\)"),
        ((sin, cos, sin), r"rope must be a \(sin, cos\) pair"),
        ((sin.tolist(), cos), r"rope table sin must be a floating-point tensor, got list"),
        ((sin.long(), cos), r"rope table sin must be a floating-point tensor, got torch.int64"),
        ((sin.to("meta"), cos), r"rope table sin is on meta"),
    ]:
        with pytest.raises(ValueError, match=match):
            magnitude_aware_linear_attention(q, k, v, rope=bad)
    with pytest.raises(ValueError, match=r"self-attention needs equal query and key lengths"):
        norm_aware_linear_attention(q, k[:, :9], v[:, :9], rope=(sin, cos))
    with pytest.raises(ValueError, match=r"expected a floating heads-last \[B, N, H, D\] input"):
        apply_rope_2d(q.long(), sin, cos)
    for bad in [(7.5, 7), (7,), 7, (0, 7), (True, 7), "77", (4, -1)]:
        with pytest.raises(ValueError, match=r"feat_size=\(H, W\), two integers >= 1"):
            rope_2d_tables(bad, 8)
    for bad in [6, 8.0, True, 0, -4]:
        with pytest.raises(ValueError, match=r"head_dim to be a positive multiple of 4"):
            rope_2d_tables((4, 4), bad)
    for bad in [0.0, -1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=r"theta="):
            rope_2d_tables((4, 4), 8, theta=bad)
    for bad in [-1, 1.5, True]:
        with pytest.raises(ValueError, match=r"num_prefix_tokens=.* integer >= 0"):
            rope_2d_tables((4, 4), 8, num_prefix_tokens=bad)
    with pytest.raises(ValueError, match=r"dtype=torch.int64 must be a floating-point"):
        rope_2d_tables((4, 4), 8, dtype=torch.int64)


def test_focus_zero_token_and_large_magnitudes_are_finite():
    """f_p of an all-zero token (eps = 0) is its limit 0, not 0/0; p-th powers of large entries no longer overflow
    (the focusing runs on the token divided by its largest entry)."""
    from visionlin.kernels.focused import focus

    x = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    x[0, 0] = -1.0
    f = focus(x, 3.0, eps=0.0)
    assert torch.isfinite(f).all() and not f[0, 0].any()
    big = focus(x.half() * 1000, 3.0)  # 1000**3 is far beyond float16
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big.double(), focus(x * 1000, 3.0), rtol=4e-3, atol=4e-3 * big.abs().max().item())
    assert math.isclose(f[0, 1].norm().item(), x[0, 1].relu().norm().item(), rel_tol=1e-12)


@pytest.mark.parametrize("keys", [9, 16])
def test_cpu_sdpa_fallback_returns_autocast_dtype_as_sdpa_does(keys):
    """Under CPU autocast SDPA returns autocast's dtype; the unfused fallback (fewer than 16 keys) must too, or a
    model's dtype would change with its key count. Float64 inputs are left alone by both. (16 keys: SDPA on both
    sides, the control.)"""
    from visionlin.kernels._common import sdpa

    q = torch.randn(1, 2, 5, 8)
    k, v = torch.randn(1, 2, keys, 8), torch.randn(1, 2, keys, 8)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            got = sdpa(q, k, v)
        assert got.dtype == want.dtype == dt
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sdpa(q.double(), k.double(), v.double()).dtype == torch.float64


# Found by the stop-55 hostile probe ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("where", ["q", "k"])
def test_cpu_sdpa_in_half_precision_keeps_an_inf_score_visible(dtype, where):
    """PyTorch's fused CPU kernel in float16 / bfloat16 gave 0 for a row with a +inf score (float32: NaN, as the
    reference); such calls now run it in float32, so softmax and agent attention agree with their references on which
    entries are NaN."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 32, 1, 4, generator=g).to(dtype) for _ in range(3))
    (q if where == "q" else k)[0, 3, 0, 1] = float("inf")
    for fast, ref in (
        (softmax_attention(q, k, v), softmax_attention_reference(q, k, v)),
        (agent_attention(q, k, v, q[:, :20].nan_to_num(posinf=1.0)),
         agent_attention_reference(q, k, v, q[:, :20].nan_to_num(posinf=1.0))),
    ):  # fmt: skip
        assert fast.dtype == dtype
        assert torch.equal(torch.isnan(fast), torch.isnan(ref)) and torch.isnan(ref).any()
        finite = ~torch.isnan(ref)
        torch.testing.assert_close(fast[finite].float(), ref[finite].float(), rtol=2e-2, atol=2e-2)


def test_float16_attention_saturates_a_large_float32_bias_instead_of_making_it_inf():
    """A float32 ``attn_bias`` of 1e5 went to +inf in float16 (the row came out 0, or NaN below 16 keys); it
    saturates at float16's largest value now, which still selects that key, and a ``-inf`` (masked) stays masked."""
    g = torch.Generator().manual_seed(1)
    for n in (8, 32):
        q, k, v = (torch.randn(1, n, 1, 4, generator=g, dtype=torch.float16) for _ in range(3))
        bias = torch.zeros(n, n)
        bias[:, 3] = 1e5
        bias[:, 5] = -math.inf
        out = softmax_attention(q, k, v, attn_bias=bias)
        ref = softmax_attention_reference(q, k, v, attn_bias=bias)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(out[0, :, 0], v[0, 3, 0].expand(n, -1), rtol=1e-3, atol=1e-3)
        masked = bias.clone()
        masked[:, 3] = 0.0
        masked[0] = -math.inf  # query 0 attends to nothing: 0, as from SDPA
        out = softmax_attention(q, k, v, attn_bias=masked)
        assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
        torch.testing.assert_close(out, softmax_attention_reference(q, k, v, attn_bias=masked), rtol=2e-3, atol=2e-3)


def test_stop55_argument_checks():
    from fractions import Fraction

    from visionlin.kernels import gated_linear_attention, neighborhood_attention
    from visionlin.kernels.agent_bias import agent_position_biases
    from visionlin.kernels.conv import token_depthwise_conv2d

    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    # a callable feature map must keep the device (meta: uninitialised memory came back); its dtype is the inputs'
    # (float64 crashed the reference; CUDA autocast runs exp / norm in float32 for bfloat16 inputs)
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match="feature_map must keep q's device \\(cpu\\), got meta"):
            linear_attention(q, k, v, feature_map=lambda x: x.to("meta"), backend=backend)
        out = linear_attention(q, k, v, feature_map=lambda x: x.double().relu(), backend=backend)
        assert out.dtype == q.dtype
        torch.testing.assert_close(out, linear_attention(q, k, v, feature_map="relu", backend=backend))
    # a 0-d side tensor on another device than the CPU is refused, a CPU scalar accepted
    meta = torch.tensor(2.0, device="meta")
    with pytest.raises(ValueError, match="rho is on meta but the queries are on cpu"):
        pure_infsa_attention(q, k, v, rho=meta)
    with pytest.raises(ValueError, match="attn_bias is on meta but the queries are on cpu"):
        softmax_attention(q, k, v, attn_bias=meta)
    torch.testing.assert_close(
        pure_infsa_attention(q, k, v, rho=torch.tensor(2.0)), pure_infsa_attention(q, k, v, rho=2.0)
    )
    # numbers other than int / float / numpy ones, and ints past float64, are refused (they failed inside the op)
    with pytest.raises(ValueError, match=r"scale=Fraction\(1, 2\) must be a finite real number"):
        linear_attention(q, k, v, scale=Fraction(1, 2))
    with pytest.raises(ValueError, match="eps=1000+ must be a finite real number"):
        linear_attention(q, k, v, eps=10**400)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(linear_attention(q, k, v, scale=np.float32(0.5)), linear_attention(q, k, v, scale=0.5))
    with pytest.raises(ValueError, match="kernel_size=100000000000000000001 must be an odd integer >= 1 below 2"):
        neighborhood_attention(q, k, v, 10**20 + 1)
    # an unhashable backend or op name ("unhashable type: 'list'")
    with pytest.raises(ValueError, match=r"unknown backend \['torch'\]"):
        linear_attention(q, k, v, backend=["torch"])
    with pytest.raises(ValueError, match=r"unknown op \['x'\]"):
        get_op(["x"])
    # GLA's message named a `u` it does not have
    with pytest.raises(ValueError, match="g is on meta, q is on cpu"):
        gated_linear_attention(q, k, v, (-torch.rand_like(q)).to("meta"))
    # the prefix tables of the agent biases must be floating point (complex lost its imaginary part)
    h, n = 2, 4
    tables = [torch.randn(s) for s in [(h, n, 7, 7), (h, n, 7, 7), (1, h, n, 3, 1), (1, h, n, 1, 3), (1, h, 3, 1, n),
                                        (1, h, 1, 3, n)]]  # fmt: skip
    for dt in (torch.complex64, torch.int64):
        ac, ca = torch.ones(1, h, n, 1, dtype=dt), torch.ones(1, h, 1, n, dtype=dt)
        with pytest.raises(ValueError, match="ac_bias / ca_bias must be floating point"):
            agent_position_biases(*tables, ac, ca, num_prefix_tokens=1)
    # RoPE tables whose angles or phases overflow float32 (NaN tables) are refused
    for theta in (1e-40, 1e39):
        with pytest.raises(ValueError, match=f"theta={re.escape(repr(theta))} overflows torch.float32"):
            rope_2d_tables((2, 2), 8, theta=theta)
    assert torch.isfinite(torch.stack(rope_2d_tables((14, 14), 8, theta=1e-3))).all()
    # zero channels: an empty output, as every other op ("non-positive groups is not supported")
    for backend in ("torch", "reference"):
        out = token_depthwise_conv2d(torch.randn(2, 16, 0), torch.randn(0, 3, 3), feat_size=(4, 4), backend=backend)
        assert out.shape == (2, 16, 0)
