"""Agent attention (Han et al., ECCV 2024), non-causal (bidirectional), heads-last ``[B, N, H, D]``.

``n`` agent tokens ``A`` (``n << N``; the layers pool them from the queries) first gather from the keys and values,
then broadcast back to the queries, two softmax attentions of cost ``O(n N D)`` each::

    V_A = softmax(s * A K^T + agent_bias) V          # [B, n, H, Dv]   agent aggregation
    out = softmax(s * Q A^T + query_bias) V_A        # [B, N, H, Dv]   agent broadcast

``agent_bias`` is broadcastable to ``[B, H, n, M]`` and ``query_bias`` to ``[B, H, N, n]`` (the position biases of the
authors' layers). The weights are never larger than ``[B, H, N, n]``, so the ``"sdpa"`` backend (two
``scaled_dot_product_attention`` calls with the biases as float masks) runs tens of thousands of tokens in fp16/bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    as_sdpa_mask,
    check_heads_last,
    check_real,
    check_side_tensor,
    fp32_reference,
    is_floating,
    masked_softmax,
    reference_dtype,
    sdpa,
)
from ._dispatch import Op

__all__ = ["agent_attention", "agent_attention_reference"]

#: Let the ``"triton"`` backend also run calls that need a gradient (its backward kernels in
#: :mod:`visionlin.kernels.triton.agent`; GPU-tested against the float64 reference and, in a model, against the
#: float32 reference backend). Off: such calls take ``"sdpa"`` (automatic choice) or raise (``backend="triton"``).
TRITON_BACKWARD = True


_OP = "agent_attention"


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    agent_bias: torch.Tensor | None,
    query_bias: torch.Tensor | None,
    scale: float | None,
    dropout_p: float,
) -> None:
    check_heads_last(_OP, q, k, v, same_length=False)
    if not isinstance(agents, torch.Tensor):
        raise ValueError(f"{_OP}: agents must be a torch.Tensor [B, n, H, D], got {type(agents).__name__}")
    if agents.ndim != 4:
        raise ValueError(f"{_OP}: expected heads-last agents [B, n, H, D], got {agents.shape=}")
    if not agents.is_floating_point():
        raise ValueError(f"{_OP}: agents must be floating point, got {agents.dtype=}")
    if agents.device != q.device:
        raise ValueError(f"{_OP}: agents are on {agents.device} but the queries are on {q.device}")
    if agents.shape[0] != q.shape[0] or agents.shape[2] != q.shape[2] or agents.shape[3] != q.shape[3]:
        raise ValueError(
            f"{_OP}: agents must share batch, heads and head dim with the queries: {agents.shape=}, {q.shape=}"
        )
    if agents.shape[1] < 1:
        raise ValueError(f"{_OP}: need at least one agent token, got {agents.shape=}")
    b, n_q, h, _ = q.shape
    n_a, m = agents.shape[1], k.shape[1]
    if agent_bias is not None:
        check_side_tensor(_OP, "agent_bias", agent_bias, q, (b, h, n_a, m), "[B, H, n, M]")
    if query_bias is not None:
        check_side_tensor(_OP, "query_bias", query_bias, q, (b, h, n_q, n_a), "[B, H, N, n]")
    check_real(_OP, "scale", scale, low=None, optional=True)
    check_real(_OP, "dropout_p", dropout_p, high=1.0)


def agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Specification of :func:`agent_attention`: both weight matrices materialised, float32, autocast disabled.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        agents: Agent tokens ``[B, n, H, D]``.
        agent_bias: Additive bias of the aggregation logits, broadcastable to ``[B, H, n, M]``.
        query_bias: Additive bias of the broadcast logits, broadcastable to ``[B, H, N, n]``.
        scale: Logit multiplier ``s`` of both softmaxes; ``None`` means ``D ** -0.5``.
        dropout_p: Dropout probability on both weight matrices (the authors' ``attn_drop``); pass 0 in eval.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check_args(q, k, v, agents, agent_bias, query_bias, scale, dropout_p)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        a = agents.to(dt)
        logits_a = torch.einsum("bahd,bmhd->bham", a, k.to(dt)) * s  # [B, H, n, M]
        if agent_bias is not None:
            logits_a = logits_a + agent_bias.to(dt)
        w_a = F.dropout(masked_softmax(logits_a), p=dropout_p) if dropout_p else masked_softmax(logits_a)
        v_a = torch.einsum("bham,bmhe->bahe", w_a, v.to(dt))  # [B, n, H, Dv]
        logits_q = torch.einsum("bnhd,bahd->bhna", q.to(dt), a) * s  # [B, H, N, n]
        if query_bias is not None:
            logits_q = logits_q + query_bias.to(dt)
        w_q = F.dropout(masked_softmax(logits_q), p=dropout_p) if dropout_p else masked_softmax(logits_q)
        out = torch.einsum("bhna,bahe->bnhe", w_q, v_a)
    return out.to(q.dtype)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The fused CUDA kernels (flash / memory-efficient / cuDNN) need a unit stride on the head dim; pooled agents
    # often come as a transposed view.
    return t if t.stride(-1) == 1 else t.contiguous()


def _sdpa(q, k, v, agents, *, agent_bias=None, query_bias=None, scale=None, dropout_p=0.0):
    # SDPA wants [B, H, L, D]; the transposes are views. Float masks must have the query dtype.
    q, k, v, agents = (_unit_last_stride(t) for t in (q, k, v, agents))
    a = agents.transpose(1, 2)
    v_a = sdpa(
        a,
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=as_sdpa_mask(agent_bias, q),
        dropout_p=dropout_p,
        scale=scale,
    )  # [B, H, n, Dv]
    out = sdpa(
        q.transpose(1, 2),
        a,
        v_a,
        attn_mask=as_sdpa_mask(query_bias, q),
        dropout_p=dropout_p,
        scale=scale,
    )
    return out.transpose(1, 2)


def _sdpa_supports(q, k, v, agents, **kwargs):
    reasons = is_floating(q, k, v, agents)
    dtypes = {t.dtype for t in (q, k, v, agents)}
    if len(dtypes) > 1:
        reasons.append(f"q, k, v and agents have different dtypes {sorted(map(str, dtypes))}")
    return reasons


def _reference_supports(q, k, v, agents, **kwargs):
    return is_floating(q, k, v, agents)


def _triton(q, k, v, agents, **kwargs):
    from .triton.agent import agent_attention_triton

    return agent_attention_triton(q, k, v, agents, **kwargs)


#: Largest ``agents x (D + Dv)`` (each padded to a power of two >= 16) the fused kernels take when a gradient is
#: needed, and for float32 inputs: the backward's programs keep ``dA`` ``[agents, D]`` and ``dV_A`` ``[agents, Dv]`` in
#: float32 registers, and float32 tiles take twice the shared memory of half ones. Measured on an H200: 128 agents at
#: head dim 32 and 32 at head dim 128 (both at the limit) pass their gpu tests in every dtype; 128 agents at head dim
#: 128 (the converter's pooled agents on a DiT) compiled the broadcast's backward for minutes in float32, then needed
#: 270 KB of shared memory (the limit is 227 KB), and the float32 forward's aggregation needed 295 KB; in bfloat16 and
#: float16 that forward runs (tested). Such calls run on SDPA.
MAX_TILES = 64 * (64 + 64)


def _triton_supports(q, k, v, agents, *, agent_bias=None, query_bias=None, dropout_p=0.0, **kwargs):
    from .triton import head_dim_reasons, heads_grid_reasons, tile_dim, triton_unavailable

    reasons = triton_unavailable(q, k, v, agents) + _sdpa_supports(q, k, v, agents)
    tensors = [t for t in (q, k, v, agents, agent_bias, query_bias) if isinstance(t, torch.Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if grad and not TRITON_BACKWARD:
        reasons.append("a gradient is required and the fused backward is off (visionlin.kernels.agent.TRITON_BACKWARD)")
    tiles = tile_dim(agents.shape[1]) * (tile_dim(q.shape[-1]) + tile_dim(v.shape[-1]))
    if (grad or q.dtype == torch.float32) and tiles > MAX_TILES:
        why = "a gradient is required and the fused backward's" if grad else "float32 inputs and the forward's"
        reasons.append(
            f"{why} tiles for {agents.shape[1]} agents at head dims D={q.shape[-1]}, Dv={v.shape[-1]} hold {tiles} "
            f"elements per program, more than its {MAX_TILES} (agents x (D + Dv), each padded to a power of two >= 16)"
        )
    if dropout_p:
        reasons.append(f"{dropout_p=} (the fused kernels have no dropout)")
    if agents.shape[1] > 128:
        reasons.append(f"{agents.shape[1]} agents > 128 (one tile holds at most 128)")
    return reasons + head_dim_reasons(q, v) + heads_grid_reasons(q)


_op = Op(_OP)
# The fused kernels first: they decline dropout and, with TRITON_BACKWARD off, whatever needs a gradient. GPU time on
# an H200 (benchmarks/results/h200/agent_backends_3daa57b.json): the op's forward 1.44-2.64x SDPA's, forward +
# backward 1.31-12.97x; Agent-DeiT-S 1.00 -> 1.11x the dense twin at 224 px (inference), Agent-Swin-T 1.35 -> 2.26x
# swin_tiny; training steps Agent-DeiT-S 0.85 -> 0.90x, Agent-Swin-T 0.88 -> 1.30x.
_op.register("triton", _triton, _triton_supports)
_op.register("sdpa", _sdpa, _sdpa_supports)
_op.register("reference", agent_attention_reference, _reference_supports)


def agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    agents: torch.Tensor,
    *,
    agent_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Agent attention; the math is in :func:`agent_attention_reference` and the module docstring.

    Backends, in automatic-selection order: ``"triton"`` (CUDA: the fused forward and backward of
    :mod:`visionlin.kernels.triton.agent`; it declines dropout, more than 128 agents, calls that need a gradient
    with :data:`TRITON_BACKWARD` off, and tiles larger than :data:`MAX_TILES` that need a gradient or are float32),
    ``"sdpa"`` (two
    ``torch.nn.functional.scaled_dot_product_attention`` calls: dropout and everything else) and ``"reference"``.
    An agent whose every key is masked by ``agent_bias`` (or a query whose every agent is, by ``query_bias``) gets 0
    from ``"sdpa"`` (on the CPU) and ``"reference"``; the Triton kernels do not special-case such rows (0 / 0: NaN).

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        agents: Agent tokens ``[B, n, H, D]``.
        agent_bias: Broadcastable to ``[B, H, n, M]``.
        query_bias: Broadcastable to ``[B, H, N, n]``.
        scale: Logit multiplier; ``None`` means ``D ** -0.5``.
        dropout_p: Dropout on both weight matrices.
        backend: ``None`` (automatic), ``"triton"``, ``"sdpa"`` or ``"reference"``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.

    Raises:
        ValueError: Shapes, dtypes or devices that do not fit together (the message names them), biases that do not
            broadcast, a non-finite ``scale`` or ``dropout_p`` outside ``[0, 1)``.
    """
    _check_args(q, k, v, agents, agent_bias, query_bias, scale, dropout_p)
    return _op(
        q,
        k,
        v,
        agents,
        agent_bias=agent_bias,
        query_bias=query_bias,
        scale=scale,
        dropout_p=dropout_p,
        backend=backend,
    )
