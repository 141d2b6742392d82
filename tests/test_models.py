"""The timm contract, checked on every registered visionlin model (small inputs keep this fast on 2 CPU cores)."""

from __future__ import annotations

import functools
import sys

import pytest
import timm
import torch
from timm.layers import get_notrace_functions, get_notrace_modules

import visionlin
from visionlin.layers import ATTN_LAYERS
from visionlin.models.vit import Block, EfficientVisionTransformer

MODELS = visionlin.list_models()
SIZE = 64  # 4 x 4 grid of 16 px patches: every mechanism, far from its nominal grid (exercises resampling)


def _stride(model: torch.nn.Module) -> int:
    """The model's total stride (16 for the isotropic family, 32 for hierarchical ones): input sides are multiples."""
    return max(info["reduction"] for info in model.feature_info)


def _filter_fn(name: str):
    """The model family's ``checkpoint_filter_fn`` (in the module of its entrypoint)."""
    return sys.modules[timm.models.model_entrypoint(name).__module__].checkpoint_filter_fn


# Deep hierarchical variants run the contract with fewer blocks per stage (every stage, width, head count and mixer
# kept): the contract belongs to the family, and their published depths are checked without running them
# (tests/test_models_nat.py builds every named configuration on the meta device and counts its parameters).
TEST_KWARGS = {
    # Isotropic ViTs with 6 of their 12 blocks (widths, heads, mixers and agent_num kept): Agent-DeiT-B keeps its
    # 4 agent blocks then softmax ones; forward_intermediates / pruning take blocks 0 and 2.
    "visionlin.models.vit": dict(depth=6),
    "visionlin.models.nat": dict(depths=(2, 2, 2, 1)),
    # A mixer then an attention block per hybrid stage; narrow (the six variants differ only in widths and depths).
    "visionlin.models.mambavision": dict(depths=(1, 1, 2, 2), embed_dim=32, in_dim=16),
    "visionlin.models.vig": dict(depth=4),  # out_indices / intermediates take the last 3 blocks
    # Linear mixer in stages 1-2, RoPE softmax in 3-4 as published; narrow, one block per stage, small head.
    **{
        f"visionlin.models.{m}": dict(
            depths=(1, 1, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), projection=32
        )
        for m in ("mavit", "ravlt", "nalaformer")
    },
    # Narrow, every stage kept; PVT one block per stage; Swin with a 2 x 2 softmax window so that the window stages'
    # shift and mask act on the small test grids (the published 7 would cover them whole).
    "visionlin.models.pvt": dict(depths=(1, 1, 1, 1), embed_dim=(16, 32, 48, 64), num_heads=(1, 2, 3, 4)),
    "visionlin.models.swin": dict(depths=(1, 1, 2, 2), embed_dim=16, num_heads=(1, 2, 2, 4), softmax_window=2),
}


