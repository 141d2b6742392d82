"""What the benchmark scripts share: CUDA-event and host timing, the timing flags and their check, the op scripts'
``--out`` / ``--commit`` / ``--shapes`` flags and their check, runs under ``TUNING`` overrides (``tuned``)."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_ms(fn: Callable[[], object], warmup: int, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call of ``iters`` calls (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def graph_ms(fn: Callable[[], object], warmup: int, iters: int, stream: torch.cuda.Stream | None = None) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph: its kernels' time without the host's
    (what a call costs inside a model whose host runs ahead of the GPU). ``fn`` must not synchronise. ``stream``
    (not the default stream): where ``fn`` is warmed up and captured; a backward alone must be captured on the
    stream its forward ran on (autograd runs each backward op on its forward op's stream, which outside the capture
    fails it: "operation failed due to a previous error during capture")."""
    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (lazy initialisation, compilation, allocator)
        for _ in range(max(1, warmup)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        fn()
    return cuda_ms(graph.replay, warmup, 1, iters)


def host_us(fn: Callable[[], object], calls: int, warmup: int = 10) -> float:
    """Microseconds of wall time per call of ``calls`` back-to-back calls, synchronised before and after: at a tiny
    shape the GPU waits on the host, so this is the host's cost of one call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def python_profile(fn: Callable[[], object], calls: int) -> list[dict]:
    """Every Python function (and builtin) run by ``calls`` calls of ``fn`` under cProfile, per call: ``name``
    (``folder/file:line(function)``), ``self_cpu_us``, ``cum_us`` and ``calls``, unsorted."""
    import cProfile
    import pstats
    from pathlib import Path

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    return [
        {"name": f"{Path(file).parent.name}/{Path(file).name}:{line}({name})", "self_cpu_us": tt / calls * 1e6,
         "cum_us": ct / calls * 1e6, "calls": nc / calls}
        for (file, line, name), (_cc, nc, tt, ct, _callers) in pstats.Stats(prof).stats.items()
    ]  # fmt: skip


def kernels_ms(fn, per_kernel: dict | None = None) -> float:
    """The summed GPU time of the kernels of one call of ``fn`` (torch profiler), in ms; with ``per_kernel``, each
    kernel's microseconds are added there under its (shortened) name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if per_kernel is not None:
        for e in events:
            per_kernel[e.name[:60]] = per_kernel.get(e.name[:60], 0.0) + e.device_time_total
    return sum(e.device_time_total for e in events) / 1e3


@contextlib.contextmanager
def tuned(table: MutableMapping, **overrides) -> Iterator[None]:
    """``table`` (a kernel module's ``TUNING``) updated with ``overrides`` inside the block, restored exactly after it
    (keys the block added are dropped), also when the block raises."""
    saved = dict(table)
    table.update(overrides)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def add_timing_flags(p: argparse.ArgumentParser, iters: int = 20, warmup: int = 3, repeats: int = 3) -> None:
    """``--warmup``, ``--iters`` and ``--repeats`` with these defaults: the arguments of :func:`cuda_ms`."""
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--repeats", type=int, default=repeats)


def check_timing_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``p.error``) timing flags below 1: zero iterations would divide by zero, zero repeats time nothing."""
    if min(args.warmup, args.iters, args.repeats) < 1:
        p.error(f"--warmup / --iters / --repeats must be >= 1, got {args.warmup} / {args.iters} / {args.repeats}")


def add_op_flags(p: argparse.ArgumentParser, stem: str, shapes: Mapping[str, object]) -> None:
    """The flags every op-level script has: ``--out`` (required: the folder for ``<stem>.json`` / ``.png``),
    ``--commit`` and ``--shapes`` (a comma-separated subset of ``shapes``' names, all by default); read them back
    with :func:`check_op_flags`."""
    p.add_argument("--out", type=Path, required=True, help=f"folder for {stem}.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--shapes", default=",".join(shapes), help=f"comma-separated subset of {', '.join(shapes)}")


def check_op_flags(p: argparse.ArgumentParser, args: argparse.Namespace, shapes: Mapping[str, object]) -> list[str]:
    """The names ``--shapes`` lists (``args.shapes`` rewritten without empty items); a usage error (``p.error``) for an
    unknown name or none, or without CUDA."""
    names = [s for s in args.shapes.split(",") if s]
    if (unknown := sorted(set(names) - set(shapes))) or not names:
        p.error(f"--shapes: unknown {unknown or args.shapes!r}; choose from {', '.join(shapes)}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.shapes = ",".join(names)
    return names
