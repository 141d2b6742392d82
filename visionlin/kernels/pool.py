"""Adaptive average pooling of a token grid: Agent attention's agents are the queries pooled to ``(sqrt(n), sqrt(n))``.

With tokens ``x`` ``[B, H*W, C]`` (the grid in row-major order, any strides) and an output grid ``(oh, ow)``, the op
returns ``[B, oh*ow, C]`` in ``x``'s dtype::

    out[b, i * ow + j] = mean(x[b, y * W + x'] for y in rows(i, H, oh) for x' in rows(j, W, ow))
    rows(i, n, o) = floor(i n / o) ... ceil((i + 1) n / o) - 1

the bins of ``F.adaptive_avg_pool2d`` (uneven where ``o`` does not divide ``n``; neighbouring bins then share a row;
``o > n`` repeats rows). PyTorch's channels-last adaptive-pool kernel is far from the bytes it moves: 0.46 ms per
Agent-DeiT-S layer at 1024 px, batch 16 (64 x 64 tokens to 7 x 7: 50 MB, ~12 us at the H200's copy bandwidth), 5.5
of that model's 19 ms forward (``benchmarks/results/h200/profile_agent_deit_16bd094.log``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import fp32_reference, reference_dtype, same_floating_dtype, supports_floating
from ._dispatch import Op

__all__ = ["token_adaptive_avg_pool2d", "token_adaptive_avg_pool2d_reference"]

_NAME = "token_adaptive_avg_pool2d"

#: Uneven bins of at least this many tokens go through the ``"torch"`` backend's two matrix products instead of
#: ``F.adaptive_avg_pool2d``: on the H200 PyTorch's channels-last adaptive-pool kernel took 53 of Agent-Swin-T's 100 ms
#: forward at 1024 px, batch 16 (37 x 37-token bins; ``benchmarks/results/h200/profile_agent_1024_e5191ee.log``).
LARGE_POOL_BIN = 256


def _check(x: object, feat_size: object, out_size: object) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
        raise ValueError(f"{_NAME}: x must be a floating tensor [B, H*W, C], got {getattr(x, 'shape', type(x))}")
    for name, pair in (("feat_size", feat_size), ("out_size", out_size)):
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
        ):
            raise ValueError(f"{_NAME}: {name}={pair!r} must be a pair of integers (H, W), each >= 1")
    if x.shape[1] != feat_size[0] * feat_size[1]:
        raise ValueError(f"{_NAME}: x has {x.shape[1]} tokens, expected H*W for feat_size={tuple(feat_size)}")


def _map(x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).unflatten(-1, feat_size)  # [B, C, H, W] (a view)


def token_adaptive_avg_pool2d_reference(
    x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Specification (module docstring): ``F.adaptive_avg_pool2d`` of the grid, in float32; returns ``x``'s dtype.

    Args:
        x: Tokens ``[B, H*W, C]``.
        feat_size: The grid ``(H, W)``.
        out_size: The pooled grid ``(oh, ow)``.
    """
    _check(x, feat_size, out_size)
    with fp32_reference(x.device):
        out = F.adaptive_avg_pool2d(_map(x.to(reference_dtype(x.dtype)), tuple(feat_size)), tuple(out_size))
        return out.flatten(2).transpose(1, 2).to(x.dtype)


def _bin_matrix(n: int, out: int, device: torch.device) -> torch.Tensor:
    """``[out, n]`` float32: row ``i`` averages positions ``floor(i n / out)`` to ``ceil((i + 1) n / out) - 1``."""
    i = torch.arange(out, device=device)
    start = torch.div(i * n, out, rounding_mode="floor")
    end = torch.div((i + 1) * n + out - 1, out, rounding_mode="floor")
    pos = torch.arange(n, device=device)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return inside.float() / (end - start).float()[:, None]


def _native(x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    """``"torch"`` backend. Equal bins: a mean over a view of ``x`` (one reduction kernel). Uneven bins of at least
    :data:`LARGE_POOL_BIN` tokens: two matrix products with the bins' averaging matrices, in float32 with autocast
    off. Smaller uneven bins: ``F.adaptive_avg_pool2d``. All round once to ``x``'s dtype."""
    (hh, ww), (oh, ow) = feat_size, out_size
    if hh % oh == 0 and ww % ow == 0:
        return x.unflatten(1, (oh, hh // oh, ow, ww // ow)).mean(dim=(2, 4)).flatten(1, 2).to(x.dtype)
    if -(-hh // oh) * -(-ww // ow) < LARGE_POOL_BIN:
        # On a contiguous map: on the channels-last view, the CPU kernel's output layout (contiguous at batch 1) and
        # the one its meta function declares (channels-last) differ, and a compiled graph (aot_eager) read the pooled
        # agents with the declared strides: Agent models gave NaN / 1e37 at non-square sizes.
        return F.adaptive_avg_pool2d(_map(x, feat_size).contiguous(), out_size).flatten(2).transpose(1, 2)
    b, _, c = x.shape
    with torch.autocast(x.device.type, enabled=False):
        rows = torch.matmul(_bin_matrix(hh, oh, x.device), x.float().reshape(b, hh, ww * c))  # [B, oh, W*C]
        out = torch.matmul(_bin_matrix(ww, ow, x.device), rows.reshape(b * oh, ww, c))  # [B*oh, ow, C]
    return out.reshape(b, oh * ow, c).to(x.dtype)


def _triton(x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
    from .triton.pool import token_adaptive_avg_pool2d_triton

    return token_adaptive_avg_pool2d_triton(x, feat_size, out_size)


def _triton_supports(x: torch.Tensor, *args: object, **kwargs: object) -> list[str]:
    from .triton import batch_grid_reasons, triton_unavailable

    reasons = triton_unavailable(x)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {x.dtype} (allowed: float16, bfloat16, float32)")
    return reasons + batch_grid_reasons(x.shape[0])


_op = Op(_NAME)
_op.register("triton", _triton, _triton_supports)
_op.register("torch", _native, same_floating_dtype)
_op.register("reference", token_adaptive_avg_pool2d_reference, supports_floating)


def token_adaptive_avg_pool2d(
    x: torch.Tensor, feat_size: tuple[int, int], out_size: tuple[int, int], *, backend: str | None = None
) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of a token grid ``[B, H*W, C]`` -> ``[B, oh*ow, C]`` in ``x``'s dtype; see
    :func:`token_adaptive_avg_pool2d_reference`.

    Backends: ``"triton"`` (CUDA: one kernel forward, one backward, float32 sums), ``"torch"`` (a mean over a view
    for equal bins, else matrix products or ``F.adaptive_avg_pool2d``), ``"reference"`` (float32).

    Non-finite inputs: every cell whose bin holds a NaN or an infinity is non-finite, as in the reference; the Triton
    forward and the ``"torch"`` backend's matrix path sum a grid row into its cells through products with 0 / 1 (or
    averaging) weights, so there such a value also makes the other cells of its bin row NaN (``0 * inf``). Cells of
    the other bin rows are unaffected. (In agent attention every query attends to every agent, so one non-finite
    query makes the whole output non-finite on every backend.)

    Raises:
        ValueError: ``x`` not a floating ``[B, H*W, C]`` tensor, sizes that are not pairs of positive ints, or a token
            count other than ``H * W``.
    """
    _check(x, feat_size, out_size)
    return _op(x, (int(feat_size[0]), int(feat_size[1])), (int(out_size[0]), int(out_size[1])), backend=backend)
