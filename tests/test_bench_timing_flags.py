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


OP_SCRIPTS = ("conv_op", "focus_op", "layer_norm_op", "pool_op", "rms_mix_op")  # _timing.add_op_flags


@pytest.mark.parametrize("script", OP_SCRIPTS)
@pytest.mark.parametrize(("shapes", "shown"), [("nope", "['nope']"), (",", "','"), ("", "''")])
def test_op_scripts_refuse_unknown_or_no_shapes_naming_the_allowed(script, shapes, shown, capsys):
    module = importlib.import_module(f"benchmarks.{script}")
    with pytest.raises(SystemExit) as e:
        module.main(["--out", "unused", "--shapes", shapes])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--shapes: unknown {shown}; choose from {', '.join(module.SHAPES)}" in err


def test_op_flags_drop_empty_items_and_need_cuda(monkeypatch):
    import argparse

    import torch

    from benchmarks._timing import add_op_flags, check_op_flags

    p = argparse.ArgumentParser()
    add_op_flags(p, "x_op", {"a": 1, "b": 2})
    args = p.parse_args(["--out", "o", "--shapes", "b,,a,"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_op_flags(p, args, {"a": 1, "b": 2}) == ["b", "a"] and args.shapes == "b,a"
    assert p.parse_args(["--out", "o"]).shapes == "a,b"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        check_op_flags(p, args, {"a": 1, "b": 2})
