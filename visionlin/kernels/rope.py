"""2-D rotary position embedding (RoPE) of MAViT / RAVLT / NaLaFormer, heads-last ``[B, N, H, D]``.

For a ``(H, W)`` grid and head dim ``D`` (``D % 4 == 0``)::

    angle = 1 / theta ** linspace(0, 1, D/4)          # D/4 frequencies, both endpoints included
    angle = (a0, a0, a1, a1, ...)                     # each repeated twice -> D/2 values
    phase(i, j) = concat(i * angle, j * angle)        # token at row i, column j (index i*W + j): [D]

so the first ``D/2`` channels rotate with the ROW index and the last ``D/2`` with the COLUMN index. Channels are rotated
in adjacent pairs: ``rope(x) = x * cos(phase) + rotate_every_two(x) * sin(phase)`` with
``rotate_every_two(x)[2m], rotate_every_two(x)[2m+1] = -x[2m+1], x[2m]``. Rotated dot products therefore depend only on
the row and column offsets of the two tokens. Prefix (class) tokens get phase 0 (``sin = 0``, ``cos = 1``: identity).
"""

from __future__ import annotations

import torch

from ._common import check_heads_last, check_real

__all__ = [
    "RopeTables",
    "apply_rope_2d",
    "apply_rope_2d_pair",
    "check_rope_attention_args",
    "check_rope_tables",
    "maybe_apply_rope",
    "rope_2d_tables",
    "rotate_every_two",
]

#: ``(sin, cos)``, each ``[N, D]``.
RopeTables = tuple[torch.Tensor, torch.Tensor]


