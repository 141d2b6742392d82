"""benchmarks/conv_op.py: argument checks on the CPU; a short run (every method, both modes, the sweep) on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import conv_op


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        conv_op.main(["--out", "unused", "--shapes", "agent_deit_s,nope"])
    assert e.value.code == 2
    assert "unknown shape(s) ['nope']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path, monkeypatch):
    monkeypatch.setitem(conv_op.SHAPES, "tiny", (2, 9, 7, 48, 5, 1))
    args = ["--out", str(tmp_path), "--shapes", "tiny", "--warmup", "1", "--iters", "2", "--repeats", "1"]
    assert conv_op.main([*args, "--sweep", "--weight-grad-sweep", "--profile"]) == 0
    doc = json.loads((tmp_path / "conv_op.json").read_text())
    got = {(r["method"], r["mode"]) for r in doc["rows"] if r["status"] == "ok"}
    want = {(m, mode) for m in ("triton", "torch", "add_bound") for mode in ("forward", "forward_backward")}
    assert got == want | {("triton_taps", "forward_backward")}
    assert [(r["method"], r["kernel_ms"] > 0) for r in doc["profile"]] == [("triton", True), ("torch", True)]
    assert len(doc["sweep"]) == 24 + 30 + 10 and all(r["status"] == "ok" for r in doc["sweep"])
    from visionlin.kernels.triton import conv

    want = {
        "block_t": conv.BLOCK_T,
        "block_c": conv.BLOCK_C,
        "warps": conv.WARPS,
        "stages": None,
        "weight_grad": "tile",
        "wg_per_sm": None,
        "wg_warps": None,
        "wg_elements": None,
        "wg_prefetch": False,
    }
    assert want == conv.TUNING  # the sweep and the per-tap rows restored it
