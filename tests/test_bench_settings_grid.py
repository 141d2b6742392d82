"""The launch-settings search of ``benchmarks/linear_settings_ab.py --grid`` end to end on the CPU: both kernel families
under Triton's interpreter at tiny shapes and two values per knob, the CUDA-graph timer replaced by a wall clock. It
checks the plumbing a GPU session relies on (every setting recorded, a wrong result refused, the best kept, the JSON
written after each case, the family's TUNING restored), not any timing."""

from __future__ import annotations

import textwrap

from interpreter_utils import run_in_interpreter

_SCRIPT = textwrap.dedent(
    """
    import json, tempfile, time
    from pathlib import Path
    import torch
    import benchmarks.linear_settings_ab as ab
    import visionlin.train.bench_op as bench_op
    from visionlin.kernels.triton import linear as tri, rope_linear as rl

    def wall(fn, ms=100):
        t = time.perf_counter(); fn(); return (time.perf_counter() - t) * 1e3

    bench_op._bench_graph = wall
    bench_op.CASES[0] = ("tiny", 1, 40, 2, 16, "relu", "divide")
    ab.DEVICE = "cpu"
    ab.gpu_meta = lambda argv, commit: {"commit": commit, "gpu": None, "cpu": "cpu", "torch": "-", "triton": "-",
                                        "date": "-"}  # the real one asks the GPU
    ab.ROPE_CASES = (("tiny MALA", "magnitude", 1, 40, 1, 16), ("tiny NaLa", "norm_aware", 1, 24, 2, 16))
    ab.FORWARD_GROUPS = ({"warps": (2, 4), "rows": (16, 32)}, {"readout_per_sm": (0, 1)})
    ab.BACKWARD_GROUPS = ({"rows_backward": (16, 0)},)  # 0 rows: refused by TUNING's check, recorded as an error
    ab.ROPE_FORWARD_GROUPS = ({"rows_state": (16, 32)},)
    ab.ROPE_BACKWARD_GROUPS = ({"warps_backward": (8, 2)},)  # ends off the default: must not leak into the next case
    before = (dict(tri.TUNING), dict(rl.TUNING))
    out = Path(tempfile.mkdtemp())
    for family, cases in (("linear", [0]), ("rope", [0, 1])):
        assert ab._grid(family, out, "test", None, cases, torch.float32, family) == 0
        result = json.loads((out / f"{family}.json").read_text())
        rows = result["rows"]
        assert {r["case"] for r in rows} == ({"tiny"} if family == "linear" else {"tiny MALA", "tiny NaLa"})
        shipped = [(r["case"], r["part"]) for r in rows if r.get("shipped")]
        assert len(shipped) == len(set(shipped)) == 2 * len(cases) and all(r.get("graph_ms") for r in rows
                                                                              if r.get("shipped")), rows
        ok = [r for r in rows if "graph_ms" in r and not r.get("shipped")]
        assert ok and all(r["max_rel_diff"] <= ab.GRID_TOLERANCE for r in ok), rows
        assert len(result["best"]) == 2 * len(cases) and len(result["defaults"]) == len(cases)
    # each case's reference and recorded defaults come from the shipped settings, not the previous case's last try
    defaults = json.loads((out / "rope.json").read_text())["defaults"]
    assert defaults["0"]["warps_backward"] == defaults["1"]["warps_backward"] == rl.WARPS_LARGE, defaults  # float32
    bad = [r for r in json.loads((out / "linear.json").read_text())["rows"] if r.get("rows_backward") == 0]
    assert bad and "TUNING['rows_backward'] = 0: must be an integer >= 1 or None" in bad[0]["error"], bad
    assert (dict(tri.TUNING), dict(rl.TUNING)) == before
    print("interpreter ok")
    """
)


def test_settings_grid_runs_both_families_under_the_interpreter():
    run_in_interpreter(_SCRIPT, timeout=600)
