"""benchmarks/scan_op.py: flag checks on the CPU; a short run on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import scan_op


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "shipped,fast"], "--configs: unknown ['fast']"),
        (["--configs", ","], "--configs: unknown []"),
        (["--iters", "0"], "--warmup / --iters / --repeats must be >= 1"),
        (["--shapes", "2x50x3"], "--shapes must be BxLxDxN quadruples"),
        (["--shapes", "2x0x1x8"], "--shapes must be BxLxDxN quadruples"),
        (["--shapes", "axbxcxd"], "--shapes must be BxLxDxN quadruples"),
        (["--shapes", ""], "--shapes must be BxLxDxN quadruples"),
        (["--batch", "0"], "--batch must be >= 1"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        scan_op.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        scan_op.main(["--out", "unused"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_configs_name_only_tuning_keys():
    pytest.importorskip("triton")
    from visionlin.kernels.triton import scan

    for name in scan_op.CONFIGS:
        for n in (1, 8, 64):
            assert set(scan_op._overrides(name, n)) <= set(scan.TUNING), name
    # the rule shipped until stop 37: 2,048-element tiles at 4 / 8 warps
    assert scan_op._overrides("s37", 8) == {"chunk": 16, "block_d": 16, "warps": 4, "bwd_warps": 8}
    assert scan_op._overrides("s37", 5)["block_d"] == 16 and scan_op._overrides("s37", 16)["block_d"] == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path):
    from visionlin.kernels.triton import scan

    shipped = dict(scan.TUNING)
    args = ["--out", str(tmp_path), "--configs", "shipped,s37", "--shapes", "2x50x6x8", "--no-model", "--iters", "1"]
    assert scan_op.main([*args, "--warmup", "1", "--repeats", "2"]) == 0
    doc = json.loads((tmp_path / "scan_op.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["ok"] * 4
    assert all(r["max_rel_err"] < 0.02 for r in doc["rows"] if "max_rel_err" in r)
    assert shipped == scan.TUNING  # restored
