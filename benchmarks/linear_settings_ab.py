"""Launch settings of the linear-attention Triton kernels (``TUNING`` in ``visionlin.kernels.triton.linear``), side by
side in one process: each named setting in turn, several rounds in alternating order, the median per setting and case.
Forward in eager mode and replayed from a CUDA graph (kernel time alone), backward in eager mode. ``--sweep`` of
``visionlin bench op`` changes one knob at a time and runs each setting once; this compares whole settings and repeats
them, because on a shared host one pass can differ from the next by more than the settings do.

``--grid`` instead searches the settings one group of knobs at a time (coordinate descent, each case on its own),
timing the forward and the backward custom op replayed from a CUDA graph only (GPU time alone, stable to a fraction of
a percent from one replay series to the next, so one pass suffices); it writes ``linear_settings_grid.json``.
``--family rope`` searches the MALA / RALA / NaLa kernels' settings (``TUNING`` in
``visionlin.kernels.triton.rope_linear``) the same way, at the stage shapes of MAViT-T / RAVLT-T / NaLaFormer-T
(``rope_settings_grid.json``).

Usage (on a GPU machine):
    python benchmarks/linear_settings_ab.py --out benchmarks/results/h200 [--rounds 3] [--commit SHA]
    python benchmarks/linear_settings_ab.py --out benchmarks/results/h200 --grid [--family rope]
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
from benchmarks._timing import tuned  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402
from visionlin.train.bench_op import CASES, run_case  # noqa: E402

STEM = "linear_settings_ab"
#: name -> TUNING keys (the rest at their defaults)
SETTINGS = {
    "default": {},
    # the settings shipped before 69e6057's search (at head dim 32; the backward's rows were 128 there too)
    "former (8 warps)": {
        "warps": 8, "rows": 64, "stages": 0, "state_per_sm": 4, "readout_per_sm": 0,
        "warps_backward": 8, "stages_backward": 0, "backward_per_sm": 4,
    },
}  # fmt: skip
MEASURES = ("triton_fwd_ms", "triton_fwd_graph_ms", "triton_bwd_ms", "triton_bwd_graph_ms")
#: ``--grid``: the groups of knobs searched in turn (every combination within a group, the best kept for the next)
FORWARD_GROUPS = (
    {"warps": (2, 4, 8), "rows": (32, 64, 128)},
    # readout_per_sm 0: one block of rows per program; stages 0: Triton's default (None would be the shipped default)
    {"state_per_sm": (2, 4, 8, 16, 32), "readout_per_sm": (0, 4, 8, 16, 32)},
    {"stages": (0, 1, 2, 4), "fused": (None, 0, 1)},
)
BACKWARD_GROUPS = (
    {"warps_backward": (4, 8), "rows_backward": (32, 64, 128), "maxnreg_backward": (None, 128)},
    {"backward_per_sm": (2, 4, 8, 16), "stages_backward": (0, 1, 2, 4)},
)
# indices into bench_op.CASES: 192 / 6 / 12 (batch, head) pairs, 1,536 (fused forward), and head dim 128 (32 pairs)
GRID_CASES = (0, 2, 3, 4, 5)
#: ``--family rope``: (label, mechanism, B, N, H, D) at the stages of MAViT-T / RAVLT-T / NaLaFormer-T (64 / 128
#: channels, 1 / 2 heads of 64, 2-D RoPE), batch 128; then head dim 32 (no shipped model, the kernels' smaller tiles)
ROPE_CASES = (
    ("MALA stage 1 (128, 3136, 1, 64)", "magnitude", 128, 3136, 1, 64),
    ("MALA stage 2 (128, 784, 2, 64)", "magnitude", 128, 784, 2, 64),
    ("RALA stage 1 (128, 3136, 1, 64)", "rank_augmented", 128, 3136, 1, 64),
    ("NaLa stage 1 (128, 3136, 1, 64)", "norm_aware", 128, 3136, 1, 64),
    ("MALA head dim 32 (128, 3136, 2, 32)", "magnitude", 128, 3136, 2, 32),
    ("NaLa head dim 32 (128, 3136, 2, 32)", "norm_aware", 128, 3136, 2, 32),
)
ROPE_FORWARD_GROUPS = (
    {"warps": (2, 4, 8), "rows_state": (32, 64, 128)},
    {"rows_readout": (16, 32, 64, 128)},
    {"per_sm": (2, 4, 8, 16), "stages": (0, 1, 2, 4)},
)
ROPE_BACKWARD_GROUPS = (
    {"warps_backward": (2, 4, 8), "rows_readout_backward": (16, 32, 64), "rows_state_backward": (16, 32, 64)},
    {"backward_per_sm": (2, 4, 8, 16), "stages_backward": (0, 1, 2)},
)
#: a setting whose result differs from the shipped settings' by more than this (relative to the largest magnitude of
#: that result) is recorded as wrong and cannot win: a search must not pick a fast kernel that computes something else
GRID_TOLERANCE = 2e-2
DEVICE = "cuda"  # of the grid's inputs (the CPU test runs the search under Triton's interpreter)


def _plot_grid(result: dict, path: Path) -> None:
    """Graph-timed ms of every setting tried, in the order tried (the shipped settings first, orange), one panel per
    case and part."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["case"], r["part"]) for r in result["rows"]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 2.6 * len(panels)), squeeze=False)
    for ax, (case, part) in zip(axes[:, 0], panels, strict=True):
        rows = [r for r in result["rows"] if (r["case"], r["part"]) == (case, part)]
        ax.bar(range(len(rows)), [r.get("graph_ms") or 0.0 for r in rows],
               color=["tab:orange" if r.get("shipped") else "tab:blue" for r in rows])  # fmt: skip
        ax.set_title(f"{case}, {part}: best {result['best'].get(f'{case} | {part}')}", fontsize=7)
        ax.set_ylabel("ms (CUDA graph)", fontsize=7)
    finish(fig, result, path, fontsize=7)


