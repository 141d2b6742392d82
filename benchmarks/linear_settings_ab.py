"""Launch settings of the linear-attention Triton kernels (``TUNING`` in ``visionlin.kernels.triton.linear``), side by
side in one process: each named setting in turn, several rounds in alternating order, the median per setting and case.
Forward in eager mode and replayed from a CUDA graph (kernel time alone), backward in eager mode. ``--sweep`` of
``visionlin bench op`` changes one knob at a time and runs each setting once; this compares whole settings and repeats
them, because on a shared host one pass can differ from the next by more than the settings do.

Usage (on a GPU machine):
    python benchmarks/linear_settings_ab.py --out benchmarks/results/h200 [--rounds 3] [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish, grouped_bars  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402
from visionlin.train.bench_op import CASES, run_case  # noqa: E402

STEM = "linear_settings_ab"
#: name -> TUNING keys (the rest at their defaults)
SETTINGS = {
    "default": {},
    "4 warps, bwd rows 64": {"warps": 4, "rows_backward": 64},
    "4 warps, bwd rows 32": {"warps": 4, "rows_backward": 32},
    "4 warps fwd only": {"warps": 4, "warps_backward": 8},
}
MEASURES = ("triton_fwd_ms", "triton_fwd_graph_ms", "triton_bwd_ms")


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4))
    for ax, measure in zip(axes, MEASURES, strict=True):
        ms = {(r["case"], r["setting"]): r[measure] for r in rows}
        grouped_bars(ax, cases, list(SETTINGS), lambda c, s, ms=ms: ms.get((c, s), 0.0), label_fmt="%.3f", label_size=6)
        ax.set_title(measure.replace("triton_", "").replace("_ms", " ms (median over rounds)"), fontsize=9)
    axes[0].legend(fontsize=7)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    from visionlin.kernels.triton import linear as tri

    p = argparse.ArgumentParser(prog="python benchmarks/linear_settings_ab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for linear_settings_ab.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--rounds", type=int, default=3, help="passes over the settings (alternating order)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in CASES if c[4] == 32]  # head dim 32: the shapes the settings were chosen for
    saved = dict(tri.TUNING)
    samples: dict[tuple[str, str], list[dict]] = {}
    errors: dict[tuple[str, str], str] = {}
    try:
        for rnd in range(args.rounds):
            order = list(SETTINGS) if rnd % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                tri.TUNING.clear()
                tri.TUNING.update(saved | SETTINGS[name])
                for case in cases:
                    try:
                        r = run_case(*case, only=("triton",))
                    except Exception as e:  # noqa: BLE001 (recorded; the other settings still run)
                        errors[(case[0], name)] = f"{type(e).__name__}: {str(e)[:200]}"
                        continue
                    samples.setdefault((case[0], name), []).append(r)
                    print(json.dumps({"round": rnd, "setting": name, "case": case[0],
                                      **{m: r.get(m) for m in MEASURES}}), flush=True)  # fmt: skip
    finally:
        tri.TUNING.clear()
        tri.TUNING.update(saved)
    rows = []
    for case in cases:
        for name in SETTINGS:
            row = {"case": case[0], "setting": name, "tuning": SETTINGS[name], "status": "ok"}
            runs = samples.get((case[0], name), [])
            if not runs:
                rows.append(row | {"status": "error", "error": errors.get((case[0], name), "not run")})
                continue
            for m in MEASURES:
                vals = [r[m] for r in runs if r.get(m) is not None]
                row[m] = statistics.median(vals) if vals else None
                row[m.replace("_ms", "_runs_ms")] = vals
            rows.append(row)
            print(f"{case[0]:34s} {name:24s} " + "  ".join(f"{m[7:]} {row[m]:.3f}" for m in MEASURES if row[m]))
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "settings": SETTINGS, "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
