"""Gated mix of two RMS-normalised inputs: ViG's 2-D gating locality injection.

With ``x``, ``y`` and ``gate`` of one shape ``[..., C]``, optional weights ``x_weight``, ``y_weight`` ``[C]`` and
``x_eps, y_eps > 0``::

    rms(t, w, eps) = t / sqrt(mean(t ** 2) + eps) * w            (mean over the last dim, as timm's RmsNorm)
    s = sigmoid(gate)
    out = rms(y, y_weight, y_eps) + (rms(x, x_weight, x_eps) - rms(y, y_weight, y_eps)) * s
        = rms(x, ...) * s + rms(y, ...) * (1 - s)
    out = SiLU(out)                                                (with ``silu=True``)

In ViG's mixer ``x`` is the attention output, ``y`` the locality branch and ``gate`` a projection of it, per head.
Unfused under autocast this is two float32 RMSNorms (whose bfloat16-input / float32-weight call takes PyTorch's
composite path), a sigmoid, the mix and the casts: about a dozen kernels forward and two dozen backward per block.
The op computes in float32 and returns the autocast dtype (what the output projection consumes) in one pass on CUDA.
"""

from __future__ import annotations

import torch

from ._common import check_channel_rows, check_flag, check_real, fp32_reference, reference_dtype, supports_floating
from ._dispatch import Op

__all__ = ["rms_gate_mix", "rms_gate_mix_reference"]

_OP = "rms_gate_mix"
#: Widest row ``C`` the Triton kernels hold in registers (one block of rows per program).
MAX_TRITON_CHANNELS = 4096


def _check(x, y, gate, x_weight, y_weight, x_eps, y_eps, silu) -> None:
    rows, vectors = {"x": x, "y": y, "gate": gate}, {"x_weight": x_weight, "y_weight": y_weight}
    check_channel_rows(_OP, rows, vectors, "an RMSNorm")
    check_real(_OP, "x_eps", x_eps, low=0.0, low_open=True)
    check_real(_OP, "y_eps", y_eps, low=0.0, low_open=True)
    check_flag(_OP, "silu", silu)


def _rms(t: torch.Tensor, weight: torch.Tensor | None, eps: float, dt: torch.dtype) -> torch.Tensor:
    t = t.to(dt)
    t = t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps)
    return t if weight is None else t * weight.to(dt)


def rms_gate_mix_reference(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    x_weight: torch.Tensor | None = None,
    y_weight: torch.Tensor | None = None,
    x_eps: float = 1e-6,
    y_eps: float = 1e-6,
    silu: bool = False,
) -> torch.Tensor:
    """Specification (module docstring), in float32 (float64 for float64 inputs); returns the promoted dtype of
    ``x``, ``y`` and ``gate``.

    Args:
        x: ``[..., C]``, normalised over the last dim, weighted by ``s = sigmoid(gate)``.
        y: ``[..., C]``, normalised over the last dim, weighted by ``1 - s``.
        gate: ``[..., C]``, the mixing logits.
        x_weight: RMSNorm weight of ``x`` ``[C]`` or ``None`` (no scale).
        y_weight: RMSNorm weight of ``y`` ``[C]`` or ``None``.
        x_eps: Added to the mean square of ``x``, ``> 0``.
        y_eps: Added to the mean square of ``y``, ``> 0``.
        silu: ``SiLU`` of the mix.
    """
    _check(x, y, gate, x_weight, y_weight, x_eps, y_eps, silu)
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    dt = reference_dtype(out_dtype)
    with fp32_reference(x.device):
        yn = _rms(y, y_weight, y_eps, dt)
        out = yn + (_rms(x, x_weight, x_eps, dt) - yn) * torch.sigmoid(gate.to(dt))
        if silu:
            out = out * torch.sigmoid(out)
        return out.to(out_dtype)


def _triton(x, y, gate, x_weight=None, y_weight=None, x_eps=1e-6, y_eps=1e-6, silu=False):
    from .triton.rms_mix import rms_gate_mix_triton

    return rms_gate_mix_triton(x, y, gate, x_weight, y_weight, x_eps, y_eps, silu)


def _triton_supports(x, y, gate, x_weight=None, y_weight=None, x_eps=1e-6, y_eps=1e-6, silu=False):
    from .triton import channel_rows_reasons

    return channel_rows_reasons({"x": x, "y": y, "gate": gate}, (x_weight, y_weight), MAX_TRITON_CHANNELS)


# The activations are positional, the weights keywords: read in float32 by the Triton kernels, which return float32
# gradients (cast to the weights' dtypes), as the gated LayerNorm's. Triton first: GPU-tested (tests-s33 at f40498f,
# every rms_mix gpu test), 1.56-1.72x the old module chain forward + backward at ViG's shapes and a ViG-S training step
# 1.12x (benchmarks/results/h200/s34/rms_mix_op_f40498f.json).
_op = Op(_OP)
_op.register("triton", _triton, _triton_supports)
_op.register("reference", rms_gate_mix_reference, supports_floating)


def rms_gate_mix(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    x_weight: torch.Tensor | None = None,
    y_weight: torch.Tensor | None = None,
    x_eps: float = 1e-6,
    y_eps: float = 1e-6,
    *,
    silu: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """``RMSNorm(x) * s + RMSNorm(y) * (1 - s)``, ``s = sigmoid(gate)``, then ``SiLU`` with ``silu`` (see
    :func:`rms_gate_mix_reference`); ``[..., C]`` in, ``[..., C]`` out.

    The op runs in one dtype: autocast's when autocast is enabled on ``x``'s device (the inputs are cast to it, as the
    ``Linear`` after the mix casts its input), else the promoted dtype of the three inputs; that is the output's
    dtype. The weights keep their dtype (read in float32; float32 gradients cast back to it).

    Backends, in automatic-selection order: ``"reference"`` (float32 math, one rounding), ``"triton"`` (CUDA,
    ``C <= MAX_TRITON_CHANNELS``: one pass forward, one backward, float32 inside, rows read through their row
    stride; opt-in, ``backend="triton"`` or ``visionlin.set_backend(model, "triton")``, until it is GPU-tested).

    Example::

        out = rms_gate_mix(o, local, g, g_norm.weight, l_norm.weight, g_norm.eps, l_norm.eps)
        # == g_norm(o) * sigmoid(g) + l_norm(local) * (1 - sigmoid(g))
    """
    _check(x, y, gate, x_weight, y_weight, x_eps, y_eps, silu)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dt = torch.get_autocast_dtype(device)
    else:
        dt = torch.promote_types(torch.promote_types(x.dtype, y.dtype), gate.dtype)
    return _op(
        x.to(dt), y.to(dt), gate.to(dt), x_weight=x_weight, y_weight=y_weight, x_eps=x_eps, y_eps=y_eps, silu=silu,
        backend=backend,
    )  # fmt: skip
