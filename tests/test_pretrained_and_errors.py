"""Pretrained-weight loading paths and bad-input errors (each a ValueError naming the offending values)."""

from __future__ import annotations

import pytest
import timm
import torch

import visionlin
from visionlin.models.vit import EfficientVisionTransformer, checkpoint_filter_fn


def test_pretrained_without_released_weights_is_a_clear_error():
    with pytest.raises(ValueError, match=r"infvit_tiny: no released pretrained weights.*pretrained_cfg_overlay"):
        timm.create_model("infvit_tiny", pretrained=True)


def test_pretrained_unreachable_url_is_a_clear_error():
    # Port 9 on loopback refuses at once: the same path an offline machine takes.
    with pytest.raises(RuntimeError, match=r"could not load pretrained weights from url='http://127.0.0.1:9/w.pth'"):
        timm.create_model(
            "flatten_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(url="http://127.0.0.1:9/w.pth")
        )


def test_pretrained_from_local_file_resamples(tmp_path):
    src = timm.create_model("flatten_deit_tiny", num_classes=10)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = timm.create_model(
        "flatten_deit_tiny", pretrained=True, num_classes=10, img_size=288, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert dst.pos_embed.shape == (1, 1 + 18 * 18, 192)
    assert dst.blocks[0].attn.positional_encoding.shape == (1, 18 * 18, 192)
    torch.testing.assert_close(dst.blocks[3].attn.qkv.weight, src.blocks[3].attn.qkv.weight)


def _tiny(**kw):
    return EfficientVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kw).eval()


def test_bad_inputs_raise_value_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"input has 1 channels, the model expects in_chans=3"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"input size \(36, 32\) is not divisible by patch_size=8"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"unknown attention layer\(s\) \['nope'\]"):
        _tiny(attn_layer="nope")
    with pytest.raises(ValueError, match=r"unknown attention layer 'nope'; choose one of"):
        visionlin.create_attn("nope", 32)
    with pytest.raises(ValueError, match=r"embed_dim=32 is not divisible by num_heads=3"):
        EfficientVisionTransformer(embed_dim=32, num_heads=3, depth=1)
    with pytest.raises(ValueError, match=r"dim=30 is not divisible by num_heads=4"):
        visionlin.create_attn("flatten", 30, num_heads=4)
    with pytest.raises(ValueError, match=r"dwc_kernel=4 must be a positive odd integer"):
        visionlin.create_attn("flatten", 32, num_heads=2, dwc_kernel=4)
    with pytest.raises(ValueError, match=r"one entry per block \(depth=2\)"):
        EfficientVisionTransformer(depth=2, embed_dim=32, num_heads=2, attn_layer=["softmax"])
    with pytest.raises(ValueError, match=r"global_pool='bad'"):
        _tiny(global_pool="bad")
    attn = visionlin.create_attn("infsa", 32, num_heads=2)
    with pytest.raises(ValueError, match=r"17 tokens do not match num_prefix_tokens=0 \+ H\*W for feat_size=\(4, 4\)"):
        attn(torch.randn(1, 17, 32), (4, 4))
    for name in ("gla", "neighborhood", "infsa"):  # gla / neighborhood gave TypeErrors from unflatten / bool()
        attn = visionlin.create_attn(name, 32, num_heads=2)
        for bad in [(4.0, 4.0), torch.tensor([4, 4]), (True, 4), "ab", (4,)]:
            with pytest.raises(ValueError, match=r"feat_size must be \(H, W\), two integers >= 1"):
                attn(torch.randn(1, 16, 32), bad)


def test_fixed_size_model_rejects_other_sizes():
    model = _tiny(dynamic_img_size=False)
    with pytest.raises(ValueError, match=r"input size \(64, 64\) differs from img_size=\(32, 32\)"):
        model(torch.randn(1, 3, 64, 64))


def test_mismatched_state_dict_names_keys_and_shapes():
    model = _tiny()
    sd = model.state_dict()
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    sd["bogus.weight"] = torch.zeros(1)
    del sd["norm.weight"]
    with pytest.raises(ValueError) as err:
        checkpoint_filter_fn(sd, model)
    msg = str(err.value)
    assert "blocks.0.mlp.fc1.weight: (7, 32) vs (128, 32)" in msg
    assert "unexpected keys: ['bogus.weight']" in msg
    assert "missing keys: ['norm.weight']" in msg


