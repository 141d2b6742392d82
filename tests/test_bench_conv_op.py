"""benchmarks/conv_op.py: argument checks on the CPU; a short run (every method, both modes, the sweep) on the GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import conv_op


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        conv_op.main(["--out", "unused", "--shapes", "agent_deit_s,nope"])
    assert e.value.code == 2
    assert "--shapes: unknown ['nope']" in capsys.readouterr().err


def test_old_conv_is_checked_and_loads(tmp_path, capsys):
    """``--old-conv``: a missing file is refused by name; a file without the weight-gradient launcher too; a real
    conv.py loads beside this tree's (its kernels, not its custom ops, which would register twice)."""
    with pytest.raises(SystemExit) as e:
        conv_op.main(["--out", "unused", "--old-conv", str(tmp_path / "none.py")])
    assert e.value.code == 2 and f"--old-conv {tmp_path / 'none.py'}: no such file" in capsys.readouterr().err
    (tmp_path / "x.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="not a visionlin/kernels/triton/conv.py"):
        conv_op._old_conv(tmp_path / "x.py")
    from visionlin.kernels.triton import conv

    old = conv_op._old_conv(Path(conv.__file__))
    assert old is not conv and old._launch_weight_grad is not conv._launch_weight_grad
    assert old.TUNING == conv.TUNING and not hasattr(old, "token_dwconv_fwd")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path, monkeypatch):
    monkeypatch.setitem(conv_op.SHAPES, "tiny", (2, 9, 7, 48, 5, 1))
    args = ["--out", str(tmp_path), "--shapes", "tiny", "--warmup", "1", "--iters", "2", "--repeats", "1"]
    from visionlin.kernels.triton import conv

    before = dict(conv.TUNING)
    assert conv_op.main([*args, "--sweep", "--weight-grad-sweep", "--profile", "--old-conv", conv.__file__]) == 0
    doc = json.loads((tmp_path / "conv_op.json").read_text())
    got = {(r["method"], r["mode"]) for r in doc["rows"] if r["status"] == "ok"}
    want = {(m, mode) for m in ("triton", "torch", "add_bound") for mode in ("forward", "forward_backward")}
    assert got == want | {("triton_taps", "forward_backward")}
    assert [(r["method"], r["kernel_ms"] > 0) for r in doc["profile"]] == [("triton", True), ("torch", True)]
    assert len(doc["sweep"]) == 24 + 36 + 11 + 4 and all(r["status"] == "ok" for r in doc["sweep"])
    assert [r["method"] for r in doc["sweep"][-4:]] == ["weight_grad_old", "weight_grad_new"] * 2
    assert before == conv.TUNING  # the sweeps and the per-tap rows restored it
    # --strip alone (no per-method rows): every strip setting next to the tile kernels, and the op with each pair
    assert conv_op.main([*args, "--strip", "--no-methods"]) == 0
    doc = json.loads((tmp_path / "conv_op.json").read_text())
    assert doc["rows"] == [] and all(r["status"] == "ok" for r in doc["sweep"])
    assert [len([r for r in doc["sweep"] if r["method"] == m]) for m in ("conv", "weight_grad", "op")] == [9, 32, 4]
    assert all(r["timing"] == "graph" for r in doc["sweep"] if r["method"] in ("conv", "weight_grad"))
    assert before == conv.TUNING
