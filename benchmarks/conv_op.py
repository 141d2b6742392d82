"""The token depthwise convolution (``visionlin.kernels.token_depthwise_conv2d``) at the op level: our Triton kernel
against ATen / cuDNN's depthwise convolution (the ``"torch"`` backend) and against what reading and writing the tensors
costs (``x + residual``: two reads and one write, the traffic the fused op cannot go below), forward and forward +
backward, at the shapes of the models that use it.

Shapes (bf16, with bias and residual): FLatten-DeiT-S (k 5, one kernel shared by the heads), Agent-DeiT-S (k 3), and
NaLaFormer-T stage 1 (CPE, k 3, 64 channels, as MAViT-T's / RAVLT-T's; ConvFFN, 256 channels at MLP ratio 4) and stage
3 (256 channels), FLatten-Swin-T and FLatten-PVT-S stage 1 (k 5), RAVLT-T's / MAViT-T's stage-1 ConvFFN (224 channels,
MLP ratio 3.5).
``triton_taps`` is our op with the per-tap weight-gradient kernel (``TUNING["weight_grad"] = "taps"``; forward +
backward only, its forward is the same). ``--sweep`` also times the forward kernel over tile settings (``TUNING`` in
``visionlin/kernels/triton/conv.py``) for the first shape of each kernel size and records every one, the fastest
first. ``--weight-grad-sweep`` times the weight-gradient kernels alone (one launch into a zeroed buffer, no other
work) over their launch settings (``TUNING``'s ``weight_grad``, ``wg_per_sm``, ``wg_warps``, ``wg_elements``) at
every shape, and the whole backward op (input, kernel and bias gradients) with the kernel that
writes the input gradient in the same walk (``"fused"``) against the others. ``--profile`` records the kernels of one
forward + backward (torch profiler: GPU microseconds per kernel and their sum) of our op and the ``"torch"`` backend at
every shape. ``--strip`` times the strip kernels (forward over ``strip_s`` / ``strip_r`` / ``strip_c``, weight gradient
over ``wg_strip_s`` / ``wg_strip_r`` / ``wg_per_sm`` / ``wg_strip_c``) next to the tile kernels as CUDA-graph replays
(kernel time: eager calls at these shapes time the launcher), and the op's forward + backward with each pair.

Usage (on a GPU machine):
    python benchmarks/conv_op.py --out benchmarks/results/h200 [--sweep] [--commit SHA]

Writes ``conv_op.json`` (rows + meta: command, commit, date, GPU, versions) and ``conv_op.png``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
    tuned,
)
from visionlin.kernels.conv import token_depthwise_conv2d  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "conv_op"
#: name: (batch, H, W, channels, kernel, prefix tokens)
SHAPES = {
    "flatten_deit_s": (256, 14, 14, 384, 5, 1),
    "agent_deit_s": (256, 14, 14, 384, 3, 1),
    "nala_t_stage1_cpe": (128, 56, 56, 64, 3, 0),
    "nala_t_stage1_ffn": (128, 56, 56, 256, 3, 0),
    "nala_t_stage3": (128, 14, 14, 256, 3, 0),
    "flatten_swin_t_stage1": (128, 56, 56, 96, 5, 0),
    "flatten_pvt_s_stage1": (128, 56, 56, 64, 5, 0),
    "ravlt_t_stage1_ffn": (128, 56, 56, 224, 3, 0),  # RAVLT-T / MAViT-T's ConvFFN (MLP ratio 3.5)
}


def _inputs(shape, dtype, grad: bool, device="cuda"):
    b, hh, ww, c, k, p = shape
    x = torch.randn(b, p + hh * ww, c, device=device, dtype=dtype, requires_grad=grad)
    res = torch.randn_like(x, requires_grad=grad)
    w = torch.randn(c, k, k, device=device, dtype=dtype, requires_grad=grad)
    bias = torch.randn(c, device=device, dtype=dtype, requires_grad=grad)
    return x, w, bias, res


def _method(backend: str | None, shape, x, w, bias, res):
    """The call timed: the op with ``backend`` (``"triton_taps"``: Triton with the per-tap weight-gradient kernel), or
    ``x + residual`` (``None``)."""
    _, hh, ww, _, _, p = shape
    if backend is None:
        return lambda: x + res
    if backend == "triton_taps":
        from visionlin.kernels.triton import conv

        def taps():
            with tuned(conv.TUNING, weight_grad="taps"):
                return token_depthwise_conv2d(
                    x, w, bias, feat_size=(hh, ww), num_prefix_tokens=p, residual=res, backend="triton"
                )

        return taps
    return lambda: token_depthwise_conv2d(
        x, w, bias, feat_size=(hh, ww), num_prefix_tokens=p, residual=res, backend=backend
    )


def _step(fn, leaves: list[torch.Tensor] | None):
    """``fn`` (forward), or its forward + backward to ``leaves``."""
    if leaves is None:
        return fn
    go = torch.randn_like(leaves[0])
    return lambda: torch.autograd.grad(fn(), leaves, go)


def _time(row: dict, step, args, graph: bool = False) -> dict:
    """``row`` with the median ms per call of ``step`` (``graph``: replays of ``step`` captured in a CUDA graph, the
    kernels' time without the host's; else back-to-back eager calls, host included) or the error it raised."""
    try:
        if graph:
            row |= {"ms": graph_ms(step, args.warmup, args.iters), "timing": "graph", "status": "ok"}
        else:
            row |= {"ms": cuda_ms(step, args.warmup, args.iters, args.repeats), "status": "ok"}
    except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(row), flush=True)
    return row


def _measure(name: str, shape, args, backend: str | None, modes=("forward", "forward_backward")) -> list[dict]:
    """Forward and forward + backward of one method: ``backend`` of the op, or ``None`` for ``x + residual``."""
    b, hh, ww, c, k, p = shape
    rows = []
    for mode in modes:
        grad = mode == "forward_backward"
        x, w, bias, res = _inputs(shape, DTYPES[args.dtype], grad)
        leaves = None if not grad else ([x, res] if backend is None else [x, w, bias, res])
        step = _step(_method(backend, shape, x, w, bias, res), leaves)
        row = {"shape": name, "method": backend or "add_bound", "mode": mode, "k": k, "channels": c,
               "tokens": hh * ww + p, "batch": b}  # fmt: skip
        with torch.set_grad_enabled(grad):
            row = _time(row, step, args)
        if row["status"] == "ok":  # the bytes the fused forward moves at least (x, residual read; out written)
            row["gb_s_min_traffic"] = 3 * x.numel() * x.element_size() / row["ms"] / 1e6
        rows.append(row)
    return rows


def _sweep(args) -> list[dict]:
    from visionlin.kernels.triton import conv

    rows = []
    seen_k = set()
    for name, shape in SHAPES.items():
        if shape[4] in seen_k or name not in args.shapes.split(","):
            continue
        seen_k.add(shape[4])
        fn = _method("triton", shape, *_inputs(shape, DTYPES[args.dtype], False))
        for bt, bc, warps, stages in itertools.product((16, 32, 64), (64, 128), (4, 8), (None, 1)):
            cfg = dict(conv="tile", block_t=bt, block_c=bc, warps=warps, stages=stages)
            with tuned(conv.TUNING, **cfg), torch.no_grad():
                rows.append(_time({"shape": name, "method": "triton", "mode": "forward", "config": cfg}, fn, args))
    return sorted(rows, key=lambda r: (r["shape"], r.get("ms", float("inf"))))


def _weight_grad_buffers(shape, args):
    """Random ``g``, ``x`` of one shape and the zeroed float32 kernel / bias gradient sums the launchers add into."""
    b, hh, ww, c, k, p = shape
    g, x = (torch.randn(b, p + hh * ww, c, device="cuda", dtype=DTYPES[args.dtype]) for _ in range(2))
    sums = torch.zeros(k * k * c + c, device="cuda", dtype=torch.float32)
    return g, x, sums[: k * k * c].view(1, k * k, c), sums[k * k * c :]


def _weight_grad_sweep(args) -> list[dict]:
    from visionlin.kernels.triton import conv

    rows = []
    for name in args.shapes.split(","):
        _, hh, ww, c, k, p = SHAPES[name]
        g, x, dw, db = _weight_grad_buffers(SHAPES[name], args)
        settings = [("taps", s, w, None) for s in (4, 16, 64) for w in (4, 8)]
        settings += [("tile", s, w, e) for s in (4, 16, 64) for w in (4, 8) for e in (4096, 8192, 16384)]
        settings += [("rows", s, w, e) for s in (4, 16, 64) for w in (4, 8) for e in (8192, 16384)]
        for kernel, per_sm, warps, elements in settings:
            cfg = dict(weight_grad=kernel, wg_per_sm=per_sm, wg_warps=warps, wg_elements=elements)
            step = functools.partial(conv._launch_weight_grad, g, x, dw, db, k, True, hh, ww, p, 0)
            with tuned(conv.TUNING, **cfg):
                row = {"shape": name, "method": "weight_grad", "mode": "kernel", "config": cfg}
                rows.append(_time(row, step, args))
        # the whole backward op (input, kernel and bias gradients): the kernels that write dx themselves ("fused")
        # against the others plus the input-gradient pass
        w = torch.randn(c, k, k, device="cuda", dtype=DTYPES[args.dtype])
        whole = [("tile", None, None, None), ("rows", None, None, None), ("taps", None, None, None)]
        whole += [("fused", s, wp, e) for s in (4, 16) for wp in (4, 8) for e in (4096, 8192)]
        for kernel, per_sm, warps, elements in whole:
            cfg = dict(weight_grad=kernel, wg_per_sm=per_sm, wg_warps=warps, wg_elements=elements)
            step = functools.partial(conv._token_dwconv_bwd_call, g, x, w, True, hh, ww, p)
            with tuned(conv.TUNING, **cfg):
                rows.append(_time({"shape": name, "method": "backward", "mode": "op", "config": cfg}, step, args))
    return sorted(rows, key=lambda r: (r["shape"], r["method"], r.get("ms", float("inf"))))


def _strip_sweep(args) -> list[dict]:
    """The strip kernels (``TUNING["conv"]`` / ``["weight_grad"] = "strip"``) against the shipped ones at every shape,
    alternating in one process: the forward kernel over its strip settings, the weight-gradient kernel over its own,
    and the op's forward + backward with each pair of defaults."""
    from visionlin.kernels.triton import conv

    rows = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        _, hh, ww, c, k, p = shape
        fn = _method("triton", shape, *_inputs(shape, DTYPES[args.dtype], False))
        fwd = [dict(conv="tile")]
        fwd += [
            dict(conv="strip", strip_s=s, strip_r=r, strip_c=bc) for s in (4, 8) for r in (16, 32) for bc in (32, 64)
        ]
        for cfg in fwd:  # graph replays: eager calls timed the launcher (s39: 0.09-0.14 ms even for 13 MB tensors)
            with tuned(conv.TUNING, **cfg), torch.no_grad():
                row = {"shape": name, "method": "conv", "mode": "forward", "config": cfg}
                rows.append(_time(row, fn, args, graph=True))
        g, x, dw, db = _weight_grad_buffers(shape, args)
        wg = [dict(weight_grad="tile"), dict(weight_grad="rows")]
        # 30 of the former 54 settings: 16 programs per SM and 4 x 4 strips were the slowest at FLatten-Swin-T's
        # stage 1 (s43, the run of all 54 cut by its limit there)
        strips = ((4, 8), (4, 16), (8, 4), (8, 8), (8, 16))
        wg += [dict(weight_grad="strip", wg_strip_s=s, wg_strip_r=r, wg_per_sm=ps, wg_strip_c=bc)
               for s, r in strips for ps in (4, 8) for bc in (16, 32, 64)]  # fmt: skip
        for cfg in wg:
            step = functools.partial(conv._launch_weight_grad, g, x, dw, db, k, True, hh, ww, p, 0)
            with tuned(conv.TUNING, **cfg):
                row = {"shape": name, "method": "weight_grad", "mode": "kernel", "config": cfg}
                rows.append(_time(row, step, args, graph=True))
        for cfg in (dict(conv="tile", weight_grad="tile"), dict(conv="strip", weight_grad="strip")) * 2:
            x, w, bias, res = _inputs(shape, DTYPES[args.dtype], True)
            step = _step(_method("triton", shape, x, w, bias, res), [x, w, bias, res])
            with tuned(conv.TUNING, **cfg):
                row = {"shape": name, "method": "op", "mode": "forward_backward", "config": cfg}
                rows.append(_time(row, step, args))
    for name in args.shapes.split(","):
        for method in ("conv", "weight_grad", "op"):
            mine = [r for r in rows if r["shape"] == name and r["method"] == method and "ms" in r]
            base = min((r["ms"] for r in mine if "strip" not in r["config"].values()), default=None)
            best = min((r for r in mine if "strip" in r["config"].values()), key=lambda r: r["ms"], default=None)
            if base and best:
                ratio = base / best["ms"]
                print(f"{name} {method}: shipped {base:.4f} ms, best strip {best['ms']:.4f} ms ({ratio:.2f}x) "
                      f"{best['config']}", flush=True)  # fmt: skip
    return rows