def test_pretrained_download_from_share_link_on_loopback(tmp_path):
    """The online path, offline: a loopback HTTP server stands in for the authors' '.../f/<id>/?dl=1' link."""
    import http.server
    import io
    import threading

    src = timm.create_model("flatten_deit_tiny")
    buf = io.BytesIO()
    torch.save({"model": src.state_dict(), "epoch": 300}, buf)
    payload = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f/0123abcd/?dl=1"
        model = timm.create_model(
            "flatten_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=url), cache_dir=str(tmp_path)
        )
    finally:
        server.shutdown()
    assert [p.name for p in tmp_path.iterdir()] == ["flatten_deit_tiny.untrained.pth"]
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model.eval()(x), src.eval()(x))


def test_pretrained_tag_resolves_to_its_own_checkpoint_and_size():
    from visionlin.models._pretrained import resolve_cfg

    cfg = resolve_cfg("agent_deit_small", {"pretrained_cfg": "in1k_448"})
    assert cfg["url"] == "https://cloud.tsinghua.edu.cn/f/a228f86241c445f1969b/?dl=1"
    model = timm.create_model("agent_deit_small.in1k_448")
    assert tuple(model.patch_embed.img_size) == (448, 448)
    assert model.pretrained_cfg["tag"] == "in1k_448"
    assert tuple(timm.create_model("agent_deit_small").patch_embed.img_size) == (224, 224)


def test_distilled_checkpoint_loads():
    model = EfficientVisionTransformer(embed_dim=64, depth=2, num_heads=2, img_size=64, patch_size=16)
    sd = dict(model.state_dict())
    sd["dist_token"] = torch.zeros(1, 1, 64)
    sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], torch.full((1, 1, 64), 7.0), sd["pos_embed"][:, 1:]], 1)
    sd["head_dist.weight"], sd["head_dist.bias"] = sd["head.weight"], sd["head.bias"]
    out = checkpoint_filter_fn(sd, model)
    torch.testing.assert_close(out["pos_embed"], model.state_dict()["pos_embed"])  # the distillation row is dropped


def test_class_token_checkpoint_into_avg_pool_model():
    src = timm.create_model("infvit_tiny")
    dst = timm.create_model("infvit_tiny", class_token=False, global_pool="avg")
    dst.load_state_dict(checkpoint_filter_fn(src.state_dict(), dst), strict=True)
    torch.testing.assert_close(dst.fc_norm.weight, src.norm.weight)
    torch.testing.assert_close(dst.pos_embed, src.pos_embed[:, 1:])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("agent_deit_tiny", {"depth": 2}),
        ("nat_mini", {"depths": (1, 1, 1, 1)}),
        ("mavit_tiny", {"depths": (1, 1, 1, 1)}),
    ],
)
def test_failed_load_state_dict_leaves_the_model_as_it_was(name, kwargs):
    """``nn.Module.load_state_dict`` copied every tensor that fit before raising for the rest (33 of 53 tensors of
    Agent-DeiT-T for one bad head shape); the models' load now changes nothing unless everything loads."""
    src = timm.create_model(name, num_classes=10, **kwargs)
    dst = timm.create_model(name, num_classes=10, **kwargs)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    good = src.state_dict()
    first = next(iter(good))
    bad_cases = {
        "shape": dict(
            good, **{"head.bias": torch.zeros(3)} if "head.bias" in good else {"head.fc.bias": torch.zeros(3)}
        ),
        "missing": {k: v for k, v in good.items() if k != first},
        "unexpected": dict(good, **{"bogus.weight": torch.zeros(1)}),
    }
    for case, sd in bad_cases.items():
        with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
            dst.load_state_dict(sd)
        assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items()), case
    with pytest.raises(RuntimeError, match="size mismatch"):  # strict=False still refuses shapes, as torch does
        dst.load_state_dict(bad_cases["shape"], strict=False)
    assert all(torch.equal(v, before[k]) for k, v in dst.state_dict().items())
    assert dst.load_state_dict(bad_cases["missing"], strict=False).missing_keys == [first]
    # A good load copies everything; Parameters handed in keep their own requires_grad.
    frozen = src.requires_grad_(False).state_dict(keep_vars=True)
    dst.load_state_dict(frozen)
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), good.values(), strict=True))
    assert not any(p.requires_grad for p in src.parameters()) and all(p.requires_grad for p in dst.parameters())
    assert not {p.data_ptr() for p in dst.parameters()} & {p.data_ptr() for p in src.parameters()}  # copied, not shared