def _build(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` with the family's test-size keywords (``TEST_KWARGS``) under the caller's."""
    test_kwargs = TEST_KWARGS.get(timm.models.model_entrypoint(name).__module__, {})
    return timm.create_model(name, **{**test_kwargs, **kwargs})


def _create(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return _build(name, **kwargs).eval()


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
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert not frozen, f"frozen parameters (a value that is not trained must be a buffer): {frozen[:10]}"
    missing = [n for n, p in model.named_parameters() if p.grad is None]
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
    s = _stride(model)
    assert feats.shape == (2, model.num_prefix_tokens + (SIZE // s) * ((SIZE + 32) // s), model.num_features)
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
    model = _build(name, features_only=True, out_indices=(-3, -1)).eval()
    chans, reductions = model.feature_info.channels(), model.feature_info.reduction()
    w = SIZE + max(reductions)
    outs = model(_x(h=SIZE, w=w))
    assert len(outs) == 2
    for o, c, r in zip(outs, chans, reductions, strict=True):
        assert o.shape == (2, c, SIZE // r, w // r)


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
    assert kept == [0, 2] and len(pruned.stages if hasattr(pruned, "stages") else pruned.blocks) == 3
    # the pruned model still runs end to end, its intermediates unchanged (the hierarchical families failed on the
    # last stage's norm or the head's width); for every prune_norm / prune_head, and a new classifier fits it
    for prune_norm, prune_head in ((False, False), (True, True)):
        pruned = _create(name)
        pruned.prune_intermediate_layers(indices=[0, 2], prune_norm=prune_norm, prune_head=prune_head)
        got = pruned.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
        for a, b in zip(got, full, strict=True):
            torch.testing.assert_close(a, b)
        feats = pruned.forward_features(x)
        assert feats.shape[-1] == pruned.num_features
        torch.testing.assert_close(pruned(x), pruned.forward_head(feats))  # (the head pruned: global_pool="")
        pruned.reset_classifier(5, "avg")
        assert pruned(x).shape == (2, 5)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_equal(name, monkeypatch):
    """Checkpointing is really used (every block goes through it) and changes neither outputs nor gradients."""
    import visionlin.models.hierarchical as hierarchical
    import visionlin.models.vit as vit
    from visionlin.models.hierarchical import ConvBlock

    calls = []
    for family in (vit, hierarchical):
        real = family.checkpoint
        monkeypatch.setattr(family, "checkpoint", lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    x = _x(batch=1)
    grads = []
    for enable in (False, True):
        model = _create(name).train()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(3)
        out = model(x)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    assert len(calls) == sum(isinstance(m, (Block, ConvBlock)) for m in model.modules())
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)
    assert grads[1][1].keys() == grads[0][1].keys()
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_checkpoint_roundtrip_and_resize(name):
    """Our own state dict loads through checkpoint_filter_fn; into a model built for another resolution, the
    resampled tables give the same outputs as the source model resampling on the fly at that resolution."""
    checkpoint_filter_fn = _filter_fn(name)
    src = _create(name)
    other = _build(name, img_size=96)  # a different init (seed not reset): loading must overwrite it
    other.load_state_dict(checkpoint_filter_fn({"model": src.state_dict()}, other), strict=True)
    x96 = _x(batch=1, h=96, w=96)
    torch.testing.assert_close(other.eval()(x96), src(x96), rtol=1e-4, atol=1e-5)
    same = _build(name)
    same.load_state_dict(checkpoint_filter_fn(src.state_dict(), same), strict=True)
    torch.testing.assert_close(same.eval()(_x()), src(_x()))


@pytest.mark.parametrize("name", MODELS)
def test_set_input_size_equals_a_model_built_at_that_size(name):
    """``set_input_size`` (timm's resize) leaves the weights, grid records and outputs of a model built at the new
    size that loaded these weights through the family's checkpoint_filter_fn (a non-square size: the grid-sized
    tables must not come out transposed); a size the model cannot run is refused with nothing changed."""
    src = _create(name)
    stride = _stride(src)
    size = (3 * stride, 4 * stride)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    bad = [0, (size[0], -size[1]), "96"]
    multiple = getattr(src, "input_multiple", None) or stride
    if multiple > 1:  # (MAViT-family models take any size)
        bad.append((size[0] + 1, size[1]))
    for value in bad:
        with pytest.raises(ValueError, match="img_size"):
            src.set_input_size(value)
    after = src.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    ref = _build(name, img_size=size).eval()
    ref.load_state_dict(_filter_fn(name)(src.state_dict(), ref), strict=True)
    snapshot = src.state_dict()  # (not copied: a state dict taken before keeps the old tensors, grid record too)
    src.set_input_size(size)
    assert all(torch.equal(snapshot[k], before[k]) for k in before)
    mine, theirs = src.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(mine[k], theirs[k], rtol=0, atol=0, msg=k)
    x = _x(batch=1, h=size[0], w=size[1])
    torch.testing.assert_close(src(x), ref(x))
    src.set_input_size(None)  # (timm: nothing to change)
    assert src.state_dict().keys() == theirs.keys()
    pruned = _create(name)
    pruned.prune_intermediate_layers([0])  # (the mixers of the blocks or stages it drops are gone)
    pruned.set_input_size(size)
    reduction = pruned.feature_info[0]["reduction"]
    feature = pruned.forward_intermediates(x, indices=[0], intermediates_only=True)[0]
    assert feature.shape[-2:] == (size[0] // reduction, size[1] // reduction)


@pytest.mark.parametrize("name", ["infvit_tiny", "agent_deit_tiny", "flatten_pvt_tiny", "agent_swin_tiny"])
def test_set_input_size_moves_a_fixed_size_model(name):
    """With ``dynamic_img_size=False`` the model takes the new size, and only it; the resized tables train."""
    model = _build(name, dynamic_img_size=False)
    stride = _stride(model)
    old, new = (4 * stride, 4 * stride), (4 * stride, 6 * stride)
    model.set_input_size(new)
    model(_x(batch=1, h=new[0], w=new[1])).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError):
        model(_x(batch=1, h=old[0], w=old[1]))


def test_set_input_size_keeps_tables_given_their_own_grid():
    """A mixer given its grid in ``attn_kwargs`` (here Agent's ``bias_size``) keeps its tables; one that took the
    model's grid follows it. ``patch_size`` is not changed (refused, naming both)."""
    model = _build("agent_deit_tiny", depth=2, attn_kwargs=[{"bias_size": (7, 7)}, {}])
    fixed = model.blocks[0].attn.ah_bias.detach().clone()
    model.set_input_size((96, 160))
    assert model.blocks[0].attn.bias_size == (7, 7) and torch.equal(model.blocks[0].attn.ah_bias, fixed)
    assert model.blocks[1].attn.bias_size == (6, 10) and model.blocks[1].attn.ah_bias.shape[3] == 6
    with pytest.raises(NotImplementedError, match=r"patch_size \(\(16, 16\) -> \(8, 8\)\)"):
        model.set_input_size(patch_size=8)
    with pytest.raises(ValueError, match="smaller than or not a multiple of the stride 32"):
        _build("flatten_pvt_tiny", dynamic_img_pad=True).set_input_size((24, 64))  # (padding makes 24 run, not < 32)
    with pytest.raises(ValueError, match="img_size=.24, 24. is smaller than the stride 32"):
        _build("flatten_pvt_tiny", dynamic_img_pad=True, img_size=24)  # (the constructor, likewise)
    meta = _build("agent_pvt_tiny", device="meta")  # resized before its weights exist (the resampling ran autocast)
    meta.set_input_size((256, 320))
    assert meta.stages[0].blocks[0].attn.bias_size == (64, 80) and meta.pos_embed_grid_size == (64, 80)


def test_set_input_size_changes_nothing_when_it_cannot_finish():
    """A model it cannot resize whole is left as it was: a parametrised position embedding, a grid-following mixer
    replaced after construction, an object without the record of its grid-following mixers (older visionlin)."""
    from torch.nn.utils import parametrize

    def state(m):
        return {k: v.clone() for k, v in m.state_dict().items()}, tuple(m.patch_embed.img_size)

    class Same(torch.nn.Module):
        def forward(self, x):
            return x

    model = _build("agent_deit_tiny", depth=2)
    parametrize.register_parametrization(model, "pos_embed", Same())
    before = state(model)
    with pytest.raises(NotImplementedError, match="cannot replace 'pos_embed'"):
        model.set_input_size((96, 160))
    after = state(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert model.blocks[1].attn.bias_size == (14, 14)
    model = _build("agent_deit_tiny", depth=2)
    model.blocks[0].attn = ATTN_LAYERS["softmax"](192, 3)
    before = state(model)
    with pytest.raises(RuntimeError, match="blocks.0.attn was built as a mixer on the model's grid"):
        model.set_input_size((96, 160))
    after = state(model)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    for name in ("agent_deit_tiny", "flatten_pvt_tiny"):
        model = _build(name)
        del model._grid_layers
        with pytest.raises(RuntimeError, match="no record of which mixers follow its grid"):
            model.set_input_size(256)
        model.prune_intermediate_layers([0])  # (still works without the record)


def test_checkpoint_filter_takes_a_no_embed_class_checkpoint_to_another_grid():
    """A ``no_embed_class`` model's own weights (class token, position rows for the grid only) load into a model of
    another size: the recorded grid tells the rows apart (they were read as one class row + 195 grid rows)."""
    from visionlin.models.vit import checkpoint_filter_fn

    src = _create("infvit_tiny", depth=2, no_embed_class=True)
    dst = _build("infvit_tiny", depth=2, no_embed_class=True, img_size=(96, 160)).eval()
    dst.load_state_dict(checkpoint_filter_fn(src.state_dict(), dst))
    src.set_input_size((96, 160))
    torch.testing.assert_close(dst.pos_embed, src.pos_embed, rtol=0, atol=0)


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
    # agent_position_biases takes the layer's float32 parameter tables by design and returns the dtype it is given
    mixed = [(op, dtypes) for op, dtypes in calls if dtypes != {torch.bfloat16} and op not in TABLE_OPS]
    assert not mixed, f"kernels called with non-bf16 or mixed dtypes: {mixed[:3]}"


#: Ops whose tensor inputs are parameters (float32 under autocast) with an explicit output dtype.
TABLE_OPS = {"agent_position_biases"}


@pytest.mark.parametrize("name", ["infvit_tiny", "agent_deit_tiny", "flatten_deit_tiny", "inline_deit_tiny"])
def test_construction_dtype_and_device(name):
    model = timm.create_model(name, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    meta = timm.create_model(name, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


class _TimmTracer(torch.fx.Tracer):
    """``torch.fx`` tracing with timm's registered leaves, as timm's FX feature extraction traces."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, tuple(get_notrace_modules())) or super().is_leaf_module(m, qualname)


def _fx_equals_eager(model: torch.nn.Module, x: torch.Tensor) -> None:
    """The FX-traced model gives the eager outputs and parameter gradients."""
    traced = torch.fx.GraphModule(model, _TimmTracer().trace(model))
    results = []
    for fn in (model, traced):
        model.zero_grad(set_to_none=True)
        out = fn(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (eager, eager_grads), (fx, fx_grads) = results
    torch.testing.assert_close(fx, eager)
    for n, g in eager_grads.items():
        torch.testing.assert_close(fx_grads[n], g, msg=n)


@pytest.mark.parametrize("name", MODELS)
def test_fx_trace_equals_eager(name):
    model = _create(name, num_classes=5)
    _fx_equals_eager(model, _x(h=SIZE, w=SIZE + _stride(model)))


# One variant per family and mechanism (the variants' module classes), the smallest: torch.export traces the same
# Python for every size of a family, so it runs on these; every variant still goes through FX tracing
# (test_fx_trace_equals_eager), timm's FX feature extraction (test_features_only_fx) and the eager contract above.
# test_representatives_cover_every_mechanism keeps the list complete.
REPRESENTATIVES = [
    "infvit_tiny",
    "infvit_pure_tiny",
    "flatten_deit_tiny",
    "agent_deit_tiny",
    "agent_deit_base",  # agent blocks then softmax blocks
    "inline_deit_tiny",
    "agent_pvt_tiny",
    "flatten_pvt_tiny",
    "agent_swin_tiny",
    "flatten_swin_tiny",
    "nat_mini",
    "nat_small",  # layer scale
    "dinat_mini",
    "dinat_base",  # layer scale
    "mambavision_tiny",
    "mambavision_base",
    "mavit_tiny",
    "ravlt_tiny",
    "nalaformer_tiny",
    "vig_tiny",
    "vig_small",
]
# torch.export (the costliest contract test, 7-19 s per model on the CI machine) runs on every representative, whole
# model, ViTs included; every entrypoint runs FX tracing and timm's FX feature extraction.
EXPORT_MODELS = REPRESENTATIVES


@functools.cache
def _mechanism(name: str) -> tuple[str, frozenset[str]]:
    """A variant's family prefix (``dinat`` apart from ``nat``) and the classes of its modules."""
    model = _build(name, device="meta")
    return name.rsplit("_", 1)[0], frozenset(type(m).__name__ for m in model.modules())


def test_representatives_cover_every_mechanism():
    covered = {_mechanism(name) for name in REPRESENTATIVES}
    missing = [name for name in MODELS if _mechanism(name) not in covered]
    assert not missing, f"add one of these to REPRESENTATIVES (a family / module-class set not covered): {missing}"
    assert set(REPRESENTATIVES) <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_features_only_fx(name):
    """timm's FX feature extraction (``feature_cls="fx"``) returns the block outputs (tokens, prefix first)."""
    torch.manual_seed(0)
    fx = _build(name, features_only=True, feature_cls="fx", out_indices=(-2, -1)).eval()
    model = _create(name)
    model.load_state_dict(fx.state_dict(), strict=False)  # the extractor keeps only what the features need
    x = _x()
    _, inter = model.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True)
    for out, (grid, prefix) in zip(fx(x), inter, strict=True):
        torch.testing.assert_close(out, torch.cat([prefix, grid], dim=1))
    # The input check survives FX's dead-code elimination: bad input gets the eager ValueError.
    with pytest.raises(ValueError, match=r"input dtype torch.float64 differs from the model's parameter dtype"):
        fx(x.double())
    with pytest.raises(ValueError, match=r"input has 1 channels"):
        fx(x[:, :1])


@pytest.mark.parametrize("name", EXPORT_MODELS)
def test_export_dynamic_batch(name):
    model = _create(name, num_classes=5)
    batch = torch.export.Dim("batch", max=64)
    exported = torch.export.export(model, (_x(batch=2),), dynamic_shapes={"x": {0: batch}})
    x = _x(batch=3)
    torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.parametrize("name", MODELS)
def test_empty_batch(name):
    model = _create(name, num_classes=5)
    assert model(_x(batch=0)).shape == (0, 5)
    assert model.forward_features(_x(batch=0)).shape[0] == 0
    maps = model.forward_intermediates(_x(batch=0), indices=2, intermediates_only=True)
    shapes = [(0, i["num_chs"], SIZE // i["reduction"], SIZE // i["reduction"]) for i in model.feature_info[-2:]]
    assert [m.shape for m in maps] == shapes
    features = _build(name, features_only=True, out_indices=(-1,)).eval()
    assert features(_x(batch=0))[0].shape == shapes[-1]


@pytest.mark.parametrize("attn", sorted(ATTN_LAYERS))
def test_every_mixer_traces_and_exports(attn):
    """FX and ``torch.export`` over every registered token mixer (also those no named model uses yet)."""
    torch.manual_seed(0)
    extra = {"agent": {"agent_num": 4}}.get(attn, {})
    model = EfficientVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3, attn_layer=attn, attn_kwargs=extra
    ).eval()
    x = torch.randn(2, 3, 32, 48)
    _fx_equals_eager(model, x)
    exported = torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch", max=64)}})
    x3 = torch.randn(3, 3, 32, 48)
    torch.testing.assert_close(exported.module()(x3), model(x3))
    assert ATTN_LAYERS[attn].kernel_ops, "set_backend checks a mixer's ops: declare them"
    assert set(ATTN_LAYERS[attn].kernel_ops) <= set(visionlin.kernels.list_ops())


@pytest.mark.parametrize("name", ["infvit_tiny", "infvit_pure_tiny"])
def test_rho_is_a_buffer_unless_learned(name):
    fixed = _create(name)
    assert "blocks.0.attn.rho_logit" in fixed.state_dict()
    assert "blocks.0.attn.rho_logit" not in dict(fixed.named_parameters())
    learned = _create(name, attn_kwargs=dict(learn_rho=True)).train()
    learned.load_state_dict(fixed.state_dict())  # same key: checkpoints load either way
    learned(_x()).square().mean().backward()
    grads = [learned.blocks[i].attn.rho_logit.grad for i in range(len(learned.blocks))]
    assert all(g is not None and g.abs() > 0 for g in grads), grads
