"""benchmarks/pool_op.py: argument checks on the CPU; a short run (both backends, both modes) on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import pool_op


def test_unknown_shape_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        pool_op.main(["--out", "unused", "--shapes", "agent_deit_s_224_bs256,nope"])
    assert e.value.code == 2
    assert "--shapes: unknown ['nope']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path, monkeypatch):
    monkeypatch.setitem(pool_op.SHAPES, "tiny", (2, 20, 20, 48, 7, 7))
    args = ["--out", str(tmp_path), "--shapes", "tiny", "--warmup", "1", "--iters", "2", "--repeats", "1"]
    assert pool_op.main(args) == 0
    doc = json.loads((tmp_path / "pool_op.json").read_text())
    got = {(r["method"], r["mode"]) for r in doc["rows"] if r["status"] == "ok"}
    assert got == {(m, mode) for m in ("triton", "torch") for mode in ("forward", "forward_backward")}
