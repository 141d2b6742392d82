"""Block-sparse and sparse-linear attention (SLA), non-causal (bidirectional), heads-last ``[B, N, H, D]``.

Both ops first predict which key blocks matter to each query block from block-pooled scores:

* Tokens are cut into consecutive blocks of ``block_q`` queries and ``block_k`` keys (any ``N``: the last block may
  be shorter; it is pooled over its real tokens only and its missing tokens are masked, never padded with zeros
  that would take part in a softmax).
* ``S_c[i, j] = mean(Q_i) . mean(K_j)`` per head. SLA's paper writes ``P_c = softmax(S_c / sqrt(d))``; the softmax and
  the scale are monotone in each row, so the ranking (all that is used) is the same.
* Per query-block row, the ``n_c = clamp(ceil(topk * n_kb), 1, n_kb)`` highest-scoring key blocks are **critical**
  (``1``), the ``n_l = min(floor(k_low * n_kb), n_kb - n_c)`` lowest **negligible** (``-1``), the rest **marginal**
  (``0``) (:func:`sla_block_map`; ties go to the lower block index, as ``torch.topk`` orders them).

:func:`block_sparse_attention` (training-free, Sparge-style top-k) is exact softmax over the critical blocks only.

:func:`sparse_linear_attention` (SLA, arXiv 2509.24006) adds a linear-attention branch and a learnable projection:

* ``O_s``: exact softmax attention of each query over the keys of its critical blocks.
* ``O_l = phi(q_i) H_i / (phi(q_i) . Z_i + eps)`` with ``H_i = sum_j phi(k_j) v_j^T`` and ``Z_i = sum_j phi(k_j)``
  over the keys ``j`` of the query's **marginal** blocks (``variant="paper"``: negligible blocks are skipped), or
  over **all** keys (``variant="code"``: the released thu-ml/SLA ``main`` branch, which has no negligible class and
  runs linear attention over every key, critical ones included). An empty key set gives ``O_l = 0``.
* ``O = O_s + O_l W^T + b`` with ``W`` ``[Dv, Dv]`` (and ``b`` ``[Dv]``) shared by all heads. SLA initialises them to
  zero, so an unconverted-equivalent start is ``O = O_s``; with ``topk = 1`` that is dense softmax attention exactly.

``additional_keys`` / ``additional_values`` ``[B, T, H, D]`` / ``[B, T, H, Dv]`` (e.g. the text tokens of a joint
text-image attention) are attended to densely by every query: they join the softmax branch as always-critical keys
(one softmax over the critical keys and them, i.e. the two parts merged exactly by their log-sum-exp) and take no
part in the block selection or the linear branch.

The feature map ``phi`` is ``"softmax"`` over the head dim (the paper's and code's default), ``"elu"`` (elu + 1) or
``"relu"``, applied to q and k alike (the code's ``tie_feature_map_qk=True``).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ._common import (
    check_heads_last,
    check_real,
    check_side_tensor,
    fp32_reference,
    reference_dtype,
    supports_floating,
)
from ._dispatch import Op

__all__ = [
    "SLA_FEATURE_MAPS",
    "SLA_VARIANTS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "sla_block_counts",
    "sla_block_map",
    "sparse_linear_attention",
    "sparse_linear_attention_reference",
]

SLA_VARIANTS = ("paper", "code")
SLA_FEATURE_MAPS = {
    "softmax": lambda x: x.softmax(dim=-1),
    "elu": lambda x: torch.where(x > 0, x + 1.0, torch.exp(x.clamp(max=0.0))),
    "relu": F.relu,
}
_SLA = "sparse_linear_attention"
_BSA = "block_sparse_attention"


def _check_block(op: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = type(value).__name__
        raise ValueError(f"{op}: {name}={value!r} must be a positive int (the paper uses 64 or 128), got a {kind}")


def _check_selection(op: str, topk: object, k_low: object, block_q: object, block_k: object) -> None:
    check_real(op, "topk", topk, low=0.0, low_open=True, high=1.0, high_open=False)
    check_real(op, "k_low", k_low, low=0.0, high=1.0)
    real = isinstance(topk, numbers.Real) and isinstance(k_low, numbers.Real)  # (numpy's too; not symbolic ones)
    if real and topk + k_low > 1.0 + 1e-12:
        raise ValueError(f"{op}: topk + k_low must be <= 1 (critical + negligible blocks), got {topk=}, {k_low=}")
    _check_block(op, "block_q", block_q)
    _check_block(op, "block_k", block_k)


def sla_block_counts(num_key_blocks: int, topk: float, k_low: float = 0.0) -> tuple[int, int]:
    """``(n_c, n_l)``: critical and negligible key blocks per query-block row for ``num_key_blocks`` key blocks."""
    n_c = min(max(math.ceil(topk * num_key_blocks - 1e-9), 1), num_key_blocks)
    n_l = min(math.floor(k_low * num_key_blocks + 1e-9), num_key_blocks - n_c)
    return n_c, n_l


def _block_mean(x: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
    """Mean of each block of ``block`` consecutive tokens of ``x`` ``[B, L, H, D]`` -> ``[B, H, ceil(L / block), D]`` in
    ``dtype`` (summed in it: no converted copy of ``x``, no padding); the last, possibly shorter, block is averaged over
    its real tokens. On CUDA (Triton present; half / float32 inputs, float32 means) one Triton kernel sums the blocks
    (``triton.sparse_linear.block_mean``, a fixed summation order): the pooling is shared by both backends, so they
    rank the very same scores."""
    fast = x.is_cuda and dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    if fast and x.numel() and x.stride(-1) == 1:
        from .triton import triton_unavailable

        if not triton_unavailable(x):
            from .triton.sparse_linear import block_mean

            return block_mean(x, block)
    b, length, h, d = x.shape
    full, tail = divmod(length, block)
    parts = []
    if full:  # splitting the token dim is a view, whatever x's strides
        parts.append(x[:, : full * block].unflatten(1, (full, block)).sum(dim=2, dtype=dtype) / block)
    if tail:
        parts.append(x[:, full * block :].sum(dim=1, keepdim=True, dtype=dtype) / tail)
    return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).transpose(1, 2)


def _block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """The pooled scores ``mean(Q_i) . mean(K_j)`` ``[B, H, nqb, nkb]`` (float32 for half / float32 inputs; device ops
    only; shared with the Triton backend, so both rank the very same numbers)."""
    dt = reference_dtype(q.dtype)
    with torch.no_grad(), fp32_reference(q.device):
        # [B, H, nqb, D] @ [B, H, D, nkb]: one batched GEMM (cheaper on the host than the einsum's parse + permutes)
        return torch.matmul(
            _block_mean(q.detach(), block_q, dt), _block_mean(k.detach(), block_k, dt).transpose(-1, -2)
        )


def _block_order(q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int) -> torch.Tensor:
    """Key-block indices per query-block row, best pooled score first: ``[B, H, nqb, nkb]`` int64 (device ops only;
    the ranking of :func:`sla_block_map`, shared with the Triton backend)."""
    # A stable descending sort: equal scores keep block order, so the choice is deterministic (NaN ranks first).
    return torch.sort(_block_scores(q, k, block_q, block_k), dim=-1, descending=True, stable=True).indices


def sla_block_map(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: float,
    k_low: float = 0.0,
    block_q: int = 64,
    block_k: int = 64,
) -> torch.Tensor:
    """Classify key blocks per query block from block-pooled scores (module docstring).

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        topk: Fraction of key blocks that are critical, in ``(0, 1]``.
        k_low: Fraction of key blocks that are negligible, in ``[0, 1)``, ``topk + k_low <= 1``.
        block_q: Queries per block.
        block_k: Keys per block.

    Returns:
        ``[B, H, ceil(N / block_q), ceil(M / block_k)]`` int8: ``1`` critical, ``0`` marginal, ``-1`` negligible.
    """
    check_heads_last("sla_block_map", q, k, k, same_length=False)
    _check_selection("sla_block_map", topk, k_low, block_q, block_k)
    if q.shape[1] == 0:
        return torch.zeros(q.shape[0], q.shape[2], 0, -(-k.shape[1] // block_k), dtype=torch.int8, device=q.device)
    with torch.no_grad():
        order = _block_order(q, k, block_q, block_k)  # [B, H, nqb, nkb]
        nkb = order.shape[-1]
        n_c, n_l = sla_block_counts(nkb, topk, k_low)
        rank_class = torch.zeros(nkb, dtype=torch.int8, device=q.device)
        rank_class[:n_c] = 1
        if n_l:
            rank_class[nkb - n_l :] = -1
        block_map = torch.empty(order.shape, dtype=torch.int8, device=q.device)
        block_map.scatter_(-1, order, rank_class.expand(order.shape).contiguous())
    return block_map


def _empty(q: torch.Tensor, v: torch.Tensor) -> bool:
    """``B = 0``, ``N = 0``, ``H = 0`` or ``Dv = 0``: an empty output (``M = 0`` and ``D = 0`` are refused)."""
    return q.shape[0] == 0 or q.shape[1] == 0 or q.shape[2] == 0 or v.shape[-1] == 0


def _token_masks(block_map: torch.Tensor, n: int, m: int, block_q: int, block_k: int) -> torch.Tensor:
    """The block map expanded to tokens: ``[B, H, N, M]`` int8."""
    qi = torch.arange(n, device=block_map.device) // block_q
    kj = torch.arange(m, device=block_map.device) // block_k
    return block_map[:, :, qi][:, :, :, kj]


def _check_additional(op: str, q: torch.Tensor, v: torch.Tensor, ak: object, av: object) -> None:
    if (ak is None) != (av is None):
        raise ValueError(f"{op}: pass both additional_keys and additional_values or neither")
    if ak is None:
        return
    check_heads_last(op, q, ak, av, same_length=False)
    if av.shape[-1] != v.shape[-1]:
        raise ValueError(f"{op}: additional_values head dim {av.shape[-1]} differs from the values' {v.shape[-1]}")


def _dense_part(q, ak, av, scale, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the additional keys: output ``[B, N, H, Dv]`` and log-sum-exp ``[B, N, H, 1]``."""
    s = torch.einsum("bnhd,bthd->bnht", q.to(acc), ak.to(acc)) * scale
    lse = s.logsumexp(dim=-1, keepdim=True)
    return torch.einsum("bnht,bthe->bnhe", (s - lse).exp(), av.to(acc)), lse


