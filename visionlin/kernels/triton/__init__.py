"""Triton kernels for the functional ops, imported lazily on the first GPU dispatch (never by ``import visionlin``).

Each kernel family is wrapped as ``torch.library`` custom ops with fake (meta) and autograd registrations, so
``torch.compile(fullgraph=True)`` keeps them as single nodes. The math each one computes is the ``*_reference`` of
its op in :mod:`visionlin.kernels`.
"""

from __future__ import annotations

import importlib.util

import torch

__all__ = [
    "LINEAR_FEATURE_MAPS",
    "MAX_HEAD_DIM",
    "MAX_NORM_AWARE_HEAD_DIM",
    "MAX_GRID_YZ",
    "batch_grid_reasons",
    "head_dim_reasons",
    "heads_grid_reasons",
    "next_pow2",
    "rope_linear_reasons",
    "tile_dim",
    "triton_unavailable",
]

#: Feature maps the fused linear-attention kernels apply themselves (by name).
LINEAR_FEATURE_MAPS = ("identity", "relu", "elu", "sigmoid", "cosine")
#: Largest q/k and v head dims the kernels tile (a 128 x 128 float32 state per program).
MAX_HEAD_DIM = 128
#: Largest head dim of the fused NaLa kernels: its features are twice as wide (``2 D`` channels), and a 256-wide
#: float32 state spills registers for sm_90.
MAX_NORM_AWARE_HEAD_DIM = 64


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``), as ``triton.next_power_of_2`` on the host."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def tuning_flag(table: dict, owner: str, key: str, allow_none: bool = False) -> bool | None:
    """``table[key]`` (a kernel module's ``TUNING``, ``owner`` its module name) as a bool (or ``None`` where
    ``allow_none``: the module's default), else a ``ValueError`` naming it (the string ``"no"`` would read as on)."""
    value = table[key]
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        allowed = "None (the default), True or False" if allow_none else "True or False"
        raise ValueError(f"{owner}.TUNING[{key!r}] = {value!r}: must be {allowed}")
    return value


def tuning_int(
    table: dict, owner: str, key: str, least: int = 1, allow_none: bool = False, pow2: bool = False
) -> int | None:
    """``table[key]`` as an integer ``>= least`` (or ``None`` where ``allow_none``; a power of two where ``pow2``),
    else a ``ValueError`` naming it: a zero or negative count would divide by zero or silently change a launch, a float
    or a string would fail deep inside one."""
    value = table[key]
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        allowed = f"an integer >= {least}" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}.TUNING[{key!r}] = {value!r}: must be {allowed}")
    if pow2 and value & (value - 1):
        raise ValueError(f"{owner}.TUNING[{key!r}] = {value!r}: must be a power of two")
    return value


def tile_dim(d: int) -> int:
    """A head (or feature) dim as the kernels tile it: the next power of two, at least 16 (``tl.dot``'s smallest K /
    N); the padding lanes are masked."""
    return max(16, next_pow2(d))


# Looked up once, without importing Triton (a plain constant: torch.compile traces the supports() checks).
_IMPORT_REASON = None if importlib.util.find_spec("triton") else "triton is not installed (pip install triton)"


def triton_unavailable(*tensors: torch.Tensor) -> list[str]:
    """Reasons the Triton kernels cannot run on these tensors (empty if they can)."""
    reasons = [_IMPORT_REASON] if _IMPORT_REASON else []
    if any(t.device.type != "cuda" for t in tensors):
        reasons.append("tensors are not on a CUDA device")
    return reasons


#: What the per-row kernels (gated LayerNorm, LayerNorm, RMS mix) read: activations in one of these dtypes.
ROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def channel_rows_reasons(rows: dict[str, torch.Tensor], params, max_channels: int) -> list[str]:
    """Reasons the per-row Triton kernels cannot run on activations ``rows`` (name -> ``[..., C]`` tensor) with
    per-channel ``params`` (``None`` entries skipped): no Triton or CUDA, activations not of one dtype of
    :data:`ROW_DTYPES`, more than ``max_channels`` channels (the row block)."""
    tensors = list(rows.values())
    reasons = triton_unavailable(*tensors, *(t for t in params if t is not None))
    dtypes = [t.dtype for t in tensors]
    if len(set(dtypes)) > 1 or dtypes[0] not in ROW_DTYPES:
        names = list(rows)
        got = ", ".join(str(d) for d in dtypes)
        if len(names) == 1:
            reasons.append(f"needs {names[0]} in float16, bfloat16 or float32; got {got}")
        else:
            together = f"{', '.join(names[:-1])} and {names[-1]}"
            reasons.append(f"needs {together} of one dtype of float16, bfloat16, float32; got {got}")
    c = tensors[0].shape[-1]
    if c > max_channels:
        reasons.append(f"C={c} channels exceed one row block (allowed: 1 to {max_channels})")
    return reasons


#: CUDA's limit on a grid's second and third dimensions (kernels that put the samples there refuse more).
MAX_GRID_YZ = 65535


def batch_grid_reasons(batch: int) -> list[str]:
    """The reason (if any) kernels with a grid row per sample (on a grid's second or third dimension) cannot launch
    ``batch`` samples."""
    if batch > MAX_GRID_YZ:
        return [f"batch {batch} > {MAX_GRID_YZ} (the kernels' grid has a program row per sample)"]
    return []


def heads_grid_reasons(q: torch.Tensor) -> list[str]:
    """The reason (if any) kernels with a grid row per (sample, head) of heads-last ``q`` (``[B, ..., H, D]``, on a
    grid's second or third dimension) cannot launch it."""
    rows = q.shape[0] * q.shape[-2]
    if rows > MAX_GRID_YZ:
        return [f"batch x heads = {q.shape[0]} x {q.shape[-2]} = {rows} > {MAX_GRID_YZ} (the kernels' grid has a "
                "program row per sample and head)"]  # fmt: skip
    return []


def head_dim_reasons(q: torch.Tensor, v: torch.Tensor) -> list[str]:
    """The reason (if any) the kernels cannot tile these q/k and v head dims."""
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return [f"head dims D={q.shape[-1]}, Dv={v.shape[-1]} exceed the kernels' {MAX_HEAD_DIM} (allowed: 1 to "
                f"{MAX_HEAD_DIM})"]  # fmt: skip
    return []


def rope_linear_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, max_head_dim: int = MAX_HEAD_DIM
) -> list[str]:
    """Reasons the fused MALA / RALA / NaLa / Efficient Attention kernels (``triton/rope_linear.py``) cannot run
    these tensors (empty if they can)."""
    reasons = triton_unavailable(q, k, v)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len({q.dtype, k.dtype, v.dtype}) > 1:
        reasons.append(f"needs one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if max_head_dim < MAX_HEAD_DIM and q.shape[-1] > max_head_dim:
        reasons.append(f"head dim D={q.shape[-1]} exceeds this kernel's {max_head_dim} (allowed: 1 to {max_head_dim})")
    return reasons + head_dim_reasons(q, v) + heads_grid_reasons(q)
