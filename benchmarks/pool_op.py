"""Agent attention's pooling (``visionlin.kernels.token_adaptive_avg_pool2d``) at the op level: our Triton kernels
against the ``"torch"`` backend (a mean over a view for equal bins, ``F.adaptive_avg_pool2d`` for small uneven bins,
two float32 matrix products for large ones), forward and forward + backward, at the agent models' shapes, eager (CUDA
events around back-to-back calls) and in GPU time (the forward replayed from a CUDA graph; the forward + backward's
kernels summed over one profiled call, the fastest of three), with the bandwidth the least traffic implies (forward:
``x`` read, the pooled tokens written; backward: the input gradient written).

Usage (on a GPU machine):
    python benchmarks/pool_op.py --out benchmarks/results/h200 [--commit SHA]

Writes ``pool_op.json`` (rows + meta: command, commit, date, GPU, versions) and ``pool_op.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import forward_backward_bars  # noqa: E402
from benchmarks._timing import (  # noqa: E402
    DTYPES,
    add_op_flags,
    add_timing_flags,
    check_op_flags,
    check_timing_flags,
    cuda_ms,
    graph_ms,
    kernels_ms,
)
from visionlin.kernels.pool import token_adaptive_avg_pool2d  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "pool_op"
#: name: (batch, H, W, channels, oh, ow); 224 px shapes at the training batch (128) unless the name says otherwise
SHAPES = {
    "agent_deit_s_224_bs256": (256, 14, 14, 384, 7, 7),  # equal 2 x 2 bins
    "agent_deit_s_1024_bs16": (16, 64, 64, 384, 7, 7),  # uneven 10 x 10 bins: F.adaptive_avg_pool2d
    "agent_deit_s_2048_bs4": (4, 128, 128, 384, 7, 7),  # uneven 19 x 19: the matrix products
    "agent_deit_s_4096_bs1": (1, 256, 256, 384, 7, 7),  # few programs: the forward splits the bins' rows
    "agent_swin_t_stage1": (128, 56, 56, 96, 3, 3),  # 9 agents over a 56 x 56 window: uneven 19 x 19
    "agent_swin_t_stage2": (128, 28, 28, 192, 4, 4),  # equal 7 x 7
    "agent_pvt_s_stage1": (128, 56, 56, 64, 7, 7),  # equal 8 x 8
}


def _time(row: dict, step, grad: bool, args) -> dict:
    try:
        with torch.set_grad_enabled(grad):
            row["ms"] = cuda_ms(step, args.warmup, args.iters, args.repeats)
            # autograd's backward is not captured (an eager backward on the autograd thread invalidated the capture)
            row["gpu_ms"] = min(kernels_ms(step) for _ in range(3)) if grad else graph_ms(step, args.warmup, args.iters)
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    return row


def _measure(name: str, shape, backend: str, args) -> list[dict]:
    b, hh, ww, c, oh, ow = shape
    rows = []
    for mode in ("forward", "forward_backward"):
        grad = mode == "forward_backward"
        # a strided view, as the layers pass it (the query third of qkv)
        qkv = torch.randn(b, hh * ww, 3 * c, device="cuda", dtype=DTYPES[args.dtype], requires_grad=grad)
        x = qkv[..., :c]
        go = torch.randn(b, oh * ow, c, device="cuda", dtype=qkv.dtype)

        def fwd(x=x):
            return token_adaptive_avg_pool2d(x, (hh, ww), (oh, ow), backend=backend)

        step = (lambda qkv=qkv, go=go: torch.autograd.grad(fwd(), qkv, go)) if grad else fwd
        row = {"shape": name, "method": backend, "mode": mode, "batch": b, "grid": [hh, ww], "out": [oh, ow],
               "channels": c}  # fmt: skip
        row = _time(row, step, grad, args)
        if row["status"] == "ok":
            nbytes = (b * hh * ww * c + b * oh * ow * c) * qkv.element_size() * (2 if grad else 1)
            row["gb_s_min_traffic_gpu"] = nbytes / row["gpu_ms"] / 1e6
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _plot(result: dict, path: Path) -> None:
    rows = [dict(r, ms=r["gpu_ms"]) for r in result["rows"] if r["status"] == "ok"]
    forward_backward_bars(result, path, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/pool_op.py", description=__doc__.split("\n\n")[0])
    add_op_flags(p, "pool_op", SHAPES)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    add_timing_flags(p)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    check_op_flags(p, args, SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes.split(","):
        for backend in ("triton", "torch"):
            rows += _measure(name, SHAPES[name], backend, args)
    by = {(r["shape"], r["method"], r["mode"]): r.get("gpu_ms") for r in rows}
    for name in args.shapes.split(","):
        for mode in ("forward", "forward_backward"):
            t, a = by.get((name, "triton", mode)), by.get((name, "torch", mode))
            if t and a:
                print(f"{name} {mode}: torch {a:.4f} ms, triton {t:.4f} ms (GPU time): {a / t:.2f}x")
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
