"""Agent attention's two position biases, built from the authors' tables in one op.

With ``h`` heads, ``n`` agents, a grid ``(H, W)`` and ``P`` prefix tokens, the tables are ``an``, ``na``
``[h, n, s, s']`` (the authors' ``7 x 7``), ``ah`` ``[1, h, n, H, 1]``, ``aw`` ``[1, h, n, 1, W]``, ``ha``
``[1, h, H, 1, n]``, ``wa`` ``[1, h, 1, W, n]`` and, for prefix tokens, ``ac`` ``[1, h, n, P]`` / ``ca``
``[1, h, P, n]``. The biases are::

    agent_bias[0, i, a, P + y W + x] = bilinear(an)[i, a, y, x] + (ah[0, i, a, y, 0] + aw[0, i, a, 0, x])
    query_bias[0, i, P + y W + x, a] = bilinear(na)[i, a, y, x] + (ha[0, i, y, 0, a] + wa[0, i, 0, x, a])
    agent_bias[0, i, a, p] = ac[0, i, a, p],  query_bias[0, i, p, a] = ca[0, i, p, a]   (zeros without ac / ca)

``bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)`` to ``(H, W)``. In training every agent
layer rebuilds them at every forward: in PyTorch that is about 14 kernels forward and 20 backward (two resizes with
their layout copies, the adds, the prefix ``cat``, the cast to the attention's dtype, and the reductions of the
backward), each with its launch and autograd node on the host, where the eager training steps of the agent models
are host-bound (``benchmarks/results/h200/host_overhead_train_ee6a326.log``). The Triton backend is one kernel
forward (both biases, cast included) and one backward (every table's gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import fp32_reference, reference_dtype
from ._dispatch import Op

__all__ = ["agent_position_biases", "agent_position_biases_reference"]

_NAME = "agent_position_biases"

Tables = tuple[torch.Tensor, ...]


def _check(tables: Tables, prefix: tuple[torch.Tensor | None, torch.Tensor | None], p: object, dtype: object) -> None:
    names = ("an_bias", "na_bias", "ah_bias", "aw_bias", "ha_bias", "wa_bias")
    for name, t in zip(names, tables, strict=True):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise ValueError(f"{_NAME}: {name} must be a floating tensor, got {getattr(t, 'dtype', type(t))}")
    an, na, ah, aw, ha, wa = tables
    if an.ndim != 4 or na.shape != an.shape:
        raise ValueError(f"{_NAME}: an_bias and na_bias must be [h, n, s, s'] of one shape, got "
                         f"{tuple(an.shape)} and {tuple(na.shape)}")  # fmt: skip
    h, n = an.shape[:2]
    if ah.ndim != 5 or aw.ndim != 5:
        raise ValueError(f"{_NAME}: ah_bias / aw_bias must be 5-D, got {tuple(ah.shape)} / {tuple(aw.shape)}")
    hh, ww = ah.shape[3], aw.shape[4]
    want = {"ah_bias": (1, h, n, hh, 1), "aw_bias": (1, h, n, 1, ww), "ha_bias": (1, h, hh, 1, n),
            "wa_bias": (1, h, 1, ww, n)}  # fmt: skip
    for (name, shape), t in zip(want.items(), (ah, aw, ha, wa), strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"{_NAME}: {name} must be {list(shape)} for h={h}, n={n} and the grid ({hh}, {ww}) "
                             f"of ah_bias / aw_bias, got {list(t.shape)}")  # fmt: skip
    if min(hh, ww) < 1 or min(an.shape[2:]) < 1:
        raise ValueError(f"{_NAME}: the grid ({hh}, {ww}) and the base tables' {tuple(an.shape[2:])} must be >= 1")
    if isinstance(p, bool) or not isinstance(p, int) or p < 0:
        raise ValueError(f"{_NAME}: num_prefix_tokens={p!r} must be an int >= 0")
    ac, ca = prefix
    if (ac is None) != (ca is None):
        raise ValueError(f"{_NAME}: pass both ac_bias and ca_bias or neither")
    if ac is not None:
        if not (isinstance(ac, torch.Tensor) and isinstance(ca, torch.Tensor)):
            raise ValueError(f"{_NAME}: ac_bias / ca_bias must be tensors, got {type(ac)} / {type(ca)}")
        if not (ac.is_floating_point() and ca.is_floating_point()):  # (complex lost its imaginary part, ints passed)
            raise ValueError(f"{_NAME}: ac_bias / ca_bias must be floating point, got {ac.dtype} / {ca.dtype}")
        if tuple(ac.shape) != (1, h, n, p) or tuple(ca.shape) != (1, h, p, n):
            raise ValueError(f"{_NAME}: with num_prefix_tokens={p}, ac_bias must be {[1, h, n, p]} and ca_bias "
                             f"{[1, h, p, n]}, got {list(ac.shape)} / {list(ca.shape)}")  # fmt: skip
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"{_NAME}: dtype={dtype!r} must be None or a floating torch.dtype")
    present = [t for t in (*tables, ac, ca) if t is not None]
    if len({t.device for t in present}) > 1:
        raise ValueError(f"{_NAME}: the tables are on several devices: {sorted({str(t.device) for t in present})}")


def _out_dtype(tables: Tables, prefix: tuple, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    out = tables[0].dtype
    for t in (*tables[1:], *prefix):
        if t is not None:
            out = torch.promote_types(out, t.dtype)
    return out


def _assemble(
    an: torch.Tensor, na: torch.Tensor, axes: Tables, prefix: tuple, p: int, bilinear
) -> tuple[torch.Tensor, torch.Tensor]:
    ah, aw, ha, wa = axes
    h, n = an.shape[:2]
    hh, ww = ah.shape[3], aw.shape[4]
    if an.numel() == 0:  # no heads or no agents (F.interpolate refuses empty channels): empty biases
        bilinear = lambda t, size: t.new_zeros(h, n, *size)  # noqa: E731
    agent = bilinear(an, (hh, ww)).reshape(1, h, n, hh * ww) + (ah + aw).reshape(1, h, n, hh * ww)
    query = bilinear(na, (hh, ww)).reshape(1, h, n, hh * ww).transpose(-1, -2) + (ha + wa).reshape(1, h, hh * ww, n)
    if p:
        ac, ca = prefix
        if ac is not None:
            agent = torch.cat([ac.to(agent.dtype), agent], dim=-1)
            query = torch.cat([ca.to(query.dtype), query], dim=-2)
        else:  # no prefix tables: prefix tokens attend and are attended unbiased
            agent = F.pad(agent, (p, 0))
            query = F.pad(query, (0, 0, p, 0))
    return agent, query


def agent_position_biases_reference(
    an_bias: torch.Tensor,
    na_bias: torch.Tensor,
    ah_bias: torch.Tensor,
    aw_bias: torch.Tensor,
    ha_bias: torch.Tensor,
    wa_bias: torch.Tensor,
    ac_bias: torch.Tensor | None = None,
    ca_bias: torch.Tensor | None = None,
    *,
    num_prefix_tokens: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Specification (module docstring), in float32 (float64 for float64 tables); returns ``dtype`` (default: the
    tables' promoted dtype)."""
    tables, prefix = (an_bias, na_bias, ah_bias, aw_bias, ha_bias, wa_bias), (ac_bias, ca_bias)
    _check(tables, prefix, num_prefix_tokens, dtype)
    out_dtype = _out_dtype(tables, prefix, dtype)
    rd = reference_dtype(_out_dtype(tables, prefix, None))

    def bilinear(t, size):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with fp32_reference(an_bias.device):
        up = tuple(t.to(rd) for t in tables)
        pre = tuple(None if t is None else t.to(rd) for t in prefix)
        agent, query = _assemble(up[0], up[1], up[2:], pre, num_prefix_tokens, bilinear)
    return agent.to(out_dtype), query.to(out_dtype)