def test_load_state_dict_takes_what_the_plain_load_takes():
    """The all-or-nothing load's dry run must not refuse a load ``nn.Module.load_state_dict`` accepts: tensors made
    under inference mode, an integer tensor for a float parameter, a model with a load hook of its own (loaded
    directly: the hook sees the real modules) or with a module the shadow cannot copy."""
    src = timm.create_model("agent_deit_tiny", depth=1, num_classes=5)
    dst = timm.create_model("agent_deit_tiny", depth=1, num_classes=5)
    with torch.inference_mode():
        inference = {k: v.clone() for k, v in src.state_dict().items()}
    dst.load_state_dict(inference)
    assert torch.equal(dst.head.weight, src.head.weight)
    dst.load_state_dict(dict(src.state_dict(), **{"head.bias": torch.arange(5)}))
    assert torch.equal(dst.head.bias, torch.arange(5.0))
    calls = []
    dst.head.register_load_state_dict_pre_hook(lambda *args: calls.append(1))
    dst.load_state_dict(src.state_dict())
    assert calls == [1]  # once: no dry run through the user's hook
    torch.nn.utils.parametrizations.weight_norm(dst.head)  # refuses to be copied
    dst.load_state_dict(dst.state_dict())


def test_jit_trace_takes_the_token_grid_as_traced_sizes():
    """Under ``torch.jit.trace`` the layers' ``feat_size`` comes as 0-d tensors: the integer check lets them through."""
    model = timm.create_model("infvit_tiny", depth=1, img_size=32, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), model(x))


def test_non_square_checkpoint_needs_a_known_grid():
    src = timm.create_model("infvit_tiny", img_size=(224, 160))
    gridless = {k: v for k, v in src.state_dict().items() if k != "pos_embed_grid"}  # e.g. a foreign checkpoint
    with pytest.raises(ValueError, match=r"cannot tell the grid of a checkpoint pos_embed with 140 grid rows"):
        checkpoint_filter_fn(gridless, timm.create_model("infvit_tiny"))
    with pytest.raises(ValueError, match=r"could be laid out \(14, 10\) or \(10, 14\)"):
        checkpoint_filter_fn(gridless, timm.create_model("infvit_tiny", img_size=(224, 160)))
    with pytest.raises(ValueError, match=r"no pos_embed_grid and this model's grid \(14, 10\) is not square"):
        timm.create_model("infvit_tiny", img_size=(224, 160)).load_state_dict(gridless)
    dst = timm.create_model("infvit_tiny", img_size=(224, 160))
    dst.load_state_dict(checkpoint_filter_fn(timm.create_model("infvit_tiny").state_dict(), dst), strict=True)
    # A square checkpoint without the grid (the authors') loads as before.
    square = {k: v for k, v in timm.create_model("infvit_tiny").state_dict().items() if k != "pos_embed_grid"}
    timm.create_model("infvit_tiny").load_state_dict(square)


@pytest.mark.parametrize("name", ["infvit_tiny", "flatten_deit_tiny", "agent_deit_tiny"])
def test_transposed_grid_checkpoint_is_resampled_or_refused(name):
    """A checkpoint built at (64, 32) carries its 4 x 2 grid: a (32, 64) model refuses it as is and gets a correctly
    resampled copy through checkpoint_filter_fn (equal to the source model resampling on the fly at 32 x 64)."""
    src = timm.create_model(name, img_size=(64, 32)).eval()
    dst = timm.create_model(name, img_size=(32, 64)).eval()
    with pytest.raises(ValueError, match=r"saved for a 4 x 2 token grid, this model has 2 x 4"):
        dst.load_state_dict(src.state_dict())
    dst.load_state_dict(checkpoint_filter_fn(src.state_dict(), dst), strict=True)
    assert dst.pos_embed_grid.tolist() == [2, 4]
    x = torch.randn(1, 3, 32, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=1e-4, atol=1e-5)
    sd = src.state_dict()
    sd["pos_embed_grid"] = torch.tensor([3, 3])
    with pytest.raises(ValueError, match=r"pos_embed_grid \(3, 3\) does not match its pos_embed's 8 grid rows"):
        checkpoint_filter_fn(sd, dst)