def _linear_setup(idx: int, dtype: torch.dtype):
    """(label, forward call, backward call, reference output, reference gradients, resolved defaults) of a
    ``bench_op.CASES`` entry, the kernels at their current settings giving the references."""
    import functools

    from visionlin.kernels.triton import linear as tri
    from visionlin.train.bench_op import CASES, triton_op_args

    label, b, n, h, d, fmap, norm = CASES[idx]
    q, k, v, g = (torch.randn(b, n, h, d, device=DEVICE, dtype=dtype) for _ in range(4))
    args = triton_op_args(fmap, norm, d)
    bd, bdv = tri._pad_dims(d, d)
    defaults = {
        "forward": tri._forward_settings(bd, bdv, tri._use_fused(b * h, bd, bdv, q.device)),
        "backward": tri._backward_settings(bd, bdv),
    }
    with torch.no_grad():
        out, state = tri.linear_attention_fwd(q, k, v, *args)
        grads = tri.linear_attention_bwd(q, k, v, out, state, g, *args)
    fwd = functools.partial(tri.linear_attention_fwd, q, k, v, *args)
    bwd = functools.partial(tri.linear_attention_bwd, q, k, v, out, state, g, *args)
    return label, fwd, bwd, out, grads, defaults


def _rope_setup(idx: int, dtype: torch.dtype):
    """:func:`_linear_setup` for a :data:`ROPE_CASES` entry (RoPE tables from random angles)."""
    import functools

    from visionlin.kernels.triton import rope_linear as rl

    label, mechanism, b, n, h, d = ROPE_CASES[idx]
    q, k, v, g = (torch.randn(b, n, h, d, device=DEVICE, dtype=dtype) for _ in range(4))
    angles = torch.randn(n, d, device=DEVICE)
    sin, cos = angles.sin().contiguous(), angles.cos().contiguous()
    args = (rl.MECHANISM_IDS[mechanism], d**-0.5, 1e-6, 0.0)
    bd, bf, bdv = rl._blocks(args[0], d, d)
    defaults = {
        "warps": rl._meta(args[0], q, v, True)["num_warps"],
        "warps_backward": rl._meta(args[0], q, v, True, backward=True)["num_warps"],
        **{f"rows_{kernel}": rl._rows(kernel, bf, bdv, dtype != torch.float32) for kernel in rl.ROWS},
    }
    with torch.no_grad():
        out, state, aux = rl.rope_linear_attention_fwd(q, k, v, sin, cos, *args)
        grads = rl.rope_linear_attention_bwd(q, k, v, sin, cos, state, aux, g, *args)
    fwd = functools.partial(rl.rope_linear_attention_fwd, q, k, v, sin, cos, *args)
    bwd = functools.partial(rl.rope_linear_attention_bwd, q, k, v, sin, cos, state, aux, g, *args)
    return label, fwd, bwd, out, grads, defaults


