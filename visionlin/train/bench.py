"""GPU benchmarks of visionlin models next to a dense timm twin: the ``visionlin bench`` command.

- ``visionlin bench models``: inference img/s and peak memory at 224 / 512 / 1024 / 2048 / 4096 px (batch 256 / 64 /
  16 / 4 / 1), eager and ``torch.compile``-d (each compiled model against the compiled twin), bf16 autocast.
- ``visionlin bench train``: training-step img/s (forward, backward, AdamW step; bf16 autocast) at 224 px, batch 128.
- ``visionlin bench largest``: the largest square input each model runs at batch 1 for inference (doubling, then
  bisection on out-of-memory, within a time cap per model) and the peak memory there.
- ``visionlin bench op``: the linear-attention op (``visionlin.train.bench_op``).
- ``visionlin bench plot FILE.json``: redraw a result's PNG from its JSON.

The models default to every registered visionlin ``*_small`` model; the twin is timm's ``deit_small_patch16_224``
built with ``dynamic_img_size=True, img_size=size`` (fused SDPA). All models of one size and mode are resident in one
process and measured in alternating order (sweeps forward, then backward, ...); img/s is the median over the sweeps
and every ratio to the twin uses the twin's median of the same sweeps. A model that runs out of memory is recorded as
``"oom"`` and the others continue. Peak memory is the model's own weights (and optimizer state) plus the largest
allocation above what was allocated before each of its warm-up calls after the first (the first compiles) and each
timed call, so the other resident models do not count. Under CUDA graphs (``cudagraphs``) that largest allocation is
the graph recording's (torch.compile records at the second call, the first one counted): the activations live in the
graph's memory pool, allocated while it is recorded, and a replay allocates nothing (until s51 only the replays were
counted, so those rows' peaks were the weights and optimizer state alone).

Each benchmark writes one JSON (``meta``: command, commit, date, GPU, versions; ``config``; ``rows``) and one PNG
drawn from it to ``--out`` (default: ``benchmarks/results/<gpu>``, e.g. ``h200``) as ``<name>.json`` / ``.png``.
While it runs, the rows so far go to ``<name>.partial.json`` after every block (removed at the end), so an interrupted
run keeps what it measured and leaves a previous result whole. The measuring functions take ``device="cpu"`` for
tests; the command needs a CUDA device for ``largest`` and ``op`` and refuses a machine without one (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import difflib
import gc
import json
import math
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._io import atomic_write, draw_or_remove, remove_stale
from ._parse import checked

__all__ = [
    "DEFAULT_BATCHES",
    "TRAIN_BATCH",
    "TRAIN_SIZE",
    "TWIN",
    "add_subcommands",
    "bench_largest",
    "bench_models",
    "bench_train",
    "default_batch",
    "default_models",
    "device_slug",
    "main",
    "plot_result",
    "run_meta",
    "search_largest",
    "train_step",
    "write_result",
]

TWIN = "deit_small_patch16_224"
PATCH = 16
DEFAULT_BATCHES = {224: 256, 512: 64, 1024: 16, 2048: 4, 4096: 1}
QUICK_COMPILE_SIZES = (224, 1024)
TRAIN_SIZE, TRAIN_BATCH = 224, 128
LARGEST_START, LARGEST_MAX = 224, 131072
#: sweeps of one row further apart than this (max - min over the median) are flagged as noisy on the console: the
#: s54 compiled run on cold caches spread 27-36% for three models (0.42-0.48x the twin) where a rerun spread under 2%
NOISY_SPREAD = 0.10
MODES = ("eager", "compiled", "cudagraphs")
#: how ``bench models`` builds each model: for the input size, or at its default size (``--build-size``)
BUILD_SIZES = ("input", "default")
#: torch.compile's mode per compiled bench mode: "cudagraphs" replays the compiled graphs as CUDA graphs (no host work
#: per kernel: what a host-bound step needs; the twin is compiled the same way)
COMPILE_MODES = {"compiled": "default", "cudagraphs": "reduce-overhead"}
MAX_BATCH = 65536
PARTIAL = ".partial"  # <name>.partial.json: the rows so far of a running benchmark
MAX_NAME = 200  # characters of --name: room for the suffixes and atomic_write's temporary name
INSTALL_PLOT = "pip install 'visionlin[bench]'"
# Settings per benchmark: (full run, --quick). An explicit flag wins over both.
PRESETS: dict[str, dict[str, tuple[Any, Any]]] = {
    "models": {"warmup": (3, 2), "iters": (30, 10), "repeats": (5, 3), "min_time": (1.0, 0.25)},
    "train": {"warmup": (3, 2), "iters": (30, 10), "repeats": (5, 3), "min_time": (1.0, 0.25)},
    "largest": {"time_cap": (90.0, 25.0)},
}


# Metadata -------------------------------------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """A folder name for a device: ``"NVIDIA H200"`` -> ``"h200"``, ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    drop = re.compile(r"nvidia|geforce|tesla|amd|radeon|instinct|\d+gb|hbm\d*e?|pcie|sxm\d*|nvl|mig.*")
    kept = [w for w in words if not drop.fullmatch(w)]
    return "_".join(kept) or "gpu"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(command: str, device: str | torch.device = "cuda", commit: str | None = None, **extra: Any) -> dict:
    """``{command, commit, date, device, gpu, cpu, torch, cuda, triton, timm, visionlin, python, **extra}``.

    ``commit`` defaults to the checkout's HEAD, or ``visionlin <version>`` for an installed package (a copied tree's
    git may be stale: pass the commit explicitly then). ``gpu`` is ``None`` on the CPU.
    """
    import timm

    import visionlin

    from .scaling import _source_commit

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = torch.device(device)
    return {
        "command": command,
        "commit": commit or _source_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": _cpu_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "timm": timm.__version__,
        "visionlin": visionlin.__version__,
        "python": platform.python_version(),
        **extra,
    }


# Models ---------------------------------------------------------------------------------------------------------------
def default_models() -> list[str]:
    """Every registered visionlin ``*_small`` model: one per family."""
    import visionlin

    return visionlin.list_models("*_small")


def default_batch(size: int) -> int:
    """The batch at ``size``: ``DEFAULT_BATCHES`` where listed, else 256 images' worth of 224 px tokens (a power
    of two, at least 1)."""
    if size in DEFAULT_BATCHES:
        return DEFAULT_BATCHES[size]
    return 2 ** max(0, math.floor(math.log2(256 * (224 / size) ** 2)))


def _create(name: str, device: torch.device, size: int | None = None) -> nn.Module:
    """Build ``name`` on ``device``: for ``size`` px inputs if given (as a user running that size would build it),
    else at its default size accepting any input size (``dynamic_img_size``). Not dynamic when built for the size:
    timm's Swin then builds its shifted-window masks in every forward instead of keeping them as buffers, a cost the
    twin would carry that a user of that size does not. A model whose constructor takes neither keyword (a CNN twin
    such as ``resnet18``: no grid-sized tables, any input side) is built without it."""
    import timm

    import visionlin  # noqa: F401  (registers the models)

    def create(**kwargs: Any) -> nn.Module:
        torch.manual_seed(0)
        try:
            return timm.create_model(name, device=device, **kwargs)
        except TypeError as e:
            if "device" not in str(e):
                raise
            return timm.create_model(name, **kwargs).to(device)  # an older timm without ``device=``

    key, value = ("img_size", size) if size is not None else ("dynamic_img_size", True)
    try:
        return create(**{key: value})
    except TypeError as e:  # (was an error row per size: "ResNet.__init__() got an unexpected keyword ...")
        if f"unexpected keyword argument '{key}'" not in str(e):
            raise
    return create()


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