def test_pretrained_into_other_input_channels(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": timm.create_model("agent_deit_tiny").state_dict()}, path)
    model = timm.create_model(
        "agent_deit_tiny", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path))
    )
    assert model.patch_embed.proj.weight.shape == (192, 1, 16, 16)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 1000)


def test_layer_and_model_argument_errors():
    attn = visionlin.create_attn("flatten", 64, num_heads=2)
    with pytest.raises(ValueError, match=r"tokens have 32 channels, the layer was built for dim=64"):
        attn(torch.randn(1, 16, 32), (4, 4))
    with pytest.raises(ValueError, match=r"num_prefix_tokens=-1 must be >= 0"):
        visionlin.create_attn("softmax", 32, 2)(torch.randn(1, 15, 32), (4, 4), -1)
    with pytest.raises(ValueError, match=r"num_heads=0 must be >= 1"):
        EfficientVisionTransformer(num_heads=0, embed_dim=32, depth=1)
    with pytest.raises(ValueError, match=r"reg_tokens=-1 must be >= 0"):
        EfficientVisionTransformer(num_heads=2, embed_dim=32, depth=1, reg_tokens=-1)


def test_softmax_dropout_goes_through_the_chosen_backend(monkeypatch):
    from visionlin.kernels import _dispatch

    chosen = []
    select = _dispatch.Op.select
    monkeypatch.setattr(
        _dispatch.Op, "select", lambda self, *a, **k: chosen.append(k.get("backend")) or select(self, *a, **k)
    )
    layer = visionlin.create_attn("softmax", 32, 2, attn_drop=0.5).train()
    visionlin.set_backend(layer, "reference")
    layer(torch.randn(1, 16, 32), (4, 4))
    assert chosen == ["reference"]


def test_rope_cache_never_keeps_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = visionlin.create_attn("mala", 64, num_heads=2)
    x = torch.randn(1, 16, 64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        layer(mode.from_tensor(x), (4, 4))
    assert type(layer(x, (4, 4))) is torch.Tensor


def _err(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_classes=-5), r"num_classes=-5 must be >= 0"),
        (dict(num_classes=2.5), r"num_classes=2.5 must be an integer"),
        (dict(drop_path_rate=-0.5), r"drop_path_rate=-0.5 must be a probability in \[0, 1\)"),
        (dict(drop_path_rate=1.5), r"drop_path_rate=1.5 must be a probability"),
        (dict(drop_rate=float("nan")), r"drop_rate=nan must be a probability"),
        (dict(attn_drop_rate=1.0), r"attn_drop_rate=1.0 must be a probability"),
        (dict(img_size=8), r"img_size=\(8, 8\) is smaller than one patch"),
        (dict(img_size=(224, 200)), r"img_size=\(224, 200\) is not a multiple of patch_size=\(16, 16\)"),
        (dict(img_size="224"), r"img_size='224' must be an integer or a pair"),
        (dict(img_size=(224, 0)), r"img_size=\(224, 0\) must be an integer or a pair of integers"),
        (dict(patch_size=0), r"patch_size=0 must be an integer or a pair"),
        (dict(mlp_ratio=-1), r"mlp_ratio=-1 must be a finite number > 0"),
        (dict(mlp_ratio=float("inf")), r"mlp_ratio=inf must be a finite number > 0"),
        (dict(mlp_ratio=1e-4), r"gives an empty MLP"),
        (dict(depth=0), r"depth=0 must be >= 1"),
        (dict(embed_dim="192"), r"embed_dim='192' must be an integer"),
        (dict(init_values=-1.0), r"init_values=-1.0 must be a finite number > 0"),
        (dict(class_token="yes"), r"class_token='yes' must be True or False"),
        (dict(attn_layer=3), r"attn_layer=3 must be a registered attention-layer name"),
        (dict(attn_kwargs=[1] * 12), r"attn_kwargs=\[1, .* must be a dict of keywords or one dict per block"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    _err(lambda: timm.create_model("infvit_tiny", **kwargs), match)
    if "img_size" in kwargs and kwargs["img_size"] == (224, 200):  # padded inputs: any size of at least a patch
        assert timm.create_model("infvit_tiny", dynamic_img_pad=True, **kwargs).patch_embed.img_size == (224, 200)


@pytest.mark.parametrize("name", ["nat_mini", "agent_pvt_tiny", "mambavision_tiny"])
def test_hierarchical_img_size_must_be_a_multiple_of_the_stride(name):
    """(Built, then failed at the first forward of an input of its own size.)"""
    for size in (200, 16):
        _err(lambda s=size: timm.create_model(name, img_size=s), rf"img_size=\({size}, {size}\) is not a multiple of "
             r"the stride 32: the model could not run an input of its own size")  # fmt: skip
    model = timm.create_model(name, img_size=200, dynamic_img_pad=True, num_classes=2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 200, 200)).shape == (1, 2)


