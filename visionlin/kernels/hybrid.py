"""Hybrid local-softmax + global-linear attention and pooled-agent attention over a token grid, heads-last.

Both ops take flat tokens ``[B, N, H, D]`` laid out row-major on an explicit ``grid`` (``(X, Y)`` for images,
``(T, X, Y)`` for video, ``N = prod(grid)``), as the diffusers converter sees them.

:func:`hybrid_attention` (the converter's ``hybrid`` method)::

    O = NA(q, k, v; kernel_size, dilation) + g_h * LIN(q, k, v)

* ``NA``: neighborhood attention (:func:`~visionlin.kernels.neighborhood_attention`): each query's softmax over the
  ``kernel_size`` window around it on the grid (NATTEN's border rule), plus ``additional_keys`` (e.g. joint
  attention's text tokens) in the same softmax, i.e. merged exactly.
* ``LIN``: global linear attention over all ``N`` image keys, ``phi(q_i) . sum_j phi(k_j) v_j^T / (phi(q_i) . sum_j
  phi(k_j) + eps)`` (:func:`~visionlin.kernels.linear_attention`, ``normalize="divide"``, means over keys).
* ``g`` ``[H]``: the per-head mix. The converter initialises it to zero, so a fresh conversion is local attention
  only and fine-tuning learns how much global context each head adds.

:func:`pooled_agent_attention` (the converter's ``agent`` method, AgentSD's training-free agent attention)::

    A = pool(q)                                   # [B, n, H, D]: mean of q over pool-sized cells of the grid
    O = softmax(s_b * q A^T) softmax(s * A K^T) V + shortcut * v

AgentSD (Han et al., arXiv 2312.08874, ``agentsd/patch.py``) takes the agents from ToMe's bipartite token merging
of the block input (stride 2 x 2) and projects them with ``to_q``; merging by mean then projecting equals pooling the
projected queries (``to_q`` is affine). Here the cells are fixed ``pool`` windows (deterministic, no random dst
choice); its ``k_scale2`` is ``s_b = s ** k_scale2`` and ``k_shortcut`` the ``shortcut``. ``additional_keys`` join
the keys of the agent aggregation (one softmax). The shortcut adds the image values (it needs ``N == M``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._common import check_heads_last, check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op
from .agent import agent_attention
from .linear import FEATURE_MAPS, apply_feature_map, linear_attention
from .neighborhood import _flat_windows, _per_dim, effective_window, neighborhood_attention

__all__ = [
    "hybrid_attention",
    "hybrid_attention_reference",
    "pool_cells",
    "pooled_agent_attention",
    "pooled_agent_attention_reference",
]

_HY = "hybrid_attention"
_AG = "pooled_agent_attention"


def _check_grid(op: str, grid: object, n: int) -> tuple[int, ...]:
    if (
        not isinstance(grid, Sequence)
        or isinstance(grid, str)
        or not 1 <= len(grid) <= 3
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in grid)
    ):
        raise ValueError(f"{op}: grid={grid!r} must be 1 to 3 positive ints (the token grid, row-major)")
    if math.prod(grid) != n:
        raise ValueError(f"{op}: grid={tuple(grid)} holds {math.prod(grid)} tokens but the inputs have N={n}")
    return tuple(int(x) for x in grid)


def _check_additional(op: str, q: torch.Tensor, v: torch.Tensor, ak: object, av: object) -> None:
    if (ak is None) != (av is None):
        raise ValueError(f"{op}: pass both additional_keys and additional_values or neither")
    if ak is not None:
        check_heads_last(op, q, ak, av, same_length=False)
        if av.shape[-1] != v.shape[-1]:
            raise ValueError(f"{op}: additional_values head dim {av.shape[-1]} differs from the values' {v.shape[-1]}")


def _check_hybrid(q, k, v, grid, kernel_size, gate, dilation, feature_map, scale, eps, ak, av):
    check_heads_last(_HY, q, k, v, same_length=True)
    grid = _check_grid(_HY, grid, q.shape[1])
    kernel_size = _per_dim("kernel_size", kernel_size, len(grid), odd=True)
    dilation = _per_dim("dilation", dilation, len(grid), odd=False)
    if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (q.shape[2],) or not gate.is_floating_point():
        got = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
        raise ValueError(f"{_HY}: gate must be a floating [H] = [{q.shape[2]}] tensor (one mix per head), got {got}")
    if gate.device != q.device:
        raise ValueError(f"{_HY}: gate is on {gate.device}, the queries on {q.device}")
    if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
        raise ValueError(f"{_HY}: unknown {feature_map=}; choose one of {sorted(FEATURE_MAPS)}")
    check_real(_HY, "scale", scale, low=None, optional=True)
    check_real(_HY, "eps", eps, low=0.0, low_open=True)
    _check_additional(_HY, q, v, ak, av)
    return grid, kernel_size, dilation


def hybrid_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    kernel_size: int | Sequence[int],
    gate: torch.Tensor,
    *,
    dilation: int | Sequence[int] = 1,
    feature_map: str = "elu",
    scale: float | None = None,
    eps: float = 1e-6,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification of :func:`hybrid_attention`: both weight matrices materialised ``[B, H, N, N]``, float32.

    Args:
        q: Queries ``[B, N, H, D]`` on ``grid`` (row-major).
        k: Keys ``[B, N, H, D]``.
        v: Values ``[B, N, H, Dv]``.
        grid: The token grid, 1 to 3 ints with product ``N``.
        kernel_size: Odd window size, an int or one per grid axis (capped at the axis as
            :func:`~visionlin.kernels.effective_window` says).
        gate: Per-head weight ``g`` ``[H]`` of the global linear part.
        dilation: Window dilation, an int or one per axis.
        feature_map: ``phi`` of the linear part, a name in :data:`~visionlin.kernels.FEATURE_MAPS`.
        scale: Softmax logit multiplier; ``None`` means ``D ** -0.5``.
        eps: Added to the linear part's denominator (of means over the keys).
        additional_keys: ``[B, E, H, D]`` keys in every query's local softmax (not in the linear part), or ``None``.
        additional_values: ``[B, E, H, Dv]``, with ``additional_keys``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    grid, kernel_size, dilation = _check_hybrid(
        q, k, v, grid, kernel_size, gate, dilation, feature_map, scale, eps, additional_keys, additional_values
    )
    n = q.shape[1]
    s = q.shape[-1] ** -0.5 if scale is None else scale
    eff = [effective_window(length, ks, d) for length, ks, d in zip(grid, kernel_size, dilation, strict=True)]
    flat, _ = _flat_windows(grid, [e[0] for e in eff], [e[1] for e in eff], q.device)  # [N, K]
    local = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    local[torch.arange(n, device=q.device)[:, None], flat] = True  # [N, N]: key j in query i's window
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        logits = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * s  # [B, H, N, N]
        logits = logits.masked_fill(~local, float("-inf"))
        if additional_keys is not None:
            extra = torch.einsum("bnhd,behd->bhne", qf, additional_keys.to(dt)) * s  # [B, H, N, E]
            logits = torch.cat([logits, extra], dim=-1)
            vf_all = torch.cat([vf, additional_values.to(dt)], dim=1)
        else:
            vf_all = vf
        o_local = torch.einsum("bhnm,bmhe->bnhe", logits.softmax(dim=-1), vf_all)
        a = torch.einsum("bnhd,bmhd->bhnm", apply_feature_map(qf, feature_map), apply_feature_map(kf, feature_map))
        a = a / n  # scores as means over the keys
        w = a / (a.sum(dim=-1, keepdim=True) + eps)  # [B, H, N, N]
        o_lin = torch.einsum("bhnm,bmhe->bnhe", w, vf)
        out = o_local + gate.to(dt)[:, None] * o_lin
    return out.to(q.dtype)


def _hybrid_torch(
    q, k, v, grid, kernel_size, gate, *, dilation=1, feature_map="elu", scale=None, eps=1e-6,
    additional_keys=None, additional_values=None,
):  # fmt: skip
    """Composition of the two ops: ``O(N K D + N D^2)``, never ``[N, N]``."""
    b, n, h, d = q.shape
    spatial = (b, *grid, h)  # (explicit sizes: a -1 cannot be inferred from an empty batch or no heads)
    o_local = neighborhood_attention(
        q.reshape(*spatial, d), k.reshape(*spatial, d), v.reshape(*spatial, v.shape[-1]), kernel_size, dilation,
        scale=scale, additional_keys=additional_keys, additional_values=additional_values,
    ).reshape(b, n, h, v.shape[-1])  # fmt: skip
    o_lin = linear_attention(q, k, v, feature_map=feature_map, normalize="divide", scale=1.0, eps=eps)
    dt = torch.promote_types(o_local.dtype, gate.dtype)
    return (o_local.to(dt) + gate.to(dt)[:, None] * o_lin.to(dt)).to(q.dtype)


_hy_op = Op(_HY)
_hy_op.register("torch", _hybrid_torch, supports_floating)
_hy_op.register("reference", hybrid_attention_reference, supports_floating)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    kernel_size: int | Sequence[int],
    gate: torch.Tensor,
    *,
    dilation: int | Sequence[int] = 1,
    feature_map: str = "elu",
    scale: float | None = None,
    eps: float = 1e-6,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Local softmax over a grid window plus gated global linear attention; arguments and math in
    :func:`hybrid_attention_reference` and the module docstring.

    Backends: ``"torch"`` (neighborhood attention, which itself runs on NATTEN where it can, plus linear attention:
    memory ``O(N K)``) and ``"reference"`` (materialised ``[N, N]`` weights).

    Raises:
        ValueError: shapes that do not fit (named in the message), a grid whose product is not ``N``, an even or
            non-positive kernel size, a gate not ``[H]``, an unknown feature map, a non-finite scale, ``eps <= 0``.
    """
    _check_hybrid(
        q, k, v, grid, kernel_size, gate, dilation, feature_map, scale, eps, additional_keys, additional_values
    )
    return _hy_op(
        q, k, v, tuple(grid), kernel_size, gate, dilation=dilation, feature_map=feature_map, scale=scale, eps=eps,
        additional_keys=additional_keys, additional_values=additional_values, backend=backend,
    )  # fmt: skip


