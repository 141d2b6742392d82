"""Non-overlapping patch embeddings as one matrix product.

A patch embedding is a convolution whose kernel equals its stride (no padding, dilation or groups): each output
token is ``W @ patch + b`` over its own ``C x kh x kw`` pixels. cuDNN runs the 3-channel image stems of DeiT-style
models (16 x 16, stride 16) with a generic implicit-GEMM kernel: on the H200 it took 1.65 ms of ``deit_small``'s
12.95 ms forward at 224 px, batch 256 (``benchmarks/results/h200/profile_iso_abf7aa9.log``), about 35x what its
FLOPs need on the tensor cores. :class:`PatchConv2d` is an ``nn.Conv2d`` (same parameters, state-dict keys and
initialisation) that, with ``FAST_PATHS["patch_gemm"]`` on, cuts the image into patches (one copy, in autocast's dtype
when autocast is on) and runs one ``F.linear`` over them; its output is the convolution's ``[B, O, H/kh, W/kw]`` as a
channels-last view of the ``[B, tokens, O]`` product, so timm's ``PatchEmbed`` flattens it to tokens without a copy.
On by default since its GPU timing (``benchmarks/profile_models.py --configs baseline,patch_gemm``: about 1.6 ms less
GPU time per forward of the DeiT-S models at 224 px, batch 256, 1.3 ms per training step at batch 128); with the
switch off, and for convolutions that are not patchifications or inputs whose sides are not multiples of the kernel,
it is the ``nn.Conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from .norm import FAST_PATHS, retype

__all__ = ["PatchConv2d", "as_patch_conv", "patchify_linear"]


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride=weight.shape[-2:])`` for ``x`` ``[B, C, H, W]`` whose sides are multiples of
    the kernel, as one matrix product over the patches; ``[B, O, H/kh, W/kw]``, channels-last in memory."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    hp, wp = h // kh, w // kw
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        # what autocast does to a convolution's input (float64 is never cast); the patch copy then moves fewer bytes
        x = x.to(torch.get_autocast_dtype(x.device.type))
    patches = x.reshape(b, c, hp, kh, wp, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, hp * wp, c * kh * kw)
    out = F.linear(patches, weight.reshape(o, c * kh * kw), bias)  # weight's (c, i, j) order is the patches'
    return out.view(b, hp, wp, o).permute(0, 3, 1, 2)


@register_notrace_module
class PatchConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`patchify_linear` when ``FAST_PATHS["patch_gemm"]`` is on and the call is a
    patchification (see the module docstring)."""

    def patchifies(self) -> bool:
        """Kernel equal to stride, no padding, unit dilation, one group."""
        return (
            tuple(self.kernel_size) == tuple(self.stride)
            and self.padding in ((0, 0), "valid")
            and tuple(self.dilation) == (1, 1)
            and self.groups == 1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kh, kw = self.kernel_size
        if (
            FAST_PATHS["patch_gemm"]
            and x.ndim == 4
            and x.shape[-2] % kh == 0
            and x.shape[-1] % kw == 0
            and self.patchifies()
        ):
            return patchify_linear(x, self.weight, self.bias)
        return super().forward(x)


def as_patch_conv(conv: nn.Module | None) -> nn.Module | None:
    """``conv`` as a :class:`PatchConv2d` when it is exactly an ``nn.Conv2d`` (parameters kept), else unchanged."""
    return retype(conv, nn.Conv2d, PatchConv2d)