def _merge(o1, lse1, o2, lse2) -> torch.Tensor:
    """Two softmax attentions over disjoint key sets merged into the softmax over their union."""
    lse = torch.logaddexp(lse1, lse2)
    return o1 * (lse1 - lse).exp() + o2 * (lse2 - lse).exp()


def _check_sla(q, k, v, proj_weight, proj_bias, topk, k_low, block_q, block_k, feature_map, variant, scale, eps):
    check_heads_last(_SLA, q, k, v, same_length=False)
    _check_selection(_SLA, topk, k_low, block_q, block_k)
    if not isinstance(variant, str) or variant not in SLA_VARIANTS:
        raise ValueError(f"{_SLA}: unknown {variant=}; choose one of {SLA_VARIANTS}")
    if variant == "code" and k_low != 0:
        raise ValueError(f"{_SLA}: variant='code' skips no blocks (linear attention over all keys); got {k_low=}")
    if not isinstance(feature_map, str) or feature_map not in SLA_FEATURE_MAPS:
        raise ValueError(f"{_SLA}: unknown {feature_map=}; choose one of {sorted(SLA_FEATURE_MAPS)}")
    check_real(_SLA, "scale", scale, low=None, optional=True)
    check_real(_SLA, "eps", eps, low=0.0, low_open=True)
    dv = v.shape[-1]
    if not isinstance(proj_weight, torch.Tensor) or tuple(proj_weight.shape) != (dv, dv):
        got = tuple(proj_weight.shape) if isinstance(proj_weight, torch.Tensor) else type(proj_weight).__name__
        raise ValueError(f"{_SLA}: proj_weight must be a [Dv, Dv] = [{dv}, {dv}] tensor, got {got}")
    check_side_tensor(_SLA, "proj_weight", proj_weight, q, (dv, dv), "[Dv, Dv]")
    if proj_bias is not None:
        check_side_tensor(_SLA, "proj_bias", proj_bias, q, (dv,), "[Dv]")
        if proj_bias.ndim != 1:
            raise ValueError(f"{_SLA}: proj_bias must be [Dv] = [{dv}], got {tuple(proj_bias.shape)}")


