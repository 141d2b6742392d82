"""The selective scan's launch settings (``visionlin.kernels.triton.scan.TUNING``) side by side in one process: the
op forward alone and forward + backward at MambaVision's training shapes, replayed from CUDA graphs (GPU time, no
host time), and a MambaVision training step's forward + backward from a CUDA graph; each setting's largest relative
error against the float32 reference (forward output and every input gradient) next to its times.

Usage (on a GPU machine):
    python benchmarks/scan_op.py --out benchmarks/results/h200 [--commit SHA] [--configs shipped,w1d4,...]
        [--shapes 128x196x160x8,...] [--model mambavision_tiny] [--no-model]

Writes ``scan_op.json`` (rows: what, shape, config, ms, vs_shipped, max_rel_err; meta with each config's settings)
and ``scan_op.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish, grouped_bars  # noqa: E402
from benchmarks._timing import add_timing_flags, check_timing_flags, graph_ms, tuned  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402

STEM = "scan_op"
#: Named settings: overrides of ``scan.TUNING`` (the rest as shipped). ``f<T>d<BD>w<W>``: both passes at chunk T,
#: BD channels and W warps per program; ``b...``: the backward alone changed.
CONFIGS: dict[str, dict] = {"shipped": {}, "s37": {}}  # s37: the settings shipped until stop 37 (see _overrides)
for _t, _bd, _w in ((16, 2, 1), (16, 4, 1), (16, 8, 1), (16, 4, 2), (16, 8, 2), (16, 16, 2), (8, 4, 1), (8, 8, 1),
                    (8, 8, 2), (32, 2, 1), (16, 8, 4)):  # fmt: skip
    CONFIGS[f"f{_t}d{_bd}w{_w}"] = {"chunk": _t, "block_d": _bd, "warps": _w}
for _bd, _w in ((2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4)):
    CONFIGS[f"b16d{_bd}w{_w}"] = {"bwd_block_d": _bd, "bwd_warps": _w}
# dB / dC added into several float32 copies by the backward's channel blocks (fewer atomics on one address)
for _k in (4, 16):
    CONFIGS[f"sl{_k}"] = {"bc_slices": _k}
CONFIGS["sl_all"] = {"bc_slices": 1 << 20}  # a copy per channel block
#: (batch, tokens, channels, states): MambaVision-T's stage-3 and stage-4 mixers at 224 px, batch 128 (14 x 14 and
#: 7 x 7 tokens, 160 / 320 scanned channels, N = 8); its stage 3 at 448 px, batch 32; a long sequence with N = 16.
SHAPES = ((128, 196, 160, 8), (128, 49, 320, 8), (32, 784, 160, 8), (2, 16384, 192, 16))


def _overrides(config: str, n: int) -> dict:
    """``scan.TUNING`` overrides of ``config`` at ``N`` states: "s37" is the rule shipped until stop 37 (2,048-element
    tiles, 4 warps forward, 8 backward)."""
    if config == "s37":
        return {"chunk": 16, "block_d": max(1, 2048 // (16 * max(2, 1 << (n - 1).bit_length()))), "warps": 4,
                "bwd_warps": 8}  # fmt: skip
    return CONFIGS[config]


def _timed(fn, configs: list[str], args, n: int) -> dict[str, float]:
    """Median ms of one CUDA-graph replay of ``fn`` under each config (at ``N`` states), the configs' order
    alternating between repeats (each capture under its config)."""
    from visionlin.kernels.triton import scan

    times: dict[str, list[float]] = {c: [] for c in configs}
    for r in range(args.repeats):
        for c in configs if r % 2 == 0 else configs[::-1]:
            with tuned(scan.TUNING, **_overrides(c, n)):
                times[c].append(graph_ms(fn, args.warmup, args.iters))
    return {c: sorted(t)[len(t) // 2] for c, t in times.items()}


def _errors(leaves, do, config: str, kw: dict) -> dict[str, float]:
    """The relative (Frobenius) errors of ``y`` and every input gradient under ``config`` against the float32
    reference on float32 copies of the same inputs."""
    from visionlin.kernels import selective_scan
    from visionlin.kernels.triton import scan

    ref_in = [t.detach().float().requires_grad_() for t in leaves]
    y_ref = selective_scan(*ref_in, **kw, backend="reference")
    ref = [y_ref, *torch.autograd.grad(y_ref, ref_in, do.float())]
    with tuned(scan.TUNING, **_overrides(config, leaves[2].shape[1])):
        y = selective_scan(*leaves, **kw, backend="triton")
        ours = [y, *torch.autograd.grad(y, leaves, do)]
    names = ("y", "du", "ddelta", "dA", "dB", "dC", "dD")
    return {
        k: ((a.float() - b).norm() / b.norm().clamp_min(1e-30)).item() for k, a, b in zip(names, ours, ref, strict=True)
    }


def _rule() -> dict:
    """The shipped rule's settings at N = 1, 8, 16, 64 (what "shipped" ran)."""
    from visionlin.kernels.triton import scan

    return {n: scan.scan_config(n)._asdict() for n in (1, 8, 16, 64)}


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    labels = list(dict.fromkeys(f"{r['what']}\n{r['shape']}" for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    rel = {(f"{r['what']}\n{r['shape']}", r["config"]): r["vs_shipped"] for r in rows}
    fig, ax = plt.subplots(figsize=(14, 4.5))
    grouped_bars(ax, labels, configs, lambda lab, c: rel.get((lab, c), 0.0), label_fmt="%.2f", fontsize=5)
    ax.axhline(1.0, color="k", lw=0.6)
    ax.set_ylabel("speed vs shipped settings (x, graph replay)")
    ax.tick_params(axis="x", labelsize=6)
    ax.legend(fontsize=6, ncols=3)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/scan_op.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commit", default=None)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES), help="BxLxDxN, comma-separated")
    p.add_argument("--model", default="mambavision_tiny", help="the model whose training step is timed")
    p.add_argument("--batch", type=int, default=128, help="the training step's batch (224 px)")
    p.add_argument("--no-model", action="store_true", help="skip the training step")
    add_timing_flags(p, iters=20, warmup=2, repeats=3)
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or not configs:
        p.error(f"--configs: unknown {unknown} (allowed: {', '.join(CONFIGS)})")
    if "shipped" not in configs:
        configs.insert(0, "shipped")  # the ratios' base
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",") if s]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        p.error(f"--shapes must be BxLxDxN quadruples of positive integers, comma-separated; got {args.shapes!r}")
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    check_timing_flags(p, args)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    import timm

    import visionlin  # noqa: F401 (registers the models)
    from visionlin.kernels import selective_scan

    rows: list[dict] = []

    def record(what: str, shape: str, fn, n: int, errors=None) -> None:
        try:
            ms = _timed(fn, configs, args, n)
            for c in configs:
                row = {"what": what, "shape": shape, "config": c, "ms": ms[c], "vs_shipped": ms["shipped"] / ms[c]}
                if errors is not None:
                    row["rel_err"] = errors(c)
                    row["max_rel_err"] = max(row["rel_err"].values())
                rows.append(row | {"status": "ok"})
                print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001 (recorded, the other rows still run)
            rows.append({"what": what, "shape": shape, "status": "error", "error": f"{type(e).__name__}: {e}"[:300]})
            print(rows[-1], flush=True)

    kw = dict(delta_softplus=True, check_values=False)
    for b, length, d, n in shapes:
        gen = torch.Generator(device="cuda").manual_seed(0)

        def randn(*shape, scale=1.0, shift=0.0, gen=gen):
            return (torch.randn(*shape, device="cuda", generator=gen) * scale + shift).to(torch.bfloat16)

        u, delta = randn(b, length, d), randn(b, length, d, shift=-4.0)
        bm, cm = randn(b, length, n), randn(b, length, n)
        a_mat = -torch.linspace(1.0, float(n), n, device="cuda").expand(d, n).contiguous()
        dskip, bias = torch.ones(d, device="cuda"), randn(d, scale=0.5).float()
        leaves = [t.requires_grad_() for t in (u, delta, a_mat, bm, cm, dskip)]
        do = randn(b, length, d)
        call = dict(kw, delta_bias=bias)

        def fwd(leaves=leaves, call=call):
            with torch.no_grad():
                selective_scan(*leaves, **call, backend="triton")

        def fwd_bwd(leaves=leaves, do=do, call=call):
            y = selective_scan(*leaves, **call, backend="triton")
            torch.autograd.grad(y, leaves, do)

        shape = f"B{b} L{length} D{d} N{n}"
        record("op forward", shape, fwd, n)
        record(
            "op forward+backward",
            shape,
            fwd_bwd,
            n,
            lambda c, leaves=leaves, do=do, call=call: _errors(leaves, do, c, call),
        )
        del u, delta, bm, cm, leaves, do
    if not args.no_model:
        model = timm.create_model(args.model).cuda().train()
        x = torch.randn(args.batch, 3, 224, 224, device="cuda")
        params = [p for p in model.parameters() if p.requires_grad]

        def step():
            with torch.autocast("cuda", torch.bfloat16):
                loss = model(x).float().logsumexp(-1).mean()
            torch.autograd.grad(loss, params)

        n = max(getattr(m, "d_state", 0) for m in model.modules())  # "s37" at the model's state size
        record(f"{args.model} forward+backward", f"224px bs{args.batch}", step, n)
    meta = gpu_meta(argv, args.commit, configs={c: CONFIGS[c] for c in configs}, scan_rule=_rule())
    result = {"benchmark": STEM, "meta": meta, "rows": rows}
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
