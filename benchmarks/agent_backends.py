"""Agent attention's two backends side by side, in GPU time: the ``"sdpa"`` backend (two cuDNN / flash calls with the
bias tables as float masks) against the fused Triton forward (``"triton"``: aggregation with the key set split over
programs when there are few (batch, head) pairs, then the broadcast), at the op and in the agent models, next to the
dense twin. GPU time, so that a host-bound 224 px forward does not hide the kernels: at the op a CUDA-graph replay;
for a model the sum of its kernels' times in one profiled eager forward (a graph replay would also count the position
biases the agent layers keep between eager forwards but rebuild inside a capture). Eager milliseconds are recorded
too. bf16 autocast, inference; ``--train`` adds the op's forward + backward (GPU time per kernel) and training steps
at 224 px, the fused backward (``visionlin.kernels.agent.TRITON_BACKWARD``, on by default) against SDPA's;
``--bwd-sweep`` times the fused backward's launch settings (rows, warps, pipeline stages) at the op shapes (or
``--sweep-shapes``).

Usage (on a GPU machine):
    python benchmarks/agent_backends.py --out benchmarks/results/h200 [--train [--no-infer --no-ops]] [--bwd-sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: (model, twin, ((size, batch), ...))
MODELS = {
    "agent_deit_small": ("deit_small_patch16_224", ((224, 256), (1024, 16), (2048, 4))),
    "agent_swin_tiny": ("swin_tiny_patch4_window7_224", ((224, 128), (1024, 8))),
    "agent_pvt_small": ("swin_tiny_patch4_window7_224", ((224, 128), (1024, 8))),
}
#: op shapes (B, N, H, D, agents): Agent-DeiT-S's blocks at 224 / 1024 / 2048 px and batch 256 / 16 / 4
OPS = ((256, 197, 6, 64, 49), (16, 4097, 6, 64, 49), (4, 16385, 6, 64, 49))


def _ms(fn, iters: int) -> tuple[float, float]:
    """(eager ms, CUDA-graph replay ms) per call."""
    from benchmarks._timing import cuda_ms, graph_ms

    return cuda_ms(fn, 3, iters, 3), graph_ms(fn, 3, iters)


def op_rows(iters: int) -> list[dict]:
    import torch

    from visionlin.kernels import agent_attention

    rows = []
    for b, n, h, d, na in OPS:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
        a = torch.randn(b, na, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
        ab = torch.randn(1, h, na, n, device="cuda", generator=g)
        qb = torch.randn(1, h, n, na, device="cuda", generator=g)
        r = {"kind": "op", "shape": [b, n, h, d, na]}
        with torch.inference_mode():
            for backend in ("sdpa", "triton"):
                ab_, qb_ = (ab.bfloat16(), qb.bfloat16()) if backend == "sdpa" else (ab, qb)  # as the layers pass them
                eager, graph = _ms(
                    functools.partial(agent_attention, q, k, v, a, agent_bias=ab_, query_bias=qb_, backend=backend),
                    iters,
                )
                r[f"{backend}_eager_ms"], r[f"{backend}_graph_ms"] = eager, graph
        r["triton_speedup_graph"] = r["sdpa_graph_ms"] / r["triton_graph_ms"]
        rows.append(r)
        print(f"op {r['shape']}: sdpa {r['sdpa_graph_ms']:.3f} ms, triton {r['triton_graph_ms']:.3f} ms "
              f"({r['triton_speedup_graph']:.2f}x)", flush=True)  # fmt: skip
    return rows


def _op_train_step(shape, backend: str):
    """A forward + backward of the op at ``shape`` (q, k, v, agents and both bias tables need a gradient) with
    ``backend`` (``"triton"``: the fused backward, ``TRITON_BACKWARD`` must be on)."""
    import torch

    from visionlin.kernels import agent_attention

    b, n, h, d, na = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    leaves = [torch.randn(b, t, h, d, device="cuda", generator=g, dtype=torch.bfloat16) for t in (n, n, n, na)]
    leaves += [torch.randn(1, h, *s, device="cuda", generator=g) for s in ((na, n), (n, na))]
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(b, n, h, d, device="cuda", generator=g, dtype=torch.bfloat16)
    cast = (lambda t: t.bfloat16()) if backend == "sdpa" else (lambda t: t)  # as the layers pass the biases

    def step():
        q, k, v, a, ab, qb = leaves
        out = agent_attention(q, k, v, a, agent_bias=cast(ab), query_bias=cast(qb), backend=backend)
        torch.autograd.grad(out, leaves, grad)

    return step


def op_train_rows(iters: int) -> list[dict]:
    """The op's forward + backward, SDPA against the fused forward + backward (``TRITON_BACKWARD`` on): eager
    milliseconds, the GPU time of one profiled call and each kernel's share."""
    from benchmarks._timing import cuda_ms, kernels_ms
    from visionlin.kernels import agent as agent_op

    rows = []
    for shape in OPS:
        r = {"kind": "op_train", "shape": list(shape)}
        before = agent_op.TRITON_BACKWARD
        try:
            for backend in ("sdpa", "triton"):
                agent_op.TRITON_BACKWARD = backend == "triton"
                step = _op_train_step(shape, backend)
                r[f"{backend}_eager_ms"] = cuda_ms(step, 3, iters, 3)
                calls = [{} for _ in range(3)]  # per-kernel microseconds of each profiled call; the fastest kept
                ms, kernels = min((kernels_ms(step, c), i) for i, c in enumerate(calls))
                r[f"{backend}_gpu_ms"] = ms
                r[f"{backend}_kernels_us"] = dict(sorted(calls[kernels].items(), key=lambda kv: -kv[1]))
        finally:
            agent_op.TRITON_BACKWARD = before
        r["triton_speedup_gpu"] = r["sdpa_gpu_ms"] / r["triton_gpu_ms"]
        rows.append(r)
        print(f"op fwd+bwd {r['shape']}: GPU time sdpa {r['sdpa_gpu_ms']:.3f} ms, triton {r['triton_gpu_ms']:.3f} ms "
              f"({r['triton_speedup_gpu']:.2f}x); eager {r['sdpa_eager_ms']:.3f} / {r['triton_eager_ms']:.3f} ms",
              flush=True)  # fmt: skip
        for backend in ("sdpa", "triton"):
            top = list(r[f"{backend}_kernels_us"].items())[:6]
            print(f"  {backend}: " + "; ".join(f"{k} {v:.0f} us" for k, v in top), flush=True)
    return rows


