"""3-D neighborhood attention with additional keys at a Wan2.1 video-transformer shape: the ``"flex"`` backend (tiled
and row-major token orders), the ``"chunked"`` backend, and dense SDPA over all tokens (what a windowed op must beat
to be worth having), forward and forward + backward, with the peak memory of each.

Default shape: one Wan2.1-1.3B self-attention layer at 480 x 832, 81 frames (latent grid 21 x 30 x 52 = 32,760
tokens, 12 heads, head dim 128), kernel 7 (K = 343) plus 512 text tokens as additional keys, bf16. The gather
reference needs ``B N K H (D + Dv)`` float32 numbers (64 GiB here) and is not run.

Usage (on a GPU machine):
    python benchmarks/neighborhood_3d.py --out benchmarks/results/h200 [--commit SHA]
        [--batch 1 --grid 21 30 52 --heads 12 --dim 128 --kernel 7 --extra 512 --dtype bf16 --no-backward]

Writes ``neighborhood_3d.json`` (rows + meta: command, commit, date, GPU, versions).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._timing import DTYPES, add_timing_flags, check_timing_flags, cuda_ms  # noqa: E402
from visionlin.kernels import neighborhood as na  # noqa: E402
from visionlin.kernels import neighborhood_attention  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "neighborhood_3d"


def _methods(args: argparse.Namespace) -> dict[str, Callable]:
    kernel = (args.kernel,) * 3

    def flex(q, k, v, ek, ev):
        return neighborhood_attention(q, k, v, kernel, additional_keys=ek, additional_values=ev, backend="flex")

    def flex_row_major(q, k, v, ek, ev):
        tile = na._flex_tile
        na._flex_tile = lambda *a: None  # the row-major token order (what tiling saves)
        try:
            return flex(q, k, v, ek, ev)
        finally:
            na._flex_tile = tile

    def chunked(q, k, v, ek, ev):
        return neighborhood_attention(q, k, v, kernel, additional_keys=ek, additional_values=ev, backend="chunked")

    def sdpa_dense(q, k, v, ek, ev):
        b, h = q.shape[0], q.shape[-2]
        kf, vf = (
            torch.cat([k.reshape(b, -1, h, k.shape[-1]), ek], 1),
            torch.cat([v.reshape(b, -1, h, v.shape[-1]), ev], 1),
        )
        out = F.scaled_dot_product_attention(q.reshape(b, -1, h, q.shape[-1]).transpose(1, 2), kf.transpose(1, 2),
                                             vf.transpose(1, 2))  # fmt: skip
        return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])

    return {"flex": flex, "flex_row_major": flex_row_major, "chunked": chunked, "sdpa_dense": sdpa_dense}


def _inputs(args: argparse.Namespace, grad: bool) -> list[torch.Tensor]:
    dt, b, h, d = DTYPES[args.dtype], args.batch, args.heads, args.dim
    shapes = [(b, *args.grid, h, d)] * 3 + [(b, args.extra, h, d)] * 2
    return [torch.randn(s, device="cuda", dtype=dt).requires_grad_(grad) for s in shapes]


def _measure(name: str, fn: Callable, args: argparse.Namespace) -> list[dict]:
    rows = []
    modes = ["forward"] + (["forward_backward"] if args.backward else [])
    for mode in modes:
        row = {"method": name, "mode": mode}
        try:
            ins = _inputs(args, mode == "forward_backward")
            if mode == "forward":

                def step(fn=fn, ins=ins):
                    with torch.no_grad():
                        return fn(*ins)
            else:
                go = torch.randn(*ins[0].shape[:-1], args.dim, device="cuda", dtype=ins[0].dtype)

                def step(fn=fn, ins=ins, go=go):
                    return torch.autograd.grad(fn(*ins), ins, go)

            step()  # compile, build the block mask
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = cuda_ms(step, args.warmup, args.iters, args.repeats)
            row.update(status="ok", ms=ms, peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="oom", error=str(e).splitlines()[0])
        except Exception as e:  # a backend that fails is recorded, the others still run
            row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/neighborhood_3d.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for neighborhood_3d.json")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grid", type=int, nargs=3, default=[21, 30, 52], metavar=("T", "X", "Y"))
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--extra", type=int, default=512, help="additional keys (text tokens)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--methods", nargs="+", default=None, help="subset of flex, flex_row_major, chunked, sdpa_dense")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="forward only")
    add_timing_flags(p, iters=10)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    methods = _methods(args)
    unknown = sorted(set(args.methods or []) - set(methods))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(methods)}")
    rows = []
    for name in args.methods or methods:
        rows += _measure(name, methods[name], args)
    by = {(r["method"], r["mode"]): r.get("ms") for r in rows if r["status"] == "ok"}
    shape = {k: getattr(args, k) for k in ("batch", "grid", "heads", "dim", "kernel", "extra", "dtype")}
    result = {
        "benchmark": STEM,
        "meta": gpu_meta(argv, args.commit),
        "shape": shape,
        "tile": na._flex_tile(tuple(args.grid), (args.kernel,) * 3, (1, 1, 1)),
        "speedup_vs_sdpa_dense": {
            f"{m}/{mode}": by[("sdpa_dense", mode)] / by[(m, mode)]
            for m in ("flex", "flex_row_major", "chunked")
            for mode in ("forward", "forward_backward")
            if by.get((m, mode)) and by.get(("sdpa_dense", mode))
        },
        "rows": rows,
    }
    print(json.dumps(result["speedup_vs_sdpa_dense"]))
    for line in write_result(result, args.out, STEM, plot=False):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