def test_entrypoint_settings_can_be_overridden():
    for name in ("infvit_tiny", "flatten_deit_tiny", "inline_deit_tiny", "agent_deit_tiny"):
        model = timm.create_model(name, attn_layer="softmax", depth=2)
        assert [type(b.attn).__name__ for b in model.blocks] == ["SoftmaxAttention"] * 2
    model = timm.create_model("agent_deit_tiny", depth=2)  # per-block settings follow depth
    assert [b.attn.agent_num for b in model.blocks] == [49, 49]
    model = timm.create_model("agent_deit_base", depth=6)  # agent in the first 4 blocks, softmax after
    assert [b.attn.attn_name for b in model.blocks] == ["agent"] * 4 + ["softmax"] * 2
    model = timm.create_model("agent_deit_tiny", depth=2, attn_layer=["softmax", "agent"])
    assert [b.attn.attn_name for b in model.blocks] == ["softmax", "agent"] and model.blocks[1].attn.agent_num == 49
    assert timm.create_model("infvit_tiny", embed_dim=96, num_heads=2).embed_dim == 96
    _err(lambda: timm.create_model("agent_deit_tiny", depth=0), r"depth=0 must be >= 1")


def test_reset_classifier_rejects_bad_values():
    model = _tiny()
    _err(lambda: model.reset_classifier(-3), r"num_classes=-3 must be >= 0")
    _err(lambda: model.reset_classifier(3, global_pool="bad"), r"global_pool='bad'")
    assert model.num_classes == 1000 and model.global_pool == "token"  # nothing half-changed


