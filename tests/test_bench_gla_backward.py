"""benchmarks/gla_backward.py: flag checks on the CPU; a short run on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import gla_backward


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "single,fast"], "--configs: unknown ['fast']"),
        (["--configs", ","], "--configs: unknown []"),
        (["--iters", "0"], "--warmup / --iters / --repeats must be >= 1"),
        (["--shapes", "2x50"], "--shapes must be BxNxH triples"),
        (["--shapes", "2x0x1"], "--shapes must be BxNxH triples"),
        (["--shapes", "axbxc"], "--shapes must be BxNxH triples"),
        (["--shapes", ""], "--shapes must be BxNxH triples"),
        (["--repeats", "-1"], "--warmup / --iters / --repeats must be >= 1"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gla_backward.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        gla_backward.main(["--out", "unused"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err


def test_configs_name_only_shipped_settings():
    from visionlin.kernels.triton import gla

    for name, overrides in gla_backward.CONFIGS.items():
        assert set(overrides) <= set(gla.TUNING), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path):
    from visionlin.kernels.triton import gla

    shipped = dict(gla.TUNING)
    args = ["--out", str(tmp_path), "--configs", "single,every", "--shapes", "2x50x2", "--no-model", "--iters", "1"]
    assert gla_backward.main([*args, "--warmup", "1", "--repeats", "2", "--packed"]) == 0
    doc = json.loads((tmp_path / "gla_backward.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["ok"] * 8
    assert {r["what"] for r in doc["rows"]} >= {"packed op forward", "packed op forward+backward"}
    assert shipped == gla.TUNING  # restored


def test_tuned_restores_the_table_exactly():
    """``benchmarks._timing.tuned``: overrides inside the block; afterwards the table as it was (a key the block added
    dropped), also when the block raises."""
    from benchmarks._timing import tuned

    table = {"a": 1, "b": True}
    with tuned(table, a=2):
        assert table == {"a": 2, "b": True}
        table["c"] = 3
    assert table == {"a": 1, "b": True}
    with pytest.raises(RuntimeError), tuned(table, b=False):
        assert table["b"] is False
        raise RuntimeError("inside")
    assert table == {"a": 1, "b": True}