def pool_cells(grid: Sequence[int], pool: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Cell index ``[N]`` (int64) of every grid token: cells of ``pool`` tokens per axis, row-major, the last cell
    of an axis shorter where ``pool`` does not divide it (``ceil(grid / pool)`` cells per axis)."""
    cells = torch.zeros((), dtype=torch.int64, device=device)
    for length, p in zip(grid, pool, strict=True):
        n_cells = -(-length // p)
        cells = cells[..., None] * n_cells + torch.arange(length, device=device) // p
    return cells.reshape(-1)


def _check_pool(pool: object, nd: int) -> tuple[int, ...]:
    values = (pool,) * nd if isinstance(pool, int) and not isinstance(pool, bool) else pool
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or len(values) != nd
        or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in values)
    ):
        raise ValueError(f"{_AG}: pool={pool!r} must be an int >= 1 or {nd} such (one per grid axis)")
    return tuple(int(x) for x in values)


def _check_agent(q, k, v, grid, pool, scale, broadcast_scale, shortcut, ak, av):
    check_heads_last(_AG, q, k, v, same_length=True)
    grid = _check_grid(_AG, grid, q.shape[1])
    pool = _check_pool(pool, len(grid))
    # (scale=0 divided by zero in the "torch" backend; a zero scale makes a softmax uniform, which no model means)
    check_real(_AG, "scale", scale, low=0.0, low_open=True, optional=True)
    check_real(_AG, "broadcast_scale", broadcast_scale, low=0.0, low_open=True, optional=True)
    check_real(_AG, "shortcut", shortcut, low=None)
    _check_additional(_AG, q, v, ak, av)
    return grid, pool


def pooled_agent_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    pool: int | Sequence[int] = 2,
    *,
    scale: float | None = None,
    broadcast_scale: float | None = None,
    shortcut: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification of :func:`pooled_agent_attention`: the pooling as a matrix, both softmaxes materialised.

    Args:
        q: Queries ``[B, N, H, D]`` on ``grid`` (row-major).
        k: Keys ``[B, N, H, D]``.
        v: Values ``[B, N, H, Dv]``.
        grid: The token grid, 1 to 3 ints with product ``N``.
        pool: Cell size per axis (int or one per axis); ``n = prod(ceil(grid / pool))`` agents.
        scale: Logit multiplier ``s`` of the aggregation ``softmax(s A K^T)``; ``None`` means ``D ** -0.5``.
        broadcast_scale: Logit multiplier ``s_b`` of the broadcast ``softmax(s_b q A^T)``; ``None`` means ``s``.
        shortcut: Weight of the ``+ shortcut * v`` term (AgentSD's ``k_shortcut``).
        additional_keys: ``[B, E, H, D]`` keys joined to the aggregation's keys, or ``None``.
        additional_values: ``[B, E, H, Dv]``, with ``additional_keys``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    grid, pool = _check_agent(q, k, v, grid, pool, scale, broadcast_scale, shortcut, additional_keys, additional_values)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    sb = s if broadcast_scale is None else broadcast_scale
    cells = pool_cells(grid, pool, q.device)
    n_a = int(cells.max()) + 1
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        member = torch.nn.functional.one_hot(cells, n_a).to(dt).T  # [n, N]
        pmat = member / member.sum(dim=1, keepdim=True)  # [n, N]: mean over each cell
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        if additional_keys is not None:
            kf = torch.cat([kf, additional_keys.to(dt)], dim=1)
            vf_keys = torch.cat([vf, additional_values.to(dt)], dim=1)
        else:
            vf_keys = vf
        agents = torch.einsum("an,bnhd->bahd", pmat, qf)  # [B, n, H, D]
        w_agg = (torch.einsum("bahd,bmhd->bham", agents, kf) * s).softmax(dim=-1)  # [B, H, n, M]
        w_bc = (torch.einsum("bnhd,bahd->bhna", qf, agents) * sb).softmax(dim=-1)  # [B, H, N, n]
        out = torch.einsum("bhna,bham,bmhe->bnhe", w_bc, w_agg, vf_keys) + shortcut * vf
    return out.to(q.dtype)


def _agent_torch(
    q, k, v, grid, pool=2, *, scale=None, broadcast_scale=None, shortcut=0.0, additional_keys=None,
    additional_values=None,
):  # fmt: skip
    """Scatter-mean pooling and :func:`~visionlin.kernels.agent_attention` (its ``"sdpa"`` backend on GPU)."""
    b, n, h, d = q.shape
    pool = _check_pool(pool, len(grid))
    s = d**-0.5 if scale is None else scale
    sb = s if broadcast_scale is None else broadcast_scale
    cells = pool_cells(grid, pool, q.device)
    n_a = math.prod([-(-g // p) for g, p in zip(grid, pool, strict=True)])  # a Python int: no data-dependent shape
    acc = torch.promote_types(q.dtype, torch.float32)
    sums = q.new_zeros(b, n_a, h, d, dtype=acc).index_add(1, cells, q.to(acc))
    counts = q.new_zeros(n_a, dtype=acc).index_add(0, cells, q.new_ones(cells.shape, dtype=acc))
    agents = (sums / counts[:, None, None]).to(q.dtype)  # [B, n, H, D]
    if additional_keys is not None:
        k, vk = torch.cat([k, additional_keys], dim=1), torch.cat([v, additional_values], dim=1)
    else:
        vk = v
    # One op scale for both softmaxes. The other one enters through a factor of magnitude <= 1, so nothing overflows
    # in half precision: the queries' (s_b / s) q . A * s where |s_b| < |s|, else the keys' A . (s / s_b) k * s_b (the
    # queries scaled by s_b / s = 32,768 overflowed float16 at |q| > 2: the converter's k_scale2=-4, head_dim 64).
    if sb == s:
        out = agent_attention(q, k, vk, agents, scale=s)
    elif sb < s:  # (both > 0: checked)
        out = agent_attention(q * (sb / s), k, vk, agents, scale=s)
    else:
        out = agent_attention(q, k * (s / sb), vk, agents, scale=sb)
    return out + shortcut * v if shortcut else out


_ag_op = Op(_AG)
_ag_op.register("torch", _agent_torch, supports_floating)
_ag_op.register("reference", pooled_agent_attention_reference, supports_floating)


def pooled_agent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    pool: int | Sequence[int] = 2,
    *,
    scale: float | None = None,
    broadcast_scale: float | None = None,
    shortcut: float = 0.0,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Agent attention with agents pooled from the queries over grid cells (AgentSD, training-free); arguments and
    math in :func:`pooled_agent_attention_reference` and the module docstring.

    Backends: ``"torch"`` (scatter-mean pooling + :func:`~visionlin.kernels.agent_attention`, memory ``O(N n)``)
    and ``"reference"`` (pooling matrix, materialised weights).

    Raises:
        ValueError: shapes that do not fit, a grid whose product is not ``N``, a pool size below 1, scales that are
            not finite numbers > 0, a non-finite shortcut.
    """
    _check_agent(q, k, v, grid, pool, scale, broadcast_scale, shortcut, additional_keys, additional_values)
    return _ag_op(
        q, k, v, tuple(grid), pool, scale=scale, broadcast_scale=broadcast_scale, shortcut=shortcut,
        additional_keys=additional_keys, additional_values=additional_values, backend=backend,
    )  # fmt: skip
