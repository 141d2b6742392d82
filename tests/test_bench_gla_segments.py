"""benchmarks/gla_segments.py: flag checks on the CPU; a short run on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gla_segments


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sizes", "1024,abc"], "--sizes / --lengths must be comma-separated integers"),
        (["--sizes", "100"], "--sizes must be multiples of 32, --lengths positive"),
        (["--lengths", "0"], "--sizes must be multiples of 32, --lengths positive"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gla_segments.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        gla_segments.main(["--out", "unused"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path):
    from visionlin.kernels.triton import gla

    shipped = gla.TUNING["segments"]
    args = ["--out", str(tmp_path), "--sizes", "256", "--lengths", "4096", "--iters", "1", "--repeats", "2"]
    assert gla_segments.main([*args, "--warmup", "1"]) == 0
    doc = json.loads((tmp_path / "gla_segments.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["ok", "ok"]
    assert gla.TUNING["segments"] is shipped  # restored
