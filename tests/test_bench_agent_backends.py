"""benchmarks/agent_backends.py: flag checks and the plot on the CPU (the measurement itself runs on the GPU)."""

from __future__ import annotations

import pytest

from benchmarks import agent_backends


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "agent_deit_small,nope"], "unknown model(s) ['nope']"),
        (["--iters", "0"], "--iters must be a positive integer, got 0"),
        (["--bwd-sweep", "--sweep-shapes", "1x2"], "--sweep-shapes takes BxNxHxDxAGENTS"),
        (["--bwd-sweep", "--sweep-shapes", "1x2x3x4x0"], "of positive ints, got '1x2x3x4x0'"),
        (["--bwd-sweep", "--sweep-shapes", "axbxcxdxe"], "got 'axbxcxdxe'"),
        (["--bwd-sweep", "--sweep-shapes", ","], "got ','"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        agent_backends.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_writes_the_ratios(tmp_path):
    rows = [
        {"kind": "op", "shape": [1, 2, 3, 4, 5]},
        *(
            {
                "kind": "model",
                "model": "agent_deit_small",
                "size": s,
                "batch": 1,
                "sdpa_vs_twin_gpu": 0.9,
                "triton_vs_twin_gpu": 1.2,
            }  # fmt: skip
            for s in (224, 1024)
        ),
        {"kind": "train", "model": "agent_swin_tiny", "size": 224, "batch": 2, "sdpa_vs_twin_gpu": 0.9,
         "triton_vs_twin_gpu": 1.3},
        {"kind": "op_train", "shape": [1, 2, 3, 4, 5]},
        {"kind": "bwd_sweep", "shape": [1, 2, 3, 4, 5], "rows": 64, "warps": 4, "stages": 1, "bwd_us": 3.0},
    ]  # fmt: skip
    meta = {"gpu": "test", "commit": "abc", "date": "2026-12-02", "torch": "x", "triton": "y", "command": "a.py"}
    agent_backends.plot({"meta": meta, "rows": rows}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
