"""Gated LayerNorm: the output norm and SiLU gate of NaLa's mixers (NaLaFormer's ``LN(attention + lepe) * SiLU(g)``).

With ``x`` and a gate ``g`` of one shape ``[..., C]``, an optional LayerNorm weight ``w`` ``[C]`` and bias ``b``
``[C]`` and ``eps > 0`` (mean and biased variance over the last dim, as ``nn.LayerNorm``)::

    out = ((x - mean(x)) / sqrt(var(x) + eps) * w + b) * g * sigmoid(g)

Under autocast, ``nn.LayerNorm`` runs in float32 and returns float32, so the unfused chain is a float32 norm, a
half-precision SiLU, a float32 product and the next ``Linear``'s cast back: four kernels and float32 round trips. The
op computes in float32 and returns the autocast dtype (what that ``Linear`` consumes) in one pass on CUDA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ._common import check_channel_rows, check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op

__all__ = [
    "gated_layer_norm",
    "gated_layer_norm_reference",
    "inference_layer_norm",
    "layer_norm",
    "layer_norm_reference",
]

_OP = "gated_layer_norm"
#: Widest row ``C`` the Triton kernels hold in registers (one row per program, 16 warps; the backward spilled at 8192).
MAX_TRITON_CHANNELS = 4096


def _check(x, gate, weight, bias, eps, op: str = _OP) -> None:
    """``op`` names the public function in the messages (``layer_norm`` shares these checks)."""
    rows = {"x": x, "gate": gate} if gate is not x else {"x": x}
    check_channel_rows(op, rows, {"weight": weight, "bias": bias}, "a LayerNorm")
    check_real(op, "eps", eps, low=0.0, low_open=True)


def gated_layer_norm_reference(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Specification (module docstring), in float32 (float64 for float64 inputs); returns the promoted dtype of
    ``x`` and ``gate`` (``x``'s when they match).

    Args:
        x: ``[..., C]``, normalised over the last dim.
        gate: ``[..., C]``, the SiLU gate.
        weight: LayerNorm weight ``[C]`` or ``None`` (no scale).
        bias: LayerNorm bias ``[C]`` or ``None`` (no shift).
        eps: Added to the variance, ``> 0``.
    """
    _check(x, gate, weight, bias, eps)
    out_dtype = torch.promote_types(x.dtype, gate.dtype)
    dt = reference_dtype(out_dtype)
    with fp32_reference(x.device):
        gf = gate.to(dt)
        return (_layer_norm_math(x, weight, bias, eps, dt) * (gf * torch.sigmoid(gf))).to(out_dtype)


def _layer_norm_math(x, weight, bias, eps: float, dt: torch.dtype) -> torch.Tensor:
    """The references' LayerNorm in ``dt``, written out: biased variance over the last dim, then the affine."""
    xf = x.to(dt)
    centred = xf - xf.mean(-1, keepdim=True)  # [..., C]
    y = centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(dt)
    if bias is not None:
        y = y + bias.to(dt)
    return y


def _native(x, gate, weight=None, bias=None, eps=1e-5):
    """``"torch"`` backend: ``F.layer_norm`` and ``F.silu`` in the inputs' (promoted) dtype (autocast off inside, or it
    would run the norm in float32 and return float32)."""
    dt = torch.promote_types(x.dtype, gate.dtype)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    off = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if off else contextlib.nullcontext():
        return F.layer_norm(x.to(dt), (x.shape[-1],), w, b, eps) * F.silu(gate.to(dt))


def _triton(x, gate, weight=None, bias=None, eps=1e-5):
    from .triton.gated_norm import gated_layer_norm_triton

    return gated_layer_norm_triton(x, gate, weight, bias, eps)


def _triton_supports(x, gate, weight=None, bias=None, eps=1e-5):
    from .triton import channel_rows_reasons

    return channel_rows_reasons({"x": x, "gate": gate}, (weight, bias), MAX_TRITON_CHANNELS)


