"""Linear recurrences with input-dependent decays: the selective scan (Mamba S6) and gated linear attention (GLA).

Both are causal along the sequence axis; vision models make them non-causal (bidirectional) by scanning both ways
(ViG) or by scanning inside windows next to a non-SSM branch (MambaVision).

* :func:`selective_scan` (Mamba-1, ``mamba_ssm.selective_scan_fn`` semantics, sequence-major layout)::

      delta = softplus(delta + delta_bias)              (each optional)
      h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t   h: [D, N] per batch, A: [D, N] (A <= 0)
      y_t = <h_t, C_t>_N + D * u_t                       then y *= silu(z) if z is given

* :func:`gated_linear_attention` (GLA, per-key-channel forget gates ``g = log f <= 0``)::

      S_t = diag(exp g_t) S_{t-1} + k_t v_t^T            S: [K, V] per batch and head
      o_t = scale * q_t^T S_t

* :func:`bidirectional_gated_linear_attention` (ViG): ``(o_fwd + o_bwd) / 2`` where the backward pass runs the same
  recurrence from the end of the sequence with its own gates; both include the current token.

Layouts (heads-last, sequence-major, as every op here): scan ``u, delta, z: [B, L, D]``, ``B, C: [B, L, N]`` or grouped
``[B, L, G, N]`` (channel ``d`` reads group ``d // (D / G)``); GLA ``q, k, g: [B, L, H, K]``, ``v: [B, L, H, V]``.
Mamba's own layout is ``[B, D, L]`` / ``[B, N, L]``: transpose the last two axes.

The references are parallel and stable. Every exponential is taken of a sum of log-decays (``delta * A`` or ``g``),
which is never positive, so nothing overflows for any step size or length:

* the selective scan runs a chunked associative scan of the pairs ``(a, x)`` (``h = exp(a) h' + x``): inside a chunk a
  Hillis-Steele scan in ``log2(chunk)`` vectorised steps, where the log-decays of a window are summed directly (no
  difference of prefix sums, so no cancellation); across chunks the same scan on the chunk summaries, recursively;
* GLA takes, inside a chunk, the segment sums ``sum_{s < r <= t} g_r`` (masked cumulative sums, Mamba-2's ``segsum``)
  as the exponents of a ``T x T`` decay matrix per key channel, and carries the ``[K, V]`` chunk states across chunks
  with the same scan.

Computation is in float32 (float64 for float64 inputs) with autocast disabled; outputs take the input dtype.
Backends: ``"reference"`` (any device, forward and backward); the selective scan's ``"triton"`` backend (a chunked
scan, :mod:`visionlin.kernels.triton.scan`) and GLA's (chunked, :mod:`visionlin.kernels.triton.gla`) register ahead
of it. Math: ``docs/mechanisms/scan.md``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F

from ._common import fp32_reference, reference_dtype, supports_floating, values_are_checkable
from ._dispatch import Op

__all__ = [
    "bidirectional_gated_linear_attention",
    "bidirectional_gated_linear_attention_qkv",
    "bidirectional_gated_linear_attention_reference",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "linear_scan_reference",
    "selective_scan",
    "selective_scan_reference",
]

_SCAN = "selective_scan"
_GLA = "gated_linear_attention"
_BIGLA = "bidirectional_gated_linear_attention"


# The associative scan ------------------------------------------------------------------------------------------------
def _scan_chunks(a: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive Hillis-Steele scan along dim 2 of ``[B, C, T, K]``: returns ``(A, H)`` with ``A_t`` the summed
    log-decay of positions ``0..t`` of the chunk and ``H_t`` the state at ``t`` started from zero.

    Pairs compose as ``(a1, x1) then (a2, x2) = (a1 + a2, exp(a2) x1 + x2)``; the identity ``(0, 0)`` pads the front.
    """
    length = a.shape[2]
    offset = 1
    while offset < length:
        x = x + torch.exp(a) * F.pad(x[:, :, :-offset], (0, 0, offset, 0))
        a = a + F.pad(a[:, :, :-offset], (0, 0, offset, 0))
        offset *= 2
    return a, x


