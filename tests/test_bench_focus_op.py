"""benchmarks/focus_op.py: argument checks on the CPU; a short run of every sweep entry on the GPU (each entry's
result equal to the first's: a timed launch setting computes what the others do)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import focus_op


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        focus_op.main(["--out", "unused", "--shapes", "pvt_s1,nope"])
    assert e.value.code == 2
    assert "--shapes: unknown ['nope']" in capsys.readouterr().err


def test_empty_shapes_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        focus_op.main(["--out", "unused", "--shapes", ","])
    assert e.value.code == 2
    assert "--shapes: unknown ','" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path, monkeypatch):
    monkeypatch.setitem(focus_op.SHAPES, "tiny", ((2, 50, 3, 32), 2))
    # one SM: every setting with a walk (programs per SM over 2 samples) walks several tiles per program
    from visionlin.kernels.triton import focus

    monkeypatch.setattr(focus, "_num_sms", lambda device: 1)
    args = ["--out", str(tmp_path), "--shapes", "tiny", "--warmup", "1", "--iters", "2"]
    assert focus_op.main(args) == 0
    doc = json.loads((tmp_path / "focus_op.json").read_text())
    rows = doc["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert len(rows) == len(focus_op.FORWARD) + len(focus_op.BACKWARD)
    # bf16 outputs: settings differ only in the order of float32 sums (row norms, dc), a unit of bf16 at most
    assert max(r["max_rel_vs_first"] for r in rows) < 2.0**-7, rows
    assert set(doc["pvt_s_ms_per_step"]) == {f"forward:{s}" for s, _ in focus_op.FORWARD} | {
        f"backward:{s}" for s, _ in focus_op.BACKWARD
    }


def test_pvt_weights_match_the_model(monkeypatch):
    """The per-step totals' weights are FLatten-PVT-S's own calls: at 224 px each of its layers focuses queries and
    keys of the listed shape (batch aside), layers per shape as listed (the s41 runs had reduced keys that the model
    does not have)."""
    import timm

    import visionlin  # noqa: F401  (registers the models)
    from visionlin.layers import focused

    seen = []
    real = focused.focused_linear_attention

    def spy(q, k, v, **kwargs):
        seen.append((tuple(q.shape[1:]), tuple(k.shape[1:])))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(focused, "focused_linear_attention", spy)
    model = timm.create_model("flatten_pvt_small").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    want = {}
    for shape, layers in focus_op.SHAPES.values():
        if layers:
            want[tuple(shape[1:])] = layers
    got = {}
    for q_shape, k_shape in seen:
        assert q_shape == k_shape, (q_shape, k_shape)
        got[q_shape] = got.get(q_shape, 0) + 1
    assert got == want
