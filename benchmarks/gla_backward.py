"""The GLA kernels' walk settings (``visionlin.kernels.triton.gla.TUNING``) side by side in one process: the single
walks against the segmented ones, for the bidirectional op (forward alone and forward + backward, with the peak
memory above the inputs) at ViG's training shapes, and a ViG-S training step (224 px, eager, bf16 autocast, AdamW).

``--packed`` also times the bidirectional op on ViG's packed projections
(:func:`~visionlin.kernels.bidirectional_gated_linear_attention_qkv`: one ``qkv`` and one ``gates`` gradient, the
two directions chained) at each shape and, with the model, the ViG-S step with
``visionlin.layers.gla.FAST_PATHS["qkv_packed"]`` off (the split call, ``(split)``) next to the shipped step (the
packed call since s51).

Usage (on a GPU machine):
    python benchmarks/gla_backward.py --out benchmarks/results/h200 [--commit SHA] [--configs single,bwd16,...]
        [--shapes 128x196x6,1x65536x6] [--no-model] [--packed]

Writes ``gla_backward.json`` (rows: what, shape, config, ms, peak MiB; meta with each config's settings) and
``gla_backward.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish, grouped_bars  # noqa: E402
from benchmarks._timing import add_timing_flags, check_timing_flags, cuda_ms, tuned  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "gla_backward"
EVERY = 10**6  # "programs per SM" no call reaches: always segment
#: Named settings: overrides of ``gla.TUNING`` (the rest as shipped).
CONFIGS: dict[str, dict] = {
    "single": {"bwd_segments": False, "bwd_intra": False, "bwd_fused_dg": False},
    "shipped": {},
    "walks": {"bwd_intra": False, "bwd_fused_dg": False},
    "bwd16": {"bwd_segments": True, "bwd_segment_chunks": 1, "bwd_segment_below": 16, "bwd_segment_target": 16},
    "bwd64": {"bwd_segments": True, "bwd_segment_chunks": 1, "bwd_segment_below": 64, "bwd_segment_target": 64},
    "bwd_every": {
        "bwd_segments": True, "bwd_segment_chunks": 1, "bwd_segment_below": EVERY, "bwd_segment_target": EVERY,
    },
    "bwd4": {"bwd_segments": True, "bwd_segment_chunks": 1, "bwd_segment_below": 1, "bwd_segment_target": 4},
    "bwd4c16": {"bwd_segments": True, "bwd_segment_chunks": 16, "bwd_segment_below": 1, "bwd_segment_target": 4},
    "intra": {"bwd_intra": True, "bwd_fused_dg": False},
    "intra_every": {
        "bwd_intra": True, "bwd_fused_dg": False, "bwd_segments": True, "bwd_segment_chunks": 1,
        "bwd_segment_below": EVERY, "bwd_segment_target": EVERY,
    },
    "fused_dg": {"bwd_intra": False, "bwd_fused_dg": True},
    "intra_fused_dg": {"bwd_intra": True, "bwd_fused_dg": True},
    "every": {
        "bwd_segments": True, "bwd_segment_chunks": 1, "bwd_segment_below": EVERY, "bwd_segment_target": EVERY,
        "segments": True, "segment_chunks": 1, "segment_below": EVERY, "segment_target": EVERY,
    },
}  # fmt: skip
# Launch sweeps, one kernel's warps or pipeline stages changed at a time: "intra_w4", "bwd_kv_s1", ...
for _name in ("fwd", "intra", "bwd_q", "bwd_kv", "dg", "seg"):
    for _w in (2, 4, 8, 16):
        CONFIGS[f"{_name}_w{_w}"] = {"launch": {_name: {"num_warps": _w}}}
    for _s in (1, 2, 3, 4):
        CONFIGS[f"{_name}_s{_s}"] = {"launch": {_name: {"num_stages": _s}}}
# Every walk kernel at 8 warps (the rule before 8a0d0ef at ViG's head dims) or at 4
CONFIGS["w8"] = {"launch": {n: {"num_warps": 8} for n in ("fwd", "intra", "bwd_q", "bwd_kv", "seg")}}
CONFIGS["w4"] = {"launch": {n: {"num_warps": 4} for n in ("fwd", "intra", "bwd_q", "bwd_kv", "seg")}}
# The kernels' tile products for half inputs (shipped: "auto", TF32 tensor-core products for bfloat16) and the chunk
# blocks (shipped: factored [T, K] tiles where the decays allow); "ieee" is the setting shipped before 093ba63's timing
CONFIGS["ieee"] = {"half_dot_precision": "ieee", "intra_factor": False}
CONFIGS["tf32"] = {"half_dot_precision": "tf32", "intra_factor": False}
CONFIGS["tf32x3"] = {"half_dot_precision": "tf32x3", "intra_factor": False}
CONFIGS["factor"] = {"intra_factor": True, "half_dot_precision": "ieee"}
CONFIGS["factor_tf32"] = {"intra_factor": True, "half_dot_precision": "tf32"}
#: (batch, tokens, heads) by default: ViG-S and ViG-T at 224 px, batch 128; ViG-S at 448 px, batch 32.
SHAPES = ((128, 196, 6), (128, 196, 3), (32, 784, 6))


def _timed(fn, configs: list[str], args) -> dict[str, float]:
    """Median ms per call of ``fn`` under each config, the configs' order alternating between repeats."""
    from visionlin.kernels.triton import gla

    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:
            with tuned(gla.TUNING, **CONFIGS[c]):
                times[c].append(cuda_ms(fn, args.warmup, args.iters, 1))
    return {c: sorted(t)[len(t) // 2] for c, t in times.items()}


def _peak(fn, config: str) -> float:
    """MiB allocated at the peak of one call of ``fn`` under ``config``, above what was allocated before it."""
    from visionlin.kernels.triton import gla

    with tuned(gla.TUNING, **CONFIGS[config]):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    labels = list(dict.fromkeys(f"{r['what']} {r['shape']}" for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    ms = {(f"{r['what']} {r['shape']}", r["config"]): r["ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(11, 4))
    grouped_bars(ax, labels, configs, lambda lab, c: ms.get((lab, c), 0.0), label_fmt="%.2f", fontsize=6)
    ax.set_ylabel("ms per call (median)")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=7)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gla_backward.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None)
    configs_help = f"comma-separated, of {', '.join(CONFIGS)}"
    p.add_argument("--configs", default="single,walks,shipped,intra,fused_dg", help=configs_help)
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="BxNxH, comma-separated")
    p.add_argument("--no-model", action="store_true", help="skip the ViG-S training step")
    p.add_argument("--packed", action="store_true", help="also the packed op (and step): see the module docstring")
    add_timing_flags(p, iters=10)
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        p.error(f"--configs: unknown {unknown} (allowed: {', '.join(CONFIGS)})")
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        p.error(f"--shapes must be BxNxH triples of positive integers, comma-separated; got {args.shapes!r}")
    check_timing_flags(p, args)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import timm

    import visionlin  # noqa: F401 (registers the models)
    from visionlin.kernels import bidirectional_gated_linear_attention, bidirectional_gated_linear_attention_qkv
    from visionlin.layers import gla as gla_layer
    from visionlin.train.bench import train_step

    rows: list[dict] = []

    def record(what: str, shape: str, fn, peak_of=None) -> None:
        try:
            ms = _timed(fn, configs, args)
            for c in configs:
                row = {"what": what, "shape": shape, "config": c, "ms": ms[c], "status": "ok"}
                if peak_of is not None:
                    row["peak_mib"] = _peak(peak_of, c)
                row["vs_single"] = ms["single"] / ms[c] if "single" in ms else None
                rows.append(row)
                print(row, flush=True)
        except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
            rows.append({"what": what, "shape": shape, "status": "error", "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)

    for b, n, h in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, gf, gb = (torch.randn(b, n, h, 32, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
        v = torch.randn(b, n, h, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
        gf, gb = (torch.nn.functional.logsigmoid(t.float()).div(16).to(t.dtype) for t in (gf, gb))
        leaves = [t.requires_grad_() for t in (q, k, v, gf, gb)]
        do = torch.randn_like(v)

        def fwd(leaves=leaves):
            with torch.no_grad():
                bidirectional_gated_linear_attention(*leaves, backend="triton")

        def fwd_bwd(leaves=leaves, do=do):
            out = bidirectional_gated_linear_attention(*leaves, backend="triton")
            torch.autograd.grad(out, leaves, do)

        shape = f"B{b} N{n} H{h} K32 V64"
        record("op forward", shape, fwd)
        record("op forward+backward", shape, fwd_bwd, peak_of=fwd_bwd)
        if args.packed:  # the same values packed as ViG's projections make them
            qkv = torch.cat([t.detach().flatten(2) for t in (q, k, v)], -1).requires_grad_()
            gates = torch.cat([t.detach().flatten(2) for t in (gf, gb)], -1).requires_grad_()

            def packed_fwd(qkv=qkv, gates=gates, h=h):
                with torch.no_grad():
                    bidirectional_gated_linear_attention_qkv(qkv, gates, h, backend="triton")

            def packed_fwd_bwd(qkv=qkv, gates=gates, h=h, do=do):
                out = bidirectional_gated_linear_attention_qkv(qkv, gates, h, backend="triton")
                torch.autograd.grad(out, [qkv, gates], do)

            record("packed op forward", shape, packed_fwd)
            record("packed op forward+backward", shape, packed_fwd_bwd, peak_of=packed_fwd_bwd)
            del qkv, gates
        del q, k, v, gf, gb, leaves, do
    if not args.no_model:
        model = timm.create_model("vig_small").cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        labels = torch.randint(0, 1000, (128,), device="cuda")
        step = train_step(model, opt, labels)
        x = torch.randn(128, 3, 224, 224, device="cuda")
        record("vig_small train step", "224px bs128", lambda: step(x))  # the shipped settings: the packed call
        if args.packed:
            with tuned(gla_layer.FAST_PATHS, qkv_packed=False):
                record("vig_small train step (split)", "224px bs128", lambda: step(x))
    meta = gpu_meta(argv, args.commit, configs={c: CONFIGS[c] for c in configs})
    result = {"benchmark": STEM, "meta": meta, "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