def _bilinear_channels_last(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(t, size, mode="bilinear", align_corners=False)`` of the small ``[h, n, s, s']`` tables in
    channels-last layout: CUDA's NCHW kernel runs one thread per output pixel looping over all ``h * n`` channels
    (about 0.1 ms per call at 224 px, as long as the attention itself); the NHWC kernel spreads them."""
    out = F.interpolate(
        t.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear", align_corners=False
    )
    return out.contiguous()


def _native(
    an, na, ah, aw, ha, wa, ac=None, ca=None, *, num_prefix_tokens=0, dtype=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``"torch"`` backend: the module docstring's formula in the tables' dtype (resizes channels-last), then cast."""
    agent, query = _assemble(an, na, (ah, aw, ha, wa), (ac, ca), num_prefix_tokens, _bilinear_channels_last)
    out_dtype = _out_dtype((an, na, ah, aw, ha, wa), (ac, ca), dtype)
    return agent.to(out_dtype), query.to(out_dtype)


def _triton(an, na, ah, aw, ha, wa, ac=None, ca=None, *, num_prefix_tokens=0, dtype=None):
    from .triton.agent_bias import agent_position_biases_triton

    out_dtype = _out_dtype((an, na, ah, aw, ha, wa), (ac, ca), dtype)
    return agent_position_biases_triton(an, na, ah, aw, ha, wa, ac, ca, num_prefix_tokens, out_dtype)


def _triton_supports(an, na, ah, aw, ha, wa, ac=None, ca=None, *, num_prefix_tokens=0, dtype=None) -> list[str]:
    from .triton import triton_unavailable
    from .triton.agent_bias import grid_reasons

    tables = [t for t in (an, na, ah, aw, ha, wa, ac, ca) if t is not None]
    reasons = triton_unavailable(*tables)
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if len({t.dtype for t in tables}) > 1:
        reasons.append(f"tables in several dtypes {sorted({str(t.dtype) for t in tables})}")
    elif an.dtype not in allowed:
        reasons.append(f"dtype {an.dtype} (allowed: float16, bfloat16, float32)")
    if dtype is not None and dtype not in allowed:
        reasons.append(f"output dtype {dtype} (allowed: float16, bfloat16, float32)")
    h, n = an.shape[:2]
    return reasons + grid_reasons(tuple(an.shape[2:]), (ah.shape[3], aw.shape[4]), h, n, num_prefix_tokens)


_op = Op(_NAME)
_op.register("triton", _triton, _triton_supports)
# (no supports for these two: the public op's checks refuse non-floating tables before any backend is chosen)
_op.register("torch", _native)
_op.register("reference", agent_position_biases_reference)


def agent_position_biases(
    an_bias: torch.Tensor,
    na_bias: torch.Tensor,
    ah_bias: torch.Tensor,
    aw_bias: torch.Tensor,
    ha_bias: torch.Tensor,
    wa_bias: torch.Tensor,
    ac_bias: torch.Tensor | None = None,
    ca_bias: torch.Tensor | None = None,
    *,
    num_prefix_tokens: int = 0,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent attention's ``agent_bias`` ``[1, h, n, P + H*W]`` (agents x keys) and ``query_bias``
    ``[1, h, P + H*W, n]`` (queries x agents) from the authors' tables (module docstring), in ``dtype`` (default:
    the tables' promoted dtype). The grid ``(H, W)`` is that of ``ah_bias`` / ``aw_bias`` (resample them first for
    another grid: :func:`visionlin.layers.agent.resample_agent_biases`).

    Backends: ``"triton"`` (CUDA: one kernel forward, one backward; float32 math, one rounding to ``dtype``),
    ``"torch"`` (PyTorch ops in the tables' dtype, then a cast), ``"reference"`` (float32).

    Raises:
        ValueError: Tables that are not floating tensors of the shapes above (the message names the expected shape),
            only one of ``ac_bias`` / ``ca_bias``, prefix tables whose size is not ``num_prefix_tokens``, or a
            ``dtype`` that is not a floating dtype.
    """
    tables, prefix = (an_bias, na_bias, ah_bias, aw_bias, ha_bias, wa_bias), (ac_bias, ca_bias)
    _check(tables, prefix, num_prefix_tokens, dtype)
    return _op(*tables, *prefix, num_prefix_tokens=num_prefix_tokens, dtype=dtype, backend=backend)