#: the backward's launch settings swept by ``--bwd-sweep``: (rows per block, warps, pipeline stages; 0: Triton's
#: default, recorded as ``None`` in the sweeps of cf7ab3c / 524afbc)
BWD_SETTINGS = [(r, w, st) for r in (32, 64) for w in (4, 8) for st in (0, 1, 2)]
#: the sweep's shapes: Agent-DeiT-S's (head dim 64) and Agent-Swin-T's first stage (224 px, batch 128, head dim 32)
SWEEP_OPS = (*OPS, (128, 3136, 3, 32, 49))


def bwd_sweep_rows(sweep_shapes: list[tuple] | None = None) -> list[dict]:
    """The fused backward's two kernels' GPU time (profiled, min of 3 calls) per launch setting at each op shape."""
    from benchmarks._timing import kernels_ms
    from visionlin.kernels import agent as agent_op
    from visionlin.kernels.triton import agent as tri

    rows, shipped = [], dict(tri.TUNING)
    before = agent_op.TRITON_BACKWARD
    agent_op.TRITON_BACKWARD = True
    try:
        for shape in SWEEP_OPS if sweep_shapes is None else sweep_shapes:
            step = _op_train_step(shape, "triton")
            for rows_, warps, stages in BWD_SETTINGS:
                tri.TUNING.update(bwd_rows=rows_, bwd_warps=warps, bwd_stages=stages)
                r = {"kind": "bwd_sweep", "shape": list(shape), "rows": rows_, "warps": warps, "stages": stages}
                try:
                    best = None
                    for _ in range(3):
                        kernels: dict[str, float] = {}
                        kernels_ms(step, kernels)
                        us = sum(v for k, v in kernels.items() if "backward_kernel" in k)
                        best = us if best is None else min(best, us)
                    r["bwd_us"] = best
                except Exception as e:  # noqa: BLE001 (a setting that does not compile is recorded, not fatal)
                    r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                rows.append(r)
                print(f"bwd {shape} rows {rows_} warps {warps} stages {stages}: {r.get('bwd_us', r.get('error'))}",
                      flush=True)  # fmt: skip
    finally:
        agent_op.TRITON_BACKWARD = before
        tri.TUNING.clear()
        tri.TUNING.update(shipped)
    return rows


def _compare(r: dict, name: str, twin_name: str, size: int, iters: int, run) -> dict:
    """Fill ``r`` with eager and GPU milliseconds of the twin and of ``name`` with each agent backend, and the ratios
    to the twin. ``run(model, backend)`` sets up one model (built for ``size``) and returns the call to time."""
    import torch

    from benchmarks._timing import cuda_ms, kernels_ms
    from visionlin.train.bench import _create

    for key, model_name, backend in (("twin", twin_name, None), ("sdpa", name, "sdpa"), ("triton", name, "triton")):
        model = _create(model_name, torch.device("cuda"), size)  # built for the size, as the bench builds it
        if backend is not None:
            for m in model.modules():
                if hasattr(m, "agent_num"):  # the agent mixers only (window / softmax stages keep theirs)
                    m.backend = backend
        with run(model, backend) as call:
            r[f"{key}_eager_ms"] = cuda_ms(call, 3, iters, 3)
            r[f"{key}_gpu_ms"] = min(kernels_ms(call) for _ in range(3))
        del model, call
        torch.cuda.empty_cache()
    for key in ("sdpa", "triton"):
        r[f"{key}_vs_twin_gpu"] = r["twin_gpu_ms"] / r[f"{key}_gpu_ms"]
        r[f"{key}_vs_twin_eager"] = r["twin_eager_ms"] / r[f"{key}_eager_ms"]
    what = "train " if r["kind"] == "train" else ""
    print(f"{name} {what}{size}px bs{r['batch']}: GPU time twin {r['twin_gpu_ms']:.2f} / sdpa {r['sdpa_gpu_ms']:.2f} "
          f"/ triton {r['triton_gpu_ms']:.2f} ms (x twin: {r['sdpa_vs_twin_gpu']:.2f} / "
          f"{r['triton_vs_twin_gpu']:.2f}); eager x twin {r['sdpa_vs_twin_eager']:.2f} / "
          f"{r['triton_vs_twin_eager']:.2f}", flush=True)  # fmt: skip
    return r


