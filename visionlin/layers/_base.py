"""Common base for token mixers: head bookkeeping, the per-instance backend, token-layout checks."""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..kernels.conv import token_depthwise_conv2d
from ._cache import cached, frozen_key

__all__ = [
    "TokenDepthwiseConv2d",
    "TokenMixer",
    "check_tokens",
    "depthwise_taps",
    "map_to_tokens",
    "merge_heads",
    "split_heads",
    "tokens_to_map",
]


def _is_int(s: object) -> bool:
    return isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool)


def check_tokens(
    x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int, name: str, dim: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``x`` is ``[B, num_prefix_tokens + H * W, dim]`` for ``feat_size = (H, W)``."""
    if x.ndim != 3:
        raise ValueError(f"{name}: expected tokens [B, N, C], got {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name}: tokens have {x.shape[-1]} channels, the layer was built for dim={dim}")
    if num_prefix_tokens < 0:
        raise ValueError(f"{name}: {num_prefix_tokens=} must be >= 0")
    if (
        not isinstance(feat_size, (tuple, list, torch.Size))
        or len(feat_size) != 2
        or not (torch.jit.is_tracing() or all(_is_int(s) for s in feat_size))  # (jit: sizes are 0-d tensors)
        or min(feat_size) < 1
    ):
        raise ValueError(f"{name}: feat_size must be (H, W), two integers >= 1, got {feat_size=}")
    expected = num_prefix_tokens + feat_size[0] * feat_size[1]
    if x.shape[1] != expected:
        raise ValueError(
            f"{name}: {x.shape[1]} tokens do not match {num_prefix_tokens=} + H*W for {feat_size=} (= {expected})"
        )


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, H*D] -> [B, N, H, D]`` (channel ``c`` belongs to head ``c // D``)."""
    return x.unflatten(-1, (num_heads, -1))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, H, D] -> [B, N, H*D]``."""
    return x.flatten(-2)


def tokens_to_map(x: torch.Tensor, feat_size: tuple[int, int]) -> torch.Tensor:
    """``[B, H*W, C]`` (row-major) -> ``[B, C, H, W]``."""
    return x.transpose(1, 2).unflatten(-1, feat_size)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]`` (row-major)."""
    return x.flatten(2).transpose(1, 2)


