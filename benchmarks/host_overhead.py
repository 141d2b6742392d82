"""Is a model bound by the GPU or by the host? Per model: eager time per forward, the same forward replayed as one
CUDA graph (no host work), the sum of its kernels' GPU time, and the host-side ops that cost most (self CPU time
per forward), bf16 autocast, inference. With ``--train``: one training step (forward, cross-entropy, backward,
fused AdamW) instead (no graph replay). ``--compile``: the model under ``torch.compile`` (default mode; the step's
host time is then Inductor's wrapper code, the custom ops' dispatch and their Python bodies). ``--stacks``: the
step (or forward) is also run under ``cProfile`` and the Python functions with the most own time are listed (on
Python >= 3.12 cProfile sees every thread, the autograd engine's backward formulas included; on older ones the main
thread only).

Usage (on a GPU machine):
    python benchmarks/host_overhead.py --out benchmarks/results/h200 --models inline_deit_small,infvit_small
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._timing import cuda_ms, python_profile  # noqa: E402
from visionlin.train.bench import train_step  # noqa: E402


def _profile():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])


def _python_top(step, calls: int = 3, n: int = 40) -> dict:
    """The Python functions with the most own time per call of ``step`` (cProfile), with their cumulative time."""
    rows = sorted(python_profile(step, calls), key=lambda r: -r["self_cpu_us"])
    return {"python_self_cpu_ms": sum(r["self_cpu_us"] for r in rows) / 1e3, "top_python": rows[:n]}


def measure(model: torch.nn.Module, size: int, batch: int, iters: int, stacks: bool = False) -> dict:
    x = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        eager = min(cuda_ms(lambda: model(x), 0, iters, 1) for _ in range(3))
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
            with torch.cuda.graph(graph, stream=stream):
                model(x)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        replay = min(cuda_ms(graph.replay, 0, iters, 1) for _ in range(3))
        model(x)  # the capture kept nothing in the layers' caches (layers._cache): refill them before profiling
        with _profile() as prof:
            model(x)
            torch.cuda.synchronize()
        python = _python_top(lambda: model(x)) if stacks else {}
    return {"eager_ms": eager, "graph_ms": replay, **_tables(prof), **python}


def measure_train(
    model: torch.nn.Module, size: int, batch: int, iters: int, stacks: bool = False, forward=None
) -> dict:
    """``forward``: what the step calls (default ``model``; e.g. its compiled version)."""
    model.train()
    x = torch.randn(batch, 3, size, size, device="cuda")
    target = torch.randint(0, model.num_classes, (batch,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    step = functools.partial(train_step(model if forward is None else forward, opt, target), x)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    eager = min(cuda_ms(step, 0, iters, 1) for _ in range(3))
    with _profile() as prof:
        step()
        torch.cuda.synchronize()
    python = _python_top(step) if stacks else {}
    return {"eager_ms": eager, "graph_ms": None, **_tables(prof), **python}


_LAUNCHES = frozenset(("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel", "cudaLaunchKernelExC",
                       "cudaMemsetAsync", "cudaMemcpyAsync"))  # fmt: skip


def _tables(prof) -> dict:
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    gpu_us = 0.0
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us += evt.device_time_total
        else:
            h = host[evt.name]
            h[0] += evt.self_cpu_time_total
            h[1] += 1
    top = sorted(host.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "kernels_ms": gpu_us / 1e3,
        # work the host enqueued on the GPU (kernel launches, memsets, copies): tens of us each on a slow host
        "launches": sum(c for n, (_, c) in host.items() if n in _LAUNCHES),
        "host_self_cpu_ms": sum(v[0] for v in host.values()) / 1e3,
        "top_host_ops": [{"name": n, "self_cpu_us": us, "calls": c} for n, (us, c) in top],
    }


def main(argv: list[str] | None = None) -> int:
    import timm

    import visionlin  # noqa: F401  (registers the models)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--models", default="deit_small_patch16_224,infvit_small,inline_deit_small")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--commit", default=None)
    parser.add_argument("--train", action="store_true", help="a training step instead of an inference forward")
    parser.add_argument("--compile", action="store_true", help="the model under torch.compile (default mode)")
    parser.add_argument("--stacks", action="store_true", help="also list the Python functions with most self CPU")
    from benchmarks.toggle_speed import add_configs_argument, parse_configs, switches

    add_configs_argument(parser)
    args = parser.parse_args(argv)

    configs = parse_configs(parser, args.configs)
    rows = []
    for name, config in ((m, c) for m in args.models.split(",") for c in configs):
        torch.manual_seed(0)
        kw = {"dynamic_img_size": True, "img_size": args.size} if name.startswith("deit") else {}
        model = timm.create_model(name, **kw).cuda().eval()
        compiled = torch.compile(model) if args.compile else None
        r = {"model": name, "size": args.size, "batch": args.batch, "train": args.train, "config": config,
             "compiled": args.compile}  # fmt: skip
        with switches(config):
            if args.train:
                r.update(measure_train(model, args.size, args.batch, args.iters, args.stacks, compiled))
            else:
                r.update(
                    measure(model if compiled is None else compiled, args.size, args.batch, args.iters, args.stacks)
                )
        rows.append(r)
        replay = "n/a" if r["graph_ms"] is None else f"{r['graph_ms']:.2f} ms"
        print(f"\n== {name} [{config}] {args.size}px bs{args.batch}: eager {r['eager_ms']:.2f} ms, graph replay "
              f"{replay}, kernels {r['kernels_ms']:.2f} ms, host self CPU {r['host_self_cpu_ms']:.2f} ms, "
              f"{r['launches']} launches",
              flush=True)  # fmt: skip
        for op in r["top_host_ops"][:24]:
            print(f"   {op['self_cpu_us'] / 1e3:7.2f} ms x{op['calls']:4d} {op['name'][:90]}")
        if args.stacks:
            print(f"   -- Python (cProfile), {r['python_self_cpu_ms']:.2f} ms own time per call in all:")
            for op in r["top_python"]:
                print(f"   {op['self_cpu_us'] / 1e3:7.2f} ms own {op['cum_us'] / 1e3:7.2f} ms cum x{op['calls']:6.1f} "
                      f"{op['name'][-100:]}")  # fmt: skip
        del model
        torch.cuda.empty_cache()
    from benchmarks._meta import gpu_meta

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"host_overhead{'_train' if args.train else ''}{'_compiled' if args.compile else ''}.json"
    (out / name).write_text(json.dumps({"meta": gpu_meta(argv, args.commit), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