def test_bad_forward_inputs():
    model = _tiny()
    _err(lambda: model(torch.randn(1, 3, 0, 0)), r"input size \(0, 0\) is smaller than one patch \(patch_size=8\)")
    _err(lambda: model(torch.randn(3, 32, 32)), r"expected an image batch \[B, C, H, W\], got shape \(3, 32, 32\)")
    _err(lambda: model(torch.randn(1, 3, 32, 32, dtype=torch.float64)), r"input dtype torch.float64 differs from")
    _err(lambda: model(torch.zeros(1, 3, 32, 32, dtype=torch.int64)), r"input dtype torch.int64 is not floating")
    _err(lambda: model.forward_head(torch.randn(2, 32)), r"forward_head expects .*\[B, N, 32\]; got shape \(2, 32\)")
    _err(lambda: model.forward_intermediates(torch.randn(1, 3, 36, 32)), r"not divisible by patch_size=8")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the model: allowed
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 1000)
    assert model.to(torch.float64)(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_checkpoint_filter_rejects_non_tensors():
    model = _tiny()
    _err(lambda: checkpoint_filter_fn([1, 2], model), r"expected a checkpoint mapping .* got list")
    _err(lambda: checkpoint_filter_fn(None, model), r"got NoneType")
    sd = dict(model.state_dict(), epoch=3)
    _err(lambda: checkpoint_filter_fn({"model": sd}, model), r"'epoch': int")


def test_pretrained_tag_and_file_errors(tmp_path):
    _err(lambda: timm.create_model("infvit_tiny.in22k"), r"unknown pretrained tag 'in22k'; valid tags: \['untrained'\]")
    _err(lambda: timm.create_model("agent_deit_small.nope"), r"valid tags: \['in1k', 'in1k_448'\]")
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=r"checkpoint file '.*missing.pth' does not exist") as err:
        timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    assert "cloud.tsinghua" not in str(err.value)  # the unused url is not blamed
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint" * 8)
    _err(
        lambda: timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(corrupt))),
        r"corrupt.pth' is not a readable torch or safetensors checkpoint",
    )
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": _tiny().state_dict()}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    _err(
        lambda: timm.create_model("infvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(truncated))),
        r"truncated.pth' is not a readable torch or safetensors checkpoint",
    )
    import argparse
    import socket

    # Training scripts' {'model': ..., 'args': argparse.Namespace} loads (the Namespace is allowed); other objects not.
    args = tmp_path / "args.pth"
    torch.save({"model": timm.create_model("agent_deit_tiny").state_dict(), "args": argparse.Namespace(lr=1)}, args)
    timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(args)))
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": timm.create_model("agent_deit_tiny").state_dict(), "x": socket.AddressFamily.AF_INET}, pickled)
    _err(
        lambda: timm.create_model("agent_deit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(pickled))),
        r"holds Python objects other than tensors.*socket.AddressFamily.*torch.load\(path, weights_only=False\)",
    )
    from safetensors.torch import save_file

    good = tmp_path / "ok.safetensors"
    src = timm.create_model("infvit_tiny", num_classes=3)
    save_file(src.state_dict(), str(good))
    model = timm.create_model(
        "infvit_tiny", num_classes=3, pretrained=True, pretrained_cfg_overlay=dict(file=str(good))
    )
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_api_type_errors_and_set_backend_checks():
    model = timm.create_model("infvit_tiny", depth=1)
    _err(lambda: visionlin.set_backend("infvit_tiny", "reference"), r"model must be an nn.Module .* got str")
    _err(lambda: visionlin.set_backend(None, "reference"), r"got NoneType")
    _err(lambda: visionlin.set_backend(model, 3), r"backend=3 must be a backend name")
    _err(lambda: visionlin.list_models(123), r"filter=123 must be a wildcard string")
    visionlin.set_backend(model, "torch")
    with pytest.raises(ValueError, match=r"backend 'sdpa' is not available .*linear_infsa_attention"):
        visionlin.set_backend(model, "sdpa")
    assert model.blocks[0].attn.backend == "torch"  # unchanged on error
    mixed = timm.create_model("agent_deit_base", depth=5)  # agent + softmax blocks: both have sdpa
    assert visionlin.set_backend(mixed, "sdpa") == 5
    with pytest.raises(ValueError, match=r"AgentAttention uses agent_attention"):
        visionlin.set_backend(mixed, "torch")
    assert {b.attn.backend for b in mixed.blocks} == {"sdpa"}
    for backend in ("torch", None):  # (returned 0 silently)
        _err(lambda b=backend: visionlin.set_backend(torch.nn.Sequential(torch.nn.Linear(2, 2)), b),
             r"Sequential has no visionlin token mixers, so there is no backend to set")  # fmt: skip


def test_unknown_mixer_keywords_and_agent_kwargs():
    _err(
        lambda: timm.create_model("infvit_tiny", depth=1, attn_kwargs=dict(bogus=1)),
        r"takes no keyword\(s\) \['bogus'\]",
    )
    _err(lambda: visionlin.create_attn("softmax", 32, 2, agent_num=4), r"'softmax' \(SoftmaxAttention\) takes no")
    _err(lambda: timm.create_model("infvit_tiny", depth=1, attn_kwargs=dict(rho_init="0.5")), r"rho_init='0.5' must be")
    # Agent-DeiT-B: a single dict goes to its agent blocks (on top of agent_num), not to the softmax blocks.
    model = timm.create_model("agent_deit_base", depth=6, attn_kwargs=dict(agent_num=16))
    assert [getattr(b.attn, "agent_num", None) for b in model.blocks] == [16] * 4 + [None] * 2


@pytest.mark.parametrize("batch", [1, 2])
def test_class_token_pooling_is_compact(batch):
    """The pooled class token is a compact ``[B, C]`` (strides ``(C, 1)``), at batch 1 too: sliced out of the tokens
    it keeps their row stride, which cuBLAS refuses past 2**31 elements (40,960 px inputs of the small models;
    tests/test_models_gpu_large.py), and ``.contiguous()`` keeps it at batch 1 (a size-1 dimension's stride does not
    count for contiguity)."""
    model = timm.create_model("infvit_tiny", depth=1, img_size=32).eval()
    tokens = model.forward_features(torch.randn(batch, 3, 32, 32))
    pooled = model.forward_head(tokens, pre_logits=True)
    width = tokens.shape[-1]
    assert tokens[:, 0].stride() == (tokens.shape[1] * width, 1) and pooled.stride() == (width, 1)
    torch.testing.assert_close(pooled, tokens[:, 0], rtol=0, atol=0)


def test_head_and_indices_errors():
    model = timm.create_model("infvit_tiny", depth=2, img_size=32, global_pool="avg", class_token=True).eval()
    tokens = model.forward_features(torch.randn(1, 3, 32, 32))
    _err(lambda: model.forward_head(tokens[:, :1]), r"1 tokens, the pooling needs at least 2")
    _err(lambda: _tiny().forward_head(torch.randn(2, 0, 32)), r"0 tokens, the pooling needs at least 1")
    x = torch.randn(1, 3, 32, 32)
    _err(
        lambda: model.forward_intermediates(x, indices=5), r"indices=5 \(take the last n blocks\) must lie in \[1, 2\]"
    )
    _err(lambda: model.forward_intermediates(x, indices=[7]), r"block indices \[7\] are out of range for 2 blocks")
    _err(lambda: model.forward_intermediates(x, indices="0"), r"indices='0' must be None, an int or")
    _err(lambda: model.prune_intermediate_layers(5), r"indices=5")
    _err(lambda: timm.create_model("infvit_tiny", depth=2, features_only=True, out_indices=(5,)), r"\[5\] are out")
    assert len(model.forward_intermediates(x, indices=[-1], intermediates_only=True)) == 1


def test_checkpoint_messages_name_what_is_wrong(tmp_path):
    model = _tiny()
    sd = model.state_dict()
    sd["pos_embed_grid"] = torch.tensor([4, 4, 1])
    _err(lambda: _tiny().load_state_dict(sd), r"pos_embed_grid must hold two integers \(H, W\), got \[4, 4, 1\]")
    _err(lambda: checkpoint_filter_fn({**model.state_dict(), 5: torch.zeros(1)}, model), r"5 \(int key\)")
    _err(
        lambda: timm.create_model("infvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path))),
        r"is a directory; pass the checkpoint file inside it",
    )


@pytest.mark.parametrize("name", ["nat_mini", "vig_tiny", "mavit_tiny", "flatten_pvt_tiny"])
def test_pretrained_weights_load_into_one_channel_input(name, tmp_path):
    """``pretrained=True, in_chans=1`` for the hierarchical families: timm adapts the first conv its
    ``pretrained_cfg["first_conv"]`` names (summed over the input channels); visionlin's key check let only the ViTs'
    ``patch_embed.proj`` through and refused every other family's stem as a shape mismatch."""
    src = timm.create_model(name)
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    dst = timm.create_model(name, pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)))
    key = dst.pretrained_cfg["first_conv"] + ".weight"
    got, want = dst.state_dict(), src.state_dict()
    torch.testing.assert_close(got[key], want[key].sum(dim=1, keepdim=True))
    assert all(torch.equal(got[k], want[k]) for k in want if k != key)


