"""Norm layers with fast paths, each behind a process-wide switch in :data:`FAST_PATHS`.

In a pre-norm block (``x + mixer(norm1(x))``, ``x + mlp(norm2(x))``) under CUDA autocast, ``nn.LayerNorm`` runs in
float32 on the float32 residual stream and writes float32, and the mixer's or MLP's first ``Linear`` casts that to
bfloat16: a float32 write, a read and a cast kernel per norm (14 bytes per element moved where 6 are needed). On the
H200 the LayerNorms were 21-32% of the hierarchical models' kernel time at 224 px (NAT-T: 65 of them, 7.6 of 23.4 ms;
``benchmarks/results/h200/profile_hier_bca30b2.log``), the twin's included.

:class:`PreNorm` is an ``nn.LayerNorm`` (same parameters and state-dict keys) that, with ``FAST_PATHS["pre_norm"]``
on, returns autocast's dtype from :func:`visionlin.kernels.layer_norm` (the Triton kernel writes it from float32
statistics in one pass; the values are those of the float32 LayerNorm rounded once, as the ``Linear``'s cast rounded
them). It does so only where no gradient is taken (inference): in a training step the op's Python call path and its
two Triton launches cost more host time than ``F.layer_norm`` (``benchmarks/results/h200/host_calls.json``), and
eager training steps are host-bound, so the switch slowed them (0.72-0.93x, ``toggle_speed_215ffc9.json``) while
it sped up inference 1.05-1.39x. Elsewhere (CPU, no autocast, gradients, ``torch.compile``, which fuses the pair
itself) it is ``nn.LayerNorm``.
:func:`stem_memory_format` is the convolutional stems' switch (``FAST_PATHS["stem_channels_last"]``).
"""

from __future__ import annotations

import torch
from timm.layers import register_notrace_function, register_notrace_module
from torch import nn

from ..kernels.gated_norm import inference_layer_norm, layer_norm

__all__ = ["FAST_PATHS", "PreNorm", "as_pre_norm", "stem_memory_format"]

#: Process-wide switches, read at every forward; each on after its GPU tests passed and ``benchmarks/toggle_speed.py``
#: (each switch off and on, side by side) measured it:
#:
#: * ``"pre_norm"``: the blocks' :class:`PreNorm` layers write autocast's dtype on CUDA in inference (one Triton pass
#:   when the ``layer_norm`` op's Triton backend is chosen). H200, batch 256, 224 px: NAT-T 1.39x, FLatten-PVT-S
#:   1.33x, MAViT-T 1.18x, NaLaFormer-T 1.06x, InfViT-S 1.05x (``toggle_speed_215ffc9.json``); at 64 channels
#:   ``F.layer_norm`` reached 245 GB/s, the Triton kernel 1669 GB/s (``layer_norm_op.json``);
#: * ``"stem_channels_last"`` (``"bn_channels_last"`` before 0.1.0): the convolutional image stems (the BatchNorm
#:   stems of MAViT / RAVLT / NaLaFormer and MambaVision, NAT / DiNAT's two-convolution tokenizer) run on
#:   channels-last CUDA tensors (the downsamplers already do: their input is a permuted token map). In NCHW,
#:   PyTorch's BatchNorm parallelises over channels: the stem's 32-channel maps at 112 x 112 took 13.6 of
#:   NaLaFormer-T's 82.3 ms training step on the H200 (``profile_hier_train_bbe2e19.log``: statistics 4.3 ms,
#:   backward 9.3 ms); channels-last, its kernels spread over the pixels and the stem's ``[B, H, W, C]`` output is
#:   contiguous without a copy. Inference 1.03x (MAViT-T), 1.02x (NaLaFormer-T). NAT-T's NCHW stem had cuDNN convert
#:   its maps to NHWC and back: 0.69 of 38.0 ms in its compiled training step (``profile_compiled_hier_train_317b7cf``).
#: * ``"patch_gemm"``: the image stems that cut non-overlapping patches (DeiT's 16 x 16, Swin's / PVT's 4 x 4) run
#:   as one matrix product over the patches instead of cuDNN's implicit-GEMM convolution
#:   (:class:`visionlin.layers.patch.PatchConv2d`), which took 1.65 ms of ``deit_small``'s 12.99 ms forward at 224 px,
#:   batch 256 on the H200. GPU time per forward with the switch on: InfViT-S 12.77 -> 11.13 ms, Agent-DeiT-S 16.89 ->
#:   15.34, FLatten-DeiT-S 16.98 -> 15.39 (``profile_patch_6e8d144.json``); per training step at batch 128 -1.3 ms
#:   (``profile_patch_train_af3eef6.json``).
#: * ``"rope_fused"``: the softmax stages of MAViT / RAVLT / NaLaFormer rotate queries and keys with one Triton pass
#:   each way (:func:`visionlin.kernels.apply_rope_2d_pair`) instead of a chain of PyTorch ops, whose backward
#:   Inductor fused with the ``qkvo`` bias-gradient sum into one slow outer reduction (2.07 ms of RAVLT-T's 33 ms
#:   compiled training step, ``benchmarks/results/h200/s38/``). CUDA-graph training step (H200, batch 128, switch
#:   off / on, one run): RAVLT-T 35.28 -> 31.86 ms (1.107x), NaLaFormer-T 41.18 -> 39.16 ms (1.052x)
#:   (``s40/toggle_speed_graphs_rope_5f74eaa.json``).
FAST_PATHS: dict[str, bool] = {"pre_norm": True, "stem_channels_last": True, "patch_gemm": True, "rope_fused": True}


@register_notrace_module
class PreNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose output under CUDA autocast, without gradients, is autocast's dtype when
    ``FAST_PATHS["pre_norm"]`` is on (see the module docstring); use it only where every consumer of the output casts
    to that dtype (``Linear``, conv)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            FAST_PATHS["pre_norm"]
            and x.is_cuda
            and torch.is_autocast_enabled("cuda")
            and not torch.compiler.is_compiling()
            and len(self.normalized_shape) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))
        ):
            out_dtype = torch.get_autocast_dtype("cuda")
            out = inference_layer_norm(x, self.weight, self.bias, self.eps, out_dtype)  # the op's kernel, lean path
            return layer_norm(x, self.weight, self.bias, self.eps, out_dtype=out_dtype) if out is None else out
        return super().forward(x)


def retype(module: nn.Module | None, exact: type[nn.Module], fast: type[nn.Module]) -> nn.Module | None:
    """``module`` as its fast-path subclass ``fast`` when its type is exactly ``exact`` (the same instance,
    parameters and settings: only its forward changes), else unchanged."""
    if type(module) is exact:
        module.__class__ = fast
    return module


def as_pre_norm(norm: nn.Module) -> nn.Module:
    """``norm`` as a :class:`PreNorm` when it is exactly an ``nn.LayerNorm`` (parameters kept), else unchanged."""
    return retype(norm, nn.LayerNorm, PreNorm)


@register_notrace_function
def stem_memory_format(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, C, H, W]`` channels-last on CUDA when ``FAST_PATHS["stem_channels_last"]`` is on, else unchanged."""
    if FAST_PATHS["stem_channels_last"] and x.is_cuda:
        return x.contiguous(memory_format=torch.channels_last)
    return x
