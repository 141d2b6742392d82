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

A miss (first call of a pattern) goes through ``kernel[grid](...)``, which compiles or finds the kernel, launches it and
returns it for the next calls. A hit calls the compiled kernel's launcher directly (what its ``[grid]`` runner calls)
and, while no Triton launch hook is installed (``knobs.runtime.launch_enter_hook`` / ``launch_exit_hook``: empty or
``None``; profilers such as Proton install them), passes no launch metadata and no hooks: on Triton 3.6 the runner
otherwise builds a metadata dict and the launcher calls two empty hook chains back into Python on every launch.
``TUNING["fast_launch"] = False`` sends every launch through Triton's path. Changes to Triton's process-wide knobs
(``TRITON_DEBUG``, instrumentation) after the first launch of a pattern are not seen.
"""

from __future__ import annotations

from typing import Any

import torch

from .._common import PLAIN_TENSOR_TYPES
from . import (  # (defined without Triton: the backends' supports() checks use them on any host)
    next_pow2,
    tile_dim,
    tuning_int,
)

try:
    from triton import knobs as _knobs
except ImportError:  # a Triton without knobs: hits take the compiled kernel's [grid] runner
    _knobs = None

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


def tuned(tuning: dict[str, Any], owner: str, key: str, default: int, pow2: bool = False) -> int:
    """A launch setting: ``tuning[key]`` (the ``TUNING`` of kernel module ``owner``) when set, else ``default``. A set
    value must be a non-negative int, and a power of two with ``pow2`` (rows and warps): checked by
    :func:`~visionlin.kernels.triton.tuning_int`, whose ``ValueError`` names the module, the key and the value."""
    value = tuning_int(tuning, owner, key, least=1 if pow2 else 0, allow_none=True, pow2=pow2)
    return default if value is None else value


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


def _int_code(v: int) -> int:
    """What Triton specialises an int argument on, as one small int: 1 for the value 1, else its range (i32 / i64 /
    u64: 2 / 4 / 8) with bit 0 set when it is divisible by 16."""
    if v == 1:
        return 1
    return (2 if -_I32 <= v < _I32 else 4 if -_I64 <= v < _I64 else 8) | (v & 15 == 0)


def _spec(a: Any) -> Any:
    t = type(a)
    if t is torch.Tensor or isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if t is int:
        return _int_code(a)
    if t is bool:
        return ("b", a)
    if t is float:
        return float
    if t is tuple:
        return tuple(_spec(x) for x in a)
    return a  # None, dtypes, strings: hashable values Triton treats as constants


def _hooks_idle() -> bool:
    """No launch hook is installed: Triton's hook attributes are ``None`` (older Triton) or empty chains (3.6+)."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):  # a plain callable, or a chain holding hooks
            return False
    return True


def _entry(compiled: Any) -> tuple | None:
    """``(launcher, function, packed metadata)`` of a compiled kernel that has launched once, or ``None`` when this
    Triton's ``CompiledKernel`` does not have them (then hits take its ``[grid]`` runner)."""
    try:
        return (compiled.run, compiled.function, compiled.packed_metadata)
    except AttributeError:
        return None


def launch(kernel: Any, grid: tuple, *args: Any, **kwargs: Any) -> Any:
    """``kernel[grid](*args, **kwargs)``, with the compiled kernel of this argument pattern cached (module docstring).
    ``grid`` is a tuple of one to three ints."""
    info = _PARAMS.get(id(kernel), False)
    if info is False:
        info = _PARAMS[id(kernel)] = _params(kernel)
    if info is None or not TUNING["fast_launch"]:
        return kernel[grid](*args, **kwargs)
    names, defaults, constexpr, name_set = info
    n = len(args)
    full = args + tuple([kwargs.get(names[i], defaults[i]) for i in range(n, len(names))]) if n < len(names) else args
    options = tuple(sorted([(k, v) for k, v in kwargs.items() if k not in name_set])) if len(kwargs) else ()
    device = torch.cuda.current_device()
    # _spec inlined for the common cases (ints first, as _int_code: isinstance against torch.Tensor is slow for
    # non-tensors); a Python call per argument cost as much as the rest of the launch
    key = (id(kernel), device, options, *[
        v if c
        else (1 if v == 1 else (2 if -_I32 <= v < _I32 else 4 if -_I64 <= v < _I64 else 8) | (v & 15 == 0))
        if type(v) is int
        else (v.dtype, v.data_ptr() & 15 == 0) if type(v) in PLAIN_TENSOR_TYPES
        else _spec(v)
        for v, c in zip(full, constexpr, strict=True)
    ])  # fmt: skip
    try:
        hit = _COMPILED.get(key)
    except TypeError:  # an unhashable argument: Triton's path
        return kernel[grid](*args, **kwargs)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        if compiled is not None and len(_COMPILED) < _MAX_PATTERNS:
            _COMPILED[key] = (compiled, _entry(compiled))
        return compiled
    compiled, entry = hit
    stream = torch._C._cuda_getCurrentRawStream(device)
    ng = len(grid)
    g0, g1, g2 = grid[0], grid[1] if ng > 1 else 1, grid[2] if ng > 2 else 1
    if entry is not None and _hooks_idle():
        run, function, packed = entry
        run(g0, g1, g2, stream, function, packed, None, None, None, *full)
    else:
        compiled[(g0, g1, g2)](*full, stream=stream)
    return compiled
