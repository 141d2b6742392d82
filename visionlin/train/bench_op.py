"""Op-level speed of non-causal linear attention on a GPU: the Triton kernels vs the native ``torch`` backend vs
flash SDPA (dense softmax, for scale), forward and forward + backward, with achieved bandwidth against the copy
bandwidth measured in the same run (the ``visionlin bench op`` command).

Bytes counted are the fewest the op must move: forward reads q, k, v and writes out; backward reads q, k, v, out and
the output gradient and writes dq, dk, dv. Times are medians of ``triton.testing.do_bench``; the forward is also
timed replayed from a CUDA graph (GPU time alone), and so is the Triton backward op (``triton_bwd_graph_ms``). Triton
is imported when the benchmark runs, not on import.

Usage (on a GPU machine):
    visionlin bench op --out benchmarks/results/h200 [--sweep]
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CASES", "add_arguments", "copy_bandwidth", "execute", "kernel_rows", "plot", "profile_triton", "run_case"]

CASES = [  # (label, B, N, H, D, feature_map, normalize)
    ("deit-s stage, relu/divide", 64, 3136, 3, 32, "relu", "divide"),
    ("deit-s stage, identity/subtract", 64, 3136, 3, 32, "identity", "subtract"),
    ("65k tokens, relu/divide", 2, 65536, 3, 32, "relu", "divide"),
    ("65k tokens, D=64", 2, 65536, 6, 64, "relu", "divide"),
    ("224px small (197), D=64", 256, 197, 6, 64, "relu", "divide"),
    ("D=128", 8, 16384, 4, 128, "elu", "divide"),
]


def _bench(fn, ms=200) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=ms, return_mode="median")


def _bench_graph(fn, ms=200) -> float:
    """GPU time alone: the call replayed from a CUDA graph (no Python or launch overhead)."""
    import triton

    with torch.cuda.stream(torch.cuda.Stream()):
        return triton.testing.do_bench_cudagraph(fn, rep=ms, return_mode="median")


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    t = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * x.element_size() / (t * 1e-3) / 1e9


def run_case(label, b, n, h, d, fmap, norm, dtype=torch.bfloat16, only: tuple[str, ...] | None = None) -> dict:
    """Time one case with every implementation (or those named in ``only``):
    ``{<impl>_{fwd,bwd,fwd_graph}_ms, <impl>_{fwd,bwd}_GBs, ...}`` and, for Triton, ``triton_bwd_graph_ms``."""
    from visionlin.kernels.linear import linear_attention_native
    from visionlin.kernels.triton.linear import linear_attention_triton

    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, n, h, d, device="cuda", dtype=dtype)
    es = q.element_size()
    fwd_bytes = 4 * b * n * h * d * es
    bwd_bytes = 8 * b * n * h * d * es
    row = {"case": label, "B": b, "N": n, "H": h, "D": d, "feature_map": fmap, "normalize": norm, "dtype": str(dtype)}
    impls = {
        "triton": lambda: linear_attention_triton(q, k, v, feature_map=fmap, normalize=norm),
        "torch": lambda: linear_attention_native(q, k, v, feature_map=fmap, normalize=norm),
    }
    if n <= 16384:
        impls["sdpa_flash"] = lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)
    for name, fn in impls.items():
        if only is not None and name not in only:
            continue
        with torch.no_grad():
            t_fwd = _bench(fn)
            try:
                row[f"{name}_fwd_graph_ms"] = _bench_graph(fn)
            except Exception as e:  # a backend that cannot be captured
                row[f"{name}_fwd_graph_ms"] = None
                print(f"{name}: no CUDA-graph timing ({type(e).__name__}: {e})")
        out = fn()

        def step(out=out):
            q.grad = k.grad = v.grad = None
            out.backward(g, retain_graph=True)

        t_bwd = _bench(step)
        if name == "triton":
            try:
                row["triton_bwd_graph_ms"] = _triton_bwd_graph_ms(q, k, v, g, fmap, norm)
            except Exception as e:  # a capture failure: the eager timings stand
                row["triton_bwd_graph_ms"] = None
                print(f"triton: no CUDA-graph timing of the backward ({type(e).__name__}: {e})")
        row[f"{name}_fwd_ms"] = t_fwd
        row[f"{name}_bwd_ms"] = t_bwd
        row[f"{name}_fwd_GBs"] = fwd_bytes / (t_fwd * 1e-3) / 1e9
        row[f"{name}_bwd_GBs"] = bwd_bytes / (t_bwd * 1e-3) / 1e9
        del out
    return row


def triton_op_args(fmap: str, norm: str, d: int) -> tuple:
    """The trailing arguments of the Triton custom ops ``linear_attention_fwd`` / ``_bwd`` for a feature map and
    normalisation by name, at head dim ``d`` (the default scale, eps 1e-6: what ``linear_attention_triton`` passes)."""
    from visionlin.kernels.triton import linear as tri

    return tri.FEATURE_MAP_IDS[fmap], tri.NORMALIZATION_IDS[norm], tri._default_scale(norm, d), 1e-6


def _triton_bwd_graph_ms(q, k, v, g, fmap: str, norm: str) -> float:
    """GPU time of the Triton backward alone: its custom op (kernels and buffers) replayed from a CUDA graph."""
    from visionlin.kernels.triton import linear as tri

    args = triton_op_args(fmap, norm, q.shape[-1])
    with torch.no_grad():
        out, state = tri.linear_attention_fwd(q, k, v, *args)
        return _bench_graph(lambda: tri.linear_attention_bwd(q, k, v, out, state, g, *args))


def kernel_rows(events, steps: int) -> list[dict]:
    """``torch.profiler`` averages (``key``, ``count``, self device time in us) as rows ``{kernel, ms_per_step,
    calls_per_step}``, the largest first; events without device time (host ops) are left out."""
    rows = []
    for e in events:
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:120], "ms_per_step": us / 1e3 / steps, "calls_per_step": e.count / steps})
    return sorted(rows, key=lambda r: -r["ms_per_step"])


def profile_triton(b, n, h, d, fmap, norm, dtype=torch.bfloat16, steps: int = 5) -> list[dict]:
    """GPU time per forward + backward step of each kernel of the Triton op (``torch.profiler``): how the forward
    splits between its state and read-out kernels, and what the backward's kernels cost."""
    from torch.profiler import ProfilerActivity, profile

    from visionlin.kernels.triton.linear import linear_attention_triton

    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(b, n, h, d, device="cuda", dtype=dtype)

    def step():
        torch.autograd.grad(linear_attention_triton(q, k, v, feature_map=fmap, normalize=norm), (q, k, v), g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return kernel_rows(prof.key_averages(), steps)


def _fwd_bytes(row: dict) -> int:
    es = 2 if "bfloat16" in row["dtype"] or "float16" in row["dtype"] else 4
    return 4 * row["B"] * row["N"] * row["H"] * row["D"] * es


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The op benchmark's flags."""
    from .bench import _stem

    parser.add_argument("--device", default="cuda", help="cuda or cuda:N (default: cuda)")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="folder for the JSON and PNG (default: benchmarks/results/<gpu>)"
    )
    parser.add_argument(
        "--name", type=_stem, default="op_linear", help="file stem of the JSON and PNG (default: op_linear)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep launch settings one at a time: the forward's rows and warps, the backward's rows, warps "
        "and register cap (first and third case)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile each case's Triton forward + backward per kernel (torch.profiler): row key triton_kernels",
    )
    parser.add_argument("--commit", default=None, help="commit to record (default: the checkout's HEAD)")
    return parser


