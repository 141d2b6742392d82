"""Parameter-derived tensors kept between inference forwards (``visionlin.layers._cache``): kept only without
gradients in plain eager mode, rebuilt when a source parameter changes (in place, by ``load_state_dict``, by a new
tensor), never a stale result, and gradients still reach every parameter in training."""

from __future__ import annotations

import copy

import pytest
import torch
from test_layers_agent_inline import _randomize
from torch import nn

from visionlin.layers import _cache, clear_derived_cache
from visionlin.layers._cache import cached, frozen_key, kept
from visionlin.layers.focused import FocusedLinearAttention
from visionlin.layers.infsa import LinearInfSAAttention


class _Sub(torch.Tensor):
    pass


def _focused(**kw) -> FocusedLinearAttention:
    return _randomize(FocusedLinearAttention(32, 2, qkv_bias=True, pos_size=(4, 5), **kw)).eval()


def _x(n: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, n, 32, generator=torch.Generator().manual_seed(seed))


def _kept(module: nn.Module) -> dict:
    return kept(module)


def test_frozen_key_refuses_where_nothing_may_be_kept():
    p = nn.Parameter(torch.randn(3))
    assert frozen_key(p) is None  # gradients on
    with torch.no_grad():
        key = frozen_key(p, None, extra=("x",))
        assert key is not None and key == frozen_key(p, None, extra=("x",))
        assert frozen_key(p, extra=("y",)) != key
        p.add_(1.0)
        assert frozen_key(p, None, extra=("x",)) != key  # the version counter moved
        assert frozen_key(torch.empty(3, device="meta")) is None
        assert frozen_key(torch.randn(3).as_subclass(_Sub)) is None  # subclasses keep the plain path
    with torch.inference_mode():
        assert frozen_key(torch.randn(3)) is None  # an inference tensor has no version counter
        assert frozen_key(p) is not None and frozen_key(p)[0] is True  # inference mode is part of the key


def test_cached_keeps_one_value_per_name_and_drops_it_on_a_none_key():
    m = nn.Module()
    calls = []

    def build(v):
        calls.append(v)
        return torch.tensor(float(v))

    assert cached(m, "a", ("k", 1), lambda: build(1)) == 1 and cached(m, "a", ("k", 1), lambda: build(2)) == 1
    assert calls == [1]
    assert cached(m, "a", ("k", 2), lambda: build(3)) == 3 and calls == [1, 3]
    assert cached(m, "a", None, lambda: build(4)) == 4 and "a" not in kept(m)
    assert cached(m, "a", ("k", 2), lambda: build(5)) == 5  # rebuilt after the drop


