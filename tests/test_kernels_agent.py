"""Agent attention kernel: reference vs two chained softmax attentions, the SDPA backend vs the reference, bad input.

Tolerances: the reference against the chained float64 softmax form is exact up to rounding (rtol 1e-9); SDPA against
the reference in fp32 within rtol/atol 1e-5 (outputs and every gradient); in bf16 / fp16 the SDPA output and input
gradients (inputs and biases) are compared with the fp32 reference on the same (rounded) inputs within atol 2e-2 / 5e-3
relative to the tensor's max magnitude (observed: <= 6e-3 / 7e-4; bf16 keeps 8 mantissa bits, fp16 11, and both
softmaxes and the intermediate agent values round).
"""

from __future__ import annotations

import pytest
import torch

from visionlin.kernels import agent_attention, agent_attention_reference, get_op, softmax_attention_reference

# (batch, tokens N, heads, head_dim D, agents n): batch 1 and 3, N = 49 (7x7), 197 (cls + 14x14), 63 (7x9), 3136
CASES = [
    (1, 49, 2, 32, 9),
    (3, 197, 3, 64, 16),
    (3, 63, 1, 80, 49),
    (1, 197, 2, 80, 9),
    (3, 49, 2, 32, 49),
    (1, 3136, 1, 64, 49),
]
IDS = [f"B{b}-N{n}-H{h}-D{d}-n{a}" for b, n, h, d, a in CASES]


def _inputs(case, dtype=torch.float64, bias=True, seed=0):
    b, n, h, d, a = case
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    q, k, v, agents = rnd(b, n, h, d), rnd(b, n, h, d), rnd(b, n, h, d), rnd(b, a, h, d)
    # Layer-style biases: shared over the batch for the agents, per sample for the queries.
    agent_bias = rnd(1, h, a, n, std=0.5) if bias else None
    query_bias = rnd(b, h, n, a, std=0.5) if bias else None
    return [q, k, v, agents, agent_bias, query_bias]


def _detached(tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad) for t in tensors]


