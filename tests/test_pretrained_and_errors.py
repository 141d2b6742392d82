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


def test_non_square_checkpoint_needs_a_known_grid():
    src = timm.create_model("infvit_tiny", img_size=(224, 160))
    with pytest.raises(ValueError, match=r"cannot infer the grid of a checkpoint pos_embed with 140 grid rows"):
        checkpoint_filter_fn(src.state_dict(), timm.create_model("infvit_tiny"))
    dst = timm.create_model("infvit_tiny", img_size=(224, 160))
    dst.load_state_dict(checkpoint_filter_fn(timm.create_model("infvit_tiny").state_dict(), dst), strict=True)


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
    with pytest.raises(ValueError, match=r"reg_tokens=-1 >= 0"):
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
