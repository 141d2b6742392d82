"""Model-level parity on the GPU: every registered model with its automatic backends (the Triton, flex and cuDNN fast
paths a user gets) against the same weights with ``visionlin.set_backend(model, "reference")`` (every mixer and its
helper ops, the token convolution and the gated LayerNorm included, on the plain-PyTorch references).

Each model is built at its test size (``tests/test_models.py``'s ``TEST_KWARGS``: every stage, mixer and head count
kept, fewer blocks) on a 64 x 64 input, batch 2, and compared forward (the logits) and backward (the input gradient
and every parameter gradient, concatenated) through a fixed random projection of the logits.

Tolerances:
  * float32 (TF32 off in PyTorch; the Triton kernels' float32 products may run on TF32 tensor cores, whose rounding
    unit is 2^-11): relative error at most 5e-3, about ten TF32 roundings;
  * bfloat16 autocast (flash-attention's rule): the fast model's relative error against the float32 reference is at
    most twice the reference model's own error under the same autocast, plus 2^-7 (two bfloat16 roundings).
"""

from __future__ import annotations

import pytest
import torch
from test_models import MODELS, _create

import visionlin

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FP32_BOUND = 5e-3
BF16_FLOOR = 2.0**-7


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture
def no_tf32(monkeypatch):
    """TF32 off in PyTorch's matrix products and cuDNN for the test only (the float32 bound's premise), restored after
    it, so that other tests in the same worker keep the defaults."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _run(model: torch.nn.Module, x: torch.Tensor, backend: str | None, autocast: bool) -> dict[str, torch.Tensor]:
    """Logits, input gradient and the concatenated parameter gradients under ``backend``."""
    visionlin.set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    proj = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    (out.float() * proj).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"backend {backend}: no gradient for {missing}"
    grads = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.requires_grad])
    return {"out": out.detach().float(), "dx": x.grad.float(), "dparams": grads}


@pytest.mark.parametrize("name", MODELS)
def test_gpu_fast_backends_match_reference(name, no_tf32):
    model = _create(name).cuda()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    ref = _run(model, x, "reference", autocast=False)
    fast = _run(model, x, None, autocast=False)
    errors = {k: _rel(fast[k], ref[k]) for k in ref}
    bad = {k: f"{e:.2e} > {FP32_BOUND:.0e}" for k, e in errors.items() if not e <= FP32_BOUND}
    assert not bad, f"float32: {bad}"

    ref_bf16 = _run(model, x, "reference", autocast=True)
    fast_bf16 = _run(model, x, None, autocast=True)
    bad = {}
    for k in ref:
        base, ours = _rel(ref_bf16[k], ref[k]), _rel(fast_bf16[k], ref[k])
        bound = 2 * base + BF16_FLOOR
        if not ours <= bound:
            bad[k] = f"{ours:.2e} > {bound:.2e} (reference under autocast: {base:.2e})"
    assert not bad, f"bfloat16 autocast: {bad}"


@pytest.mark.parametrize(
    ("name", "layer_module", "key"),
    [("vig_tiny", "gla", "qkv_packed"), ("nat_tiny", "neighborhood", "qkv_packed"), ("vig_tiny", "gla", "token_conv")],
)
def test_gpu_packed_calls_match_split(name, layer_module, key, monkeypatch, no_tf32):
    """The layers' switches written without a GPU (``visionlin.layers.<module>.FAST_PATHS[key]``: ViG's projections'
    outputs and NAT's ``qkv`` handed to the ops packed, with packed gradients; ViG's convolution on the token layout)
    on against off, both on the fast backends, at batch 64 (ViG's (batch, head) programs then fill the SMs: the packed
    walks, not the fallback), float32."""
    import importlib

    switches = importlib.import_module(f"visionlin.layers.{layer_module}").FAST_PATHS
    model = _create(name).cuda()
    x = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    monkeypatch.setitem(switches, key, False)
    split = _run(model, x, None, autocast=False)
    monkeypatch.setitem(switches, key, True)
    packed = _run(model, x, None, autocast=False)
    errors = {k: _rel(packed[k], split[k]) for k in split}
    bad = {k: f"{e:.2e} > {FP32_BOUND:.0e}" for k, e in errors.items() if not e <= FP32_BOUND}
    assert not bad, f"packed against split: {bad}"