def execute(args: argparse.Namespace, command: str) -> int:
    """Run every case (and the tuning sweep with ``--sweep``) on ``args.device``; write the JSON and PNG."""
    from visionlin.kernels.triton import linear as tri

    from .bench import run_meta, write_result

    torch.cuda.set_device(args.device)
    bw = copy_bandwidth()
    rows = []
    for case in CASES:
        row = run_case(*case)
        graph_ms = row["triton_fwd_graph_ms"]
        row["triton_fwd_frac_copy_bw"] = row["triton_fwd_GBs"] / bw
        row["triton_fwd_graph_frac_copy_bw"] = _fwd_bytes(row) / (graph_ms * 1e-3) / 1e9 / bw if graph_ms else None
        row["triton_bwd_over_fwd"] = row["triton_bwd_ms"] / row["triton_fwd_ms"]
        bwd_graph = row["triton_bwd_graph_ms"]
        row["triton_bwd_over_fwd_graph"] = bwd_graph / graph_ms if bwd_graph and graph_ms else None
        row["triton_speedup_fwd_vs_torch"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
        row["triton_speedup_bwd_vs_torch"] = row["torch_bwd_ms"] / row["triton_bwd_ms"]
        if getattr(args, "profile", False):
            _, b, n, h, d, fmap, norm = case
            row["triton_kernels"] = profile_triton(b, n, h, d, fmap, norm)
            for kr in row["triton_kernels"][:6]:
                print(f"  profile: {kr['ms_per_step']:.4f} ms x{kr['calls_per_step']:.0f} {kr['kernel']}")
        rows.append(row)
        print(
            f"{row['case']:34s} fwd {row['triton_fwd_ms']:.3f} ms (graph {graph_ms or float('nan'):.3f}, "
            f"sdpa {row.get('sdpa_flash_fwd_ms', float('nan')):.3f}; {row['triton_fwd_frac_copy_bw']:.2f} of copy bw, "
            f"{row['triton_speedup_fwd_vs_torch']:.1f}x torch) | bwd {row['triton_bwd_ms']:.3f} ms "
            f"(graph {bwd_graph or float('nan'):.3f}; {row['triton_bwd_over_fwd']:.2f}x fwd, "
            f"{row['triton_speedup_bwd_vs_torch']:.1f}x torch)",
            flush=True,
        )
    sweep = []
    if args.sweep:
        saved = dict(tri.TUNING)
        try:
            forward = [dict(rows=r, warps=w) for r, w in [(32, 4), (64, 4), (64, 8), (128, 4), (128, 8), (256, 8)]]
            # the backward's rows, warps and register cap with the forward at its defaults
            backward = [
                dict(rows_backward=r, warps_backward=w, maxnreg_backward=c)
                for r, w, c in itertools.product((32, 64, 128), (4, 8), (None, 128))
            ]
            for config in forward + backward:
                tri.TUNING.clear()
                tri.TUNING.update(saved | config)
                for case in (CASES[0], CASES[2]):  # 192 and 6 (batch, head) pairs
                    try:
                        r = run_case(*case, only=("triton",))
                    except Exception as e:  # noqa: BLE001 (recorded; the other settings still run)
                        sweep.append({"case": case[0], **config, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    sweep.append({"case": case[0], **config, **{k: r[k] for k in r if k.startswith("triton")}})
                    print(f"sweep {case[0]} {config}: fwd {r['triton_fwd_ms']:.3f} bwd {r['triton_bwd_ms']:.3f}")
        finally:
            tri.TUNING.clear()
            tri.TUNING.update(saved)
    meta = run_meta(command, args.device, args.commit, copy_bandwidth_GBs=bw)
    config = {"sweep": args.sweep, "profile": bool(getattr(args, "profile", False))}
    result = {"benchmark": "op", "meta": meta, "config": config, "rows": rows, "sweep": sweep}
    print("\n".join(write_result(result, args.out, args.name)))
    return 0


def plot(result: dict, path: Path) -> None:
    """Achieved GB/s per case and implementation, forward and backward, against the copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[dict[str, Any]] = result["rows"]
    meta = result["meta"]
    bw = meta["copy_bandwidth_GBs"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    labels = [r["case"] for r in rows]
    for ax, kind in zip(axes, ("fwd", "bwd"), strict=True):
        xs = range(len(rows))
        for i, impl in enumerate(("triton", "torch", "sdpa_flash")):
            vals = [r.get(f"{impl}_{kind}_GBs") or 0.0 for r in rows]
            ax.bar([x + 0.27 * (i - 1) for x in xs], vals, width=0.27, label=impl)
        ax.axhline(bw, color="k", ls="--", lw=1, label=f"copy {bw:.0f} GB/s")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("GB/s (minimal bytes / time)")
        ax.set_title(f"linear attention {kind}, bf16, {meta['gpu']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"commit {meta['commit'][:10]} | torch {meta['torch']} | triton {meta['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