def _run(fn, tensors, weight=None):
    q, k, v, agents, agent_bias, query_bias = tensors
    out = fn(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if weight is None else weight
    (out.float() * w).sum().backward()
    return out, [None if t is None else t.grad for t in tensors]


def _chained(q, k, v, agents, *, agent_bias=None, query_bias=None):
    """Agent attention as two softmax attentions: agents attend to (k, v), then queries attend to the agents."""
    v_a = softmax_attention_reference(agents, k, v, attn_bias=agent_bias)
    return softmax_attention_reference(q, agents, v_a, attn_bias=query_bias)


@pytest.mark.parametrize("case", CASES[:4], ids=IDS[:4])
def test_reference_equals_chained_softmax(case):
    a = _inputs(case)
    b = _detached(a)
    out_a, grads_a = _run(agent_attention_reference, a)
    out_b, grads_b = _run(_chained, b)
    torch.testing.assert_close(out_a, out_b, rtol=1e-9, atol=1e-10)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sdpa_vs_reference_fp32(case, bias):
    a = _inputs(case, torch.float32, bias=bias)
    b = _detached(a)
    out_s, grads_s = _run(lambda *t, **kw: agent_attention(*t, **kw, backend="sdpa"), a)
    out_r, grads_r = _run(lambda *t, **kw: agent_attention(*t, **kw, backend="reference"), b)
    assert out_s.dtype == torch.float32
    torch.testing.assert_close(out_s, out_r, rtol=1e-5, atol=1e-5)
    for gs, gr in zip(grads_s, grads_r, strict=True):
        if gr is None:
            assert gs is None
        else:
            torch.testing.assert_close(gs, gr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES[:5], ids=IDS[:5])
def test_sdpa_vs_reference_half(case, dtype, tol):
    half = _detached(_inputs(case, torch.float32), dtype)
    ref_in = _detached(half, torch.float32)  # the same rounded values, computed in fp32
    out_s, grads_s = _run(lambda *t, **kw: agent_attention(*t, **kw, backend="sdpa"), half)
    out_r, grads_r = _run(agent_attention_reference, ref_in)
    assert out_s.dtype == dtype
    torch.testing.assert_close(out_s.float(), out_r, rtol=tol, atol=tol * out_r.abs().max().item())
    for gs, gr in zip(grads_s, grads_r, strict=True):  # q, k, v, agents, agent_bias, query_bias
        torch.testing.assert_close(gs.float(), gr, rtol=tol, atol=tol * gr.abs().max().item())


def test_default_backend_is_sdpa():
    q = k = v = torch.randn(1, 8, 1, 4)
    assert get_op("agent_attention").select(q, k, v, q[:, :2]).name == "sdpa"
    # the fused forward first (inference on CUDA); it declines what needs a gradient or dropout, which takes SDPA
    assert list(get_op("agent_attention").backends) == ["triton", "sdpa", "reference"]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_long_sequence_half_precision_finite(backend, dtype):
    g = torch.Generator().manual_seed(0)
    n_tok, h, d, n = 20000, 2, 32, 49
    q, k, v = (torch.randn(1, n_tok, h, d, generator=g).mul(4).to(dtype) for _ in range(3))
    agents = q[:, :: n_tok // n][:, :n].contiguous()
    bias = torch.randn(1, h, n, n_tok, generator=g).to(dtype)
    ref = agent_attention_reference(q.float(), k.float(), v.float(), agents.float(), agent_bias=bias.float())
    out = agent_attention(q, k, v, agents, agent_bias=bias, backend=backend)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=5e-2, atol=5e-2 * ref.abs().max().item())


def test_broadcast_bias_forms():
    q, k, v, agents, agent_bias, query_bias = _detached(_inputs((2, 20, 2, 8, 4), torch.float32))
    full = agent_attention_reference(q, k, v, agents, agent_bias=agent_bias, query_bias=query_bias)
    for backend in ("sdpa", "reference"):
        out = agent_attention(
            q, k, v, agents, agent_bias=agent_bias[0], query_bias=query_bias.expand(2, -1, -1, -1), backend=backend
        )
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_give_zero_on_every_cpu_backend():
    """An agent whose every key is masked (``agent_bias`` row all ``-inf``) or a query whose every agent is: 0 from
    both the reference and SDPA (whose choice for such rows the reference follows: it had given NaN, spreading to every
    query); a NaN logit still gives NaN. The same for ``softmax_attention``."""
    from visionlin.kernels import softmax_attention

    q, k, v, agents, agent_bias, query_bias = _detached(_inputs((1, 20, 2, 8, 4), torch.float32))
    agent_bias, query_bias = agent_bias.clone(), query_bias.clone()
    agent_bias[0, 0, 1] = float("-inf")  # agent 1 of head 0 sees no key: its value is 0
    query_bias[0, 1, 3] = float("-inf")  # query 3 of head 1 sees no agent: its output is 0
    leaves = [[t.clone().requires_grad_() for t in (q, k, v, agents, agent_bias, query_bias)] for _ in range(2)]
    outs = [
        agent_attention(*t[:4], agent_bias=t[4], query_bias=t[5], backend=b)
        for t, b in zip(leaves, ("sdpa", "reference"), strict=True)
    ]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(outs[1]).all() and (outs[1][0, 3, 1] == 0).all() and (outs[1][0, :, 0] != 0).any()
    w = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(out, t, w) for out, t in zip(outs, leaves, strict=True)]
    for name, a, b in zip(("q", "k", "v", "agents", "agent_bias", "query_bias"), *grads, strict=True):
        assert torch.isfinite(b).all(), name  # the reference's backward gave NaN there (softmax of a -inf row)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not grads[1][4][0, 0, 1].any() and not grads[1][5][0, 1, 3].any()  # masked rows: no bias gradient
    bias = torch.zeros(1, 2, 20, 20)
    bias[0, 0, 5] = float("-inf")
    outs = [softmax_attention(q, k, v, attn_bias=bias, backend=b) for b in ("sdpa", "reference")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert (outs[1][0, 5, 0] == 0).all() and torch.isfinite(outs[1]).all()
    bias[0, 0, 5, 0] = float("nan")
    assert softmax_attention(q, k, v, attn_bias=bias, backend="reference")[0, 5, 0].isnan().all()


def test_non_contiguous_inputs():
    q, k, v = (torch.randn(2, 8, 12, 2).permute(0, 2, 3, 1) for _ in range(3))  # [B, N, H, D], D-stride != 1
    agents = torch.randn(2, 8, 4, 2).permute(0, 2, 3, 1)
    ref = agent_attention_reference(q.contiguous(), k.contiguous(), v.contiguous(), agents.contiguous())
    torch.testing.assert_close(agent_attention(q, k, v, agents, backend="sdpa"), ref, rtol=1e-5, atol=1e-5)


def test_value_dim_may_differ_and_scale():
    q, k, agents = torch.randn(2, 12, 2, 8), torch.randn(2, 15, 2, 8), torch.randn(2, 4, 2, 8)
    v = torch.randn(2, 15, 2, 5)
    for backend in ("sdpa", "reference"):
        out = agent_attention(q, k, v, agents, scale=0.3, backend=backend)
        assert out.shape == (2, 12, 2, 5)
    torch.testing.assert_close(
        agent_attention(q, k, v, agents, scale=0.3, backend="sdpa"),
        agent_attention(q, k, v, agents, scale=0.3, backend="reference"),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_dropout(backend):
    q, k, v, agents = (torch.randn(2, 30, 2, 8) for _ in range(4))
    plain = agent_attention(q, k, v, agents, backend=backend)
    torch.manual_seed(0)
    dropped = agent_attention(q, k, v, agents, dropout_p=0.5, backend=backend)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(plain, dropped)


def test_reference_is_fp32_under_autocast():
    q, k, v, agents = (torch.randn(1, 16, 1, 8) for _ in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = agent_attention_reference(q, k, v, agents)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, agent_attention_reference(q, k, v, agents))


def test_bad_input():
    q = k = v = torch.randn(2, 10, 2, 8)
    agents = torch.randn(2, 4, 2, 8)
    with pytest.raises(ValueError, match=r"agents.shape=torch.Size\(\[2, 4, 8\]\)"):
        agent_attention(q, k, v, agents[:, :, 0])
    with pytest.raises(ValueError, match=r"agents must share .*agents.shape=torch.Size\(\[2, 4, 3, 8\]\)"):
        agent_attention(q, k, v, torch.randn(2, 4, 3, 8))
    with pytest.raises(ValueError, match=r"agents must share"):
        agent_attention(q, k, v, torch.randn(2, 4, 2, 6))
    with pytest.raises(
        ValueError, match=r"agent_bias of shape \(1, 2, 5, 10\) is not broadcastable to .*\(2, 2, 4, 10\)"
    ):
        agent_attention(q, k, v, agents, agent_bias=torch.zeros(1, 2, 5, 10))
    with pytest.raises(ValueError, match=r"query_bias of shape \(2, 2, 10, 4, 1\) is not broadcastable"):
        agent_attention(q, k, v, agents, query_bias=torch.zeros(2, 2, 10, 4, 1))
    with pytest.raises(ValueError, match=r"dropout_p=1.5"):
        agent_attention(q, k, v, agents, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"key and value lengths differ"):
        agent_attention(q, k, v[:, :7], agents)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        agent_attention(q, k, v, agents, backend="nope")
    with pytest.raises(NotImplementedError, match="different dtypes"):
        agent_attention(q, k, v.double(), agents, backend="sdpa")
    with pytest.raises(ValueError, match="must be floating point"):  # bad input: refused before any backend
        agent_attention(q.long(), k.long(), v.long(), agents.long(), backend="reference")
    with pytest.raises(NotImplementedError, match="not floating point"):  # the backends' own supports() agree
        get_op("agent_attention")(q.long(), k.long(), v.long(), agents.long(), backend="reference")