@pytest.mark.parametrize("name", ["flatten_pvt_tiny", "flatten_swin_tiny", "agent_pvt_tiny"])
def test_hierarchical_transposed_grid_checkpoint_is_resampled_or_refused(name):
    """The hierarchical models with grid-sized tables (stage position embeddings, FLatten's positional encodings)
    record their stage-0 grid: a (64, 96) checkpoint loaded into a (96, 64) model silently (the token counts agree),
    now it is refused as is and resampled correctly through checkpoint_filter_fn (equal to the source resampling on
    the fly); an older checkpoint without the record loads where that is unambiguous."""
    from visionlin.models.hierarchical import checkpoint_filter_fn as filter_fn

    src = timm.create_model(name, img_size=(64, 96)).eval()
    with torch.no_grad():
        for key, p in src.named_parameters():
            if key.endswith(("pos_embed", "positional_encoding")):
                p.normal_()
    dst = timm.create_model(name, img_size=(96, 64)).eval()
    with pytest.raises(ValueError, match=r"saved for a 16 x 24 stage-0 token grid, this model has 24 x 16"):
        dst.load_state_dict(src.state_dict())
    dst.load_state_dict(filter_fn(src.state_dict(), dst), strict=True)
    assert dst.pos_embed_grid.tolist() == [24, 16]
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=1e-4, atol=1e-5)
        other = timm.create_model(name, img_size=(128, 64)).eval()  # another size: resampled from the record
        other.load_state_dict(filter_fn(src.state_dict(), other))
        y = torch.randn(1, 3, 128, 64)
        torch.testing.assert_close(other(y), src(y), rtol=1e-4, atol=1e-5)
    old = {k: v for k, v in src.state_dict().items() if k != "pos_embed_grid"}  # a checkpoint from before the record
    same = timm.create_model(name, img_size=(96, 64))
    with pytest.raises(ValueError, match=r"has no pos_embed_grid and this model's stage-0 grid \(24, 16\) is not"):
        same.load_state_dict(old)
    with pytest.raises(ValueError, match=r"has no pos_embed_grid and this model's stage-0 grid \(24, 16\)"):
        filter_fn(old, same)  # the filter too (it resampled nothing and loaded the transposed tables)
    square = timm.create_model(name, img_size=(64, 64))
    square.load_state_dict({k: v for k, v in square.state_dict().items() if k != "pos_embed_grid"})
    assert "pos_embed_grid" not in dict(timm.create_model("nat_mini", img_size=64).named_buffers())  # no tables


