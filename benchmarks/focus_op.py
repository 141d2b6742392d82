"""FLatten's focusing kernels (``visionlin/kernels/triton/focus.py``) over their launch settings (``TUNING``), at the
shapes of FLatten-PVT-S, FLatten-Swin-T and FLatten-DeiT-S in a training batch of 128 at 224 px: the forward (one
``[B, N, H, D]`` read, one written) and the backward (two read, one written, the channel scale's gradient summed), each
timed as a CUDA-graph replay next to a copy of the same bytes (``copy_``: the bandwidth bound, measured in the same
run). Each setting also gets a model-weighted total: the sum over a FLatten-PVT-S training step's calls (per layer, the
queries and the keys, which have the same shape, are focused twice, in the forward and again in the backward's
recomputation, and their gradients once).

Usage (on a GPU machine):
    python benchmarks/focus_op.py --out benchmarks/results/h200 [--commit SHA] [--shapes pvt_s1_q,...]

Writes ``focus_op.json`` (rows: shape, direction, setting, ms, GB/s, fraction of the copy's GB/s; the weighted totals;
meta: command, commit, date, GPU, versions) and ``focus_op.png``.
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
from benchmarks._timing import add_op_flags, add_timing_flags, check_op_flags, check_timing_flags, graph_ms, tuned  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "focus_op"
B = 128
#: name: ([B, N, H, D], FLatten-PVT-S layers of this shape; 0: not a PVT-S shape). FLatten-PVT-S attends over whole
#: stage maps (no key reduction: the authors' ``PVT_LA_SR_RATIOS`` are 1111), so its keys have its queries' shape:
#: per layer the forward direction runs 4 times (queries and keys, in the forward and again in the backward's
#: recomputation) and the backward twice
SHAPES = {
    "pvt_s1": ((B, 3136, 1, 64), 3),
    "pvt_s2": ((B, 784, 2, 64), 4),
    "pvt_s3": ((B, 196, 5, 64), 6),
    "pvt_s4": ((B, 49, 8, 64), 3),
    "swin_t1": ((B, 3136, 3, 32), 0),
    "swin_t2": ((B, 784, 6, 32), 0),
    "deit_s": ((B, 197, 6, 64), 0),
}
CALLS = {"forward": 4, "backward": 2}  # per FLatten-PVT-S layer


#: (name, TUNING overrides) of the forward / backward sweeps; the first of each is the setting before stop 41.
#: Names: e<entries a tile>_w<entries a warp>[_p<programs per SM: a walk of tiles per program>][_pf: the next tile
#: loaded ahead]
def _fwd(e: int, w: int, p: int | None = None, pf: bool = False) -> tuple[str, dict]:
    name = f"e{e}_w{w}" + (f"_p{p}" if p else "") + ("_pf" if pf else "")
    return name, {"fwd_tokens": None, "fwd_elements": e, "warp_elements": w, "fwd_programs": p, "prefetch": pf}


def _bwd(e: int, w: int, p: int, pf: bool = False) -> tuple[str, dict]:
    name = f"e{e}_w{w}_p{p}" + ("_pf" if pf else "")
    return name, {"bwd_tokens": None, "bwd_elements": e, "bwd_warp_elements": w, "bwd_programs": p, "prefetch": pf}


FORWARD = [
    ("narrow", {"fwd_tokens": 8, "warp_elements": 128, "fwd_programs": None, "prefetch": False}),
    _fwd(1024, 256), _fwd(2048, 256), _fwd(2048, 512), _fwd(4096, 512), _fwd(2048, 512, 8),
    _fwd(2048, 512, 8, True), _fwd(2048, 512, 16, True), _fwd(1024, 256, 16, True), _fwd(1024, 512, 16, True),
    _fwd(4096, 512, 8, True),
]  # fmt: skip
BACKWARD = [
    ("narrow", {"bwd_tokens": 4, "bwd_warp_elements": 128, "bwd_programs": 8, "prefetch": False}),
    _bwd(1024, 128, 8), _bwd(1024, 256, 8), _bwd(2048, 256, 8), _bwd(1024, 256, 16), _bwd(1024, 256, 8, True),
    _bwd(1024, 256, 16, True), _bwd(1024, 128, 8, True), _bwd(512, 128, 16, True), _bwd(2048, 256, 8, True),
]  # fmt: skip


def _inputs(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    go = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    c = torch.rand(shape[2] * shape[3], device="cuda", generator=g) + 0.5
    return x, go, c


def _row(shape_name: str, direction: str, setting: str, overrides: dict, args, first: dict) -> dict:
    """One setting at one shape; ``first``: the outputs of this shape's first setting that ran, by direction (filled
    here when missing), each later setting's outputs compared with them."""
    from visionlin.kernels.triton import focus

    shape = SHAPES[shape_name][0]
    x, go, c = _inputs(shape)
    row = {"shape": shape_name, "dims": list(shape), "direction": direction, "setting": setting, "tuning": overrides}
    try:
        with tuned(focus.TUNING, **overrides):
            if direction == "forward":
                call = lambda: focus._focus(x, c, 3.0, 1e-6)  # noqa: E731
                outs = {"f": call()}
            else:
                call = lambda: focus._focus_grad(x, c, go, 3.0, 1e-6, True)  # noqa: E731
                outs = dict(zip(("dx", "dc"), call(), strict=True))
            ms = statistics.median(graph_ms(call, args.warmup, args.iters) for _ in range(args.repeats))
        nbytes = x.numel() * x.element_size() * (2 if direction == "forward" else 3)
        row |= {"ms": ms, "gb_s": nbytes / ms / 1e6, "status": "ok"}
        # every setting computes the same features / gradients (the tests hold them to float64): a guard that a
        # sweep entry did not time a broken launch (the backward's dx and its scale gradient dc)
        ref = first.setdefault(direction, outs)
        row["max_rel_vs_first"] = max(
            ((outs[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max().clamp_min(1e-30)).item()
            for k in outs
        )
    except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    return row


def _copy_gb_s(shape, args) -> float:
    """GB/s (bytes read + written) of ``copy_`` of one bfloat16 tensor of ``shape``: the bound both directions are
    compared with."""
    src = torch.empty(shape, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src), args.warmup, args.iters)
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(13, 8))
    for ax, direction in zip(axes, ("forward", "backward"), strict=True):
        rows = [r for r in result["rows"] if r["direction"] == direction and r["status"] == "ok"]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        frac = {(r["shape"], r["setting"]): r["copy_fraction"] for r in rows}
        grouped_bars(ax, shapes, settings, lambda s, k, f=frac: f.get((s, k), 0.0), fontsize=7, rotation=15)
        ax.set_ylabel("GB/s / copy's GB/s")
        ax.set_title(f"{direction} (graph replay)", fontsize=9)
        ax.legend(fontsize=6, ncol=5)
    finish(fig, result, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/focus_op.py", description=__doc__.split("\n\n")[0])
    add_op_flags(p, "focus_op", SHAPES)
    add_timing_flags(p, iters=20, warmup=2, repeats=1)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    names = check_op_flags(p, args, SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        copy = _copy_gb_s(SHAPES[name][0], args)
        first: dict = {}
        for direction, sweep in (("forward", FORWARD), ("backward", BACKWARD)):
            for setting, overrides in sweep:
                row = _row(name, direction, setting, overrides, args, first)
                if row["status"] == "ok":
                    row["copy_gb_s"] = copy
                    row["copy_fraction"] = row["gb_s"] / copy
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("tuning", "dims")}), flush=True)
    # FLatten-PVT-S's focusing per training step, per setting: its layers x calls per layer x ms, over its shapes
    totals = {}
    for direction, sweep in (("forward", FORWARD), ("backward", BACKWARD)):
        for setting, _ in sweep:
            parts = [
                SHAPES[r["shape"]][1] * CALLS[direction] * r["ms"]
                for r in rows
                if r["direction"] == direction and r["setting"] == setting and r["status"] == "ok"
                and SHAPES[r["shape"]][1]
            ]  # fmt: skip
            pvt = [n for n in names if SHAPES[n][1]]
            if len(parts) == len(pvt) and pvt:
                totals[f"{direction}:{setting}"] = sum(parts)
    for direction, sweep in (("forward", FORWARD), ("backward", BACKWARD)):
        first = totals.get(f"{direction}:{sweep[0][0]}")
        for setting, _ in sweep:
            if (t := totals.get(f"{direction}:{setting}")) is not None:
                print(f"flatten_pvt_small {direction} {setting}: {t:.3f} ms per step"
                      + (f" ({first / t:.2f}x narrow)" if first else ""))  # fmt: skip
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows, "pvt_s_ms_per_step": totals}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
