"""Where the time of one sparse-linear (SLA) / block-sparse forward goes, at Wan2.1-1.3B's attention shape (N = 32,760
tokens, 12 heads, head dim 128, bf16, no gradient), next to dense cuDNN SDPA in the same run.

Rows (milliseconds, median of ``--iters`` CUDA-event-timed calls):

* ``total:<method>``: the whole op (``sparse``, ``sla-code``, ``sla-paper``) and ``dense:cudnn``;
* ``part:<name>``: its pieces as the Triton backend runs them: the block pooling (``pool``), the pooled scores
  (``scores``, pooling included), the ranking kernel alone (``select-kernel``), the whole selection (``select``,
  ``select-marginal``), the linear states (``states-code``: one state, ``states-paper``: per query block), and the
  fused forward kernel without and with the read-out (``fwd-sparse``, ``fwd-code``, ``fwd-paper``);
* with ``--tiles``, ``tiles:<kernel> ...``: the forward kernel and the state kernel under other tile sizes, warps,
  stages and read-out precisions (what the shipped settings in ``triton/sparse_linear.py`` were chosen from).

Also a CUDA-kernel profile table of the ``sla-code`` forward (``profile``).

Usage (on a GPU machine)::

    python benchmarks/sla_parts.py [--sparsity 0.95] [--tiles] [--out benchmarks/results/h200] [--commit SHA]

Writes ``sla_parts.json`` (rows + command, commit, date, GPU and versions) and ``sla_parts.png``.
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
from benchmarks._timing import cuda_ms  # noqa: E402
from visionlin.train.bench import device_slug, write_result  # noqa: E402

#: Forward-kernel settings tried by ``--tiles``: (query tile, key tile, warps, stages).
FWD_TILES = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 4, 2),
             (128, 32, 4, 3), (64, 32, 4, 3)]  # fmt: skip
#: State-kernel settings tried by ``--tiles``: (products, key tile, warps, stages).
STATE_TILES = [("bf16x2", 128, 8, 3), ("bf16x2", 64, 8, 2), ("tf32", 64, 8, 2), ("bf16x2", 64, 4, 2),
               ("bf16x2", 128, 8, 2), ("bf16x2", 32, 4, 2)]  # fmt: skip


def run(args: argparse.Namespace) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from visionlin.kernels import block_sparse_attention, sparse_linear_attention
    from visionlin.kernels import sparse_linear as spl
    from visionlin.kernels.triton import sparse_linear as sl

    dev = torch.device("cuda")
    b, n, h, d = args.batch, args.n, args.heads, args.head_dim
    bq, bk, topk = args.block_q, args.block_k, round(1.0 - args.sparsity, 6)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    w = 0.02 * torch.randn(d, d, device=dev, generator=g)
    bias = torch.zeros(d, device=dev)
    scale = d**-0.5
    rows: list[dict] = []

    def add(name: str, fn: Callable[[], object]) -> None:
        try:
            row = {"name": name, "status": "ok", "ms": cuda_ms(fn, args.warmup, 1, args.iters)}
        except Exception as e:  # noqa: BLE001 (one failed row must not lose the others)
            row = {"name": name, "status": "error", "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(row, flush=True)

    def sla(variant: str, k_low: float) -> Callable[[], object]:
        return lambda: sparse_linear_attention(
            q, k, v, w, bias, topk=topk, k_low=k_low, block_q=bq, block_k=bk, variant=variant, backend="triton"
        )

    with torch.no_grad():
        dense = [t.transpose(1, 2).contiguous() for t in (q, k, v)]  # SDPA's preferred layout
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            add("dense:cudnn", lambda: F.scaled_dot_product_attention(*dense))
        dense.clear()  # frees the copies
        add(
            "total:sparse", lambda: block_sparse_attention(q, k, v, topk=topk, block_q=bq, block_k=bk, backend="triton")
        )
        add("total:sla-code", sla("code", 0.0))
        add("total:sla-paper", sla("paper", args.k_low))
        nkb = -(-n // bk)
        n_c, n_l = spl.sla_block_counts(nkb, topk, args.k_low)
        add("part:pool", lambda: spl._block_mean(q, bq, torch.float32))
        add("part:scores", lambda: spl._block_scores(q, k, bq, bk))
        scores = spl._block_scores(q, k, bq, bk)
        add("part:select-kernel", lambda: sl._select(scores, n_c, nkb, False))
        add("part:select", lambda: sl.select_blocks(q, k, topk, 0.0, bq, bk, False))
        add("part:select-marginal", lambda: sl.select_blocks(q, k, topk, args.k_low, bq, bk, True))
        lut, marginal = sl.select_blocks(q, k, topk, args.k_low, bq, bk, True)
        add("part:states-code", lambda: sl.linear_states(k, v, None, bk, "softmax"))
        add("part:states-paper", lambda: sl.linear_states(k, v, marginal, bk, "softmax"))
        states = {
            "code": sl.linear_states(k, v, None, bk, "softmax"),
            "paper": sl.linear_states(k, v, marginal, bk, "softmax"),
        }

        def fwd(kind: str) -> Callable[[], object]:
            if kind == "sparse":
                return lambda: sl.sla_fwd(q, k, v, lut, None, None, None, None, scale, 1.0, bq, bk, 0)
            hi, zi = states[kind]
            return lambda: sl.sla_fwd(q, k, v, lut, hi, zi, w, bias, scale, 1e-5, bq, bk, 0)

        for kind in ("sparse", "code", "paper"):
            add(f"part:fwd-{kind}", fwd(kind))
        if args.tiles:
            shipped = sl.fwd_config
            try:
                for kind in ("sparse", "code", "paper"):
                    # (the code variant's folded read-out always runs bf16x3 on CUDA; the paper variant's takes either)
                    for precs in {"sparse": ("-",), "code": ("bf16x3",), "paper": ("tf32", "bf16x3")}[kind]:
                        for tq, tk, nw, ns in FWD_TILES:

                            def cfg(*a, tq=tq, tk=tk, nw=nw, ns=ns, lp=precs):
                                c = shipped(*a)
                                c.update(BLOCK_Q=tq, BLOCK_K=tk, QPB=bq // tq, KSUB=bk // tk, num_warps=nw,
                                         num_stages=ns)  # fmt: skip
                                if lp != "-":
                                    c["LIN_PREC"] = lp
                                return c

                            sl.fwd_config = cfg
                            add(f"tiles:fwd-{kind} {precs} q{tq} k{tk} w{nw} s{ns}", fwd(kind))
            finally:
                sl.fwd_config = shipped
            saved = (dict(sl._STATES_PREC), dict(sl.STATES_TILES))
            try:
                for prec, bn, nw, ns in STATE_TILES:
                    sl._STATES_PREC[torch.bfloat16] = prec
                    sl.STATES_TILES[torch.bfloat16] = (bn, {"num_warps": nw, "num_stages": ns})
                    add(f"tiles:states {prec} n{bn} w{nw} s{ns}", lambda: sl.linear_states(k, v, None, bk, "softmax"))
            finally:
                sl._STATES_PREC.clear()
                sl._STATES_PREC.update(saved[0])
                sl.STATES_TILES.clear()
                sl.STATES_TILES.update(saved[1])
        from torch.profiler import ProfilerActivity, profile

        call = sla("code", 0.0)
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
    print(table)
    base = next((r["ms"] for r in rows if r["name"] == "dense:cudnn" and r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["dense_over_this"] = base / r["ms"]
    shape = {"batch": b, "tokens": n, "heads": h, "head_dim": d, "dtype": "bf16", "sparsity": args.sparsity,
             "block_q": bq, "block_k": bk, "k_low": args.k_low, "n_c": n_c, "n_l": n_l}  # fmt: skip
    return {"benchmark": "sla_parts", "meta": gpu_meta(args.argv, args.commit), "shape": shape, "rows": rows,
            "profile_sla_code": table}  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok" and not r["name"].startswith("tiles:")]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows][::-1], [r["ms"] for r in rows][::-1], color="tab:blue")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["ms"], i, f" {r['ms']:.3f} ms ({r.get('dense_over_this', 0):.1f}x)", va="center", fontsize=7)
    ax.set_xlabel("ms (no gradient); in brackets: dense cuDNN / this")
    s = result["shape"]
    finish(fig, result, path, note=f"\nSLA parts, N={s['tokens']}, H={s['heads']}, D={s['head_dim']}, "
           f"sparsity {s['sparsity']}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/sla_parts.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=32760)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--k-low", type=float, default=0.10)
    p.add_argument("--block-q", type=int, choices=(64, 128), default=128)
    p.add_argument("--block-k", type=int, choices=(64,), default=64)
    p.add_argument("--tiles", action="store_true", help="also sweep the kernels' tile settings")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--commit", default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if not torch.cuda.is_available():
        print("sla_parts.py needs a CUDA GPU", file=sys.stderr)
        return 2
    args.argv = argv if argv is not None else sys.argv[1:]
    out = args.out or Path(__file__).resolve().parent / "results" / device_slug("cuda")
    out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    for line in write_result(result, out, "sla_parts", plot=plot):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
