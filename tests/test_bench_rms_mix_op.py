"""benchmarks/rms_mix_op.py: flag checks on the CPU; a short run on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import rms_mix_op


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shapes", "vig_s,vig_b"], "--shapes: unknown ['vig_b']"),
        (["--shapes", ","], "--shapes: unknown ','"),
        (["--iters", "0"], "--warmup / --iters / --repeats must be >= 1"),
        (["--repeats", "-2"], "--warmup / --iters / --repeats must be >= 1"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        rms_mix_op.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        rms_mix_op.main(["--out", "unused"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path):
    args = ["--out", str(tmp_path), "--shapes", "vig_t", "--no-model", "--iters", "1", "--repeats", "1"]
    assert rms_mix_op.main(args) == 0
    rows = json.loads((tmp_path / "rms_mix_op.json").read_text())["rows"]
    assert {(r["method"], r["mode"]) for r in rows if r["status"] == "ok"} == {
        (m, mode) for m in rms_mix_op.METHODS for mode in ("forward", "forward_backward")
    }
