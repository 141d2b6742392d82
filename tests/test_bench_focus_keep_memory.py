"""benchmarks/focus_keep_memory.py: flag checks on the CPU (the measurement needs a GPU)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import focus_keep_memory


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "flatten_pvt_smal"], "--models / --twin: unknown ['flatten_pvt_smal']"),
        (["--models", ","], "--models / --twin: unknown ','"),
        (["--twin", "swin_tiny"], "--models / --twin: unknown ['swin_tiny']"),
        (["--batch", "0"], "--batch and --size must be >= 1, got 0 and 224"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        focus_keep_memory.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        focus_keep_memory.main(["--out", "unused"])
    assert e.value.code == 2 and "needs a CUDA device" in capsys.readouterr().err
