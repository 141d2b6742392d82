"""TokenDepthwiseConv2d: the depthwise Conv2d of the RoPE-hybrid blocks (CPE, LePE, ConvFFN) on grid tokens, fused with
its residual, against nn.Conv2d on the [B, C, H, W] map, forward and backward, with and without autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionlin.layers._base import TokenDepthwiseConv2d, map_to_tokens, tokens_to_map


def _plain(conv: nn.Conv2d, x: torch.Tensor, feat: tuple[int, int], residual, prefix: int) -> torch.Tensor:
    out = map_to_tokens(nn.functional.conv2d(tokens_to_map(x[:, prefix:], feat), conv.weight, conv.bias, 1,
                                             conv.padding, 1, conv.groups))  # fmt: skip
    if prefix:
        out = torch.cat([out.new_zeros(x.shape[0], prefix, x.shape[2]), out], 1)
    return out if residual is None else residual + out


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("with_residual", [True, False])
def test_matches_conv2d_forward_backward(kernel, prefix, with_residual):
    torch.manual_seed(0)
    feat, c = (5, 7), 6
    conv = TokenDepthwiseConv2d(c, kernel).double()
    x = torch.randn(2, prefix + 35, c, dtype=torch.float64, requires_grad=True)
    res = torch.randn_like(x, requires_grad=True) if with_residual else None
    out = conv(x, feat, res, prefix)
    ref = _plain(conv, x, feat, res, prefix)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    ins = [x, conv.weight, conv.bias, *([res] if with_residual else [])]
    got = torch.autograd.grad(out, ins, g)
    want = torch.autograd.grad(ref, ins, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_autocast_runs_the_conv_in_bf16_and_keeps_a_float32_residual():
    torch.manual_seed(0)
    conv = TokenDepthwiseConv2d(8, 3)
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, (4, 4), x)  # the float32 residual stream: conv in bf16, added outside in float32
        half = conv(x.bfloat16(), (4, 4), x.bfloat16())  # both bf16: fused
    assert out.dtype == torch.float32 and half.dtype == torch.bfloat16
    ref = x + _plain(conv, x.bfloat16().float(), (4, 4), None, 0)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(half.float(), out, rtol=3e-2, atol=3e-2)


def test_is_a_conv2d_with_its_keys_and_refuses_even_kernels():
    conv = TokenDepthwiseConv2d(4, 5)
    assert isinstance(conv, nn.Conv2d) and conv.groups == 4 and conv.padding == (2, 2)
    assert set(conv.state_dict()) == {"weight", "bias"} and conv.weight.shape == (4, 1, 5, 5)
    with pytest.raises(ValueError, match="kernel_size=4 must be a positive odd integer"):
        TokenDepthwiseConv2d(4, 4)
    with pytest.raises(ValueError, match="tokens"):
        conv(torch.randn(1, 10, 4), (3, 3))  # 10 tokens on a 3 x 3 grid
