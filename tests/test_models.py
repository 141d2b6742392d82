"""The timm contract, checked on every registered visionlin model (small inputs keep this fast on 2 CPU cores)."""

from __future__ import annotations

import pytest
import timm
import torch

import visionlin
from visionlin.models.vit import checkpoint_filter_fn

MODELS = visionlin.list_models()
SIZE = 64  # 4 x 4 grid of 16 px patches: every mechanism, far from its nominal grid (exercises resampling)


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _x(batch: int = 2, h: int = SIZE, w: int = SIZE, chans: int = 3) -> torch.Tensor:
    return torch.randn(batch, chans, h, w, generator=torch.Generator().manual_seed(1))


def test_models_registered():
    expected = {
        "infvit_tiny",
        "infvit_small",
        "infvit_base",
        "infvit_pure_tiny",
        "infvit_pure_small",
        "infvit_pure_base",
        "flatten_deit_tiny",
        "flatten_deit_small",
        "agent_deit_tiny",
        "agent_deit_small",
        "agent_deit_base",
        "inline_deit_tiny",
        "inline_deit_small",
        "inline_deit_base",
    }
    assert expected <= set(MODELS)
    assert set(timm.list_models("infvit*")) >= {n for n in expected if n.startswith("infvit")}


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name):
    model = _create(name, num_classes=7).train()
    x = _x()
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:10]}"
    nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not nonfinite


@pytest.mark.parametrize("name", MODELS)
def test_cfg_and_head(name):
    model = _create(name)
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name
    assert cfg["fixed_input_size"] is False
    sd = model.state_dict()
    assert cfg["first_conv"] + ".weight" in sd
    assert cfg["classifier"] + ".weight" in sd
    x = _x(h=SIZE, w=SIZE + 32)  # non-square, resolution unlocked
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_prefix_tokens + (SIZE // 16) * ((SIZE + 32) // 16), model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.head_hidden_size)
    assert model.forward_head(feats).shape == (2, model.num_classes)
    assert set(model.no_weight_decay()) <= {n for n, _ in model.named_parameters()}
    assert model.group_matcher()["stem"]


@pytest.mark.parametrize("name", MODELS)
def test_reset_classifier(name):
    model = _create(name)
    model.reset_classifier(0)
    assert model(_x()).shape == (2, model.num_features)
    model.reset_classifier(5, global_pool="avg")
    assert model(_x()).shape == (2, 5)
    model.reset_classifier(0, "")
    assert model(_x()).ndim == 3


@pytest.mark.parametrize("name", MODELS)
def test_features_only(name):
    model = timm.create_model(name, features_only=True, out_indices=(-3, -1)).eval()
    chans, reductions = model.feature_info.channels(), model.feature_info.reduction()
    outs = model(_x(h=SIZE, w=SIZE + 16))
    assert len(outs) == 2
    for o, c, r in zip(outs, chans, reductions, strict=True):
        assert o.shape == (2, c, SIZE // r, (SIZE + 16) // r)


@pytest.mark.parametrize("name", MODELS)
def test_forward_intermediates(name):
    model = _create(name)
    x = _x()
    final, inter = model.forward_intermediates(x, indices=3)
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(inter) == 3
    for f, info in zip(inter, model.feature_info[-3:], strict=True):
        assert f.shape == (2, info["num_chs"], SIZE // info["reduction"], SIZE // info["reduction"])
    early = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True, stop_early=True)
    full = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert len(early) == 2
    for a, b in zip(early, full, strict=True):
        torch.testing.assert_close(a, b)
    pruned = _create(name)
    kept = pruned.prune_intermediate_layers(indices=[0, 2], prune_head=True)
    assert kept == [0, 2] and len(pruned.blocks) == 3


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_equal(name, monkeypatch):
    """Checkpointing is really used (every block goes through it) and changes neither outputs nor gradients."""
    import visionlin.models.vit as vit

    calls = []
    real = vit.checkpoint
    monkeypatch.setattr(vit, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _x(batch=1)
    grads = []
    for enable in (False, True):
        model = _create(name).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == len(model.blocks)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    assert grads[1][1].keys() == grads[0][1].keys()
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_roundtrip_and_resize(name):
    """Our own state dict loads through checkpoint_filter_fn; into a model built for another resolution, the
    resampled tables give the same outputs as the source model resampling on the fly at that resolution."""
    src = _create(name)
    other = timm.create_model(name, img_size=96)  # a different init (seed not reset): loading must overwrite it
    other.load_state_dict(checkpoint_filter_fn({"model": src.state_dict()}, other), strict=True)
    x96 = _x(batch=1, h=96, w=96)
    torch.testing.assert_close(other.eval()(x96), src(x96), rtol=1e-4, atol=1e-5)
    same = timm.create_model(name)
    same.load_state_dict(checkpoint_filter_fn(src.state_dict(), same), strict=True)
    torch.testing.assert_close(same.eval()(_x()), src(_x()))


@pytest.mark.parametrize("name", MODELS)
def test_no_mixed_dtypes_under_autocast(name, monkeypatch):
    """Under bf16 autocast every kernel call gets one dtype: an fp32 table promoting q/k/v would silently send the
    call to the float32 reference instead of the native path."""
    from visionlin.kernels import _dispatch

    calls = []
    select = _dispatch.Op.select

    def spy(self, *args, backend=None, **kwargs):
        calls.append((self.name, {a.dtype for a in args if isinstance(a, torch.Tensor)}))
        return select(self, *args, backend=backend, **kwargs)

    monkeypatch.setattr(_dispatch.Op, "select", spy)
    model = _create(name)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(_x(batch=1))
    assert calls
    mixed = [(op, dtypes) for op, dtypes in calls if dtypes != {torch.bfloat16}]
    assert not mixed, f"kernels called with non-bf16 or mixed dtypes: {mixed[:3]}"


@pytest.mark.parametrize("name", ["infvit_tiny", "agent_deit_tiny", "flatten_deit_tiny", "inline_deit_tiny"])
def test_construction_dtype_and_device(name):
    model = timm.create_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    meta = timm.create_model(name, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}
