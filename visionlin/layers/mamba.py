"""MambaVision's token mixer: a selective-scan branch next to a symmetric branch without SSM (Hatamizadeh & Kautz,
CVPR 2025, arXiv 2407.08083), with the authors' parameter names (``in_proj``, ``conv1d_x``, ``conv1d_z``, ``x_proj``,
``dt_proj``, ``A_log``, ``D``, ``out_proj``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.scan import selective_scan
from ._base import TokenMixer, check_tokens
from ._cache import cached, frozen_key
from ._registry import register_attn

__all__ = ["MambaVisionMixer"]


@register_attn("mambavision")
class MambaVisionMixer(TokenMixer):
    """MambaVision mixer over the token sequence (prefix tokens first, then the grid in row-major order).

    ``in_proj`` splits into ``x`` and ``z`` (``d_inner / 2`` channels each); both go through a depthwise 1-D
    convolution along the sequence (non-causal, ``padding='same'``, no bias) and SiLU. ``x`` then runs the selective
    scan (``d_state`` states per channel, step sizes from ``x_proj`` -> ``dt_proj``, ``D`` skip, no ``z`` gating);
    ``z`` does not. ``out_proj`` mixes ``concat([scan(x), z])``.

    As the authors' code, ``dt_proj``'s bias is applied twice (inside ``dt_proj`` and again as the scan's
    ``delta_bias``) before the softplus; ``faithful_dt_bias=False`` applies it once.

    Constructor compatible with timm's ``Attention``: ``num_heads``, ``qkv_bias`` and ``norm_layer`` do not apply and
    are ignored (the projections' bias is ``bias``, as Mamba's); ``qk_norm`` and ``attn_drop`` have no meaning here
    and raise ``NotImplementedError``.

    Args:
        dim: Channels ``C`` (``d_model``).
        num_heads: Ignored (kept for the common constructor).
        qkv_bias: Ignored.
        qk_norm: Must be ``False``.
        attn_drop: Must be 0.
        proj_drop: Dropout after ``out_proj``.
        norm_layer: Ignored.
        d_state: SSM states per channel ``N`` (MambaVision: 8).
        d_conv: Kernel of the depthwise 1-D convolutions (MambaVision: 3).
        expand: ``d_inner = expand * C`` (MambaVision: 1); ``d_inner`` must be even.
        dt_rank: Rank of the step-size projection (``"auto"``: ``ceil(C / 16)``).
        dt_min: Smallest initial step size.
        dt_max: Largest initial step size.
        dt_init_floor: Floor of the initial step sizes.
        conv_bias: Mamba's flag; the authors pass ``conv_bias // 2``, so ``True`` still gives no bias (their quirk).
        bias: Bias on ``in_proj`` and ``out_proj``.
        faithful_dt_bias: Add ``dt_proj``'s bias twice, as the authors' code does.
    """

    kernel_ops = ("selective_scan",)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        *,
        d_state: int = 8,
        d_conv: int = 3,
        expand: float = 1,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        faithful_dt_bias: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(dim, num_heads)
        if qk_norm:
            raise NotImplementedError("MambaVisionMixer has no queries or keys to normalise (qk_norm=True)")
        if attn_drop:
            raise NotImplementedError(f"MambaVisionMixer has no attention matrix to drop ({attn_drop=})")
        d_inner = int(expand * dim)
        if d_inner < 2 or d_inner % 2:
            raise ValueError(
                f"MambaVisionMixer: d_inner = int(expand * dim) = {d_inner} must be even and >= 2 ({expand=})"
            )
        for name, value in (("d_state", d_state), ("d_conv", d_conv)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaVisionMixer: {name}={value!r} must be an integer >= 1")
        if dt_rank == "auto":
            dt_rank = math.ceil(dim / 16)
        if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
            raise ValueError(f"MambaVisionMixer: dt_rank={dt_rank!r} must be 'auto' or an integer >= 1")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"MambaVisionMixer: need 0 < dt_min <= dt_max, got {dt_min=}, {dt_max=}")
        dd = {"device": device, "dtype": dtype}
        half = d_inner // 2
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = d_inner, d_state, d_conv, dt_rank
        self.faithful_dt_bias = faithful_dt_bias
        self.in_proj = nn.Linear(dim, d_inner, bias=bias, **dd)
        self.x_proj = nn.Linear(half, dt_rank + 2 * d_state, bias=False, **dd)
        self.dt_proj = nn.Linear(dt_rank, half, bias=True, **dd)
        self.A_log = nn.Parameter(torch.empty(half, d_state, **dd))
        self.D = nn.Parameter(torch.empty(half, **dd))
        self.out_proj = nn.Linear(d_inner, dim, bias=bias, **dd)
        conv_kw = dict(kernel_size=d_conv, groups=half, bias=bool(conv_bias // 2), padding="same")
        self.conv1d_x = nn.Conv1d(half, half, **conv_kw, **dd)
        self.conv1d_z = nn.Conv1d(half, half, **conv_kw, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._dt_range = (dt_min, dt_max, dt_init_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real ``A = -(1..N)``, ``D = 1``, step sizes log-uniform in ``[dt_min, dt_max]``
        through ``dt_proj``'s bias (the authors' model re-initialises every ``Linear`` afterwards, which zeroes it)."""
        dt_min, dt_max, floor = self._dt_range
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(a).expand_as(self.A_log))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        log_dt = torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def extra_repr(self) -> str:
        return f"d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, dt_rank={self.dt_rank}"

    def forward(self, x: torch.Tensor, feat_size: tuple[int, int], num_prefix_tokens: int = 0) -> torch.Tensor:
        """Tokens ``[B, num_prefix_tokens + H*W, C]`` in and out; the scan runs over them in this order."""
        check_tokens(x, feat_size, num_prefix_tokens, type(self).__name__, self.dim)
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)  # [B, d_inner / 2, L] each
        xs = F.silu(self.conv1d_x(xs)).transpose(1, 2)  # [B, L, d_inner / 2]
        z = F.silu(self.conv1d_z(z)).transpose(1, 2)
        dt, b, c = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt) if self.faithful_dt_bias else F.linear(dt, self.dt_proj.weight)
        key = frozen_key(self.A_log, self.D, self.dt_proj.bias)  # kept between inference forwards (layers._cache)
        a, d, bias = cached(self, "scan", key, self._scan_parameters)
        y = selective_scan(
            xs,
            dt,
            a,
            b,
            c,
            d,
            delta_bias=bias,
            delta_softplus=True,
            check_values=False,  # -exp(A_log) is <= 0: no host sync per forward to re-check it
            backend=self.backend,
        )
        return self.proj_drop(self.out_proj(torch.cat([y, z], dim=-1)))

    def _scan_parameters(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A = -exp(A_log), D, delta bias)`` in float32, as the scan takes them."""
        return -torch.exp(self.A_log.float()), self.D.float(), self.dt_proj.bias.float()
