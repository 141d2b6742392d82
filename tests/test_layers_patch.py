"""The patch stems as one matrix product (``visionlin.layers.patch``, ``FAST_PATHS["patch_gemm"]``): the same values
and gradients as the convolution (forward, backward, autocast), the fallbacks, and the models built with it through
the timm contract (state dict, FX, export, compile) with the switch on."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import visionlin  # noqa: F401  (registers the models)
from visionlin.layers import PatchConv2d, as_patch_conv
from visionlin.layers import norm as norm_module
from visionlin.layers.patch import patchify_linear


@pytest.fixture
def patch_gemm(monkeypatch):
    monkeypatch.setitem(norm_module.FAST_PATHS, "patch_gemm", True)


@pytest.mark.parametrize(
    ("c", "o", "k", "size", "bias"),
    [(3, 8, (4, 4), (8, 12), True), (3, 5, (16, 16), (32, 16), False), (2, 4, (2, 3), (6, 9), True)],
)
def test_patchify_linear_equals_the_convolution(c, o, k, size, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, c, *size, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(o, c, *k, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(o, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    ref = nn.functional.conv2d(x, w, b, stride=k)
    out = patchify_linear(x, w, b)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref)
    grad = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    expected = torch.autograd.grad(ref, leaves, grad)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, grad), expected)
    # channels-last and empty inputs
    torch.testing.assert_close(patchify_linear(x.detach().contiguous(memory_format=torch.channels_last), w, b), ref)
    assert patchify_linear(x[:0], w, b).shape == (0, *ref.shape[1:])


def test_patchify_linear_under_autocast_matches_the_convolution_dtype():
    x, conv = torch.randn(2, 3, 16, 16), nn.Conv2d(3, 8, 4, stride=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = conv(x), patchify_linear(x, conv.weight, conv.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # float64 stays float64 under autocast, as the convolution does
    x64, conv64 = x.double(), conv.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = conv64(x64), patchify_linear(x64, conv64.weight, conv64.bias)
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref)


def test_patch_conv_switch_and_fallbacks(patch_gemm, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "visionlin.layers.patch.patchify_linear", lambda *a: calls.append(1) or patchify_linear(*a)
    )  # fmt: skip
    conv = as_patch_conv(nn.Conv2d(3, 4, 4, stride=4))
    assert type(conv) is PatchConv2d and conv.patchifies()
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.weight, conv.bias, stride=4))
    assert calls == [1]
    for other, inp in [
        (PatchConv2d(3, 4, 4, stride=4), torch.randn(1, 3, 9, 8)),  # side not a multiple of the kernel: floor, as conv
        (PatchConv2d(3, 4, 3, stride=2, padding=1), x),  # overlapping
        (PatchConv2d(4, 4, 2, stride=2, groups=2), torch.randn(1, 4, 8, 8)),  # grouped
        (PatchConv2d(3, 4, 2, stride=2, dilation=2), x),
        (PatchConv2d(3, 4, 4, stride=4), torch.randn(3, 8, 8)),  # unbatched
    ]:
        ref = nn.Conv2d.forward(other, inp)
        torch.testing.assert_close(other(inp), ref)
    assert calls == [1]
    monkeypatch.setitem(norm_module.FAST_PATHS, "patch_gemm", False)
    conv(x)
    assert calls == [1]
    assert type(as_patch_conv(nn.Conv1d(3, 4, 2))) is nn.Conv1d  # only exactly nn.Conv2d is converted


@pytest.mark.parametrize("name", ["infvit_tiny", "flatten_swin_tiny"])
def test_models_with_patch_gemm_match_and_keep_the_contract(name, patch_gemm, monkeypatch):
    """Switch on against off: same logits and gradients; the stem is a PatchConv2d under its usual keys; FX (timm's
    feature extraction), ``torch.export`` and ``torch.compile(fullgraph=True)`` with the switch on."""
    kw = {"depths": (1, 1, 1, 1)} if "swin" in name else {"depth": 2}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, img_size=64, **kw).eval()
    stem = model.patch_embed.proj if hasattr(model, "patch_embed") else model.stem.proj
    assert type(stem) is PatchConv2d
    assert any(k.endswith("proj.weight") for k in model.state_dict())
    x = torch.randn(2, 3, 64, 64)

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    on = run()
    monkeypatch.setitem(norm_module.FAST_PATHS, "patch_gemm", False)
    off = run()
    monkeypatch.setitem(norm_module.FAST_PATHS, "patch_gemm", True)
    torch.testing.assert_close(on[0], off[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(on[1], off[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)

    from timm.models import create_feature_extractor, get_graph_node_names

    with torch.no_grad():
        ref = model(x)
        fx = create_feature_extractor(model, return_nodes=[get_graph_node_names(model)[1][-1]])  # the output node
        torch.testing.assert_close(next(iter(fx(x).values())), ref, rtol=1e-4, atol=1e-5)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref, rtol=1e-4, atol=1e-5)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), ref, rtol=1e-4, atol=1e-5)
