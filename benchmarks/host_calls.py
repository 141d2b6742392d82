"""Host time of single op calls, where it goes: each op's forward and forward + backward at a tiny shape (the GPU
idle, so the host is the bound) timed per call and run under ``cProfile``; the functions with the most own time are
printed. Also a bare Triton launch (an empty kernel with as many arguments as our kernels take) as the floor.

Usage (on a GPU machine):
    python benchmarks/host_calls.py --out benchmarks/results/h200 [--ops layer_norm,na2d] [--commit SHA]

Writes ``host_calls.json`` (per op and mode: microseconds per call, the top functions by own time; meta).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._timing import host_us  # noqa: E402


@triton.jit
def _empty_kernel(A, B, C, D, n0, n1, n2, n3, n4, n5, n6, n7, n8, n9, n10, n11, f0, BLOCK: tl.constexpr):
    pass


def _cases():
    from visionlin.kernels import layer_norm
    from visionlin.kernels.neighborhood import neighborhood_attention

    dev = "cuda"
    x = torch.randn(8, 384, device=dev, requires_grad=True)
    w = torch.ones(384, device=dev, requires_grad=True)
    b = torch.zeros(384, device=dev, requires_grad=True)
    q = torch.randn(1, 8, 8, 2, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn_like(q, requires_grad=True) for _ in range(2))
    rpb = torch.zeros(2, 13, 13, device=dev, requires_grad=True)
    a = torch.empty(1, device=dev)

    def empty_launch():
        _empty_kernel[(1,)](a, a, a, a, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0.5, BLOCK=16)

    return {
        "triton_empty_launch": (empty_launch, None),
        "layer_norm_torch": (lambda: layer_norm(x, w, b, out_dtype=torch.bfloat16, backend="torch"), (x, w, b)),
        "layer_norm_triton": (lambda: layer_norm(x, w, b, out_dtype=torch.bfloat16, backend="triton"), (x, w, b)),
        "na2d_triton": (
            lambda: neighborhood_attention(q, k, v, kernel_size=7, rpb=rpb, backend="triton"),
            (q, k, v, rpb),
        ),
    }


def _top(step, calls: int, n: int) -> list[dict]:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls_per_op": nc / calls,
                     "own_us_per_op": tt / calls * 1e6, "cum_us_per_op": ct / calls * 1e6})  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_us_per_op"])[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/host_calls.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--ops", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--top", type=int, default=18)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    cases = _cases()
    names = args.ops.split(",") if args.ops else list(cases)
    if unknown := sorted(set(names) - set(cases)):
        p.error(f"unknown op(s) {unknown}; choose from {sorted(cases)}")
    rows = []
    for name in names:
        fn, leaves = cases[name]
        for mode in ("forward", "forward_backward") if leaves else ("forward",):
            if mode == "forward":
                step = fn
            else:

                def step(fn=fn, leaves=leaves):
                    out = fn()
                    torch.autograd.grad(out, leaves, torch.ones_like(out))

            with torch.set_grad_enabled(mode != "forward"):
                row = {"op": name, "mode": mode, "us_per_call": host_us(step, args.calls),
                       "top": _top(step, args.calls, args.top)}  # fmt: skip
            rows.append(row)
            print(f"\n== {name} {mode}: {row['us_per_call']:.1f} us per call (own / cumulative us per call)")
            for t in row["top"]:
                own, cum, n = t["own_us_per_op"], t["cum_us_per_op"], t["calls_per_op"]
                print(f"   {own:7.1f} {cum:7.1f}  x{n:<5.1f} {t['function'][:90]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_calls.json").write_text(json.dumps({"meta": gpu_meta(argv, args.commit), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