def test_hierarchical_layout_keywords():
    """attn_kwargs without attn_layer on the Swin variants replaced the published layout with the backbone's default
    mixer (and dropped agent_num); now they reach the layout's linear layers. Keywords that only shape the published
    layout are refused next to attn_layer; agent_num with attn_kwargs on PVT was a TypeError; MAViT-family dynamic
    flags are checked."""
    m = timm.create_model("flatten_swin_tiny", attn_kwargs=dict(focusing_factor=2.0))
    kinds = {(type(b.attn).__name__, getattr(b.attn, "focusing_factor", None)) for s in m.stages for b in s.blocks}
    assert kinds == {("ShiftedWindowAttention", None), ("FocusedLinearAttention", 2.0)}
    m = timm.create_model("agent_swin_tiny", attn_kwargs={})
    assert {type(b.attn).__name__ for s in m.stages for b in s.blocks} == {"AgentAttention", "ShiftedWindowAttention"}
    with pytest.raises(ValueError, match=r"\['agent_num'\] only apply to the published layout"):
        timm.create_model("agent_swin_tiny", attn_layer="agent", agent_num=4)
    with pytest.raises(ValueError, match=r"without attn_layer must be one dict"):
        timm.create_model("agent_swin_tiny", attn_kwargs=[{}] * 4)
    with pytest.raises(ValueError, match="give agent_num inside attn_kwargs"):
        timm.create_model("agent_pvt_tiny", agent_num=9, attn_kwargs={"agent_num": 4})
    for flag in ("dynamic_img_size", "dynamic_img_pad"):
        with pytest.raises(ValueError, match=rf"{flag}='no' must be True or False"):
            timm.create_model("mavit_tiny", img_size=64, **{flag: "no"})


def test_stop55_model_argument_checks():
    """features_only / forward_intermediates indices out of block order or repeated (feature_info listed them as
    given, the outputs came in block order, once each); attn_type not a str, a stem width of 0 (the default, silently),
    attn_kwargs that repeat the model's own arguments (TypeErrors)."""
    for out_indices in ([3, 0], (1, 1), (-1, 0)):
        with pytest.raises(ValueError, match=r"must name each block once, in increasing block order"):
            timm.create_model("nat_mini", features_only=True, out_indices=out_indices, img_size=64)
    model = timm.create_model("nat_mini", features_only=True, out_indices=(0, -1), img_size=64)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == model.feature_info.channels() == [64, 512]
    with pytest.raises(ValueError, match=r"block indices \[5, 2\] must name each block once"):
        timm.create_model("infvit_tiny", img_size=64).forward_intermediates(torch.randn(1, 3, 64, 64), indices=[5, 2])
    with pytest.raises(ValueError, match=r"attn_type=5 must be a str"):
        timm.create_model("flatten_swin_tiny", attn_type=5)
    with pytest.raises(ValueError, match=r"stem width=0 must be >= 1"):
        timm.create_model("mambavision_tiny", in_dim=0)
    for name, kw in (("infvit_tiny", {"qkv_bias": False}), ("flatten_pvt_tiny", {"num_heads": 2})):
        with pytest.raises(ValueError, match=rf"attn_kwargs \['{next(iter(kw))}'\] are set by the model"):
            timm.create_model(name, attn_kwargs=kw)