# The activations (x, gate) are positional, the affine parameters keywords: float32 whatever the activations' dtype
# (the Triton kernels read them in float32 and return float32 gradients), as the selective scan's parameters.
_op = Op(_OP)
_op.register("triton", _triton, _triton_supports)
_op.register("torch", _native, supports_floating)
_op.register("reference", gated_layer_norm_reference, supports_floating)


def gated_layer_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``LayerNorm(x) * SiLU(gate)`` (see :func:`gated_layer_norm_reference`), ``[..., C]`` in, ``[..., C]`` out.

    The op runs in one dtype: autocast's when autocast is enabled on ``x``'s device (``x`` and ``gate`` are cast to
    it, as the ``Linear`` after the norm casts its inputs), else the promoted dtype of ``x`` and ``gate``; that is the
    output's dtype. ``weight`` and ``bias`` keep their dtype: the ``"torch"`` backend casts them to the op's dtype
    (``F.layer_norm`` needs one dtype), the Triton kernels read them in float32 and return float32 gradients.

    Backends: ``"torch"`` (``F.layer_norm`` with float32 statistics, then ``F.silu`` and the product, each rounded to
    the dtype), ``"triton"`` (CUDA, preferred: one pass in float32, one rounding, the gate read through its row
    stride), ``"reference"`` (float32).

    Example::

        out = gated_layer_norm(x, g, ln.weight, ln.bias, ln.eps)  # == ln(x) * F.silu(g)
    """
    _check(x, gate, weight, bias, eps)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
    else:
        dt = torch.promote_types(x.dtype, gate.dtype)
    # weight and bias pass in their own dtype: the "torch" backend casts them to dt (as a LayerNorm under autocast
    # would), the Triton kernels read them in float32 and return float32 gradients (no bfloat16 round trip that
    # torch.compile would remove and eager would not)
    return _op(x.to(dt), gate.to(dt), weight=weight, bias=bias, eps=eps, backend=backend)


# LayerNorm with its output in another dtype (the same Triton kernels without the gate) --------------------------------
_LN_OP = "layer_norm"


def _check_ln(x, weight, bias, eps, out_dtype) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim == 0:
        raise ValueError(f"{_LN_OP}: x must be a floating torch.Tensor [..., C], got {x!r:.80}")
    _check(x, x, weight, bias, eps, _LN_OP)  # (its messages said gated_layer_norm)
    if out_dtype is not None and (not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point):
        raise ValueError(f"{_LN_OP}: out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Specification: the biased-variance LayerNorm over the last dim in float32 (float64 for float64 input), rounded
    once to ``out_dtype`` (default ``x``'s dtype)."""
    _check_ln(x, weight, bias, eps, out_dtype)
    with fp32_reference(x.device):
        return _layer_norm_math(x, weight, bias, eps, reference_dtype(x.dtype)).to(out_dtype or x.dtype)


def _ln_native(x, weight=None, bias=None, eps=1e-5, out_dtype=None):
    """``"torch"`` backend: ``F.layer_norm`` as ``nn.LayerNorm`` runs it (autocast's float32 under autocast; outside it
    the weight / bias in ``x``'s dtype), then a cast to ``out_dtype``: two kernels."""
    if not torch.is_autocast_enabled(x.device.type):
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype or x.dtype)


def _ln_triton(x, weight=None, bias=None, eps=1e-5, out_dtype=None):
    from .triton.gated_norm import layer_norm_triton

    return layer_norm_triton(x, weight, bias, eps, out_dtype)


def _ln_triton_supports(x, weight=None, bias=None, eps=1e-5, out_dtype=None):
    from .triton import ROW_DTYPES, channel_rows_reasons

    reasons = channel_rows_reasons({"x": x}, (weight, bias), MAX_TRITON_CHANNELS)
    if out_dtype is not None and out_dtype not in ROW_DTYPES:
        reasons.append(f"out_dtype must be float16, bfloat16 or float32; got {out_dtype}")
    return reasons