@dataclass
class _Entry:
    """One model under measurement: its label, the callable timed on an input batch and what it holds resident."""

    label: str
    model: str
    backend: str | None
    twin: bool
    module: nn.Module | None = None
    step: Callable[[torch.Tensor], Any] | None = None
    own_bytes: int = 0
    status: str = "ok"
    error: str | None = None
    iters: int = 0
    first_call_s: float | None = None
    rates: list[float] = field(default_factory=list)
    peaks: list[float] = field(default_factory=list)


def _timed(entry: _Entry, x: torch.Tensor, iters: int, device: torch.device) -> tuple[float, float | None]:
    """``iters`` calls of ``entry.step`` on ``x``: (seconds per call, peak MiB) where the peak is the entry's own
    resident bytes plus the peak allocation above the level before the calls (``None`` off CUDA)."""
    _sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        entry.step(x)
    _sync(device)
    seconds = (time.perf_counter() - t0) / iters
    peak = None
    if device.type == "cuda":
        peak = (entry.own_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**20
    return seconds, peak


def _guard(entry: _Entry, device: torch.device, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; an out-of-memory error marks ``entry`` ``"oom"``, another exception ``"error"``; memory is freed
    after the exception (and its frames) are gone. Returns ``fn()``'s value, or ``None`` on failure."""
    failed = False
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        entry.status, entry.error, failed = "oom", _short(e), True
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # a model that fails must not end the run: recorded, the others continue
        entry.status, entry.error, failed = "error", _short(e), True
    finally:
        if failed:
            entry.module = entry.step = None
    _free(device)
    return None


def _compile(module: nn.Module, mode: str = "compiled") -> Callable:
    return torch.compile(module, mode=COMPILE_MODES[mode])


@contextlib.contextmanager
def _compile_scope(compiled: bool):
    """A fresh dynamo cache per block, with room for one entry per resident model (several models share one
    ``forward``: the default limit of 8 would send the ninth back to eager silently; hitting it now raises)."""
    if not compiled:
        yield
        return
    import torch._dynamo

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True):
            yield
    finally:
        torch._dynamo.reset()


class _Budget:
    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.t0 > self.seconds


def _specs(models: Sequence[str], backends: Sequence[str | None], twin: str | None) -> list[_Entry]:
    specs = []
    for name in models:
        for backend in backends:
            label = name if len(backends) == 1 else f"{name}@{backend or 'auto'}"
            specs.append(_Entry(label=label, model=name, backend=backend, twin=False))
    if twin:
        specs.append(_Entry(label=twin, model=twin, backend=None, twin=True))
    return specs


def _run_block(
    specs: list[_Entry],
    build: Callable[[_Entry], None],
    x: torch.Tensor,
    device: torch.device,
    *,
    warmup: int,
    iters: int,
    repeats: int,
    min_time: float,
    budget: _Budget,
) -> None:
    """Build every entry and warm each up (``warmup`` calls, at least two; the first call's time is kept: it
    includes compilation). The last warm-up call sets the number of timed calls per sweep: at most ``iters``, enough
    for ``min_time`` seconds. Then ``repeats`` sweeps over the entries that still run, in alternating order. Once
    ``budget`` is spent, entries not yet warmed up are skipped and no further sweep starts (the first one runs)."""
    for e in specs:
        _guard(e, device, lambda e=e: build(e))
    for e in sorted(specs, key=lambda e: not e.twin):  # the twin first: the others' ratios need it
        if e.status != "ok":
            continue
        if budget.spent():  # a warm-up may compile for a minute: the models not started yet are skipped
            e.status, e.error, e.module, e.step = "skipped", "time budget spent before its warm-up", None, None
            continue

        def warm(e: _Entry = e) -> None:
            t0 = time.perf_counter()
            e.step(x)
            _sync(device)
            e.first_call_s = time.perf_counter() - t0
            for _ in range(max(1, warmup - 1)):  # the first call may compile: the last of these sets the pace
                per_call, peak = _timed(e, x, 1, device)
                _add_peak(e, peak)
            e.iters = max(1, min(iters, math.ceil(min_time / max(per_call, 1e-9))))

        _guard(e, device, warm)
    # One untimed call each, in the first sweep's order: a model compiled after another can change global state that
    # the other's compiled code guards on (a log-once set, say), and its recompilation must not land in a timed sweep
    # (nor its peak: a recompilation's workspaces are not the step's).
    for e in [e for e in specs if e.status == "ok"]:
        _guard(e, device, lambda e=e: e.step(x))
    with _frozen_heap():
        for r in range(repeats):
            if budget.spent() and r:
                break
            order = [e for e in specs if e.status == "ok"]
            for e in order if r % 2 == 0 else order[::-1]:
                result = _guard(e, device, lambda e=e: _timed(e, x, e.iters, device))
                if result is not None:
                    e.rates.append(x.shape[0] / result[0])
                    _add_peak(e, result[1])


@contextlib.contextmanager
def _frozen_heap():
    """The objects alive now (the resident models, the compilers' caches) moved out of the garbage collector's reach
    while the sweeps run (``gc.freeze``), so a collection triggered by a model's per-call allocations scans only what
    the calls made, not the whole heap the compiles of every resident model left: such pauses land in whichever
    model's timed calls trigger them, most often the ones whose Python host path allocates most per call. Unfrozen
    after; nothing is freed or kept by it."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _add_peak(e: _Entry, peak: float | None) -> None:
    if peak is not None:
        e.peaks.append(peak)


def _rows(specs: list[_Entry], common: dict) -> list[dict]:
    """One row per entry (the twin included), ratios to the twin from this block's own medians."""
    twin = next((e for e in specs if e.twin), None)
    twin_rate = statistics.median(twin.rates) if twin and twin.status == "ok" and twin.rates else None
    twin_peak = max(twin.peaks) if twin and twin.status == "ok" and twin.peaks else None
    rows = []
    for e in specs:
        ok = e.status == "ok" and bool(e.rates)
        rate = statistics.median(e.rates) if ok else None
        peak = max(e.peaks) if ok and e.peaks else None
        row = {
            "model": e.label,
            "entrypoint": e.model,
            "backend": "twin" if e.twin else (e.backend or "auto"),
            **common,
            "status": e.status if e.status != "ok" or ok else "skipped",
            "img_s": rate,
            "img_s_sweeps": e.rates,
            "spread": (max(e.rates) - min(e.rates)) / rate if ok else None,
            "peak_mib": peak,
            "iters": e.iters or None,
            "first_call_s": e.first_call_s,
            "twin": twin.label if twin else None,
            "twin_img_s": twin_rate,
            "twin_peak_mib": twin_peak,
            "ratio_vs_twin": rate / twin_rate if rate and twin_rate else None,
            "mem_ratio_vs_twin": peak / twin_peak if peak and twin_peak else None,
        }
        if e.error:
            row["error"] = e.error
        rows.append(row)
    return rows


def _skipped(specs: list[_Entry], common: dict, why: str) -> list[dict]:
    return [
        {
            "model": e.label,
            "entrypoint": e.model,
            "backend": "twin" if e.twin else (e.backend or "auto"),
            **common,
            "status": "skipped",
            "error": why,
        }
        for e in specs
    ]


def _report(row: dict, stream: Any = None) -> None:
    stream = stream or sys.stdout
    where = f"{row['model']:24s} {row.get('mode', ''):8s} {row['size']:5d}px bs{row['batch']:<4d}"
    if row["status"] != "ok":
        print(f"{where} {row['status'].upper()}  {row.get('error') or ''}", file=stream, flush=True)
        return
    ratio = f" ({row['ratio_vs_twin']:.2f}x twin)" if row.get("ratio_vs_twin") and row["backend"] != "twin" else ""
    peak = f", peak {row['peak_mib']:.0f} MiB" if row["peak_mib"] is not None else ""
    spread = row.get("spread")
    noisy = f"; NOISY: the sweeps spread {spread:.0%}" if spread is not None and spread > NOISY_SPREAD else ""
    print(f"{where} {row['img_s']:10.1f} img/s{ratio}{peak}{noisy}", file=stream, flush=True)


def bench_models(
    models: Sequence[str],
    *,
    sizes: Sequence[int] = tuple(DEFAULT_BATCHES),
    batches: dict[int, int] | None = None,
    twin: str | None = TWIN,
    modes: Sequence[str] = ("eager", "compiled"),
    compile_sizes: Sequence[int] | None = None,
    backends: Sequence[str | None] = (None,),
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 3,
    iters: int = 30,
    repeats: int = 5,
    min_time: float = 1.0,
    time_budget: float | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
    build_size: str = "input",
) -> list[dict]:
    """Inference img/s and peak memory of ``models`` and ``twin`` at every size, per mode; one row per model, size
    and mode (statuses ``ok``, ``oom``, ``error``, ``skipped``).

    Args:
        build_size: ``"input"``: each model built for the input size (``img_size=size``: grid-sized tables such as
            position embeddings are parameters of that size); ``"default"``: built at its default size and run on
            the larger inputs with ``dynamic_img_size`` (such tables resampled in each forward, not stored). FLatten-
            DeiT keeps a key positional encoding per block: built at 4096 px its 12 tables are 1.2 GB of parameters.
        batches: batch per size (default: ``default_batch``).
        compile_sizes: sizes measured compiled too (default: all); only with ``"compiled"`` in ``modes``.
        backends: kernel backends to measure each model with (``None``: automatic choice).
        iters: at most this many timed calls per sweep; fewer when ``min_time`` seconds are reached sooner.
        time_budget: seconds after which the remaining blocks are recorded as skipped (a running one finishes).
        on_rows: called with all rows so far after every block (to save partial results).
    """
    device = torch.device(device)
    batches = {s: (batches or {}).get(s) or default_batch(s) for s in sizes}
    compile_sizes = list(sizes) if compile_sizes is None else list(compile_sizes)
    if build_size not in BUILD_SIZES:
        raise ValueError(f"build_size={build_size!r}; choose one of {BUILD_SIZES}")
    budget = _Budget(time_budget)
    rows: list[dict] = []
    for mode in modes:  # every eager block first: cheap and complete before a time budget meets the compiles
        for size in sizes:
            if mode in COMPILE_MODES and size not in compile_sizes:
                continue
            batch = batches[size]
            specs = _specs(models, backends, twin)
            common = {"mode": mode, "size": size, "batch": batch, "tokens": (size // PATCH) ** 2,
                      "built_for": size if build_size == "input" else "default"}  # fmt: skip
            if budget.spent():
                block = _skipped(specs, common, f"time budget of {time_budget:g} s spent")
            else:
                block = _inference_block(
                    specs, size, batch, mode, device, dtype, warmup, iters, repeats, min_time, budget,
                    build_size == "input",
                )  # fmt: skip
                block = _rows(block, common)
            for row in block:
                _report(row)
            rows += block
            if on_rows:
                on_rows(rows)
    return rows


def _inference_block(
    specs: list[_Entry],
    size: int,
    batch: int,
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    repeats: int,
    min_time: float,
    budget: _Budget,
    build_for_input: bool = True,
) -> list[_Entry]:
    import visionlin

    def build(e: _Entry) -> None:
        model = _create(e.model, device, size if build_for_input else None).eval()
        if not e.twin and e.backend is not None:  # (a fresh model makes the automatic choice)
            visionlin.set_backend(model, e.backend)
        e.module = model
        e.own_bytes = _nbytes([*model.parameters(), *model.buffers()])
        fn = _compile(model, mode) if mode in COMPILE_MODES else model

        def step(x: torch.Tensor) -> None:
            if mode == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
                fn(x)

        e.step = step

    with _compile_scope(mode in COMPILE_MODES):
        x = torch.randn(batch, 3, size, size, device=device)
        _run_block(
            specs, build, x, device, warmup=warmup, iters=iters, repeats=repeats, min_time=min_time, budget=budget
        )
        del x
    for e in specs:
        e.module = e.step = None
    _free(device)
    return specs


def bench_train(
    models: Sequence[str],
    *,
    size: int = TRAIN_SIZE,
    batch: int = TRAIN_BATCH,
    twin: str | None = TWIN,
    modes: Sequence[str] = ("eager",),
    backends: Sequence[str | None] = (None,),
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    warmup: int = 3,
    iters: int = 30,
    repeats: int = 5,
    min_time: float = 1.0,
    time_budget: float | None = None,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Training-step img/s (forward, cross-entropy, backward, AdamW step, autocast ``dtype``) and peak memory of
    ``models`` and ``twin`` at ``size`` px, ``batch`` images; one row per model and mode. Peak memory counts the
    model's weights and optimizer state."""
    device = torch.device(device)
    budget = _Budget(time_budget)
    rows: list[dict] = []
    for mode in modes:
        specs = _specs(models, backends, twin)
        common = {"mode": mode, "size": size, "batch": batch, "tokens": (size // PATCH) ** 2}
        if budget.spent():
            block = _skipped(specs, common, f"time budget of {time_budget:g} s spent")
        else:
            timing = dict(warmup=max(1, warmup), iters=iters, repeats=repeats, min_time=min_time, budget=budget)
            block = _rows(_train_block(specs, size, batch, mode, device, dtype, timing), common)
        for row in block:
            _report(row)
        rows += block
        if on_rows:
            on_rows(rows)
    return rows


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    new_step: bool = False,
) -> Callable[[torch.Tensor], None]:
    """The benchmarks' training step on a batch ``x``: ``forward`` under autocast (``dtype``, on ``labels``' device
    type), cross-entropy against ``labels``, backward, ``optimizer`` step, gradients set to ``None``. ``new_step``:
    tell ``torch.compile``'s CUDA graphs that an iteration begins (``mode="reduce-overhead"``)."""
    device_type = labels.device.type

    def step(x: torch.Tensor) -> None:
        if new_step:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device_type, dtype=dtype):
            loss = nn.functional.cross_entropy(forward(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _train_block(
    specs: list[_Entry], size: int, batch: int, mode: str, device: torch.device, dtype: torch.dtype, timing: dict
) -> list[_Entry]:
    import visionlin

    def build(e: _Entry) -> None:
        model = _create(e.model, device, size).train()
        if not e.twin and e.backend is not None:  # (a fresh model makes the automatic choice)
            visionlin.set_backend(model, e.backend)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        fn = _compile(model, mode) if mode in COMPILE_MODES else model
        labels = torch.randint(0, model.num_classes, (batch,), device=device)

        train = train_step(fn, opt, labels, dtype, new_step=mode == "cudagraphs")

        def step(x: torch.Tensor) -> None:
            train(x)
            if not e.own_bytes:  # after the first step the optimizer state exists
                state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
                e.own_bytes = _nbytes([*model.parameters(), *model.buffers(), *state, labels])

        e.module, e.step = model, step

    with _compile_scope(mode in COMPILE_MODES):
        x = torch.randn(batch, 3, size, size, device=device)
        _run_block(specs, build, x, device, **timing)
        del x
    for e in specs:
        e.module = e.step = None
    _free(device)
    return specs


# Largest input --------------------------------------------------------------------------------------------------------
def search_largest(
    run_at: Callable[[int], float | None],
    *,
    start: int = LARGEST_START,
    multiple: int = PATCH,
    max_size: int = LARGEST_MAX,
    time_cap: float = 90.0,
    clock: Callable[[], float] = time.perf_counter,
    free: Callable[[], None] = lambda: None,
) -> dict:
    """The largest side (a multiple of ``multiple``) at which ``run_at(side)`` returns without raising
    ``torch.cuda.OutOfMemoryError``: doubling from ``start``, then bisection between the largest success and the
    smallest failure, until they are one ``multiple`` apart, ``max_size`` succeeds, or the next probe is predicted to
    end past ``time_cap`` seconds (the probe's time is extrapolated from the last two, as side^e with e in [2, 4]).
    A successful probe that took more than twice its prediction (or the first one, which has none) runs once more at
    the same side and its second time (``warm_seconds``) feeds the extrapolation: one-time costs at a new shape (Triton
    compiling a kernel variant, cuDNN choosing an algorithm) would otherwise predict every later probe past the cap.

    Another exception at a side above a success is a limit too (a library's: cuBLAS refuses a matrix whose row
    stride passes 2**31 elements, for one): that side bounds the bisection as an out-of-memory does, the probe keeps
    the message, and ``limited_by`` is ``"error"`` when the smallest failing side is such a one. An exception at the
    first probe, before anything ran, is raised: the model does not run at all.

    ``run_at`` returns the peak memory in MiB (or ``None``); ``free`` runs after each failure. Returns
    ``{"largest_px", "peak_mib", "first_oom_px", "first_error_px", "error", "limited_by", "probes", "search_s"}``,
    ``limited_by`` one of ``"memory"`` (bisected to ``multiple``), ``"error"`` (the same, the failure an exception
    other than out-of-memory), ``"time"``, ``"max_size"``, ``"oom_at_start"``.
    """
    if start % multiple or start <= 0 or max_size < start:
        raise ValueError(f"{start=} must be a positive multiple of {multiple=} and at most {max_size=}")
    t0 = clock()
    probes: list[dict] = []
    lo = hi = None
    lo_peak = None

    def predicted(side: int) -> float:
        ok = [(p["size"], p.get("warm_seconds", p["seconds"])) for p in probes if p["ok"]]
        if not ok:
            return 0.0
        (size, t), e = ok[-1], 2.0
        if len(ok) > 1 and size > ok[-2][0] and ok[-2][1] > 0 and t > 0:
            e = min(4.0, max(2.0, math.log(t / ok[-2][1]) / math.log(size / ok[-2][0])))
        return t * (side / size) ** e

    def probe(side: int) -> bool:
        nonlocal lo, hi, lo_peak
        expected = predicted(side)
        s = clock()
        ok = True
        error = None
        try:
            peak = run_at(side)
        except torch.cuda.OutOfMemoryError:
            ok, peak = False, None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # a limit other than memory above a success; before any, the model's failure
            if lo is None:
                raise
            ok, peak, error = False, None, _short(err)
        row = {"size": side, "ok": ok, "seconds": clock() - s, "peak_mib": peak}
        if error is not None:
            row["error"] = error
        slow = ok and (expected <= 0 or row["seconds"] > 2 * expected)  # one-time costs? time it warm
        if slow and clock() - t0 + row["seconds"] <= time_cap:  # (if the cap leaves room for it)
            s = clock()
            try:
                run_at(side)
                row["warm_seconds"] = clock() - s
            except torch.cuda.OutOfMemoryError:  # (it fitted once: the side stands; the first time is kept)
                free()
        probes.append(row)
        if ok:
            lo, lo_peak = side, peak
        else:
            hi = side
            free()
        return ok

    limited_by = None
    side = start
    while True:  # doubling
        if clock() - t0 + predicted(side) > time_cap and lo is not None:
            limited_by = "time"
            break
        if not probe(side):
            break
        if side >= max_size:
            limited_by = "max_size"
            break
        side = min(2 * side, max_size)
    while limited_by is None and lo is not None and hi - lo > multiple:  # bisection
        mid = (lo + hi) // 2 // multiple * multiple
        if clock() - t0 + predicted(mid) > time_cap:
            limited_by = "time"
            break
        probe(mid)
    if lo is None:
        limited_by = "oom_at_start"
    ooms = [p["size"] for p in probes if not p["ok"] and "error" not in p]
    errors = {p["size"]: p["error"] for p in probes if "error" in p}  # exceptions other than out-of-memory
    first_error = min(errors) if errors else None
    if limited_by is None and hi is not None and hi == first_error:
        limited_by = "error"
    return {
        "largest_px": lo,
        "tokens": (lo // multiple) ** 2 if lo else None,
        "peak_mib": lo_peak,
        "first_oom_px": min(ooms) if ooms else None,
        "first_error_px": first_error,
        "error": errors.get(first_error),
        "limited_by": limited_by or "memory",
        "probes": probes,
        "search_s": clock() - t0,
    }


def bench_largest(
    models: Sequence[str],
    *,
    twin: str | None = TWIN,
    backends: Sequence[str | None] = (None,),
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    start: int = LARGEST_START,
    max_size: int = LARGEST_MAX,
    time_cap: float = 90.0,
    on_rows: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """``search_largest`` for each model and the twin: batch-1 inference forwards (autocast ``dtype``, the input
    already in ``dtype``) on a model built once at its default size with ``dynamic_img_size``."""
    import visionlin

    device = torch.device(device)
    rows: list[dict] = []
    for e in _specs(models, backends, twin):

        def build(e: _Entry = e) -> None:
            model = _create(e.model, device).eval()
            if not e.twin and e.backend is not None:  # (a fresh model makes the automatic choice)
                visionlin.set_backend(model, e.backend)
            e.module, e.own_bytes = model, _nbytes([*model.parameters(), *model.buffers()])

        _guard(e, device, build)
        row = {"model": e.label, "entrypoint": e.model, "backend": "twin" if e.twin else (e.backend or "auto")}
        if e.status == "ok":
            model = e.module

            def run_at(side: int, model: nn.Module = model, e: _Entry = e) -> float | None:
                _sync(device)
                if device.type == "cuda":
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                with torch.inference_mode(), torch.autocast(device.type, dtype=dtype):
                    x = torch.randn(1, 3, side, side, device=device, dtype=dtype)
                    model(x)
                    del x
                _sync(device)
                if device.type != "cuda":
                    return None
                return (e.own_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**20

            try:
                found = search_largest(
                    run_at, start=start, max_size=max_size, time_cap=time_cap, free=lambda: _free(device)
                )
                row.update(status="ok" if found["largest_px"] else "oom", **found)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # anything but out-of-memory: recorded, the next model runs
                row.update(status="error", error=_short(err))
        else:
            row.update(status=e.status, error=e.error)
        e.module = None
        _free(device)
        rows.append(row)
        if row["status"] == "ok":
            error = f"; at {row['first_error_px']} px: {row['error']}" if row["error"] else ""
            print(
                f"{row['model']:24s} largest {row['largest_px']} px ({row['tokens']} tokens), limited by "
                f"{row['limited_by']}, first OOM {row['first_oom_px']}, peak {row['peak_mib']} MiB, "
                f"{row['search_s']:.0f} s{error}",
                flush=True,
            )
        else:
            print(f"{row['model']:24s} {row['status'].upper()} {row.get('error') or ''}", flush=True)
        if on_rows:
            on_rows(rows)
    twin_row = next((r for r in rows if r["backend"] == "twin" and r.get("largest_px")), None)
    for r in rows:
        if twin_row and r.get("largest_px"):
            r["side_ratio_vs_twin"] = r["largest_px"] / twin_row["largest_px"]
    return rows


# Results --------------------------------------------------------------------------------------------------------------
def write_json(path: Path, doc: dict, *, partial: bool = False, indent: int = 1, allow_nan: bool = True) -> None:
    """Write ``doc`` to ``path`` atomically (a run killed mid-write leaves the previous file whole). ``partial``: the
    rows so far of a running benchmark, saved so that a run cut short keeps them: the file says ``"partial": true``;
    a complete write drops the key. ``allow_nan=False`` raises on a NaN or infinity instead of writing one."""
    doc = {**doc, "partial": True} if partial else {k: v for k, v in doc.items() if k != "partial"}
    text = json.dumps(doc, indent=indent, allow_nan=allow_nan) + "\n"
    atomic_write(Path(path), lambda p: p.write_text(text))


def write_result(
    result: dict,
    out: Path,
    stem: str,
    *,
    plot: bool | Callable[[dict, Path], None] = True,
    partial: bool = False,
) -> list[str]:
    """Write ``<stem>.json`` and (with matplotlib, ``plot``) ``<stem>.png`` drawn from it; one line per outcome.
    ``plot`` may be the drawing function itself (``plot(result, png_path)``; default :func:`plot_result`). A
    ``<stem>.png`` that is not drawn anew (``plot=False``, nothing measured, no matplotlib, the drawing failed) is
    removed: it was drawn from an earlier result, and the folder never pairs a JSON with another run's PNG.
    ``partial``: the rows so far of a running benchmark (saved so that a run cut short keeps them): the JSON says so
    (``"partial": true``) and no PNG is drawn; the run's last, complete write has no such key."""
    notes = []
    path = out / f"{stem}.json"
    png = out / f"{stem}.png"
    write_json(path, result, partial=partial, allow_nan=False)
    notes.append(f"wrote {path}" + (" (partial: the rows so far)" if partial else ""))
    if not plot or partial:
        return [*notes, *remove_stale(png)]
    if not any(r.get("status", "ok") == "ok" for r in result["rows"]):
        return [*notes, f"{stem}.png skipped: nothing was measured", *remove_stale(png)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        skipped = f"{stem}.png skipped: matplotlib is not installed; install it with {INSTALL_PLOT}"
        return [*notes, skipped, *remove_stale(png)]
    draw = plot if callable(plot) else plot_result
    draw_or_remove(png, lambda p: draw(json.loads(path.read_text()), p))
    return [*notes, f"wrote {png}"]


#: what ``plot_result`` reads of each benchmark: (keys of every row, keys of a measured row, keys of ``meta``)
PLOT_NEEDS = {
    "models": (
        ("model", "backend", "mode", "size", "batch", "status"),
        ("img_s", "peak_mib", "ratio_vs_twin"),
        ("gpu", "torch", "triton", "commit", "date"),
    ),
    "train": (("model", "mode", "size", "batch", "status"), (), ("gpu", "torch", "triton", "commit", "date")),
    "largest": (
        ("model", "backend", "status"),
        ("largest_px", "tokens", "limited_by"),
        ("gpu", "torch", "triton", "commit", "date"),
    ),
    "op": (("case",), (), ("gpu", "torch", "triton", "commit", "copy_bandwidth_GBs")),
}


def _plot_problem(result: dict) -> str | None:
    """Why ``plot_result`` cannot draw ``result`` (a benchmark's JSON, loaded), or ``None``."""
    kind, rows, meta = result["benchmark"], result["rows"], result.get("meta")
    every, measured, meta_keys = PLOT_NEEDS[kind]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        return "has 'rows' that are not a list of objects"
    if not rows:
        return "has no rows: nothing to plot"
    for i, row in enumerate(rows):
        missing = [k for k in every if k not in row]
        if not missing and row.get("status", "ok") == "ok":
            missing = [k for k in measured if k not in row]
        if missing:
            also = f"; a measured one (status 'ok') also {', '.join(measured)}" if measured else ""
            return f"has no {', '.join(map(repr, missing))} in row {i} (a {kind} row needs {', '.join(every)}{also})"
    if not any(r.get("status", "ok") == "ok" for r in rows):
        statuses = ", ".join(sorted({str(r.get("status")) for r in rows}))
        return f"has no measured row (status 'ok'; its rows are {statuses}): nothing to plot"
    if not isinstance(meta, dict):
        return "has no 'meta' object (the plot's title comes from it)"
    if kind != "op" and not meta.get("gpu"):
        meta_keys = (*meta_keys, "cpu")  # the title names the CPU when there is no GPU
    if missing := [k for k in meta_keys if k not in meta]:
        return f"has no {', '.join(map(repr, missing))} in its 'meta'"
    return None


def _title(result: dict) -> str:
    m = result["meta"]
    commit = m["commit"][:10] if re.fullmatch(r"[0-9a-f]{7,40}", m["commit"]) else m["commit"]
    return f"{m['gpu'] or m['cpu']} | torch {m['torch']} | triton {m['triton']} | {commit} | {m['date']}"


def plot_result(result: dict, path: Path) -> None:
    """Draw ``result`` (as loaded from its JSON) to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kind = result["benchmark"]
    if kind == "op":
        from .bench_op import plot as plot_op

        return plot_op(result, path)
    draw = {"models": _plot_models, "train": _plot_train, "largest": _plot_largest}[kind]
    fig = draw(plt, result)
    fig.suptitle(_title(result), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_models(plt: Any, result: dict) -> Any:
    rows = result["rows"]
    modes = [m for m in MODES if any(r["mode"] == m and r["status"] == "ok" for r in rows)]
    fig, axes = plt.subplots(len(modes), 3, figsize=(17, 4.6 * len(modes)), squeeze=False)
    for axrow, mode in zip(axes, modes, strict=True):
        sub = [r for r in rows if r["mode"] == mode]
        for name in dict.fromkeys(r["model"] for r in sub):
            pts = sorted((r for r in sub if r["model"] == name and r["status"] == "ok"), key=lambda r: r["size"])
            bad = sorted({f"{r['status']} {r['size']}" for r in sub if r["model"] == name and r["status"] != "ok"})
            is_twin = any(r["backend"] == "twin" for r in sub if r["model"] == name)
            style = {"ls": "--", "color": "k"} if is_twin else {}
            label = name + (f" ({', '.join(bad)})" if bad else "")
            xs = [r["size"] for r in pts]
            axrow[0].plot(xs, [r["img_s"] for r in pts], marker="o", label=label, **style)
            if pts and all(r["peak_mib"] for r in pts):  # no peaks off CUDA
                axrow[1].plot(xs, [r["peak_mib"] for r in pts], marker="o", **style)
            if not is_twin:
                rp = [r for r in pts if r["ratio_vs_twin"]]
                axrow[2].plot([r["size"] for r in rp], [r["ratio_vs_twin"] for r in rp], marker="o", label=name)
        axrow[2].axhline(1.0, color="k", ls="--", lw=1)
        batches = ", ".join(f"{r['size']}:{r['batch']}" for r in {r["size"]: r for r in sub}.values())
        sizes = sorted({r["size"] for r in sub})
        if not any(r.get("peak_mib") for r in sub):
            axrow[1].text(0.5, 0.5, "no peak memory off CUDA", ha="center", transform=axrow[1].transAxes)
        for ax, ylabel in zip(axrow, ("img/s", "peak memory (MiB)", "img/s relative to the twin"), strict=True):
            ax.set_xlim(min(sizes) / 1.25, max(sizes) * 1.25)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.minorticks_off()
            if ylabel != "img/s relative to the twin" and ax.has_data():
                ax.set_yscale("log")
            ax.set_xlabel("input side (px)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{mode}, bf16 inference (batch per size {batches})", fontsize=8)
        axrow[0].legend(fontsize=6)
    return fig


def _plot_train(plt: Any, result: dict) -> Any:
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    names = list(dict.fromkeys(r["model"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        cells = {r["model"]: r for r in rows if r["mode"] == mode}
        xs = [i + (j - (len(modes) - 1) / 2) * width for i in range(len(names))]
        for ax, key in zip(axes, ("img_s", "peak_mib"), strict=True):
            vals = [(cells.get(n) or {}).get(key) or 0.0 for n in names]
            bars = ax.bar(xs, vals, width, label=mode)
            if key == "img_s":
                for b, n in zip(bars, names, strict=True):
                    c = cells.get(n) or {}
                    text = f"{c['ratio_vs_twin']:.2f}x" if c.get("ratio_vs_twin") else c.get("status", "")
                    ax.annotate(text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", fontsize=7)
    if not any(r.get("peak_mib") for r in rows):
        axes[1].text(0.5, 0.5, "no peak memory off CUDA", ha="center", transform=axes[1].transAxes)
    r0 = rows[0]
    for ax, ylabel in zip(axes, ("training img/s (fwd + bwd + AdamW)", "peak memory (MiB)"), strict=True):
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{r0['size']} px, batch {r0['batch']}, bf16 autocast; labels: x the twin", fontsize=8)
        ax.legend(fontsize=7)
    return fig


def _plot_largest(plt: Any, result: dict) -> Any:
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 2))
    names = [r["model"] for r in rows]
    vals = [r.get("largest_px") or 0 for r in rows]
    bars = ax.barh(range(len(rows)), vals, color=["k" if r["backend"] == "twin" else "C0" for r in rows])
    for b, r in zip(bars, rows, strict=True):
        if r.get("largest_px"):
            peak = f", peak {r['peak_mib'] / 1024:.1f} GiB" if r.get("peak_mib") else ""
            ratio = (
                f"; {r['side_ratio_vs_twin']:.2f}x the twin's side"
                if r["backend"] != "twin" and r.get("side_ratio_vs_twin")
                else ""
            )
            text = f" {r['largest_px']} px ({r['tokens']:,} tokens{peak}; limit: {r['limited_by']}{ratio})"
        else:
            text = f" {r['status']}"
        ax.annotate(text, (b.get_width(), b.get_y() + b.get_height() / 2), va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    ax.set_xscale("log", base=2)
    if any(vals):
        ax.set_xlim(min(v for v in vals if v) / 2, max(vals) * 16)  # room for the labels
    ax.set_xlabel("largest square input side at batch 1 (px), bf16 inference")
    return fig


# Command line ---------------------------------------------------------------------------------------------------------
def _items(text: str, what: str) -> list[str]:
    from .scaling import _items as items

    return items(text, what)


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _positive_float(text: str) -> float:
    return checked(float, text, lambda v: 0 < v < math.inf, "a positive number of seconds")


def _stem(text: str) -> str:
    """A ``--name``: the file stem of the result in ``--out`` (``<name>.json``, ``<name>.png``)."""
    why = None
    if not text.strip():
        why = "is empty"
    elif "/" in text or "\\" in text:
        why = "is a path (the folder is --out)"
    elif text.startswith((".", "-")):
        why = f"starts with {text[0]!r}"
    elif text.lower().endswith((".json", ".png")):
        why = "ends with a file suffix (.json and .png are added)"
    elif len(text) > MAX_NAME:
        why = f"is longer than {MAX_NAME} characters"
    elif bad := sorted(set(re.sub(r"[A-Za-z0-9_.+-]", "", text))):
        why = f"has {', '.join(map(repr, bad))}"
    if why:  # (an empty name wrote a hidden '.json' after the run, 'a/b' failed then, '../x' wrote outside --out)
        raise argparse.ArgumentTypeError(
            f"{text!r} {why}; give a plain file stem: letters, digits, '_', '-', '+' and '.', not starting with '.' "
            "or '-', e.g. bench_models_h200"
        )
    return text


def _size(text: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()) or int(text) == 0 or int(text) % PATCH:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive multiple of {PATCH}; sizes are input sides in pixels, multiples of the "
            f"patch size {PATCH}, e.g. 224,512"
        )
    return int(text)


def _sizes(text: str) -> list[int]:
    sizes = [_size(s) for s in _items(text, "size")]
    if len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"a size is given more than once in {text!r}")
    return sizes


def _batches(text: str) -> dict[int, int]:
    out = {}
    for item in _items(text, "SIZE=BATCH pair"):
        size, sep, batch = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{item!r} is not SIZE=BATCH (e.g. 224=256,1024=16)")
        b = _positive_int(batch)
        if b > MAX_BATCH:
            raise argparse.ArgumentTypeError(f"batch {b} in {item!r} is larger than {MAX_BATCH}")
        out[_size(size)] = b
    return out


def _modes(text: str) -> list[str]:
    modes = _items(text, "mode")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
    return modes


def _add_modes(p: argparse.ArgumentParser, default: list[str]) -> None:
    p.add_argument(
        "--modes",
        type=_modes,
        default=default,
        help="eager, compiled (torch.compile), cudagraphs (torch.compile mode='reduce-overhead'), comma-separated "
        f"(default: {','.join(default)})",
    )


def _add_common(p: argparse.ArgumentParser, name: str, *, cpu_ok: bool) -> None:
    p.add_argument(
        "--models",
        type=lambda t: _items(t, "model"),
        default=None,
        metavar="A,B,...",
        help="visionlin models (`visionlin list`; default: every registered *_small model, one per family)",
    )
    p.add_argument("--twin", default=TWIN, help=f"the dense timm model measured next to them (default: {TWIN})")
    p.add_argument(
        "--backends",
        type=lambda t: _items(t, "backend"),
        default=["auto"],
        metavar="B,...",
        help="kernel backends to measure each model with, e.g. torch,triton (default: auto, the automatic choice)",
    )
    p.add_argument(
        "--device",
        default="cuda",
        help="cuda or cuda:N" + (" (cpu runs, for smoke tests only)" if cpu_ok else "") + " (default: cuda)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="folder for the JSON and PNG (default: benchmarks/results/<gpu>)"
    )
    p.add_argument(
        "--name", type=_stem, default=f"bench_{name}", help=f"file stem of the JSON and PNG (default: bench_{name})"
    )
    p.add_argument("--commit", default=None, help="commit to record (default: the checkout's HEAD)")
    p.add_argument("--quick", action="store_true", help="fewer and shorter measurements (see the defaults)")
    p.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let cuDNN time its convolution algorithms per shape and keep the fastest (torch.backends.cudnn."
        "benchmark), as timm's benchmark.py and train.py do (default: on; off for largest, whose every probe is a "
        "new shape: the algorithm search would run inside the measured call and add its workspaces to the peak)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="add to the existing result in --out (rows of the same model, mode and size are replaced; the earlier "
        "runs' metadata is kept): splits one suite over several calls",
    )


def _add_timing(p: argparse.ArgumentParser, name: str) -> None:
    pre = PRESETS[name]
    p.add_argument(
        "--warmup",
        type=_positive_int,
        default=None,
        help=f"untimed calls first (default {pre['warmup'][0]}, --quick {pre['warmup'][1]})",
    )
    p.add_argument(
        "--iters",
        type=_positive_int,
        default=None,
        help="most timed calls per model per sweep "
        f"(default {pre['iters'][0]}, --quick {pre['iters'][1]}); fewer once --min-time is reached",
    )
    p.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help=f"sweeps in alternating order, median reported (default {pre['repeats'][0]}, --quick {pre['repeats'][1]})",
    )
    p.add_argument(
        "--min-time",
        type=_positive_float,
        default=None,
        help="seconds of timed calls per model per sweep to aim "
        f"for (default {pre['min_time'][0]}, --quick {pre['min_time'][1]})",
    )
    p.add_argument(
        "--time-budget",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="after this many seconds the remaining blocks are recorded as skipped (default: none)",
    )


def add_subcommands(parser: argparse.ArgumentParser, handler: Callable | None = None) -> argparse.ArgumentParser:
    """Add ``models``, ``train``, ``largest``, ``op`` and ``plot`` subcommands to ``parser``. Each sets ``fn``
    (``handler`` if given, else ``execute``) and ``parser``; ``fn(args, parser, argv)`` returns the exit status."""
    from . import bench_op

    fn = handler or execute
    sub = parser.add_subparsers(dest="what", required=True, metavar="{models,train,largest,op,plot}")
    p = sub.add_parser(
        "models",
        help="inference img/s and peak memory vs input size, eager and compiled, next to the twin",
        description="Inference img/s and peak memory of visionlin models next to a dense twin at several input "
        "sizes, eager and torch.compile-d, bf16 autocast; an out-of-memory is recorded as 'oom'.",
    )
    _add_common(p, "models", cpu_ok=True)
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_BATCHES),
        metavar="S,...",
        help=f"input sides, multiples of {PATCH} (default: {','.join(map(str, DEFAULT_BATCHES))})",
    )
    p.add_argument(
        "--batch-sizes",
        type=_batches,
        default={},
        metavar="S=B,...",
        help="batch per size, overriding the defaults "
        + ",".join(f"{s}={b}" for s, b in DEFAULT_BATCHES.items())
        + " (other sizes: 256 images' worth of 224 px tokens)",
    )
    _add_modes(p, ["eager", "compiled"])
    p.add_argument(
        "--build-size",
        choices=BUILD_SIZES,
        default="input",
        help="input: each model built for the input size (grid-sized tables are parameters of that size); default: "
        "built at its default size, larger inputs through dynamic_img_size (tables resampled per forward; FLatten's "
        "per-block positional encodings are 1.2 GB of parameters when built for 4096 px) (default: input)",
    )
    p.add_argument(
        "--compile-sizes",
        type=_sizes,
        default=None,
        metavar="S,...",
        help="sizes measured compiled (default: every size; --quick: 224,1024)",
    )
    _add_timing(p, "models")
    p.set_defaults(fn=fn, parser=p)

    p = sub.add_parser(
        "train",
        help="training-step img/s (fwd + bwd + AdamW, bf16 autocast) next to the twin",
        description="Training-step img/s (forward, backward, AdamW step, bf16 autocast) and peak memory of visionlin "
        "models next to a dense twin.",
    )
    _add_common(p, "train", cpu_ok=True)
    p.add_argument("--size", type=_size, default=TRAIN_SIZE, help=f"input side (default: {TRAIN_SIZE})")
    p.add_argument("--batch", type=_positive_int, default=TRAIN_BATCH, help=f"batch (default: {TRAIN_BATCH})")
    _add_modes(p, ["eager"])
    _add_timing(p, "train")
    p.set_defaults(fn=fn, parser=p)

    p = sub.add_parser(
        "largest",
        help="largest square input at batch 1 (inference) for each model and the twin",
        description="The largest square input (a multiple of 16 px) each model and the twin run at batch 1 for bf16 "
        "inference: doubling, then bisection on out-of-memory, within a time cap per model.",
    )
    _add_common(p, "largest", cpu_ok=False)
    p.add_argument("--start", type=_size, default=LARGEST_START, help=f"first side tried (default: {LARGEST_START})")
    p.add_argument("--max-size", type=_size, default=LARGEST_MAX, help=f"largest side tried (default: {LARGEST_MAX})")
    pre = PRESETS["largest"]["time_cap"]
    p.add_argument(
        "--time-cap",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help=f"search time per model (default {pre[0]:g}, --quick {pre[1]:g}); a probe predicted to end past it is "
        "not started",
    )
    p.set_defaults(fn=fn, parser=p)

    p = sub.add_parser(
        "op",
        help="linear-attention op: Triton vs torch backend vs flash SDPA",
        description=(bench_op.__doc__ or "").split("\n\n")[0],
    )
    bench_op.add_arguments(p)
    p.set_defaults(fn=fn, parser=p)

    p = sub.add_parser(
        "plot",
        help="redraw a result's PNG from its JSON",
        description="Redraw the PNG next to a result JSON written by `visionlin bench`.",
    )
    p.add_argument("json", help="a JSON written by visionlin bench (the PNG goes next to it)")
    p.set_defaults(fn=fn, parser=p)
    return parser


def _check_device(parser: argparse.ArgumentParser, text: str, *, cpu_ok: bool) -> torch.device:
    why_cpu = "" if cpu_ok else " (this benchmark needs a GPU)"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        parser.error(f"argument --device: {text!r} is not a torch device; use 'cuda' or 'cuda:N'{why_cpu}")
    if device.type == "cpu" and cpu_ok:
        return device
    if device.type != "cuda":
        parser.error(
            f"argument --device: {text!r} is not measured; use 'cuda' or 'cuda:N'"
            + (", or 'cpu' for a smoke test" if cpu_ok else why_cpu)
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        why = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        parser.error(
            f"argument --device: {text!r} is not available on this machine ({why}); visionlin bench measures on a "
            "CUDA GPU" + (" (--device cpu runs a smoke test)" if cpu_ok else "")
        )
    if device.index is not None and device.index >= count:
        parser.error(f"argument --device: {text!r} does not exist; this machine has cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _check_out(parser: argparse.ArgumentParser, text: str | None, device: torch.device, stem: str) -> Path:
    if text is None:
        slug = device_slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
        text = str(Path("benchmarks") / "results" / slug)
    if not text.strip():
        parser.error(f"argument --out: {text!r} is not a folder name")
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".visionlin-write-check-"):
            pass
    except OSError as e:
        parser.error(f"argument --out: cannot write to folder {str(out)!r} ({e.strerror or e})")
    for suffix in (".json", ".png", f"{PARTIAL}.json"):
        if (out / f"{stem}{suffix}").is_dir():
            parser.error(f"argument --out: {str(out / (stem + suffix))!r} is a folder; the result is written there")
    return out


def _check_models(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    import timm

    import visionlin

    valid = visionlin.list_models()
    if args.models is None:
        args.models = default_models()
    for name in args.models:
        if name not in valid:
            close = difflib.get_close_matches(name.lower(), valid, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            parser.error(f"argument --models: unknown model {name!r}{hint}; valid models: {', '.join(valid)}")
    if args.twin not in timm.list_models():
        close = difflib.get_close_matches(args.twin.lower(), timm.list_models(), n=3, cutoff=0.7)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parser.error(f"argument --twin: {args.twin!r} is not a timm model{hint}; default: {TWIN}")
    from .scaling import _patch_size

    twin_patch = _patch_size(args.twin)
    if PATCH % twin_patch:  # patch 16 (ViT twins) or a divisor of it (hierarchical: Swin's 4)
        parser.error(
            f"argument --twin: {args.twin!r} has patch size {twin_patch}; the twin needs {PATCH} or a divisor of it"
        )
    known = sorted({b for backends in visionlin.kernels.list_ops().values() for b in backends} | {"auto"})
    for b in args.backends:
        if b not in known:
            parser.error(f"argument --backends: unknown backend {b!r}; choose from {', '.join(known)}")
    args.backends = [None if b == "auto" else b for b in args.backends]
    for name in args.models if any(args.backends) else ():  # each model's mixers must have each backend
        model = timm.create_model(name, device="meta")
        for b in filter(None, args.backends):
            try:
                visionlin.set_backend(model, b)
            except ValueError as e:  # (was accepted, and each row failed at its first forward)
                parser.error(f"argument --backends: {b!r} cannot run {name}: {e}")


def _settings(args: argparse.Namespace, what: str) -> None:
    for key, (full, quick) in PRESETS[what].items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check every flag of ``args.what`` before anything is built; a bad value exits via ``parser.error`` (status 2).
    Fills in the defaults that depend on others (``--quick``, the models, the output folder)."""
    what = args.what
    if what == "plot":
        path = Path(args.json)
        if not path.is_file():
            parser.error(f"argument json: {args.json!r} is not a file")
        try:
            result = json.loads(path.read_text())
            assert result["benchmark"] in ("models", "train", "largest", "op") and "rows" in result
        except (OSError, ValueError, KeyError, TypeError, AssertionError):
            parser.error(f"argument json: {args.json!r} is not a result written by visionlin bench")
        if problem := _plot_problem(result):  # (was a KeyError or matplotlib's ValueError traceback)
            parser.error(f"argument json: {args.json!r} {problem}")
        return
    if what == "op":
        args.device = _check_device(parser, args.device, cpu_ok=False)
        args.out = _check_out(parser, args.out, args.device, args.name)
        return
    _check_models(parser, args)
    _settings(args, what)
    if args.cudnn_benchmark is None:
        args.cudnn_benchmark = what != "largest"
    args.device = _check_device(parser, args.device, cpu_ok=what != "largest")
    if what == "models":
        from .scaling import _stride

        for name in args.models:  # (only multiples of 16 were checked: a four-stage model failed each row at 240)
            stride = _stride(name)
            if bad := [s for s in args.sizes if s % stride]:
                parser.error(
                    f"argument --sizes: {bad[0]} is not a multiple of {name}'s total stride {stride} (the side every "
                    "input must be a multiple of)"
                )
        bad = [s for s in args.batch_sizes if s not in args.sizes]
        if bad:
            parser.error(f"argument --batch-sizes: {bad[0]} is not one of --sizes {','.join(map(str, args.sizes))}")
        compiled = [m for m in args.modes if m in COMPILE_MODES]
        if args.compile_sizes is None:
            args.compile_sizes = [s for s in args.sizes if s in QUICK_COMPILE_SIZES] if args.quick else args.sizes
            dropped = [s for s in args.sizes if s not in args.compile_sizes]
            if compiled and dropped:  # (a 4096 px compile takes minutes: --quick leaves it out unless asked)
                what = "nothing" if not args.compile_sizes else "only " + ",".join(map(str, args.compile_sizes))
                note = f"--quick compiles {what} of --sizes; not compiled: {','.join(map(str, dropped))}"
                if len(compiled) == len(args.modes) and not args.compile_sizes:
                    parser.error(f"{note}, and --modes {','.join(args.modes)} has no eager mode: nothing to measure "
                                 "(--compile-sizes chooses the compiled sizes)")  # fmt: skip
                print(f"note: {note} (--compile-sizes chooses)", file=sys.stderr)
        bad = [s for s in args.compile_sizes if s not in args.sizes]
        if bad:
            parser.error(f"argument --compile-sizes: {bad[0]} is not one of --sizes {','.join(map(str, args.sizes))}")
    if what == "largest" and args.max_size < args.start:
        parser.error(f"argument --max-size: {args.max_size} is below --start {args.start}")
    args.out = _check_out(parser, args.out, args.device, args.name)
    args.previous = None
    path = args.out / f"{args.name}.json"
    if args.append and path.exists():
        try:
            previous = json.loads(path.read_text())
            ok = previous["benchmark"] == what and isinstance(previous["rows"], list) and "meta" in previous
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            parser.error(f"argument --append: {str(path)!r} is not a {what!r} result written by visionlin bench")
        args.previous = previous


def _row_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in ("model", "backend", "mode", "size"))


def _config(args: argparse.Namespace) -> dict:
    skip = {"fn", "parser", "out", "commit", "name", "command", "what", "previous", "append"}
    config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items() if k not in skip}
    if "backends" in config:
        config["backends"] = [b or "auto" for b in config["backends"]]
    return config


def execute(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str]) -> int:
    """Run the benchmark ``args.what`` (parsed by ``add_subcommands``'s parser) and write its result; exit status:
    0, 1 when a model failed with an error other than out-of-memory, 2 for a bad flag, 130 when interrupted."""
    validate(parser, args)
    command = shlex.join(["visionlin", "bench", *argv] if argv[:1] != ["bench"] else ["visionlin", *argv])
    if args.what == "plot":
        path = Path(args.json)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"error: the PNG needs matplotlib; install it with {INSTALL_PLOT}", file=sys.stderr)
            return 1
        png = path.with_suffix(".png")
        try:
            atomic_write(png, lambda p: plot_result(json.loads(path.read_text()), p))
        except (KeyError, TypeError, ValueError) as e:  # a value of the wrong type (the keys were checked)
            print(f"error: cannot draw {png} from {path} ({_short(e)}); nothing written", file=sys.stderr)
            return 1
        print(f"wrote {png}")
        return 0
    if args.what == "op":
        from . import bench_op

        return bench_op.execute(args, command)
    meta = run_meta(command, args.device, args.commit)
    config = _config(args)
    result = {"benchmark": args.what, "meta": meta, "config": config, "rows": []}
    kept: list[dict] = []
    if args.previous is not None:  # --append: the earlier runs' rows stay unless this run measures them again
        prev = args.previous
        meta["earlier_runs"] = [
            *prev["meta"].pop("earlier_runs", []),
            {**prev["meta"], "config": prev.get("config")},
        ]
        kept = prev["rows"]

    path, partial = args.out / f"{args.name}.json", args.out / f"{args.name}{PARTIAL}.json"
    wrote_partial = False

    def save(rows: list[dict], final: bool = False) -> list[str]:
        nonlocal wrote_partial
        new = {_row_key(r) for r in rows}
        result["rows"] = [r for r in kept if _row_key(r) not in new] + rows
        if not final:  # the previous result (its JSON and PNG) stays whole until this run ends
            wrote_partial = True
            return write_result(result, args.out, f"{args.name}{PARTIAL}", plot=False)
        notes = write_result(result, args.out, args.name)
        if wrote_partial:
            partial.unlink(missing_ok=True)
        return notes

    common = dict(twin=args.twin, backends=args.backends, device=args.device, on_rows=save)
    timing = {}
    if args.what != "largest":
        timing = dict(
            warmup=args.warmup,
            iters=args.iters,
            repeats=args.repeats,
            min_time=args.min_time,
            time_budget=args.time_budget,
        )
    print(
        f"visionlin bench {args.what}: {', '.join(args.models)} and {args.twin} on {meta['gpu'] or meta['cpu']}; "
        f"results go to {args.out}",
        flush=True,
    )
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    try:
        if args.what == "models":
            rows = bench_models(
                args.models,
                sizes=args.sizes,
                batches=args.batch_sizes,
                modes=args.modes,
                compile_sizes=args.compile_sizes,
                build_size=args.build_size,
                **common,
                **timing,
            )
        elif args.what == "train":
            rows = bench_train(args.models, size=args.size, batch=args.batch, modes=args.modes, **common, **timing)
        else:
            rows = bench_largest(
                args.models, start=args.start, max_size=args.max_size, time_cap=args.time_cap, **common
            )
    except KeyboardInterrupt:
        unchanged = f"; {path} is unchanged" if path.exists() else ""
        if wrote_partial:
            print(f"interrupted; the rows measured so far are in {partial}{unchanged}", file=sys.stderr)
        else:  # (said the rows were in <name>.json, which held the previous run)
            print(f"interrupted before the first block was measured; nothing written{unchanged}", file=sys.stderr)
        return 130
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        notes = save(rows, final=True)
    except OSError as e:
        print(f"error: could not write the results to {str(args.out)!r}: {e}", file=sys.stderr)
        return 1
    print("\n".join(notes))
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        print(
            f"error: {len(errors)} measurement(s) failed: "
            + "; ".join(
                f"{r['model']}{' at ' + str(r['size']) + ' px' if 'size' in r else ''}: {r['error']}" for r in errors
            ),
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m visionlin.train.bench") -> int:
    """Entry point with the ``visionlin bench`` subcommands; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = add_subcommands(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])).parse_args(argv)
    return args.fn(args, args.parser, argv)


if __name__ == "__main__":
    sys.exit(main())