def _old_conv(path: Path):
    """The kernels and launchers of an older ``conv.py`` (its source up to the custom ops, which would register
    again), as a module of ``visionlin.kernels.triton`` (its relative imports resolve against this tree)."""
    import types

    src = path.read_text()
    cut = src.find("@torch.library.custom_op")
    if "def _launch_weight_grad(" not in src or cut < 0:
        raise SystemExit(f"--old-conv {path}: not a visionlin/kernels/triton/conv.py (no _launch_weight_grad)")
    mod = types.ModuleType("visionlin.kernels.triton._conv_old")
    mod.__package__ = "visionlin.kernels.triton"
    exec(compile(src[:cut], str(path.resolve()), "exec"), mod.__dict__)  # noqa: S102 (a file the user names)
    return mod


def _old_new_rows(args) -> list[dict]:
    """The weight-gradient kernel alone at its default launch, the older file's and this tree's, alternating."""
    from visionlin.kernels.triton import conv

    old = _old_conv(args.old_conv)
    rows = []
    for name in args.shapes.split(","):
        _, hh, ww, _, k, p = SHAPES[name]
        g, x, dw, db = _weight_grad_buffers(SHAPES[name], args)
        for _ in range(2):
            for tag, mod in (("old", old), ("new", conv)):
                step = functools.partial(mod._launch_weight_grad, g, x, dw, db, k, True, hh, ww, p, 0)
                rows.append(_time({"shape": name, "method": f"weight_grad_{tag}", "mode": "kernel"}, step, args))
        best = {t: min(r.get("ms", float("inf")) for r in rows[-4:] if r["method"] == f"weight_grad_{t}")
                for t in ("old", "new")}  # fmt: skip
        print(f"{name}: weight gradient kernel old / new {best['old'] / best['new']:.2f}x")
    return rows


