"""Every benchmark script that takes ``--warmup`` / ``--iters`` / ``--repeats`` (``_timing.add_timing_flags``) refuses
a value below 1 with the values it got, before it needs a GPU: zero iterations would divide by zero, zero repeats would
time nothing."""

from __future__ import annotations

import importlib

import pytest

# script: (its required arguments, its default warmup / iters / repeats as the message prints them with --iters 0)
SCRIPTS = {
    "authors_speed": (["--authors-dir", "."], "5 / 0 / 3"),
    "conv_op": (["--out", "unused"], "3 / 0 / 3"),
    "focus_op": (["--out", "unused"], "2 / 0 / 1"),
    "gla_backward": (["--out", "unused"], "3 / 0 / 3"),
    "gla_segments": (["--out", "unused"], "2 / 0 / 3"),
    "layer_norm_op": (["--out", "unused"], "3 / 0 / 3"),
    "neighborhood_3d": (["--out", "unused"], "3 / 0 / 3"),
    "neighborhood_op": (["--out", "unused"], "5 / 0 / 5"),
    "pool_op": (["--out", "unused"], "3 / 0 / 3"),
    "rms_mix_op": (["--out", "unused"], "3 / 0 / 3"),
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_iters_zero_is_refused(script, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    required, shown = SCRIPTS[script]
    with pytest.raises(SystemExit) as e:
        module.main([*required, "--iters", "0"])
    assert e.value.code == 2
    assert f"--warmup / --iters / --repeats must be >= 1, got {shown}" in capsys.readouterr().err
