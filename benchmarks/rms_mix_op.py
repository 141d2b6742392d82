"""ViG's gating locality injection (``visionlin.kernels.rms_gate_mix``) at the op level and in a ViG-S training step:
the Triton kernels against the module chain ViG's mixer ran before the op (timm's ``RmsNorm`` on the attention
output and on the locality branch, the sigmoid mix; bfloat16 autocast) and against the op's float32 reference, forward
and forward + backward, at ViG's per-head shapes of a training batch; then a ViG-S training step with the op's
automatic backend and with ``visionlin.set_backend(model, "triton")``, alternating.

Usage (on a GPU machine):
    python benchmarks/rms_mix_op.py --out benchmarks/results/h200 [--commit SHA] [--shapes vig_s,...] [--no-model]

Writes ``rms_mix_op.json`` (rows + meta: command, commit, date, GPU, versions) and ``rms_mix_op.png``.
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
from benchmarks._timing import add_op_flags, add_timing_flags, check_op_flags, check_timing_flags, cuda_ms  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "rms_mix_op"
#: name: (batch, tokens, heads, head width, silu) of ViG's mixers in a training batch
SHAPES = {
    "vig_s": (128, 196, 6, 64, False),
    "vig_t": (128, 196, 3, 64, True),
    "vig_s_448": (32, 784, 6, 64, False),
}
METHODS = ("chain", "reference", "triton")


def _method(method: str, o, local, gl, g_norm, l_norm, silu: bool):
    from visionlin.kernels import rms_gate_mix

    if method == "chain":  # ViG's mixer before the op (under autocast, as in training)

        def fn():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                lo = l_norm(local)
                out = lo + (g_norm(o) - lo) * torch.sigmoid(gl)
                return torch.nn.functional.silu(out) if silu else out

        return fn

    def fn():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return rms_gate_mix(o, local, gl, g_norm.weight, l_norm.weight, g_norm.eps, l_norm.eps, silu=silu,
                                backend=method)  # fmt: skip

    return fn


def _row(shape: str, method: str, mode: str, args) -> dict:
    from timm.layers import RmsNorm

    b, n, h, c, silu = SHAPES[shape]
    grad = mode == "forward_backward"
    gen = torch.Generator(device="cuda").manual_seed(0)
    o, local, gl = (
        torch.randn(b, n, h, c, device="cuda", generator=gen, dtype=torch.bfloat16).requires_grad_(grad)
        for _ in range(3)
    )
    g_norm, l_norm = RmsNorm(c, eps=4e-6).cuda(), RmsNorm(c, eps=1e-6).cuda()
    fn = _method(method, o, local, gl, g_norm, l_norm, silu)
    leaves = (o, local, gl, g_norm.weight, l_norm.weight)
    if grad:
        go = torch.randn(b, n, h, c, device="cuda", dtype=torch.bfloat16)
        step = lambda: torch.autograd.grad(fn(), leaves, go)  # noqa: E731
    else:
        step = fn
    row = {"shape": shape, "rows": b * n * h, "channels": c, "silu": silu, "method": method, "mode": mode}
    try:
        with torch.set_grad_enabled(grad):
            row |= {"ms": cuda_ms(step, args.warmup, args.iters, args.repeats), "status": "ok"}
        # the least bf16 traffic: three inputs read, the output written; backward: dout read too, three grads written
        row["gb_s_min_traffic"] = b * n * h * c * 2 * (4 + (4 if grad else 0)) / row["ms"] / 1e6
    except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(row), flush=True)
    return row


def _model_rows(args) -> list[dict]:
    """A ViG-S training step (224 px, bs 128, bf16 autocast, AdamW) with the mix on its automatic backend and on
    Triton, alternating."""
    import timm

    import visionlin
    from visionlin.train.bench import train_step

    model = timm.create_model("vig_small").cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = train_step(model, opt, torch.randint(0, 1000, (128,), device="cuda"))
    x = torch.randn(128, 3, 224, 224, device="cuda")
    times: dict[str, list[float]] = {"auto": [], "triton": []}
    for r in range(args.repeats):
        for name in ("auto", "triton") if r % 2 == 0 else ("triton", "auto"):
            visionlin.set_backend(model, None if name == "auto" else "triton")
            times[name].append(cuda_ms(lambda: step(x), args.warmup, args.iters, 1))
    rows = []
    for name, t in times.items():
        rows.append({"shape": "vig_small 224px bs128", "method": name, "mode": "train_step",
                     "ms": sorted(t)[len(t) // 2], "status": "ok"})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _plot(result: dict, path: Path) -> None:
    rows = [r for r in result["rows"] if r["status"] == "ok" and r["mode"] != "train_step"]
    forward_backward_bars(result, path, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/rms_mix_op.py", description=__doc__.split("\n\n")[0])
    add_op_flags(p, "rms_mix_op", SHAPES)
    p.add_argument("--no-model", action="store_true", help="skip the ViG-S training step")
    add_timing_flags(p)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    shapes = check_op_flags(p, args, SHAPES)
    rows = [_row(s, m, mode, args) for s in shapes for mode in ("forward", "forward_backward") for m in METHODS]
    by = {(r["shape"], r["method"], r["mode"]): r.get("ms") for r in rows}
    for s in shapes:
        for mode in ("forward", "forward_backward"):
            t, c = by.get((s, "triton", mode)), by.get((s, "chain", mode))
            if t and c:
                print(f"{s} {mode}: chain {c:.3f} ms, triton {t:.3f} ms: {c / t:.2f}x")
    if not args.no_model:
        rows += _model_rows(args)
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