def _profile(args) -> list[dict]:
    """The kernels of one forward + backward per shape and backend (after a warm-up call)."""
    rows = []
    for name in args.shapes.split(","):
        for backend in ("triton", "torch"):
            x, w, bias, res = _inputs(SHAPES[name], DTYPES[args.dtype], True)
            step = _step(_method(backend, SHAPES[name], x, w, bias, res), [x, w, bias, res])
            step()
            per_kernel: dict[str, float] = {}
            ms = kernels_ms(step, per_kernel)
            top = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))
            rows.append({"shape": name, "method": backend, "mode": "kernels", "kernel_ms": ms, "kernels_us": top})
            listed = ", ".join(f"{k[:40]} {v:.0f}" for k, v in top.items())
            print(f"{name} {backend}: {ms:.3f} ms of kernels (us): {listed}")
    return rows


def _plot(result: dict, path: Path) -> None:
    forward_backward_bars(result, path, [r for r in result["rows"] if r["status"] == "ok"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/conv_op.py", description=__doc__.split("\n\n")[0])
    add_op_flags(p, "conv_op", SHAPES)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sweep", action="store_true", help="also time the forward kernel over its tile settings")
    p.add_argument("--weight-grad-sweep", action="store_true", help="time the weight-gradient kernels, the backward")
    p.add_argument("--profile", action="store_true", help="also record one forward + backward's kernels")
    p.add_argument("--strip", action="store_true", help="time the strip kernels against the shipped ones")
    p.add_argument("--no-methods", action="store_true", help="skip the per-method rows (triton, torch, add bound)")
    p.add_argument("--old-conv", type=Path, help="an older conv.py: its weight-gradient kernel next to this one's")
    add_timing_flags(p)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    if args.old_conv is not None and not args.old_conv.is_file():
        p.error(f"--old-conv {args.old_conv}: no such file")
    check_op_flags(p, args, SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in [] if args.no_methods else args.shapes.split(","):
        for backend in ("triton", "triton_taps", "torch", None):
            modes = ("forward_backward",) if backend == "triton_taps" else ("forward", "forward_backward")
            rows += _measure(name, SHAPES[name], args, backend, modes)
    by = {(r["shape"], r["method"], r["mode"]): r.get("ms") for r in rows}
    for name in args.shapes.split(","):
        for mode in ("forward", "forward_backward"):
            t, a, bound = (by.get((name, m, mode)) for m in ("triton", "torch", "add_bound"))
            if t and a and bound:
                print(f"{name} {mode}: torch / triton {a / t:.2f}x, triton / add bound {t / bound:.2f}x")
        taps, tile = by.get((name, "triton_taps", "forward_backward")), by.get((name, "triton", "forward_backward"))
        if taps and tile:
            print(f"{name} forward_backward: weight gradient per tap / one-pass tile {taps / tile:.2f}x")
    sweep = _sweep(args) if args.sweep else []
    sweep += _weight_grad_sweep(args) if args.weight_grad_sweep else []
    sweep += _strip_sweep(args) if args.strip else []
    sweep += _old_new_rows(args) if args.old_conv is not None else []
    profile = _profile(args) if args.profile else []
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows, "sweep": sweep, "profile": profile}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