def depthwise_taps(
    owner: nn.Module, conv: nn.Conv2d, dt: torch.dtype, repeat: int = 1, name: str = "taps"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A depthwise ``conv``'s kernel and bias as :func:`visionlin.kernels.token_depthwise_conv2d` takes them
    (``[C, k, k]``, ``[C]``) in ``dt``, repeated ``repeat`` times over the channels (a kernel shared by the heads);
    kept for ``owner`` under ``name`` between inference forwards (:mod:`visionlin.layers._cache`)."""

    def build() -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = conv.weight[:, 0].to(dt), None if conv.bias is None else conv.bias.to(dt)
        if repeat == 1:
            return weight, bias
        return weight.repeat(repeat, 1, 1), None if bias is None else bias.repeat(repeat)

    return cached(owner, name, frozen_key(conv.weight, conv.bias, extra=(dt, repeat)), build)


@register_notrace_module
class TokenDepthwiseConv2d(nn.Conv2d):
    """A depthwise ``k x k`` ``nn.Conv2d`` (its parameters, initialisation and state-dict keys) applied to grid tokens
    and added to a residual in one call.

    ``forward(x, feat_size, residual=None, num_prefix_tokens=0, backend=None)`` takes tokens ``x``
    ``[B, P + H*W, C]`` (``P`` prefix tokens, then the ``H x W`` grid row-major) and returns tokens
    ``residual + conv(grid(x))`` (prefix tokens: ``residual``'s, zeros without one) through
    :func:`visionlin.kernels.token_depthwise_conv2d`: on CUDA one fused Triton pass (no ``[B, C, H, W]`` copies, no
    separate add, no half-precision cuDNN depthwise kernel), ATen's convolution elsewhere. The convolution runs in
    autocast's dtype when autocast is on (as a ``Conv2d``'s would; a residual in another dtype, e.g. autocast's
    float32 residual stream, is then added outside the kernel), else in the promoted dtype of ``x`` and ``residual``;
    float32 accumulation. An FX leaf for timm's feature extraction.
    """

    def __init__(
        self, dim: int, kernel_size: int, bias: bool = True, device: torch.device | None = None, dtype=None
    ) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"TokenDepthwiseConv2d: {kernel_size=} must be a positive odd integer")
        super().__init__(
            dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias, device=device, dtype=dtype
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        feat_size: tuple[int, int],
        residual: torch.Tensor | None = None,
        num_prefix_tokens: int = 0,
        backend: str | None = None,
    ) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the convolution in autocast's dtype, as a Conv2d's would be
            dt = torch.get_autocast_dtype(device)
        else:
            dt = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        # A residual in another dtype (autocast's float32 residual stream) is added outside, as before: fusing it
        # would round the stream to the convolution's dtype.
        fused = residual is not None and residual.dtype == dt
        weight, bias = depthwise_taps(self, self, dt)
        out = token_depthwise_conv2d(
            x.to(dt),
            weight,
            bias,
            feat_size=(int(feat_size[0]), int(feat_size[1])),
            num_prefix_tokens=num_prefix_tokens,
            residual=residual if fused else None,
            backend=backend,
        )
        return out if fused or residual is None else residual + out


@register_notrace_module
class TokenMixer(nn.Module):
    """Base class of every attention layer (an FX leaf for timm's FX tracing: mixers branch on token-grid sizes).

    Subclasses take ``(dim, num_heads, ...)`` like timm's ``Attention`` and implement
    ``forward(x, feat_size, num_prefix_tokens=0)`` on tokens ``[B, num_prefix_tokens + H*W, C]`` (prefix tokens such as
    a class token first, then the ``H x W`` grid in row-major order).

    Attributes:
        backend: Kernel backend used by this instance (``None`` = automatic choice); see ``visionlin.set_backend``.
    """

    attn_name: str = ""
    #: Whether the layer has parameters whose size depends on the token grid (resampled when the grid changes).
    size_dependent: bool = False
    #: Constructor keyword taking the nominal grid ``(H, W)`` of a size-dependent layer (models fill it in).
    grid_kwarg: str | None = None
    #: Constructor keyword taking the number of prefix tokens the layer is built for (models fill it in).
    prefix_kwarg: str | None = None
    #: Names of the ``visionlin.kernels`` ops the layer calls with its ``backend`` (checked by ``set_backend``).
    kernel_ops: tuple[str, ...] = ()

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):  # (4.0 or "64" failed at the first forward)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"{type(self).__name__}: {name}={value!r} must be a positive int")
        dim, num_heads = int(dim), int(num_heads)
        if dim <= 0 or num_heads <= 0:
            raise ValueError(f"{type(self).__name__}: dim and num_heads must be positive, got {dim=}, {num_heads=}")
        if dim % num_heads:
            raise ValueError(f"{type(self).__name__}: {dim=} is not divisible by {num_heads=}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend: str | None = None

    def helper_backend(self, op: str) -> str | None:
        """The backend for helper op ``op``: the layer's ``backend`` if ``op`` has one of that name, else automatic
        (``set_backend(model, "sdpa")`` picks the attention's SDPA path and leaves the depthwise convolution's choice
        to it, which has no SDPA backend)."""
        from ..kernels import get_op

        return self.backend if self.backend in get_op(op).backends else None

    @classmethod
    def convert_official_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the authors' parameter names/shapes for this module (keys relative to it) onto ours."""
        return dict(state_dict)

    def adapt_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], old_grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Resample grid-sized tables of a (converted) state dict to this instance's grid; identity by default.

        Args:
            state_dict: This layer's entries (keys relative to it).
            old_grid: The grid ``(H, W)`` the tables were saved for, where the checkpoint says so; ``None`` lets the
                layer infer it from the table shapes.
        """
        return dict(state_dict)

    def grid_tables_for(self, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        """This layer's grid-sized tables laid out for the token grid ``grid`` (resampled from the layer's own grid
        as :meth:`adapt_state_dict` resamples a checkpoint saved for it), keys relative to the layer; ``{}`` when the
        layer has none or ``grid`` is its own. Changes nothing: the caller assigns them and sets the grid
        attribute (``grid_kwarg``), as the models' ``set_input_size`` does."""
        name = self.grid_kwarg
        old = None if name is None else getattr(self, name, None)
        if old is None or tuple(old) == tuple(grid):
            return {}
        own = {k: v.detach() for k, v in self.state_dict().items()}
        setattr(self, name, tuple(grid))
        try:
            new = self.adapt_state_dict(own, old_grid=tuple(old))
        finally:
            setattr(self, name, old)
        return {k: v for k, v in new.items() if k in own and v is not own[k]}
