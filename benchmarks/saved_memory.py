"""Where a training step's activation memory goes: the tensors autograd keeps for the backward, by the module that
saved them, next to the step's peak memory, for our models and their dense twin.

Each tensor saved for the backward (saved-tensor hooks that only look, ``visionlin.layers._recompute.observe_saved``:
the ATen ops' saved inputs and outputs and what our custom autograd functions ``save_for_backward``, but not what a
layer has recomputed in the backward instead) is counted once per storage, in the storage's
bytes (a view keeps its whole storage alive), attributed to the innermost module running when it was saved, and
classed as a parameter (the weights themselves: not activation memory), a cast of a parameter (autocast's half
precision copy of a weight, kept for the weight's gradient) or an activation. Peak memory is
``torch.cuda.max_memory_allocated`` over one forward + backward (after ``--warmup`` unmeasured ones) above what was
allocated before it (the weights; their gradients, allocated by the backward, are included; no optimizer is built).

Usage:
    python benchmarks/saved_memory.py --out benchmarks/results/h200 [--models agent_deit_small,...] [--batch 128]

Writes ``saved_memory.json`` (meta: command, commit, date, device, versions) and prints a table per model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

import visionlin  # noqa: E402, F401  (registers the models)
from benchmarks._meta import gpu_meta  # noqa: E402
from visionlin.layers._recompute import observe_saved  # noqa: E402
from visionlin.train.bench import _create  # noqa: E402

MODELS = "deit_small_patch16_224,agent_deit_small,flatten_deit_small,infvit_small"


@contextlib.contextmanager
def _module_stack() -> list[str]:
    """A list holding, while the context is open, the qualified class names of the modules whose forward runs."""
    stack: list[str] = []
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, a: stack.append(type(m).__name__))
    post = nn.modules.module.register_module_forward_hook(lambda m, a, o: stack.pop() and None)
    try:
        yield stack
    finally:
        pre.remove()
        post.remove()


def saved_breakdown(model: nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> dict:
    """One training forward + backward of ``model`` on ``x`` (autocast to ``dtype`` when given): the saved tensors'
    bytes by kind and by module class, and the step's peak memory (CUDA only)."""
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    seen: set[int] = set()
    by_kind: dict[str, int] = defaultdict(int)
    by_module: dict[str, int] = defaultdict(int)
    by_dtype: dict[str, int] = defaultdict(int)
    by_shape: dict[tuple, list[int]] = defaultdict(lambda: [0, 0])  # (module, shape, dtype) -> [count, bytes]
    count = 0

    with _module_stack() as stack:

        def look(t: torch.Tensor) -> None:
            nonlocal count
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in seen or storage.nbytes() == 0:
                return
            seen.add(ptr)
            count += 1
            if ptr in params:
                kind = "parameter"
            elif tuple(t.shape) in shapes and t.numel() == storage.nbytes() // t.element_size() and t.ndim <= 2:
                kind = "parameter cast"
            else:
                kind = "activation"
            by_kind[kind] += storage.nbytes()
            if kind == "activation":
                module = stack[-1] if stack else "(top level)"
                by_module[module] += storage.nbytes()
                by_dtype[str(t.dtype).replace("torch.", "")] += storage.nbytes()
                entry = by_shape[(module, tuple(t.shape), str(t.dtype).replace("torch.", ""))]
                entry[0] += 1
                entry[1] += storage.nbytes()

        cuda = x.device.type == "cuda"
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        autocast = torch.autocast(x.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with observe_saved(look), autocast:
            out = model(x)
            loss = out.float().logsumexp(-1).mean()
        loss.backward()
        peak = None
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
    mib = 2.0**20
    return {
        "saved_tensors": count,
        "saved_mib": {k: v / mib for k, v in sorted(by_kind.items())},
        "activation_mib_by_module": {k: v / mib for k, v in sorted(by_module.items(), key=lambda kv: -kv[1])},
        "activation_mib_by_dtype": {k: v / mib for k, v in sorted(by_dtype.items(), key=lambda kv: -kv[1])},
        "largest_activations": [
            {"module": m, "shape": list(shape), "dtype": dt, "count": n, "mib": b / mib}
            for (m, shape, dt), (n, b) in sorted(by_shape.items(), key=lambda kv: -kv[1][1])[:25]
        ],
        "step_peak_mib_above_weights": None if peak is None else peak / mib,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/saved_memory.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for saved_memory.json")
    p.add_argument("--models", default=MODELS, help="comma-separated timm / visionlin model names")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="steps run before the measured one (default 1: a first step also allocates what later steps reuse; "
        "deit_small's first step peaked 65 MiB above its later ones on the H200 at batch 64, ours did not)",
    )
    p.add_argument("--commit", default=None)
    p.add_argument("--name", default="saved_memory", help="JSON file stem")
    args = p.parse_args(argv)
    if args.batch < 1 or args.size < 16 or args.warmup < 0:
        p.error(f"--batch must be >= 1, --size >= 16 and --warmup >= 0, got {args.batch}, {args.size}, {args.warmup}")
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if not timm.is_model(n)]
    if not names or unknown:
        p.error(f"unknown model(s) {unknown or names}; any timm or visionlin model name")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        model = _create(name, device, args.size).train()  # built for the size, as the bench builds it (seed 0)
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        for _ in range(args.warmup):  # kernels compiled, caches and library workspaces allocated before the measure
            saved_breakdown(model, x, dtype)
        r = {"model": name, "batch": args.batch, "size": args.size, "warmup": args.warmup,
             **saved_breakdown(model, x, dtype)}  # fmt: skip
        results.append(r)
        act = r["saved_mib"].get("activation", 0.0)
        peak = r["step_peak_mib_above_weights"]
        print(f"== {name} {args.size}px bs{args.batch}: {r['saved_tensors']} saved tensors, activations {act:.0f} MiB, "
              f"parameter casts {r['saved_mib'].get('parameter cast', 0.0):.0f} MiB"
              + ("" if peak is None else f", step peak {peak:.0f} MiB above the weights"))  # fmt: skip
        for mod, mib in list(r["activation_mib_by_module"].items())[:10]:
            print(f"   {mib:9.1f} MiB  {mod}")
        print("   by dtype: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in r["activation_mib_by_dtype"].items()))
        for e in r["largest_activations"][:12]:
            print(f"   {e['mib']:9.1f} MiB  {e['count']:3d} x {e['dtype']:8s} {e['shape']}  ({e['module']})")
        del model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = gpu_meta(argv, args.commit) if device.type == "cuda" else {"command": argv, "device": "cpu"}
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out / (args.name + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