def sparse_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    *,
    topk: float = 0.05,
    k_low: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    variant: str = "paper",
    scale: float | None = None,
    eps: float = 1e-5,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification of :func:`sparse_linear_attention`: materialised ``[B, H, N, M]`` masks, in float32.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        proj_weight: The learnable projection ``W`` ``[Dv, Dv]`` applied to ``O_l`` (zero-initialised in SLA).
        proj_bias: Its bias ``[Dv]`` or ``None``.
        topk: Fraction of key blocks that are critical (``k_h``), in ``(0, 1]``; paper 0.05, code 0.1.
        k_low: Fraction that are negligible (``k_l``), in ``[0, 1)``; paper 0.10; must be 0 for ``variant="code"``.
        block_q: Queries per block (paper 64, code 64 or 128).
        block_k: Keys per block (64).
        feature_map: ``phi``: a name in :data:`SLA_FEATURE_MAPS`.
        variant: ``"paper"`` (linear over marginal blocks) or ``"code"`` (linear over all keys).
        scale: Softmax score multiplier (finite); ``None`` means ``D ** -0.5``.
        eps: Added to the linear branch's denominator (``> 0``; the code uses ``1e-5``).
        additional_keys: ``[B, T, H, D]`` keys every query attends to densely in the softmax branch, or ``None``.
        additional_values: ``[B, T, H, Dv]``, with ``additional_keys``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check_sla(q, k, v, proj_weight, proj_bias, topk, k_low, block_q, block_k, feature_map, variant, scale, eps)
    _check_additional(_SLA, q, v, additional_keys, additional_values)
    if _empty(q, v):
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n, m = q.shape[1], k.shape[1]
    block_map = sla_block_map(q, k, topk=topk, k_low=k_low, block_q=block_q, block_k=block_k)
    cls = _token_masks(block_map, n, m, block_q, block_k)  # [B, H, N, M]
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        qf, kf, vf = q.to(dt), k.to(dt), v.to(dt)
        s = torch.einsum("bnhd,bmhd->bhnm", qf, kf) * scale
        s = s.masked_fill(cls != 1, float("-inf"))  # every row has >= 1 critical key
        o_s = _softmax_with_additional(s, qf, vf, additional_keys, additional_values, scale, dt)
        phi = SLA_FEATURE_MAPS[feature_map]
        a = torch.einsum("bnhd,bmhd->bhnm", phi(qf), phi(kf))  # linear scores phi(q_i) . phi(k_j)
        if variant == "paper":
            a = a * (cls == 0).to(dt)
        o_l = torch.einsum("bhnm,bmhe->bnhe", a, vf) / (a.sum(dim=-1).transpose(1, 2).unsqueeze(-1) + eps)
        o_l = o_l @ proj_weight.to(dt).T
        if proj_bias is not None:
            o_l = o_l + proj_bias.to(dt)
        out = o_s + o_l
    return out.to(q.dtype)