_ln_op = Op(_LN_OP)
# Triton first: GPU-tested (tests/test_kernels_layer_norm.py, 29 of 29 at 85f5f37); its forward moves 6 bytes per
# float32 element where F.layer_norm + cast move 14, and at 64 channels F.layer_norm reached 245 GB/s to its 1669.
_ln_op.register("triton", _ln_triton, _ln_triton_supports)
_ln_op.register("torch", _ln_native, supports_floating)
_ln_op.register("reference", layer_norm_reference, supports_floating)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x`` ``[..., C]`` with the output in ``out_dtype`` (default ``x``'s dtype).

    Under autocast a pre-norm block's LayerNorm runs in float32 and the ``Linear`` after it casts the float32 result
    to bfloat16: a float32 write and a cast kernel. ``layer_norm(x, w, b, eps, out_dtype=torch.bfloat16)`` is that
    pair's result (float32 statistics and affine, one rounding); the ``"triton"`` backend writes it in one pass (6
    instead of 14 bytes per element for a float32 ``x``). ``weight`` / ``bias`` keep their dtype; their gradients are
    float32 from the Triton kernels.

    Backends, in automatic-selection order: ``"triton"`` (CUDA, ``C <= MAX_TRITON_CHANNELS``), ``"torch"``
    (``F.layer_norm`` as ``nn.LayerNorm`` under the caller's autocast, then the cast), ``"reference"`` (float32, one
    rounding). Each call of the Triton backend costs more host time than ``F.layer_norm`` (a Python call path and two
    kernel launches for forward and backward): in a host-bound eager training step prefer ``"torch"``, as
    :class:`visionlin.layers.norm.PreNorm` does.
    """
    _check_ln(x, weight, bias, eps, out_dtype)
    return _ln_op(x, weight=weight, bias=bias, eps=eps, out_dtype=out_dtype, backend=backend)


_LEAN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_lean_kernel = None  # the Triton forward, resolved on the first CUDA call (False: Triton cannot run here)


def inference_layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """``layer_norm(x, weight, bias, eps, out_dtype=out_dtype)`` by the Triton forward in one launch, without the op's
    argument checks, backend selection and autograd wrapper, or ``None`` when the call is not one it takes (then call
    :func:`layer_norm`).

    For callers that know no gradient is taken (:class:`visionlin.layers.norm.PreNorm` in inference): the op's call
    path cost ~300 us of host time per call on the H200 host that left the 224 px forwards host-bound
    (``benchmarks/results/h200/host_stacks_infer_bb00715.log``), against ~50 us for ``F.layer_norm``. Taken for a plain
    eager CUDA ``x`` (no fake, functorch or traced tensors) of float16, bfloat16 or float32 with ``1 <= C <=
    MAX_TRITON_CHANNELS``, ``weight`` / ``bias`` ``[C]`` unit-stride tensors on ``x``'s device or ``None``, ``eps > 0``
    and ``out_dtype`` one of those three dtypes; the result is the ``"triton"`` backend's, bit for bit.
    """
    global _lean_kernel
    if (
        type(x) is not torch.Tensor
        or not x.is_cuda
        or x.dtype not in _LEAN_DTYPES
        or out_dtype not in _LEAN_DTYPES
        or not x.ndim
        or not 0 < x.shape[-1] <= MAX_TRITON_CHANNELS
        or not eps > 0
        or torch._C._functorch.is_functorch_wrapped_tensor(x)
        or torch.jit.is_tracing()
    ):
        return None
    c = x.shape[-1]
    for t in (weight, bias):
        if t is not None and (t.ndim != 1 or t.shape[0] != c or t.stride(0) != 1 or t.device != x.device):
            return None
    if _lean_kernel is None:
        from .triton import triton_unavailable

        if triton_unavailable(x):
            _lean_kernel = False
        else:
            from .triton.gated_norm import layer_norm_inference

            _lean_kernel = layer_norm_inference
    if _lean_kernel is False:
        return None
    return _lean_kernel(x, weight, bias, float(eps), out_dtype)
