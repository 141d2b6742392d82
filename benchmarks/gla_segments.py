"""The segmented GLA forward (``visionlin.kernels.triton.gla.TUNING["segments"]``) against the single walk, side by
side in one process: ViG-S inference at batch 1 and high resolution (where the (batch, head, value block) programs
leave most SMs idle), and the bidirectional op alone at ViG-S's head dims over long sequences.

Usage (on a GPU machine):
    python benchmarks/gla_segments.py --out benchmarks/results/h200 [--sizes 1024,2048,4096] [--commit SHA]

Writes ``gla_segments.json`` (rows: what, size or length, ms with the single walk and segmented, their ratio; meta)
and ``gla_segments.png``.
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

STEM = "gla_segments"


def _both(fn, args) -> dict:
    """Milliseconds per call of ``fn`` with the single walk and segmented, in alternating repeats."""
    from visionlin.kernels.triton import gla

    times = {False: [], True: []}
    for r in range(args.repeats):
        for seg in (False, True) if r % 2 == 0 else (True, False):
            with tuned(gla.TUNING, segments=seg):
                times[seg].append(cuda_ms(fn, args.warmup, args.iters, 1))
    single, segmented = (sorted(times[s])[len(times[s]) // 2] for s in (False, True))
    return {"ms_single": single, "ms_segmented": segmented, "speedup": single / segmented, "status": "ok"}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    labels = [f"{r['what']} {r['n']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 4))
    ms = {(lab, m): r[f"ms_{m}"] for lab, r in zip(labels, rows, strict=True) for m in ("single", "segmented")}
    grouped_bars(ax, labels, ["single", "segmented"], lambda lab, m: ms[(lab, m)], label_fmt="%.2f", fontsize=7)
    ax.set_ylabel("ms per call (median)")
    ax.legend(fontsize=7)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gla_segments.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--sizes", default="1024,2048,4096", help="ViG-S input sides, batch 1")
    p.add_argument("--lengths", default="65536,1048576", help="op-level sequence lengths, batch 1")
    add_timing_flags(p, iters=5, warmup=2)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        lengths = [int(s) for s in args.lengths.split(",") if s]
    except ValueError:
        p.error(f"--sizes / --lengths must be comma-separated integers, got {args.sizes!r} / {args.lengths!r}")
    if any(s < 32 or s % 32 for s in sizes) or any(n < 1 for n in lengths):
        p.error("--sizes must be multiples of 32, --lengths positive")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import timm

    import visionlin  # noqa: F401 (registers the models)
    from visionlin.kernels import bidirectional_gated_linear_attention

    rows = []
    model = timm.create_model("vig_small").cuda().eval()
    for size in sizes:
        x = torch.randn(1, 3, size, size, device="cuda")

        def infer(x=x):
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

        row = {"what": "vig_small", "n": size}
        try:
            row |= _both(infer, args)
        except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
            row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(row, flush=True)
    for n in lengths:
        q, k, g = (torch.randn(1, n, 6, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        v = torch.randn(1, n, 6, 64, device="cuda", dtype=torch.bfloat16)
        gate = torch.nn.functional.logsigmoid(g.float()).to(g.dtype) / 16

        def op(q=q, k=k, v=v, gate=gate):
            with torch.inference_mode():
                bidirectional_gated_linear_attention(q, k, v, gate, gate, backend="triton")

        row = {"what": "bidirectional_gla", "n": n}
        try:
            row |= _both(op, args)
        except Exception as e:  # noqa: BLE001
            row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(row, flush=True)
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