def _family(name: str):
    """(TUNING dict, case setup, number of cases, default case indices, forward groups, backward groups)."""
    if name == "rope":
        from visionlin.kernels.triton import rope_linear as rl

        cases = tuple(range(len(ROPE_CASES)))
        return rl.TUNING, _rope_setup, len(ROPE_CASES), cases, ROPE_FORWARD_GROUPS, ROPE_BACKWARD_GROUPS
    from visionlin.kernels.triton import linear as tri
    from visionlin.train.bench_op import CASES

    return tri.TUNING, _linear_setup, len(CASES), GRID_CASES, FORWARD_GROUPS, BACKWARD_GROUPS


def _grid(
    family: str, out: Path, commit: str | None, argv: list[str] | None, cases: list[int], dtype: torch.dtype, name: str
) -> int:
    """Coordinate descent over the family's forward and backward groups of knobs, per case, graph-timed; the JSON is
    rewritten after every case (a run cut short keeps what it measured)."""
    import itertools

    from visionlin.train.bench_op import _bench_graph

    tuning, setup, _, _, forward_groups, backward_groups = _family(family)
    saved = dict(tuning)

    def use(config: dict | None = None) -> None:
        """The family's ``TUNING`` as shipped, with ``config`` over it."""
        tuning.clear()
        tuning.update(saved | (config or {}))

    rows, best, defaults = [], {}, {}
    result = {"benchmark": f"{family}_settings_grid", "meta": gpu_meta(argv, commit), "dtype": str(dtype),
              "tolerance": GRID_TOLERANCE, "defaults": defaults,
              "forward_groups": [{k: list(v) for k, v in grp.items()} for grp in forward_groups],
              "backward_groups": [{k: list(v) for k, v in grp.items()} for grp in backward_groups],
              "best": best, "rows": rows}  # fmt: skip
    try:
        for idx in cases:
            use()  # each case's reference and recorded defaults at the shipped settings, not the last one tried
            label, fwd, bwd, ref_out, ref_grads, defaults[str(idx)] = setup(idx, dtype)
            for part, groups in (("forward", forward_groups), ("backward", backward_groups)):
                call, ref = (fwd, (ref_out,)) if part == "forward" else (bwd, ref_grads)
                use()
                shipped = {"case": label, "part": part, "shipped": True}  # the yardstick of what the search finds
                try:
                    with torch.no_grad():
                        shipped["graph_ms"] = _bench_graph(call, ms=100)
                except Exception as e:  # noqa: BLE001 (recorded; the search still runs)
                    shipped["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(shipped)
                print(json.dumps(shipped), flush=True)
                chosen: dict = {}
                for group in groups:
                    timed = []
                    for values in itertools.product(*group.values()):
                        config = chosen | dict(zip(group, values, strict=True))
                        use(config)
                        row = {"case": label, "part": part, **config}
                        try:
                            with torch.no_grad():
                                got = call()
                                row["max_rel_diff"] = max(
                                    (
                                        (x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)
                                    ).item()
                                    for x, y in zip(got[: len(ref)], ref, strict=True)
                                )
                                if not row["max_rel_diff"] <= GRID_TOLERANCE:  # NaN fails too
                                    raise ValueError(
                                        f"result differs from the shipped settings': {row['max_rel_diff']}"
                                    )
                                ms = _bench_graph(call, ms=100)
                            row["graph_ms"] = ms
                            timed.append((ms, config))
                        except Exception as e:  # noqa: BLE001 (recorded; the other settings still run)
                            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    if timed:
                        chosen = min(timed, key=lambda t: t[0])[1]
                best[f"{label} | {part}"] = chosen
                print(f"best {label} {part}: {chosen}", flush=True)
            write_result(result, out, name, partial=True)
    finally:
        use()
    for note in write_result(result, out, name, plot=_plot_grid):
        print(note)
    return 0


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5 * len(MEASURES), 4))
    for ax, measure in zip(axes, MEASURES, strict=True):
        ms = {(r["case"], r["setting"]): r[measure] for r in rows}
        grouped_bars(
            ax, cases, list(result["settings"]), lambda c, s, ms=ms: ms.get((c, s), 0.0), label_fmt="%.3f", label_size=6
        )
        ax.set_title(measure.replace("triton_", "").replace("_ms", " ms (median over rounds)"), fontsize=9)
    axes[0].legend(fontsize=7)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    from visionlin.kernels.triton import linear as tri

    p = argparse.ArgumentParser(prog="python benchmarks/linear_settings_ab.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for linear_settings_ab.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--rounds", type=int, default=None, help="passes over the settings, alternating order (default 3)")
    p.add_argument("--grid", action="store_true", help="coordinate descent over the knobs, graph-timed (see above)")
    p.add_argument("--family", choices=("linear", "rope"), default="linear",
                   help="with --grid: the linear kernels or the MALA / RALA / NaLa (RoPE) kernels")  # fmt: skip
    p.add_argument("--settings", type=json.loads, default=None,
                   help='JSON {name: {TUNING key: value}} compared instead of the built-in SETTINGS')  # fmt: skip
    p.add_argument("--cases", type=lambda s: [int(i) for i in s.split(",")], default=None,
                   help="comma-separated indices into bench_op.CASES (default: the head-dim-32 cases; with --grid "
                   f"{','.join(map(str, GRID_CASES))})")  # fmt: skip
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--name", default=None, help=f"file stem of the JSON and PNG (default: {STEM}, or "
                   "linear_settings_grid with --grid)")  # fmt: skip
    args = p.parse_args(argv)
    if args.grid and (args.settings is not None or args.rounds is not None):
        p.error("--grid searches its own settings once: --settings and --rounds do not apply to it")
    if args.family != "linear" and not args.grid:
        p.error("--family rope needs --grid (the A/B compares the linear kernels' settings)")
    n_cases = _family(args.family)[2] if args.grid else len(CASES)
    settings = SETTINGS if args.settings is None else args.settings
    if not isinstance(settings, dict) or not settings or not all(isinstance(v, dict) for v in settings.values()):
        p.error("--settings must be a non-empty JSON object of objects")
    unknown = {k for v in settings.values() for k in v} - set(tri.TUNING)
    if unknown:
        p.error(f"--settings names unknown TUNING keys {sorted(unknown)}; allowed: {sorted(tri.TUNING)}")
    bad = {f"{n}.{k}": x for n, v in settings.items() for k, x in v.items()
           if not (x is None or (isinstance(x, int) and not isinstance(x, bool) and x >= 0))}  # fmt: skip
    if bad:
        p.error(f"--settings values must be null or non-negative integers, got {bad}")
    cases_ok = args.cases is None or (
        bool(args.cases) and all(0 <= i < n_cases for i in args.cases) and len(set(args.cases)) == len(args.cases)
    )
    if not cases_ok:
        p.error(f"--cases must be distinct indices 0..{n_cases - 1}, got {args.cases}")
    rounds = 3 if args.rounds is None else args.rounds
    if rounds < 1:
        p.error(f"--rounds must be at least 1, got {rounds}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)
    if args.grid:
        grid_cases = list(_family(args.family)[3]) if args.cases is None else args.cases
        name = args.name or f"{args.family}_settings_grid"
        return _grid(args.family, args.out, args.commit, argv, grid_cases, dtype, name)
    # default: head dim 32, the shapes the built-in settings were chosen for
    cases = [c for c in CASES if c[4] == 32] if args.cases is None else [CASES[i] for i in args.cases]
    samples: dict[tuple[str, str], list[dict]] = {}
    errors: dict[tuple[str, str], str] = {}
    for rnd in range(rounds):
        order = list(settings) if rnd % 2 == 0 else list(reversed(settings))
        for name in order:
            with tuned(tri.TUNING, **settings[name]):
                for case in cases:
                    try:
                        r = run_case(*case, dtype=dtype, only=("triton",))
                    except Exception as e:  # noqa: BLE001 (recorded; the other settings still run)
                        errors[(case[0], name)] = f"{type(e).__name__}: {str(e)[:200]}"
                        continue
                    samples.setdefault((case[0], name), []).append(r)
                    print(json.dumps({"round": rnd, "setting": name, "case": case[0],
                                      **{m: r.get(m) for m in MEASURES}}), flush=True)  # fmt: skip
    rows = []
    for case in cases:
        for name in settings:
            row = {"case": case[0], "setting": name, "tuning": settings[name], "status": "ok"}
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
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "dtype": args.dtype, "settings": settings,
              "rows": rows}  # fmt: skip
    for note in write_result(result, args.out, args.name or STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
