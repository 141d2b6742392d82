"""A cheaper host path for launching the Triton kernels.

``kernel[grid](*args, **kwargs)`` runs Triton's generic launcher in Python: it binds the arguments to the signature,
specialises each one, hashes the specialisation with the options, looks the compiled kernel up, then launches it.
On the H200 host of ``benchmarks/results/h200/host_stacks_infer_bb00715.log`` that took ~80 us per launch, and the
224 px forwards were host-bound (InfViT-S: 18 ms of host time for 10.7 ms of kernels, ``forward_jitter_bb00715_*``).

:func:`launch` keeps the compiled kernel of each call site's argument pattern and launches it through the compiled
kernel's own runner (``CompiledKernel[grid](*args, stream=...)``, the launcher Triton's path ends in). The pattern is
a refinement of what Triton specialises on, so a hit is always the kernel Triton would pick:

* a tensor: its dtype and whether its address is 16-byte aligned;
* an int: whether it is 1, divisible by 16, and whether it fits 32 / 64 bits (Triton's i32 / i64 / u64);
* a bool or float: its type (a bool's value too);
* a ``tl.constexpr`` parameter and every launch option (``num_warps``, ``num_stages``, ...): the value itself;
* the current CUDA device (Triton compiles per device; kernels launch on the current device and stream).

A miss (first call of a pattern) goes through ``kernel[grid](...)``, which compiles or finds the kernel, launches it
and returns it for the next calls. ``TUNING["fast_launch"] = False`` sends every launch through Triton's path. Changes
to Triton's process-wide knobs (``TRITON_DEBUG``, instrumentation) after the first launch of a pattern are not seen.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TUNING", "cdiv", "launch", "next_pow2", "tile_dim", "tuned"]

#: ``"fast_launch"``: use the cache (off: Triton's own launcher for every call).
TUNING: dict[str, bool] = {"fast_launch": True}

_I32 = 2**31
_I64 = 2**63
_MAX_PATTERNS = 4096  # per process; beyond it launches take Triton's path (a pathological caller, not a model)
_COMPILED: dict[tuple, Any] = {}
_PARAMS: dict[int, tuple | None] = {}  # id(kernel) -> (names, defaults, constexpr flags, name set) or None


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host-side grids and tile counts. ``triton.cdiv`` / ``triton.next_power_of_2`` are
    constexpr-function objects since Triton 3.5, about 3-5 us per call on the host: a dozen per op call added up."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``), as ``triton.next_power_of_2`` on the host."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def tile_dim(d: int) -> int:
    """A head (or feature) dim as the kernels tile it: the next power of two, at least 16 (``tl.dot``'s smallest K /
    N); the padding lanes are masked."""
    return max(16, next_pow2(d))


def tuned(tuning: dict[str, Any], key: str, default: int, pow2: bool = False) -> int:
    """A launch setting: ``tuning[key]`` (a kernel module's ``TUNING``) when set, else ``default``. A set value must be
    a non-negative int, and a power of two with ``pow2`` (rows and warps); anything else raises ``ValueError``."""
    value = tuning[key]
    if value is None:
        return default
    bad = not isinstance(value, int) or isinstance(value, bool) or value < 0
    if bad or (pow2 and (value < 1 or value & (value - 1))):
        kind = "a power of two" if pow2 else "a non-negative int"
        raise ValueError(f"TUNING[{key!r}] must be None or {kind}, got {value!r}")
    return value


def _params(kernel: Any) -> tuple | None:
    """The kernel's parameter names, defaults and constexpr flags, or ``None`` when it is not a plain ``@triton.jit``
    function (autotuned or heuristics-wrapped kernels keep Triton's path)."""
    from triton.runtime.jit import JITFunction

    params = getattr(kernel, "params", None)
    if not isinstance(kernel, JITFunction) or params is None or not torch.cuda.is_available():
        return None  # TRITON_INTERPRET's InterpretedFunction, autotuners, heuristics: Triton's own path
    try:
        names = tuple(p.name for p in params)
        defaults = tuple(p.default if p.has_default else None for p in params)
        constexpr = tuple(bool(p.is_constexpr) for p in params)
    except AttributeError:  # a Triton whose KernelParam differs: keep its own path
        return None
    return names, defaults, constexpr, frozenset(names)


def _spec(a: Any) -> Any:
    t = type(a)
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if t is int:
        return (a == 1, a & 15 == 0, -_I32 <= a < _I32, -_I64 <= a < _I64)
    if t is bool:
        return ("b", a)
    if t is float:
        return float
    if t is tuple:
        return tuple(_spec(x) for x in a)
    return a  # None, dtypes, strings: hashable values Triton treats as constants


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)``, with the compiled kernel of this argument pattern cached (module docstring).
    ``grid`` is a tuple of one to three ints."""
    info = _PARAMS.get(id(kernel), False)
    if info is False:
        info = _PARAMS[id(kernel)] = _params(kernel)
    if info is None or not TUNING["fast_launch"]:
        return kernel[grid](*args, **kwargs)
    names, defaults, constexpr, name_set = info
    full = list(args)
    for i in range(len(args), len(names)):
        full.append(kwargs.get(names[i], defaults[i]))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in name_set))
    device = torch.cuda.current_device()
    # _spec inlined for the two common cases (tensors, ints): a Python call per argument cost as much as the rest
    key = (id(kernel), device, options, *[
        v if c
        else (v.dtype, v.data_ptr() & 15 == 0) if isinstance(v, torch.Tensor)
        else (v == 1, v & 15 == 0, -_I32 <= v < _I32, -_I64 <= v < _I64) if type(v) is int
        else _spec(v)
        for v, c in zip(full, constexpr, strict=True)
    ])  # fmt: skip
    try:
        compiled = _COMPILED.get(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[grid](*args, **kwargs)
    if compiled is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and len(_COMPILED) < _MAX_PATTERNS:
            _COMPILED[key] = compiled
        return compiled
    g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
    compiled[g](*full, stream=torch._C._cuda_getCurrentRawStream(device))
    return compiled
