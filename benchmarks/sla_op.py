"""Op-level speed of the converter's sparse attention ops against dense SDPA (cuDNN / flash), forward and
forward + backward, at Wan2.1-1.3B's attention shape (N = 32,760 tokens = 480p x 81 frames, 12 heads, head dim 128).

Methods (each at every sparsity, ``topk = 1 - sparsity`` of the key blocks critical):

* ``sdpa-cudnn``, ``sdpa-flash``, ``sdpa``: dense ``F.scaled_dot_product_attention`` on ``[B, H, N, D]`` contiguous
  tensors (its preferred layout: the best case for dense), with the backend forced, and PyTorch's own choice;
* ``sparse``: :func:`visionlin.kernels.block_sparse_attention` (Triton backend);
* ``sla-paper``: :func:`visionlin.kernels.sparse_linear_attention`, ``variant="paper"``, ``k_low`` negligible blocks
  (default 0.10, the paper's; capped at ``1 - topk``);
* ``sla-code``: the same op, ``variant="code"`` (linear attention over all keys, the released code's main branch);
* ``<method>:fused-readout`` rows (forward + backward) run the SLA methods with the linear read-out's backward fused
  into one kernel (``TUNING["fused_readout_bwd"]``), the rows without it the torch read-out backward;
* ``<method>:select`` rows time the block selection alone (pooling, scores, sort, LUT) as part of the profile.

The sparse ops take ``[B, N, H, D]`` (heads-last, the converter's layout). Each time is the median over ``--iters``
CUDA-event-timed calls after ``--warmup`` calls, each call timed alone (the host's launch time counts where the GPU
waits for it); a speedup is the best dense SDPA time of that mode over the method's. Forward rows also carry
``graph_ms``: one call captured in a CUDA graph and replayed, the kernels' time alone (what the op costs inside a model
whose host runs ahead of the GPU), with ``graph_speedup_vs_best_sdpa`` against the dense rows' graph times.

Usage (on a GPU machine)::

    python benchmarks/sla_op.py [--out benchmarks/results/h200] [--commit SHA] [--iters 10]

Writes ``sla_op.json`` (rows + command, commit, date, GPU and versions, via ``visionlin.train.bench``) and
``sla_op.png`` to ``--out`` (default ``benchmarks/results/<gpu>/``); the JSON is rewritten after every row, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish  # noqa: E402
from benchmarks._timing import cuda_ms, graph_ms  # noqa: E402
from visionlin.train.bench import device_slug, write_result  # noqa: E402

DENSE = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION", "sdpa": None}
SPARSE = ("sparse", "sla-paper", "sla-code")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _dense(method: str, q, k, v, grad, mode: str) -> Callable[[], object]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = DENSE[method]

    def call():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            if backend is None:
                out = F.scaled_dot_product_attention(q, k, v)
            else:
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    out = F.scaled_dot_product_attention(q, k, v)
        if mode == "fwd+bwd":
            out.backward(grad)
        return out

    return call


def _sparse(method: str, q, k, v, w, b, grad, mode: str, topk: float, k_low: float, bq: int, bk: int):
    from visionlin.kernels import block_sparse_attention, sparse_linear_attention

    def call():
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            if method == "sparse":
                out = block_sparse_attention(q, k, v, topk=topk, block_q=bq, block_k=bk, backend="triton")
            else:
                variant = method.split("-")[1]
                out = sparse_linear_attention(
                    q, k, v, w, b, topk=topk, k_low=k_low if variant == "paper" else 0.0, block_q=bq, block_k=bk,
                    variant=variant, backend="triton",
                )  # fmt: skip
        if mode == "fwd+bwd":
            out.backward(grad)
        return out

    return call


def _readout(fn: Callable[[], object], fused: bool) -> Callable[[], object]:
    """``fn`` with the linear read-out's backward fused into one kernel or not (``TUNING["fused_readout_bwd"]``, on by
    default: the plain rows set it off)."""
    from visionlin.kernels.triton import sparse_linear as sl

    def call():
        saved = sl.TUNING["fused_readout_bwd"]
        sl.TUNING["fused_readout_bwd"] = fused
        try:
            return fn()
        finally:
            sl.TUNING["fused_readout_bwd"] = saved

    return call


def _select(q, k, topk: float, k_low: float, bq: int, bk: int, marginal: bool) -> Callable[[], object]:
    from visionlin.kernels.triton.sparse_linear import select_blocks

    return lambda: select_blocks(q, k, topk, k_low, bq, bk, marginal)


def _row(method: str, sparsity: float | None, mode: str, fn: Callable[[], object], args) -> dict:
    row = {"method": method, "sparsity": sparsity, "mode": mode}
    try:
        row.update(status="ok", ms=cuda_ms(fn, args.warmup, 1, args.iters))
        if mode == "fwd":  # (the forward calls run without autograd)
            row["graph_ms"] = graph_ms(fn, args.warmup, args.iters)
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 (one failed method must not lose the others' rows)
        row.update(status="error", error=f"{type(e).__name__}: {str(e)[:300]}")
    torch.cuda.empty_cache()
    print(row, flush=True)
    return row


def _speedups(rows: list[dict]) -> None:
    for mode in MODES:
        dense = [r["ms"] for r in rows if r["mode"] == mode and r["method"] in DENSE and r["status"] == "ok"]
        for r in rows:
            if r["mode"] == mode and r["status"] == "ok" and dense:
                r["speedup_vs_best_sdpa"] = min(dense) / r["ms"]
        graphs = [r["graph_ms"] for r in rows if r["mode"] == mode and r["method"] in DENSE and "graph_ms" in r]
        for r in rows:
            if r["mode"] == mode and "graph_ms" in r and graphs:
                r["graph_speedup_vs_best_sdpa"] = min(graphs) / r["graph_ms"]


def run(args: argparse.Namespace, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Measure every row; ``save(result)`` after each one (a run cut short by a time limit keeps its rows)."""
    dev = torch.device("cuda")
    dt = DTYPES[args.dtype]
    b, n, h, d = args.batch, args.n, args.heads, args.head_dim
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=dt, generator=g) for _ in range(3))
    grad = torch.randn(b, n, h, d, device=dev, dtype=dt, generator=g)
    # The projection as a converted layer holds it (float32); non-zero so the linear branch is not optimised away.
    w = (0.02 * torch.randn(d, d, device=dev, generator=g)).requires_grad_()
    bias = torch.zeros(d, device=dev, requires_grad=True)
    shape = {"batch": b, "tokens": n, "heads": h, "head_dim": d, "dtype": args.dtype}
    settings = {"block_q": args.block_q, "block_k": args.block_k, "k_low": args.k_low, "iters": args.iters,
                "warmup": args.warmup, "layout": "sparse ops [B, N, H, D]; SDPA [B, H, N, D] contiguous"}  # fmt: skip
    rows: list[dict] = []
    result = {"benchmark": "sla_op", "meta": gpu_meta(args.argv, args.commit), "shape": shape, "settings": settings,
              "rows": rows}  # fmt: skip

    def add(row: dict) -> None:
        rows.append(row)
        _speedups(rows)
        save(result)

    for mode in MODES:
        need = mode == "fwd+bwd"
        hq, hk, hv = (t.transpose(1, 2).contiguous().requires_grad_(need) for t in (q, k, v))
        hg = grad.transpose(1, 2).contiguous()
        for method in DENSE:
            add(_row(method, None, mode, _dense(method, hq, hk, hv, hg, mode), args))
        del hq, hk, hv, hg
        sq, sk, sv = (t.detach().requires_grad_(need) for t in (q, k, v))
        for sparsity in args.sparsity:
            topk = round(1.0 - sparsity, 6)
            k_low = min(args.k_low, 1.0 - topk)
            for method in SPARSE:
                fn = _sparse(method, sq, sk, sv, w, bias, grad, mode, topk, k_low, args.block_q, args.block_k)
                both = mode == "fwd+bwd" and method != "sparse"
                add(_row(method, sparsity, mode, _readout(fn, fused=False) if both else fn, args))
                if both:
                    add(_row(f"{method}:fused-readout", sparsity, mode, _readout(fn, fused=True), args))
                if mode == "fwd" and method != "sparse":
                    sel = _select(sq, sk, topk, k_low if method == "sla-paper" else 0.0, args.block_q, args.block_k,
                                  method == "sla-paper")  # fmt: skip
                    add(_row(f"{method}:select", sparsity, mode, sel, args))
    return result