def _softmax_with_additional(s, qf, vf, ak, av, scale, dt) -> torch.Tensor:
    """Materialised softmax branch: scores ``s`` ``[B, H, N, M]`` (masked) and the additional keys as extra columns."""
    if ak is None:
        return torch.einsum("bhnm,bmhe->bnhe", s.softmax(dim=-1), vf)
    m = s.shape[-1]
    s = torch.cat([s, torch.einsum("bnhd,bthd->bhnt", qf, ak.to(dt)) * scale], dim=-1)  # [B, H, N, M + T]
    p = s.softmax(dim=-1)
    return torch.einsum("bhnm,bmhe->bnhe", p[..., :m], vf) + torch.einsum("bhnt,bthe->bnhe", p[..., m:], av.to(dt))


def _gather_critical(k: torch.Tensor, idx: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (or values) of the critical blocks: ``k`` ``[B, M, H, E]``, ``idx`` ``[B, H, nqb, n_c]`` ->
    ``[B, H, nqb, n_c * block_k, E]`` and the validity of each gathered key ``[1|B, 1|H, nqb, n_c * block_k]``."""
    b, m, h, e = k.shape
    nkb = -(-m // block_k)
    kb = F.pad(k, (0, 0, 0, 0, 0, nkb * block_k - m)).reshape(b, nkb, block_k, h, e).permute(0, 3, 1, 2, 4)
    nqb, n_c = idx.shape[2], idx.shape[3]
    g = torch.gather(
        kb.unsqueeze(2).expand(b, h, nqb, nkb, block_k, e),
        3,
        idx[..., None, None].expand(b, h, nqb, n_c, block_k, e),
    )  # [B, H, nqb, n_c, block_k, E]
    pos = idx[..., None] * block_k + torch.arange(block_k, device=k.device)  # [B, H, nqb, n_c, block_k]
    return g.reshape(b, h, nqb, n_c * block_k, e), (pos < m).reshape(b, h, nqb, n_c * block_k)


def _fit_blocks(block_q: int, block_k: int, n: int, m: int) -> tuple[int, int]:
    """Blocks no longer than the sequences: a block past the end holds what a block of exactly ``N`` (``M``) holds
    (one block, the same mean and the same selection), and the padding to it is never allocated (``block_q = 10**8``
    for 40 tokens asked for 6.4 GB)."""
    return min(block_q, max(n, 1)), min(block_k, max(m, 1))


def _blockwise_sparse(q, k, v, idx, block_q, block_k, scale, ak=None, av=None) -> torch.Tensor:
    """``O_s`` over the critical blocks (and the additional keys) only, ``O(N n_c block_k D)``: ``[B, N, H, Dv]`` in
    float32 (float64)."""
    acc = reference_dtype(q.dtype)
    b, n, h, d = q.shape
    nqb = idx.shape[2]
    qb = F.pad(q, (0, 0, 0, 0, 0, nqb * block_q - n)).reshape(b, nqb, block_q, h, d).permute(0, 3, 1, 2, 4)
    kg, valid = _gather_critical(k, idx, block_k)
    vg, _ = _gather_critical(v, idx, block_k)
    s = torch.einsum("bhiqd,bhikd->bhiqk", qb.to(acc), kg.to(acc)) * scale
    s = s.masked_fill(~valid[:, :, :, None, :], float("-inf"))
    lse = s.logsumexp(dim=-1, keepdim=True)  # [B, H, nqb, block_q, 1]
    o = torch.einsum("bhiqk,bhike->bhiqe", (s - lse).exp(), vg.to(acc))  # [B, H, nqb, block_q, Dv]
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nqb * block_q, h, v.shape[-1])[:, :n]
    if ak is None:
        return o
    lse = lse.permute(0, 2, 3, 1, 4).reshape(b, nqb * block_q, h, 1)[:, :n]
    return _merge(o, lse, *_dense_part(q, ak, av, scale, acc))


def _sla_native(
    q, k, v, proj_weight, proj_bias=None, *, topk=0.05, k_low=0.10, block_q=64, block_k=64, feature_map="softmax",
    variant="paper", scale=None, eps=1e-5, additional_keys=None, additional_values=None,
):  # fmt: skip
    """``"torch"`` backend: block-wise, never materialising ``[N, M]``. The sparse branch gathers the critical key
    blocks; the linear branch sums per-key-block states ``h_j = phi(K_j)^T V_j``, ``z_j`` through the block map
    (``O(N D Dv + nqb nkb D Dv)``). Float32 math (float64 for float64 inputs), output in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc = reference_dtype(q.dtype)
    b, n, h, _ = q.shape
    m = k.shape[1]
    block_q, block_k = _fit_blocks(block_q, block_k, n, m)
    block_map = sla_block_map(q, k, topk=topk, k_low=k_low, block_q=block_q, block_k=block_k)
    n_c, _ = sla_block_counts(block_map.shape[-1], topk, k_low)
    idx = torch.topk(block_map.to(torch.int32), n_c, dim=-1, sorted=False).indices  # the n_c critical blocks
    o_s = _blockwise_sparse(q, k, v, idx, block_q, block_k, scale, additional_keys, additional_values)
    phi = SLA_FEATURE_MAPS[feature_map]
    fq, fk, vf = phi(q.to(acc)), phi(k.to(acc)), v.to(acc)
    nkb = block_map.shape[-1]
    pad = nkb * block_k - m
    d, dv = fk.shape[-1], v.shape[-1]
    fkb = F.pad(fk, (0, 0, 0, 0, 0, pad)).reshape(b, nkb, block_k, h, d)  # padded keys have phi = 0 rows
    vb = F.pad(vf, (0, 0, 0, 0, 0, pad)).reshape(b, nkb, block_k, h, dv)
    if variant == "code":
        state = torch.einsum("bjthd,bjthe->bhde", fkb, vb)  # [B, H, D, Dv] over all keys
        z = fkb.sum(dim=(1, 2))  # [B, H, D]
        num = torch.einsum("bnhd,bhde->bnhe", fq, state)
        den = torch.einsum("bnhd,bhd->bnh", fq, z).unsqueeze(-1)
    else:
        hj = torch.einsum("bjthd,bjthe->bhjde", fkb, vb)  # [B, H, nkb, D, Dv]: h_j = phi(K_j)^T V_j
        zj = fkb.sum(dim=2).transpose(1, 2)  # [B, H, nkb, D]: z_j
        marginal = (block_map == 0).to(acc)  # [B, H, nqb, nkb]
        state = torch.einsum("bhij,bhjde->bhide", marginal, hj)  # H_i
        z = torch.einsum("bhij,bhjd->bhid", marginal, zj)  # Z_i
        nqb = block_map.shape[2]
        fqb = F.pad(fq, (0, 0, 0, 0, 0, nqb * block_q - n)).reshape(b, nqb, block_q, h, d)
        num = torch.einsum("biqhd,bhide->biqhe", fqb, state).reshape(b, nqb * block_q, h, dv)[:, :n]
        den = torch.einsum("biqhd,bhid->biqh", fqb, z).reshape(b, nqb * block_q, h, 1)[:, :n]
    o_l = (num / (den + eps)) @ proj_weight.to(acc).T
    if proj_bias is not None:
        o_l = o_l + proj_bias.to(acc)
    return (o_s + o_l).to(q.dtype)


#: Block sizes the Triton kernels tile (one query / key block per tile).
TRITON_BLOCKS = (32, 64, 128)


def _triton_supports(q, k, v, *others, block_q=64, block_k=64, additional_keys=None, **kwargs) -> list[str]:
    """Reasons the fused Triton kernels cannot run this call (empty if they can). ``additional_keys`` run: their
    dense softmax (a second kernel call, or float32 torch) is merged with the kernel's by log-sum-exp."""
    from .triton import head_dim_reasons, heads_grid_reasons, triton_unavailable

    reasons = triton_unavailable(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(
            f"needs one dtype of float16, bfloat16, float32 for q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    for name, t in zip(("proj_weight", "proj_bias"), others, strict=False):
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            reasons.append(f"{name} has non-floating dtype {t.dtype}")
    if block_q not in TRITON_BLOCKS or block_k not in TRITON_BLOCKS:
        reasons.append(f"block sizes block_q={block_q}, block_k={block_k} are not tiled (allowed: {TRITON_BLOCKS})")
    return reasons + head_dim_reasons(q, v) + heads_grid_reasons(q)


def _sla_triton(q, k, v, proj_weight, proj_bias=None, **kwargs):
    """``"triton"`` backend (:mod:`visionlin.kernels.triton.sparse_linear`), importing Triton on first use."""
    from .triton.sparse_linear import sparse_linear_attention_triton

    return sparse_linear_attention_triton(q, k, v, proj_weight, proj_bias, **kwargs)


_sla_op = Op(_SLA)
_sla_op.register("triton", _sla_triton, _triton_supports)
_sla_op.register("torch", _sla_native, supports_floating)
_sla_op.register("reference", sparse_linear_attention_reference, supports_floating)


def sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None = None,
    *,
    topk: float = 0.05,
    k_low: float = 0.10,
    block_q: int = 64,
    block_k: int = 64,
    feature_map: str = "softmax",
    variant: str = "paper",
    scale: float | None = None,
    eps: float = 1e-5,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Sparse-linear attention (SLA); see the module docstring and :func:`sparse_linear_attention_reference`.

    Backends: ``"triton"`` (CUDA, float16 / bfloat16 / float32, head dims up to 128, blocks of 32, 64 or 128: fused
    block-sparse softmax + linear branch, see :mod:`visionlin.kernels.triton.sparse_linear`; ``additional_keys`` by a
    dense call of the same kernel over them, merged into the image keys' softmax by log-sum-exp),
    ``"torch"`` (block-wise, memory ``O(N n_c block_k)`` per head, any device) and ``"reference"`` (materialised
    masks). The last two compute in float32 (float64 for float64 inputs); all return q's dtype.

    Raises:
        ValueError: bad shapes, ``topk`` outside ``(0, 1]``, ``k_low`` outside ``[0, 1)``, ``topk + k_low > 1``,
            non-positive block sizes, an unknown variant or feature map, ``k_low > 0`` with ``variant="code"``,
            ``proj_weight`` not ``[Dv, Dv]``.
    """
    _check_sla(q, k, v, proj_weight, proj_bias, topk, k_low, block_q, block_k, feature_map, variant, scale, eps)
    _check_additional(_SLA, q, v, additional_keys, additional_values)
    if _empty(q, v):
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return _sla_op(
        q, k, v, proj_weight, proj_bias, topk=topk, k_low=k_low, block_q=block_q, block_k=block_k,
        feature_map=feature_map, variant=variant, scale=scale, eps=eps, additional_keys=additional_keys,
        additional_values=additional_values, backend=backend,
    )  # fmt: skip


def _check_bsa(q, k, v, topk, block_q, block_k, scale, ak=None, av=None):
    check_heads_last(_BSA, q, k, v, same_length=False)
    _check_additional(_BSA, q, v, ak, av)
    _check_selection(_BSA, topk, 0.0, block_q, block_k)
    check_real(_BSA, "scale", scale, low=None, optional=True)


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float = 0.5,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Specification of :func:`block_sparse_attention`: softmax over the keys of each query's critical blocks
    (:func:`sla_block_map` with ``k_low = 0``), materialised, in float32.

    Non-finite inputs: a NaN in ``q`` or ``k`` enters the pooled block scores, so which blocks are critical is then
    arbitrary (every backend uses the same map). A NaN or inf in ``v`` of a block a query does not attend to reaches
    that query here (the materialised product multiplies it by a zero weight) but not in the ``"torch"`` and
    ``"triton"`` backends, which never read that block for it: compare such outputs only where the reference is finite.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys ``[B, M, H, D]``.
        v: Values ``[B, M, H, Dv]``.
        topk: Fraction of key blocks each query block attends to, in ``(0, 1]`` (sparsity ``1 - topk``).
        block_q: Queries per block.
        block_k: Keys per block.
        scale: Score multiplier (finite); ``None`` means ``D ** -0.5``.
        additional_keys: ``[B, T, H, D]`` keys every query attends to densely (joined to the softmax), or ``None``.
        additional_values: ``[B, T, H, Dv]``, with ``additional_keys``.

    Returns:
        ``[B, N, H, Dv]`` in the dtype of ``q``.
    """
    _check_bsa(q, k, v, topk, block_q, block_k, scale, additional_keys, additional_values)
    if _empty(q, v):
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_map = sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    cls = _token_masks(block_map, q.shape[1], k.shape[1], block_q, block_k)
    dt = reference_dtype(q.dtype)
    with fp32_reference(q.device):
        s = torch.einsum("bnhd,bmhd->bhnm", q.to(dt), k.to(dt)) * scale
        s = s.masked_fill(cls != 1, float("-inf"))
        out = _softmax_with_additional(s, q.to(dt), v.to(dt), additional_keys, additional_values, scale, dt)
    return out.to(q.dtype)


def _bsa_native(q, k, v, *, topk=0.5, block_q=64, block_k=64, scale=None, additional_keys=None, additional_values=None):
    """``"torch"`` backend: gathers the critical key blocks (never materialises ``[N, M]``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    block_q, block_k = _fit_blocks(block_q, block_k, q.shape[1], k.shape[1])
    block_map = sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    n_c, _ = sla_block_counts(block_map.shape[-1], topk)
    idx = torch.topk(block_map.to(torch.int32), n_c, dim=-1, sorted=False).indices
    return _blockwise_sparse(q, k, v, idx, block_q, block_k, scale, additional_keys, additional_values).to(q.dtype)


def _bsa_triton(q, k, v, **kwargs):
    """``"triton"`` backend: the SLA softmax kernel without the linear branch."""
    from .triton.sparse_linear import block_sparse_attention_triton

    return block_sparse_attention_triton(q, k, v, **kwargs)


_bsa_op = Op(_BSA)
_bsa_op.register("triton", _bsa_triton, _triton_supports)
_bsa_op.register("torch", _bsa_native, supports_floating)
_bsa_op.register("reference", block_sparse_attention_reference, supports_floating)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: float = 0.5,
    block_q: int = 64,
    block_k: int = 64,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Training-free block top-k sparse attention; see :func:`block_sparse_attention_reference`.

    Backends: ``"triton"`` (CUDA; the SLA softmax kernel without the linear branch, same limits, ``additional_keys``
    merged the same way), ``"torch"`` (gathers critical blocks) and ``"reference"``; output in q's dtype.

    Raises:
        ValueError: bad shapes, ``topk`` outside ``(0, 1]``, non-positive block sizes, a non-finite scale.
    """
    _check_bsa(q, k, v, topk, block_q, block_k, scale, additional_keys, additional_values)
    if _empty(q, v):
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    return _bsa_op(
        q, k, v, topk=topk, block_q=block_q, block_k=block_k, scale=scale, additional_keys=additional_keys,
        additional_values=additional_values, backend=backend,
    )  # fmt: skip