@pytest.mark.parametrize("prefix", [0, 1])
def test_focused_layer_keeps_its_derived_tensors_and_stays_exact(prefix):
    layer = _focused()
    x = _x(20 + prefix)
    want = layer(x, (4, 5), prefix)  # gradients on: nothing kept
    assert not _kept(layer)
    with torch.no_grad():
        first = layer(x, (4, 5), prefix)
        kept = _kept(layer)
        assert set(kept) == {"pos", "scale", "dwc"}
        second = layer(x, (4, 5), prefix)
        assert all(_kept(layer)[k] is kept[k] for k in kept)  # reused, not rebuilt
    torch.testing.assert_close(first, want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(second, want.detach(), rtol=0, atol=0)
    with torch.no_grad():
        for name in ("scale", "positional_encoding", "dwc.weight", "dwc.bias"):
            layer.get_parameter(name).add_(0.05)  # an optimizer step
            got = layer(x, (4, 5), prefix)
            with torch.enable_grad():
                fresh = layer(x, (4, 5), prefix)
            torch.testing.assert_close(got, fresh.detach(), rtol=0, atol=0, msg=name)
        other = _randomize(_focused(), seed=7)
        layer.load_state_dict(other.state_dict())
        with torch.enable_grad():
            fresh = other(x, (4, 5), prefix)
        torch.testing.assert_close(layer(x, (4, 5), prefix), fresh.detach(), rtol=0, atol=0)
        resized = layer(_x(6 * 5 + prefix), (6, 5), prefix)  # another grid: the table resampled, not reused
        with torch.enable_grad():
            fresh = layer(_x(6 * 5 + prefix), (6, 5), prefix)
        torch.testing.assert_close(resized, fresh.detach(), rtol=0, atol=0)
    # training: every parameter gets a gradient, and the step drops what inference kept
    layer.train()
    layer(x, (4, 5), prefix).square().sum().backward()
    assert not _kept(layer)
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_focused_layer_keeps_per_dtype_under_autocast():
    layer = _focused()
    x = _x(20)
    with torch.no_grad():
        plain = layer(x, (4, 5))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = layer(x, (4, 5))
            assert _kept(layer)["dwc"][0].dtype == torch.bfloat16
        again = layer(x, (4, 5))
    assert half.dtype == torch.bfloat16 and _kept(layer)["dwc"][0].dtype == torch.float32
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


def test_infsa_rho_is_kept_and_learned_rho_still_trains():
    layer = _randomize(LinearInfSAAttention(32, 2, learn_rho=True)).eval()
    x = _x(20)
    with torch.no_grad():
        out = layer(x, (4, 5))
        rho = _kept(layer)["rho"]
        assert layer.rho() is rho
        layer.rho_logit.add_(0.5)
        assert layer.rho() is not rho and torch.equal(layer.rho(), torch.sigmoid(layer.rho_logit.float()))
    layer(x, (4, 5)).sum().backward()
    assert layer.rho_logit.grad is not None
    assert out.shape == x.shape


def test_copies_and_reassigned_parameters_do_not_reuse_kept_tensors():
    layer = _focused()
    x = _x(20)
    with torch.no_grad():
        layer(x, (4, 5))
        twin = copy.deepcopy(layer)
        twin.scale = nn.Parameter(twin.scale + 1.0)  # a new tensor under the same name
        with torch.enable_grad():
            fresh = twin(x, (4, 5))
        torch.testing.assert_close(twin(x, (4, 5)), fresh.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["token_conv", "mamba"])
def test_token_conv_and_mamba_mixer_keep_exact_results_across_updates(which):
    from visionlin.layers._base import TokenDepthwiseConv2d
    from visionlin.layers.mamba import MambaVisionMixer

    if which == "token_conv":
        module = _randomize(TokenDepthwiseConv2d(32, 3)).eval()
        names, expect = ("weight", "bias"), {"taps"}

        def run():
            return module(_x(20), (4, 5), residual=_x(20, seed=2))
    else:
        module = _randomize(MambaVisionMixer(32, 2, d_state=4)).eval()
        names, expect = ("A_log", "D", "dt_proj.bias"), {"scan"}

        def run():
            return module(_x(20), (4, 5))

    want = run().detach()
    with torch.no_grad():
        torch.testing.assert_close(run(), want, rtol=0, atol=0)
        assert set(_kept(module)) == expect
        torch.testing.assert_close(run(), want, rtol=0, atol=0)
        for name in names:
            module.get_parameter(name).add_(0.1)
            with torch.enable_grad():
                fresh = run().detach()
            torch.testing.assert_close(run(), fresh, rtol=0, atol=0, msg=name)
    run().sum().backward()
    assert all(module.get_parameter(n).grad is not None for n in names)


def test_data_edits_need_a_clear_and_reassigned_storages_never_alias():
    """In-place edits through ``.data`` do not move the version counter (documented): clear_derived_cache (or KEEP =
    False) makes them seen. Reassigning ``p.data`` back and forth never returns a value built for another storage that
    once had the same address: the kept entry holds its sources' storages."""
    layer = _focused()
    x = _x(20)

    def fresh():
        with torch.enable_grad():
            return layer(x, (4, 5)).detach()

    with torch.no_grad():
        layer(x, (4, 5))
        layer.scale.data.add_(1.0)
        clear_derived_cache(layer)
        torch.testing.assert_close(layer(x, (4, 5)), fresh(), rtol=0, atol=0)
        # two reassignments per forward: the second storage can land where the first one was (found with 256
        # channels on the CPU allocator)
        wide = _randomize(FocusedLinearAttention(256, 4, qkv_bias=True)).eval()
        xw = torch.randn(1, 16, 256, generator=torch.Generator().manual_seed(3))
        for _ in range(6):
            got = wide(xw, (4, 4))
            entries = dict(_cache._STORE[wide])
            clear_derived_cache(wide)
            torch.testing.assert_close(got, wide(xw, (4, 4)), rtol=0, atol=0)  # a fresh build
            _cache._STORE[wide] = entries  # as if that build had not happened
            wide.scale.data = wide.scale.data + 0.5
            wide.scale.data = wide.scale.data + 0.5
        _cache.KEEP = False
        try:
            layer(x, (4, 5))
            assert not kept(layer)
        finally:
            _cache.KEEP = True
    with pytest.raises(TypeError, match="nn.Module or None"):
        clear_derived_cache("model")
    clear_derived_cache()  # every module


def test_kept_values_are_not_carried_by_copies_or_pickles():
    import io

    layer = _focused()
    with torch.no_grad():
        layer(_x(20), (4, 5))
    assert kept(layer)
    assert not kept(copy.deepcopy(layer))
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert not kept(torch.load(buf, weights_only=False))