def _linear_scan(a: torch.Tensor, x: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int) -> torch.Tensor:
    """``h_t = exp(a_t) h_{t-1} + x_t`` along dim 1 of ``[B, L, K]`` (``h_{-1}`` = ``initial_state`` ``[B, K]`` or 0);
    returns every ``h_t`` ``[B, L, K]``."""
    b, length, k = x.shape
    if length <= chunk_size:
        decay, h = _scan_chunks(a[:, None], x[:, None])
        decay, h = decay[:, 0], h[:, 0]
        return h if initial_state is None else h + torch.exp(decay) * initial_state[:, None]
    n = -(-length // chunk_size)
    pad = n * chunk_size - length
    a = F.pad(a, (0, 0, 0, pad)).view(b, n, chunk_size, k)  # (0, 0) pairs: identity steps
    x = F.pad(x, (0, 0, 0, pad)).view(b, n, chunk_size, k)
    decay, h = _scan_chunks(a, x)  # [B, n, T, K] each, per chunk from a zero state
    ends = _linear_scan(decay[:, :, -1], h[:, :, -1], initial_state, chunk_size)  # state after each chunk
    first = torch.zeros_like(ends[:, :1]) if initial_state is None else initial_state[:, None].to(ends.dtype)
    entry = torch.cat([first, ends[:, :-1]], dim=1)  # state entering each chunk, [B, n, K]
    h = h + torch.exp(decay) * entry[:, :, None]
    return h.reshape(b, n * chunk_size, k)[:, :length]


def linear_scan_reference(
    log_decay: torch.Tensor,
    x: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> torch.Tensor:
    """The first-order linear recurrence ``h_t = exp(a_t) * h_{t-1} + x_t`` along dim 1, elementwise over the rest.

    Args:
        log_decay: ``a`` ``[B, L, *S]``, every entry ``<= 0`` (a decay in ``(0, 1]``; ``-inf`` resets the state).
        x: Inputs ``[B, L, *S]``.
        initial_state: ``h_{-1}`` ``[B, *S]`` (zeros if ``None``).
        chunk_size: Positions per chunk of the parallel scan (performance only).

    Returns:
        Every state ``h`` ``[B, L, *S]``, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: mismatched shapes, non-floating dtypes or a bad ``chunk_size``.
    """
    op = "linear_scan"
    _check_chunk(op, chunk_size, minimum=2)
    for name, t in (("log_decay", log_decay), ("x", x)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 2:
            raise ValueError(f"{op}: {name} must be a floating-point tensor [B, L, ...], got {_describe(t)}")
    if log_decay.shape != x.shape:
        raise ValueError(f"{op}: log_decay and x shapes differ: {tuple(log_decay.shape)} vs {tuple(x.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"{op}: initial_state must be [B, *S] = {(x.shape[0], *x.shape[2:])}, got {tuple(initial_state.shape)}"
        )
    dt = reference_dtype(x.dtype)
    b, length = x.shape[:2]
    k = math.prod(x.shape[2:])
    with fp32_reference(x.device):
        h0 = None if initial_state is None else initial_state.to(dt).reshape(b, k)
        h = _linear_scan(log_decay.to(dt).reshape(b, length, k), x.to(dt).reshape(b, length, k), h0, chunk_size)
    return h.reshape(x.shape)


# Checks ---------------------------------------------------------------------------------------------------------------
def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def _check_chunk(op: str, chunk_size: Any, minimum: int = 1) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < minimum:
        raise ValueError(f"{op}: chunk_size={chunk_size!r} must be an integer >= {minimum}")


def _check_tensor(
    op: str, name: str, t: Any, shape: tuple[int, ...], layout: str, device: torch.device, lead: str = "u"
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor {layout}={shape}, got {type(t).__name__}")
    if t.is_complex():
        raise NotImplementedError(f"{op}: complex {name} ({t.dtype}) is not supported; pass real tensors")
    if not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be floating point, got {name}.dtype={t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must be {layout}={tuple(shape)}, got {name}.shape={tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, {lead} is on {device}")


def _check_nonpositive(op: str, name: str, t: torch.Tensor) -> None:
    """Eager-only value check (skipped while tracing / compiling): every entry finite and ``<= 0``."""
    if t.numel() == 0 or not values_are_checkable(t):
        return
    with torch.no_grad():
        bad = t[~(torch.isfinite(t) & (t <= 0))]
    if bad.numel():
        raise ValueError(
            f"{op}: every entry of {name} must be finite and <= 0 (a decay exp({name}) <= 1); {bad.numel()} of "
            f"{t.numel()} are not (e.g. {bad.flatten()[:4].tolist()})"
        )


def _check_scan_args(
    u: Any,
    delta: Any,
    A: Any,
    B: Any,
    C: Any,
    D: Any,
    z: Any,
    delta_bias: Any,
    delta_softplus: Any,
    return_last_state: Any,
    chunk_size: Any,
    check_values: Any = True,
) -> None:
    op = _SCAN
    if not isinstance(u, torch.Tensor) or u.ndim != 3:
        raise ValueError(f"{op}: u must be a tensor [B, L, D], got {_describe(u)}")
    if u.is_complex() or not u.is_floating_point():
        raise ValueError(f"{op}: u must be real floating point, got u.dtype={u.dtype}")
    b, length, d = u.shape
    _check_tensor(op, "delta", delta, (b, length, d), "[B, L, D]", u.device)
    if not isinstance(A, torch.Tensor) or A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"{op}: A must be a tensor [D, N] with D={d} (u's channels), got {_describe(A)}")
    n = A.shape[1]
    _check_tensor(op, "A", A, (d, n), "[D, N]", u.device)
    for name, t in (("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or t.ndim not in (3, 4):
            raise ValueError(f"{op}: {name} must be [B, L, N] or grouped [B, L, G, N], got {_describe(t)}")
        groups = t.shape[2] if t.ndim == 4 else 1
        shape = (b, length, n) if t.ndim == 3 else (b, length, groups, n)
        _check_tensor(op, name, t, shape, "[B, L, N]" if t.ndim == 3 else "[B, L, G, N]", u.device)
        if groups < 1 or d % groups:
            raise ValueError(f"{op}: {name} has G={groups} groups, which must divide the D={d} channels")
    if D is not None:
        _check_tensor(op, "D", D, (d,), "[D]", u.device)
    if z is not None:
        _check_tensor(op, "z", z, (b, length, d), "[B, L, D]", u.device)
    if delta_bias is not None:
        _check_tensor(op, "delta_bias", delta_bias, (d,), "[D]", u.device)
    for name, flag in (("delta_softplus", delta_softplus), ("return_last_state", return_last_state)):
        if not isinstance(flag, bool):
            raise ValueError(f"{op}: {name}={flag!r} must be True or False")
    _check_chunk(op, chunk_size, minimum=2)  # chunks of 1 would not shorten the sequence
    if not isinstance(check_values, bool):
        raise ValueError(f"{op}: check_values={check_values!r} must be True or False")
    if check_values:
        _check_nonpositive(op, "A", A)


def _expand_groups(t: torch.Tensor, channels: int) -> torch.Tensor:
    """``[B, L, N]`` -> ``[B, L, 1, N]``; grouped ``[B, L, G, N]`` -> ``[B, L, D, N]`` (channel ``d``: group
    ``d // (D / G)``)."""
    if t.ndim == 3:
        return t[:, :, None]
    return t.repeat_interleave(channels // t.shape[2], dim=2)


# Selective scan -------------------------------------------------------------------------------------------------------
def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    return_last_state: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan (Mamba S6), as ``mamba_ssm.selective_scan_fn`` with the sequence axis before channels.

    Args:
        u: Inputs ``[B, L, D]``.
        delta: Step sizes ``[B, L, D]`` (before ``delta_bias`` / softplus); the effective step must be ``>= 0``.
        A: State matrix (diagonal) ``[D, N]``, every entry ``<= 0`` (Mamba's ``-exp(A_log)``).
        B: Input projections ``[B, L, N]``, or ``[B, L, G, N]`` for ``G`` channel groups.
        C: Output projections, as ``B``.
        D: Skip ``[D]`` (``y += D * u``).
        z: Gate ``[B, L, D]`` (``y *= silu(z)``).
        delta_bias: Added to ``delta`` ``[D]`` before the softplus.
        delta_softplus: Apply ``softplus`` (PyTorch's, threshold 20) to the step sizes.
        return_last_state: Also return the final state ``h_{L-1}`` ``[B, D, N]`` (float32 / float64).
        chunk_size: Positions per chunk of the parallel scan (performance only).

    Returns:
        ``y`` ``[B, L, D]`` in ``u``'s dtype, or ``(y, last_state)``.

    Raises:
        ValueError: shapes that do not fit (named), non-floating dtypes, ``A`` not finite and ``<= 0`` (eager only),
            a bad ``chunk_size``.
        NotImplementedError: complex ``A`` / ``B`` / ``C`` (Mamba's complex variant).
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size)
    dt = reference_dtype(u.dtype)
    b, length, d = u.shape
    n = A.shape[1]
    with fp32_reference(u.device):
        uf = u.to(dt)
        step = delta.to(dt)  # [B, L, D]
        if delta_bias is not None:
            step = step + delta_bias.to(dt)
        if delta_softplus:
            step = F.softplus(step)
        log_decay = step[..., None] * A.to(dt)  # [B, L, D, N], <= 0
        inputs = (step * uf)[..., None] * _expand_groups(B.to(dt), d)  # [B, L, D, N]
        h = _linear_scan(log_decay.reshape(b, length, d * n), inputs.reshape(b, length, d * n), None, chunk_size)
        h = h.view(b, length, d, n)
        y = torch.einsum("bldn,bldn->bld", h, _expand_groups(C.to(dt), d).expand(b, length, d, n))
        if D is not None:
            y = y + uf * D.to(dt)
        if z is not None:
            y = y * F.silu(z.to(dt))
    out = y.to(u.dtype)
    if return_last_state:
        last = h[:, -1] if length else torch.zeros(b, d, n, dtype=dt, device=u.device)
        return out, last
    return out


def _scan_reference_backend(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    z: torch.Tensor | None,
    *,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    chunk_size: int,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    return selective_scan_reference(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        return_last_state=return_last_state,
        chunk_size=chunk_size,
    )


_SCAN_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCAN_MAX_STATE = 64  # triton.scan.MAX_STATE, kept here so supports() never imports Triton


def _scan_triton_supports(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    z: torch.Tensor | None,
    *,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    **kwargs: Any,
) -> list[str]:
    from .triton import batch_grid_reasons, triton_unavailable

    tensors = [t for t in (u, delta, B, C, z, A, D, delta_bias) if t is not None]
    reasons = triton_unavailable(*tensors)
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in _SCAN_TRITON_DTYPES})
    if bad:
        reasons.append(f"dtypes {', '.join(bad)} (the Triton scan takes float32, float16, bfloat16)")
    if A.shape[1] > _SCAN_MAX_STATE:
        reasons.append(f"state size N={A.shape[1]} exceeds the Triton scan's {_SCAN_MAX_STATE} (allowed: 1 to 64)")
    return reasons + batch_grid_reasons(u.shape[0])  # the batch runs on the launch grid's second axis


def _scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    z: torch.Tensor | None,
    *,
    A: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    chunk_size: int,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``"triton"`` backend: :mod:`visionlin.kernels.triton.scan` (its own chunk length; ``chunk_size`` is the
    reference's performance knob)."""
    from .triton.scan import selective_scan_triton

    return selective_scan_triton(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=return_last_state
    )


# The activations (u, delta, B, C, z) are positional: backends' supports() and the dtype checks read them. The
# parameters (A, D, delta_bias) are keywords: float32 by Mamba's convention whatever the activations' dtype.
_scan_op = Op(_SCAN)
_scan_op.register("triton", _scan_triton, _scan_triton_supports)  # preferred: see docs/kernels.md for its GPU runs
_scan_op.register("reference", _scan_reference_backend, supports_floating)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    return_last_state: bool = False,
    chunk_size: int = 64,
    check_values: bool = True,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The selective scan (Mamba S6); see :func:`selective_scan_reference` for the arguments and the math.

    ``check_values=False`` skips the eager check that ``A`` is finite and ``<= 0``: it reads ``A``'s values, a host
    sync per call on a GPU (a layer passing ``-exp(A_log)`` has it by construction; the reference always checks).

    Backends, in automatic-selection order: ``"triton"`` (CUDA; float32 / float16 / bfloat16; ``N <= 64``; a chunked
    scan with a float32 state, forward and backward, :mod:`visionlin.kernels.triton.scan`) and ``"reference"`` (any
    floating dtypes and devices, forward and backward).

    Raises:
        ValueError: bad shapes, dtypes or values (see the reference).
        NotImplementedError: complex inputs, or ``backend`` cannot run the call (with its reasons).
    """
    _check_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size, check_values)
    return _scan_op(
        u,
        delta,
        B,
        C,
        z,
        A=A,
        D=D,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
        chunk_size=chunk_size,
        backend=backend,
    )


# Gated linear attention ----------------------------------------------------------------------------------------------
def _check_gla_args(op: str, q: Any, k: Any, v: Any, gates: dict[str, Any], scale: Any, chunk_size: Any) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"{op}: {name} must be a heads-last tensor [B, L, H, D], got {_describe(t)}")
    if not (q.is_floating_point() and k.is_floating_point() and v.is_floating_point()):
        raise ValueError(f"{op}: q, k and v must be floating point, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if q.shape != k.shape:
        raise ValueError(f"{op}: q and k must have one shape [B, L, H, K], got {q.shape=}, {k.shape=}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, L, H, V] with q's B, L, H, got {q.shape=}, {v.shape=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: key head dim K = 0 (got {q.shape=}); K must be >= 1")
    for name, g in gates.items():
        _check_tensor(op, name, g, tuple(q.shape), "[B, L, H, K]", q.device, lead="q")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not -math.inf < scale < math.inf
    ):
        raise ValueError(f"{op}: scale={scale!r} must be a finite real number or None")
    _check_chunk(op, chunk_size)


def _gla_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float, chunk_size: int
) -> torch.Tensor:
    """Forward GLA in float32 / float64 on ``[B, L, H, K]`` / ``[B, L, H, V]``: intra-chunk decay matrices from
    segment sums of ``g``, chunk states ``[K, V]`` carried by :func:`_linear_scan`."""
    b, length, h, dk = q.shape
    dv = v.shape[-1]
    t = min(chunk_size, length)
    n = -(-length // t)
    pad = n * t - length

    def chunks(x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, 0, 0, pad)).view(b, n, t, h, x.shape[-1])  # [B, n, T, H, .]

    q, k, v, g = chunks(q), chunks(k), chunks(v), chunks(g)
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [t, s]: s <= t
    # segsum[t, s] = sum_{s < r <= t} g_r (masked cumulative sums, no difference of prefix sums); -inf above the
    # diagonal, so exp() sees only values <= 0.
    rows = g[:, :, :, None].expand(b, n, t, t, h, dk)  # [B, n, r, s, H, K]: rows[.., r, s] = g_r
    strict = causal.tril(-1)[None, None, :, :, None, None]  # r > s
    segsum = torch.cumsum(rows.masked_fill(~strict, 0.0), dim=2)
    segsum = segsum.masked_fill(~causal[None, None, :, :, None, None], float("-inf"))
    decay = torch.exp(segsum)  # [B, n, t, s, H, K]
    scores = torch.einsum("bcthk,bcshk,bctshk->bctsh", q, k, decay)
    out = torch.einsum("bctsh,bcshv->bcthv", scores, v)
    # Chunk states from a zero start: sum_s (k_s * exp(sum_{s < r <= T-1} g_r)) v_s^T, then carried across chunks.
    local = torch.einsum("bcshk,bcshv->bchkv", k * decay[:, :, -1], v)  # [B, n, H, K, V]
    total = torch.cumsum(g, dim=2)  # sum_{r <= t} g_r within the chunk, [B, n, T, H, K]
    chunk_decay = total[:, :, -1, :, :, None].expand(b, n, h, dk, dv)
    state = h * dk * dv
    ends = _linear_scan(chunk_decay.reshape(b, n, state), local.reshape(b, n, state), None, 64).view(b, n, h, dk, dv)
    entry = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)  # state entering each chunk
    out = out + torch.einsum("bcthk,bchkv->bcthv", q * torch.exp(total), entry)
    return (out * scale).reshape(b, n * t, h, dv)[:, :length]


def gated_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    reverse: bool = False,
    chunk_size: int = 16,
) -> torch.Tensor:
    """Gated linear attention, one direction (fla's ``naive_recurrent_gla`` semantics, heads-last).

    ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * q_t^T S_t`` (``S_{-1} = 0``); with ``reverse`` the
    recurrence runs from the last position to the first.

    Args:
        q: Queries ``[B, L, H, K]``.
        k: Keys ``[B, L, H, K]``.
        v: Values ``[B, L, H, V]``.
        g: Log forget gates ``[B, L, H, K]``, every entry ``<= 0`` (e.g. ``logsigmoid(x) / 16``).
        scale: Query scale (default ``K ** -0.5``).
        reverse: Scan from the end.
        chunk_size: Positions per chunk (performance only; memory grows with ``chunk_size * K`` per token).

    Returns:
        ``o`` ``[B, L, H, V]`` in ``v``'s dtype.

    A NaN or infinite ``k`` or ``v`` makes every output of its chunk non-finite, the positions before it included
    (the chunk's products give masked pairs a weight of 0, and 0 times inf is NaN, as in causal SDPA), and every
    later one; finite inputs are never affected by this. ``g`` is not checked for ``<= 0`` (that would read the
    tensor on the host): a positive gate grows the state and may overflow.

    Raises:
        ValueError: shapes that do not fit (named), non-floating dtypes, a non-finite ``scale``, a bad
            ``chunk_size``.
    """
    _check_gla_args(_GLA, q, k, v, {"g": g}, scale, chunk_size)
    if not isinstance(reverse, bool):
        raise ValueError(f"{_GLA}: reverse={reverse!r} must be True or False")
    if q.shape[1] * q.shape[2] * v.shape[-1] == 0:  # B = 0 runs through (no guard on a dynamic batch)
        return v.new_zeros(v.shape)
    dt = reference_dtype(v.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with fp32_reference(q.device):
        args = [t.to(dt) for t in (q, k, v, g)]
        if reverse:
            args = [t.flip(1) for t in args]
        out = _gla_chunked(*args, scale, chunk_size)
        if reverse:
            out = out.flip(1)
    return out.to(v.dtype)


def bidirectional_gated_linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """ViG's bidirectional GLA: ``(o_fwd + o_bwd) / 2``, both directions sharing ``q, k, v`` with their own gates.

    ``o_fwd`` is :func:`gated_linear_attention_reference` with ``g_fwd``; ``o_bwd`` runs ``R_t = diag(exp g_bwd_t)
    R_{t+1} + k_t v_t^T``, ``o_bwd_t = scale * q_t^T R_t`` (both include the current token). Arguments as
    :func:`gated_linear_attention_reference`; ``g_fwd`` and ``g_bwd`` ``[B, L, H, K]``, entries ``<= 0``.

    Returns:
        ``o`` ``[B, L, H, V]`` in ``v``'s dtype.
    """
    _check_gla_args(_BIGLA, q, k, v, {"g_fwd": g_fwd, "g_bwd": g_bwd}, scale, chunk_size)
    if q.shape[1] * q.shape[2] * v.shape[-1] == 0:  # B = 0 runs through (no guard on a dynamic batch)
        return v.new_zeros(v.shape)
    dt = reference_dtype(v.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with fp32_reference(q.device):
        q32, k32, v32 = (t.to(dt) for t in (q, k, v))
        # Both directions in one batch: the backward one on flipped sequences.
        both = _gla_chunked(
            torch.cat([q32, q32.flip(1)]),
            torch.cat([k32, k32.flip(1)]),
            torch.cat([v32, v32.flip(1)]),
            torch.cat([g_fwd.to(dt), g_bwd.to(dt).flip(1)]),
            scale,
            chunk_size,
        )
        b = q.shape[0]
        out = (both[:b] + both[b:].flip(1)) / 2
    return out.to(v.dtype)


_GLA_MAX_DIM = 64  # triton.gla.MAX_KEY_DIM / MAX_VALUE_DIM, kept here so supports() never imports Triton


def _gla_triton_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *gates: torch.Tensor, **kwargs: Any
) -> list[str]:
    from .triton import heads_grid_reasons, triton_unavailable

    tensors = [q, k, v, *gates]
    reasons = triton_unavailable(*tensors)
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in _SCAN_TRITON_DTYPES})
    if bad:
        reasons.append(f"dtypes {', '.join(bad)} (the Triton GLA kernels take float32, float16, bfloat16)")
    if max(q.shape[-1], v.shape[-1]) > _GLA_MAX_DIM:
        reasons.append(
            f"head dims K={q.shape[-1]}, V={v.shape[-1]} exceed the Triton GLA kernels' {_GLA_MAX_DIM} (allowed: 1 to "
            f"{_GLA_MAX_DIM}: a larger [K, V] state spills registers)"
        )
    reasons += heads_grid_reasons(q)
    return reasons


def _gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    reverse: bool = False,
    chunk_size: int = 16,
) -> torch.Tensor:
    """``"triton"`` backend: :mod:`visionlin.kernels.triton.gla` (chunks of 16; ``chunk_size`` is the reference's)."""
    from .triton.gla import gla_triton

    return gla_triton(q, k, v, g, scale=scale, reverse=reverse)


def _bigla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """``"triton"`` backend: two directions of :mod:`visionlin.kernels.triton.gla`, summed in float32."""
    from .triton.gla import bidirectional_gla_triton

    return bidirectional_gla_triton(q, k, v, g_fwd, g_bwd, scale=scale)


# fla's chunk_gla / fused_recurrent_gla(reverse=True) would register before "triton".
_gla_op = Op(_GLA)
_gla_op.register("triton", _gla_triton, _gla_triton_supports)  # preferred: every GPU test passed at dee6de5
_gla_op.register("reference", gated_linear_attention_reference, supports_floating)
_bigla_op = Op(_BIGLA)
_bigla_op.register("triton", _bigla_triton, _gla_triton_supports)  # preferred: every GPU test passed at dee6de5
_bigla_op.register("reference", bidirectional_gated_linear_attention_reference, supports_floating)


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    reverse: bool = False,
    chunk_size: int = 16,
    backend: str | None = None,
) -> torch.Tensor:
    """Gated linear attention, one direction; see :func:`gated_linear_attention_reference`.

    Backends, in automatic-selection order: ``"triton"`` (CUDA; float32 / float16 / bfloat16; head dims up to 64;
    chunked, forward and backward, :mod:`visionlin.kernels.triton.gla`) and ``"reference"``.

    Raises:
        ValueError: bad shapes, dtypes or arguments (see the reference).
        NotImplementedError: ``backend`` cannot run the call (with its reasons).
    """
    _check_gla_args(_GLA, q, k, v, {"g": g}, scale, chunk_size)
    return _gla_op(q, k, v, g, scale=scale, reverse=reverse, chunk_size=chunk_size, backend=backend)


def bidirectional_gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
    backend: str | None = None,
) -> torch.Tensor:
    """ViG's bidirectional gated linear attention; see :func:`bidirectional_gated_linear_attention_reference`.

    Backends, in automatic-selection order: ``"triton"`` (as :func:`gated_linear_attention`'s: a forward and a
    reversed call summed in float32) and ``"reference"``.

    Raises:
        ValueError: bad shapes, dtypes or arguments (see the reference).
        NotImplementedError: ``backend`` cannot run the call (with its reasons).
    """
    _check_gla_args(_BIGLA, q, k, v, {"g_fwd": g_fwd, "g_bwd": g_bwd}, scale, chunk_size)
    return _bigla_op(q, k, v, g_fwd, g_bwd, scale=scale, chunk_size=chunk_size, backend=backend)


def gla_packed_views(qkv: torch.Tensor, gates: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """``q, k, v, g_fwd, g_bwd`` ``[B, L, H, *]`` as views of ViG's packed projections ``qkv`` ``[B, L, 2 K + V]`` and
    ``gates`` ``[B, L, 2 K]`` (``K = gates.shape[-1] // 2``; head dims ``K / num_heads`` and ``V / num_heads``): what
    :func:`bidirectional_gated_linear_attention_qkv`, its Triton op and ViG's split call take apart (no checks)."""
    kw = gates.shape[-1] // 2
    q, k, v = qkv.split([kw, kw, qkv.shape[-1] - 2 * kw], dim=-1)
    return tuple(t.unflatten(-1, (num_heads, -1)) for t in (q, k, v, *gates.split([kw, kw], dim=-1)))


def bidirectional_gated_linear_attention_qkv(
    qkv: torch.Tensor,
    gates: torch.Tensor,
    num_heads: int,
    *,
    scale: float | None = None,
    chunk_size: int = 16,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`bidirectional_gated_linear_attention` of ``q, k, v`` packed in one projection's output and the two
    directions' gates in another's, as ViG's layer makes them: ``qkv`` ``[B, L, 2 K + V]`` (``q``, ``k``, ``v`` along
    the last dim, each ``num_heads`` heads), ``gates`` ``[B, L, 2 K]`` (``g_fwd``, ``g_bwd``); ``K`` is
    ``gates.shape[-1] / 2``. The same result ``[B, L, H, V / H]`` and backends; the ``"triton"`` backend's backward
    writes one gradient for ``qkv`` and one for ``gates`` instead of ten that autograd sums and concatenates (the two
    directions' ``dq``, ``dk``, ``dv`` and gates' gradients: one fused kernel of 0.84 ms in a 29.8 ms ViG-S training
    step under CUDA graphs, H200, stop 38).

    Raises:
        ValueError: ``qkv`` / ``gates`` not tensors ``[B, L, C]`` with one ``B, L``, widths that do not split into
            ``num_heads`` heads as above (the message names them), and everything
            :func:`bidirectional_gated_linear_attention` refuses.
        NotImplementedError: ``backend`` cannot run the call (with its reasons).
    """
    op = "bidirectional_gated_linear_attention_qkv"
    for name, t in (("qkv", qkv), ("gates", gates)):
        if not isinstance(t, torch.Tensor) or t.ndim != 3:
            raise ValueError(f"{op}: {name} must be a tensor [B, L, C], got {_describe(t)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"{op}: num_heads={num_heads!r} must be an integer >= 1")
    if qkv.shape[:2] != gates.shape[:2]:
        raise ValueError(f"{op}: qkv and gates must share B, L, got {tuple(qkv.shape)=}, {tuple(gates.shape)=}")
    key_width = gates.shape[-1] // 2
    value_width = qkv.shape[-1] - 2 * key_width
    if gates.shape[-1] % (2 * num_heads) or key_width == 0 or value_width < num_heads or value_width % num_heads:
        raise ValueError(
            f"{op}: gates [B, L, 2 K] and qkv [B, L, 2 K + V] with K and V positive multiples of {num_heads=}; got "
            f"gates width {gates.shape[-1]} (K = {gates.shape[-1] / 2:g}) and qkv width {qkv.shape[-1]} (V = "
            f"{qkv.shape[-1] - gates.shape[-1]})"
        )
    q, k, v, g_fwd, g_bwd = gla_packed_views(qkv, gates, num_heads)
    try:
        _check_gla_args(_BIGLA, q, k, v, {"g_fwd": g_fwd, "g_bwd": g_bwd}, scale, chunk_size)
    except ValueError as e:  # named as this function's call
        raise ValueError(
            f"{op} (q, k, v and g_fwd, g_bwd split from qkv and gates): {str(e).removeprefix(_BIGLA + ': ')}"
        ) from None
    chosen = _bigla_op.select(q, k, v, g_fwd, g_bwd, scale=scale, chunk_size=chunk_size, backend=backend, caller=op)
    if chosen.name == "triton":
        from .triton.gla import bidirectional_gla_triton_qkv

        return bidirectional_gla_triton_qkv(qkv, gates, num_heads, scale=scale)
    return chosen.fn(q, k, v, g_fwd, g_bwd, scale=scale, chunk_size=chunk_size)
