"""CUDA-event timing shared by the benchmark scripts (``neighborhood_op.py``, ``neighborhood_3d.py``,
``host_overhead.py``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

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
