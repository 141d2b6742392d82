"""The pre-norm LayerNorm (``visionlin.kernels.layer_norm`` with ``out_dtype=bfloat16``) at the op level: the Triton
kernels against what a block does without them (``F.layer_norm`` in float32, as autocast runs ``nn.LayerNorm``, then
the ``Linear``'s cast to bfloat16), forward and forward + backward, at the shapes of the models' blocks in a training
batch (float32 residual stream). The backward launch settings (``TUNING`` in
``visionlin/kernels/triton/gated_norm.py``) are swept for every shape, and the host time of one call is measured at a
tiny shape (the GPU idle: what a host-bound training step pays per LayerNorm).

Usage (on a GPU machine):
    python benchmarks/layer_norm_op.py --out benchmarks/results/h200 [--commit SHA]

Writes ``layer_norm_op.json`` (rows + meta: command, commit, date, GPU, versions) and ``layer_norm_op.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import forward_backward_bars  # noqa: E402
from benchmarks._timing import (  # noqa: E402
    add_op_flags,
    add_timing_flags,
    check_op_flags,
    check_timing_flags,
    cuda_ms,
    host_us,
    tuned,
)
from visionlin.kernels import layer_norm  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "layer_norm_op"
#: name: (rows, channels) of a training batch of 128 at 224 px
SHAPES = {
    "infvit_s": (128 * 197, 384),
    "nat_t_stage1": (128 * 56 * 56, 64),
    "nat_t_stage3": (128 * 14 * 14, 256),
    "pvt_s_stage2": (128 * 28 * 28, 128),
    "pvt_s_stage3": (128 * 14 * 14, 320),
    "swin_t_stage4": (128 * 7 * 7, 768),
}
#: (programs per SM, elements per thread, num_stages) swept for the backward; the first is the shipped default
SWEEP = list(itertools.product((4, 16, 64), (8, 16), (None, 1)))


def _method(method: str, x, w, b):
    if method == "torch":  # nn.LayerNorm under autocast (float32), then the Linear's cast
        return lambda: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5).to(torch.bfloat16)
    return lambda: layer_norm(x, w, b, 1e-5, out_dtype=torch.bfloat16, backend=method)


def _inputs(m: int, c: int, grad: bool):
    x = torch.randn(m, c, device="cuda", requires_grad=grad)
    w = (1 + 0.1 * torch.randn(c, device="cuda")).requires_grad_(grad)
    b = (0.1 * torch.randn(c, device="cuda")).requires_grad_(grad)
    return x, w, b


def _row(shape: str, method: str, mode: str, m: int, c: int, args, config=None) -> dict:
    grad = mode == "forward_backward"
    x, w, b = _inputs(m, c, grad)
    fn = _method(method, x, w, b)
    if grad:
        go = torch.randn(m, c, device="cuda", dtype=torch.bfloat16)
        step = lambda: torch.autograd.grad(fn(), (x, w, b), go)  # noqa: E731
    else:
        step = fn
    row = {"shape": shape, "rows": m, "channels": c, "method": method, "mode": mode}
    if config is not None:
        row["config"] = config
    try:
        with torch.set_grad_enabled(grad):
            row |= {"ms": cuda_ms(step, args.warmup, args.iters, args.repeats), "status": "ok"}
        # the least traffic: x (float32) read and the bfloat16 output written; backward: x and dout read, dx written
        nbytes = m * c * (4 + 2 + (4 + 2 + 4 if grad else 0))
        row["gb_s_min_traffic"] = nbytes / row["ms"] / 1e6
    except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(row), flush=True)
    return row


def _host_us(method: str, grad: bool, calls: int = 200) -> float:
    """Microseconds of host time per call at a tiny shape (the GPU runs ahead of nothing: the host is the bound)."""
    x, w, b = _inputs(8, 384, grad)
    fn = _method(method, x, w, b)
    go = torch.randn(8, 384, device="cuda", dtype=torch.bfloat16)
    step = (lambda: torch.autograd.grad(fn(), (x, w, b), go)) if grad else fn
    with torch.set_grad_enabled(grad):
        return host_us(step, calls, warmup=20)


def _plot(result: dict, path: Path) -> None:
    forward_backward_bars(result, path, [r for r in result["rows"] if r["status"] == "ok" and "config" not in r])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/layer_norm_op.py", description=__doc__.split("\n\n")[0])
    add_op_flags(p, "layer_norm_op", SHAPES)
    p.add_argument("--no-sweep", action="store_true", help="skip the backward launch-settings sweep")
    add_timing_flags(p)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    check_op_flags(p, args, SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)
    from visionlin.kernels.triton import gated_norm

    rows, sweep = [], []
    for name in args.shapes.split(","):
        m, c = SHAPES[name]
        for method in ("torch", "triton"):
            for mode in ("forward", "forward_backward"):
                rows.append(_row(name, method, mode, m, c, args))
        if args.no_sweep:
            continue
        for per_sm, per_thread, stages in SWEEP:
            cfg = {"programs_per_sm": per_sm, "per_thread": per_thread, "stages": stages}
            with tuned(gated_norm.TUNING, backward_programs_per_sm=per_sm, backward_per_thread=per_thread,
                       backward_stages=stages):  # fmt: skip
                sweep.append(_row(name, "triton", "forward_backward", m, c, args, config=cfg))
    host = {f"{meth}_{mode}": _host_us(meth, mode == "forward_backward")
            for meth in ("torch", "triton") for mode in ("forward", "forward_backward")}  # fmt: skip
    by = {(r["shape"], r["method"], r["mode"]): r.get("ms") for r in rows}
    for name in args.shapes.split(","):
        for mode in ("forward", "forward_backward"):
            t, a = by.get((name, "triton", mode)), by.get((name, "torch", mode))
            if t and a:
                print(f"{name} {mode}: torch {a:.3f} ms, triton {t:.3f} ms: {a / t:.2f}x")
        ok = [r for r in sweep if r["shape"] == name and r["status"] == "ok"]
        best = min(ok, key=lambda r: r["ms"], default=None)
        if best:
            print(f"{name} backward sweep best {best['ms']:.3f} ms at {best['config']}")
    print("host us per call:", json.dumps({k: round(v, 1) for k, v in host.items()}))
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows + sweep, "host_us": host}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