def rope_2d_tables(
    feat_size: tuple[int, int],
    head_dim: int,
    *,
    theta: float = 10000.0,
    num_prefix_tokens: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``sin`` and ``cos`` tables of the 2-D RoPE (module docstring).

    The phases are computed in float32 (float64 if ``dtype`` is float64), as the authors do, then cast to ``dtype``.

    Args:
        feat_size: Token grid ``(H, W)``; tokens are row-major.
        head_dim: Channels ``D`` per head; must be a multiple of 4.
        theta: Frequency base.
        num_prefix_tokens: Identity rows (``sin = 0``, ``cos = 1``) put before the grid rows, for class tokens.
        device: Device of the tables.
        dtype: Dtype of the tables (default float32).

    Returns:
        ``(sin, cos)``, each ``[num_prefix_tokens + H * W, D]``.

    Raises:
        ValueError: ``head_dim`` is not a positive multiple of 4, ``feat_size`` is not two positive ints,
            ``num_prefix_tokens`` is not an int ``>= 0``, ``theta`` is not finite and ``> 0`` or ``dtype`` is not a
            floating dtype (bools and floats are not ints here: ``feat_size=(7.5, 7)`` is refused, not truncated).
    """
    if not _is_int(head_dim) or head_dim <= 0 or head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim to be a positive multiple of 4, got {head_dim=}")
    if (
        not isinstance(feat_size, (tuple, list, torch.Size))
        or len(feat_size) != 2
        or not all(_is_int(s) and s >= 1 for s in feat_size)
    ):
        raise ValueError(f"2-D RoPE needs feat_size=(H, W), two integers >= 1, got {feat_size=}")
    if not _is_int(num_prefix_tokens) or num_prefix_tokens < 0:
        raise ValueError(f"{num_prefix_tokens=} must be an integer >= 0")
    check_real("rope_2d_tables", "theta", theta, low=0.0, low_open=True)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"rope_2d_tables: dtype={dtype!r} must be a floating-point torch.dtype (or None)")
    dtype = dtype or torch.float32
    work = torch.float64 if dtype == torch.float64 else torch.float32
    hh, ww = int(feat_size[0]), int(feat_size[1])
    # the angles run from 1 to 1 / theta, the phases up to max(H, W) x the largest: each must be finite in `work`
    # (theta=1e-40 gave NaN tables, theta=1e39 an infinite base and every angle but the first 0)
    top = torch.finfo(work).max
    if not (theta < top and max(hh, ww) / min(float(theta), 1.0) < top):
        raise ValueError(
            f"rope_2d_tables: theta={theta!r} overflows {work} angles or phases for feat_size={tuple(feat_size)} "
            f"(1 / theta and max(H, W) / min(theta, 1) must stay below {top:.3g}; RoPE uses theta around 10 to 1e4)"
        )
    angle = 1.0 / (theta ** torch.linspace(0, 1, head_dim // 4, device=device, dtype=work))
    angle = angle.repeat_interleave(2)  # [D/2]: a0, a0, a1, a1, ...
    rows = torch.arange(hh, device=device, dtype=work)[:, None] * angle  # [H, D/2]
    cols = torch.arange(ww, device=device, dtype=work)[:, None] * angle  # [W, D/2]
    phase = torch.cat([rows[:, None, :].expand(hh, ww, -1), cols[None, :, :].expand(hh, ww, -1)], dim=-1)
    phase = phase.reshape(hh * ww, head_dim)
    if num_prefix_tokens:
        phase = torch.cat([phase.new_zeros(num_prefix_tokens, head_dim), phase], dim=0)
    return phase.sin().to(dtype), phase.cos().to(dtype)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """Map each channel pair ``(x[2m], x[2m+1])`` of the last dim to ``(-x[2m+1], x[2m])``."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope_2d(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate heads-last ``x`` by the tables of :func:`rope_2d_tables`, in the dtype of ``x``.

    Args:
        x: Queries or keys ``[B, N, H, D]``.
        sin: ``[N, D]``.
        cos: ``[N, D]``.

    Returns:
        ``[B, N, H, D]``: ``x * cos + rotate_every_two(x) * sin`` (tables broadcast over batch and heads).

    Raises:
        ValueError: the tables are not ``[N, D]`` for ``x``.
    """
    check_rope_tables("apply_rope_2d", x, (sin, cos))
    sin = sin.to(x.dtype)[:, None, :]  # [N, 1, D]
    cos = cos.to(x.dtype)[:, None, :]
    return x * cos + rotate_every_two(x) * sin


def apply_rope_2d_pair(
    q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, *, fused: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_rope_2d` of the queries and the keys of one attention: ``(rope(q), rope(k))``.

    Args:
        q: Queries ``[B, N, H, D]``.
        k: Keys, the same shape, dtype and device as ``q``.
        sin: ``[N, D]``.
        cos: ``[N, D]``.
        fused: Rotate both in one Triton pass (forward and backward), in float32 from the tables, rounded once to the
            inputs' dtype, where it applies: CUDA inputs in float32 / float16 / bfloat16 and tables that take no
            gradient. Elsewhere (and with ``fused=False``) :func:`apply_rope_2d` twice, which rounds the tables to the
            inputs' dtype first.

    Raises:
        ValueError: the tables are not ``[N, D]`` for ``q``, ``k`` differs from ``q`` in shape, dtype or device, or
            ``fused`` is not a bool.
    """
    if not isinstance(fused, bool):
        raise ValueError(f"apply_rope_2d_pair: fused must be a bool, got {fused!r}")
    check_rope_tables("apply_rope_2d_pair", q, (sin, cos))
    if not isinstance(k, torch.Tensor) or (k.shape, k.dtype, k.device) != (q.shape, q.dtype, q.device):
        got = f"{tuple(k.shape)} {k.dtype} on {k.device}" if isinstance(k, torch.Tensor) else type(k).__name__
        raise ValueError(f"apply_rope_2d_pair: k must match q ({tuple(q.shape)} {q.dtype} on {q.device}), got {got}")
    if fused and _fused_pair_applies(q, sin, cos):
        from .triton.rope import rope_2d_pair_triton

        return rope_2d_pair_triton(q, k, sin, cos)
    return apply_rope_2d(q, sin, cos), apply_rope_2d(k, sin, cos)


def _fused_pair_applies(q: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether the Triton pair kernel takes these inputs (else the PyTorch ops do)."""
    grad_tables = torch.is_grad_enabled() and (sin.requires_grad or cos.requires_grad)
    return q.is_cuda and q.dtype in (torch.float32, torch.float16, torch.bfloat16) and not grad_tables


def check_rope_tables(op: str, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``rope = (sin, cos)`` are both ``[N, D]`` for heads-last ``x`` ``[B, N, H, D]``."""
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise ValueError(f"{op}: rope must be a (sin, cos) pair of [N, D] tables, got {type(rope).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: expected a floating heads-last [B, N, H, D] input, got {got}")
    n, d = x.shape[1], x.shape[-1]
    sin, cos = rope
    for name, t in (("sin", sin), ("cos", cos)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{op}: rope table {name} must be a floating-point tensor, got {got}")
        if t.device != x.device:
            raise ValueError(f"{op}: rope table {name} is on {t.device} but the input is on {x.device}")
    if tuple(sin.shape) != (n, d) or tuple(cos.shape) != (n, d):
        raise ValueError(
            f"{op}: rope tables must be [N, D] = {(n, d)} for input {tuple(x.shape)}, "
            f"got sin {tuple(sin.shape)} and cos {tuple(cos.shape)}"
        )
    if d % 2:
        raise ValueError(f"{op}: rotary channels come in pairs, got odd head dim {d=}")


def maybe_apply_rope(x: torch.Tensor, rope: RopeTables | None) -> torch.Tensor:
    """:func:`apply_rope_2d` with ``rope = (sin, cos)``, or ``x`` unchanged when ``rope`` is ``None``."""
    return x if rope is None else apply_rope_2d(x, *rope)


def check_rope_attention_args(
    op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: RopeTables | None, eps: float
) -> None:
    """Input checks shared by the RoPE linear attentions: heads-last q/k/v, ``[N, D]`` tables, finite ``eps >= 0``.

    Without RoPE the key length may differ from the query length; with it both must equal the tables' ``N``.

    Raises:
        ValueError: naming the offending shapes or values.
    """
    check_heads_last(op, q, k, v, same_length=rope is not None)
    if rope is not None:
        check_rope_tables(op, q, rope)
    check_real(op, "eps", eps)