def plot(result: dict, path: Path) -> None:
    """Bars of milliseconds per method and sparsity, one panel per mode, speedups over the best SDPA on top (``g``:
    the CUDA-graph replay's, kernels alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok" and ":" not in r["method"]]
    fig, axes = plt.subplots(1, len(MODES), figsize=(13, 4.8), squeeze=False)
    for ax, mode in zip(axes[0], MODES, strict=True):
        sub = [r for r in rows if r["mode"] == mode]
        labels = [r["method"] if r["sparsity"] is None else f"{r['method']}\n{r['sparsity']:.0%}" for r in sub]
        colors = ["tab:gray" if r["sparsity"] is None else f"C{SPARSE.index(r['method'])}" for r in sub]
        bars = ax.bar(range(len(sub)), [r["ms"] for r in sub], color=colors)
        for bar, r in zip(bars, sub, strict=True):
            if "speedup_vs_best_sdpa" in r:
                text = f"{r['speedup_vs_best_sdpa']:.1f}x"
                if "graph_speedup_vs_best_sdpa" in r:  # kernels alone (CUDA graph)
                    text += f"\ng {r['graph_speedup_vs_best_sdpa']:.1f}x"
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=6)  # fmt: skip
        ax.set_xticks(range(len(sub)), labels, rotation=60, fontsize=7)
        ax.set_ylabel("ms per call")
        s = result["shape"]
        ax.set_title(f"{mode}: B{s['batch']} N{s['tokens']} H{s['heads']} D{s['head_dim']} {s['dtype']}", fontsize=9)
    finish(fig, result, path)


def _floats(text: str) -> list[float]:
    vals = [float(x) for x in text.split(",") if x.strip()]
    if not vals or any(not 0.0 <= x < 1.0 for x in vals):
        raise argparse.ArgumentTypeError(f"sparsities must be comma-separated numbers in [0, 1), got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/sla_op.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32760, help="tokens (default: Wan2.1 480p x 81 frames)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sparsity", type=_floats, default=[0.8, 0.9, 0.95], help="comma-separated (default 0.8,0.9,0.95)")
    p.add_argument("--k-low", type=float, default=0.10, help="sla-paper's negligible fraction (default 0.10)")
    p.add_argument("--block-q", type=int, choices=(64, 128), default=128)
    p.add_argument("--block-k", type=int, choices=(64, 128), default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default=None, help="commit to record (default: the checkout's HEAD)")
    p.add_argument("--out", type=Path, default=None, help="folder (default benchmarks/results/<gpu>)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug(torch.cuda.get_device_name())
    out.mkdir(parents=True, exist_ok=True)
    result = run(args, save=lambda res: write_result(res, out, "sla_op", partial=True))
    for note in write_result(result, out, "sla_op", plot=False if args.no_plot else plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
