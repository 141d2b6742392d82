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