def model_rows(models: list[str], iters: int) -> list[dict]:
    import torch

    rows = []
    for name in models:
        twin_name, sizes = MODELS[name]
        for size, batch in sizes:
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size, device="cuda")

            @contextlib.contextmanager
            def infer(model, _backend, x=x):
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    yield functools.partial(model.eval(), x)

            r = {"kind": "model", "model": name, "twin": twin_name, "size": size, "batch": batch}
            rows.append(_compare(r, name, twin_name, size, iters, infer))
    return rows


def train_rows(models: list[str], iters: int, batch: int = 128) -> list[dict]:
    """Training steps at 224 px (forward, cross-entropy, backward, AdamW; bf16 autocast): SDPA against the fused
    forward + backward (``visionlin.kernels.agent.TRITON_BACKWARD`` on), next to the twin; GPU time as for inference."""
    import torch

    from visionlin.kernels import agent as agent_op
    from visionlin.train.bench import train_step

    rows = []
    for name in models:
        twin_name = MODELS[name][0]
        torch.manual_seed(0)
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        labels = torch.randint(0, 1000, (batch,), device="cuda")

        @contextlib.contextmanager
        def train(model, backend, x=x, labels=labels):
            opt = torch.optim.AdamW(model.train().parameters(), lr=1e-4, fused=True)
            before = agent_op.TRITON_BACKWARD
            agent_op.TRITON_BACKWARD = backend == "triton"
            try:
                yield functools.partial(train_step(model, opt, labels), x)
            finally:
                agent_op.TRITON_BACKWARD = before

        r = {"kind": "train", "model": name, "twin": twin_name, "size": 224, "batch": batch}
        rows.append(_compare(r, name, twin_name, 224, iters, train))
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks._plot import finish, grouped_bars

    models = [r for r in result["rows"] if r["kind"] in ("model", "train")]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models)), 3.5))
    groups = [f"{r['model']}{' train' if r['kind'] == 'train' else ''}\n{r['size']} px bs{r['batch']}"
              for r in models]  # fmt: skip
    by = dict(zip(groups, models, strict=True))
    grouped_bars(ax, groups, ["sdpa", "triton"], lambda g, s: by[g][f"{s}_vs_twin_gpu"], label_fmt="%.2f",
                 fontsize=6)  # fmt: skip
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_ylabel("GPU time: twin / ours (higher is faster)")
    ax.legend(fontsize=7)
    finish(
        fig,
        result,
        path,
        note="\nagent attention backends; GPU time: the kernels of one profiled eager forward (training step), bf16",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--no-ops", action="store_true")
    parser.add_argument("--no-infer", action="store_true", help="skip the inference model rows")
    parser.add_argument("--train", action="store_true", help="also training steps at 224 px (fused backward on)")
    parser.add_argument("--bwd-sweep", action="store_true", help="also the fused backward's launch settings swept")
    parser.add_argument("--sweep-shapes", default=None, help="the sweep's op shapes, e.g. 128x3136x3x32x49,...")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if args.iters < 1:
        parser.error(f"--iters must be a positive integer, got {args.iters}")
    shapes = None
    if args.sweep_shapes:
        try:
            shapes = [tuple(int(x) for x in sh.split("x")) for sh in args.sweep_shapes.split(",")]
        except ValueError:
            shapes = []
        if not shapes or any(len(sh) != 5 or min(sh) < 1 for sh in shapes):
            parser.error(f"--sweep-shapes takes BxNxHxDxAGENTS,... of positive ints, got {args.sweep_shapes!r}")

    rows = [] if args.no_ops else op_rows(args.iters * 5)
    rows += [] if args.no_infer else model_rows(models, args.iters)
    rows += op_train_rows(args.iters * 5) if args.train and not args.no_ops else []
    rows += train_rows(models, args.iters) if args.train else []
    rows += bwd_sweep_rows(shapes) if args.bwd_sweep else []
    from benchmarks._meta import gpu_meta

    result = {"meta": gpu_meta(argv, args.commit), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_backends.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "agent_backends.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
