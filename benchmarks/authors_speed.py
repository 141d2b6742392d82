"""Our models against the authors' own implementations, side by side in one process (issue 6's last target).

The authors' repositories stay beside the project, never inside it: ``--authors-dir DIR`` holds plain checkouts
(``DIR/Agent-Attention``, ``DIR/FLatten-Transformer``, ``DIR/MALA``, ``DIR/RALA``, ``DIR/infinite-self-attention``,
``DIR/NaLaFormer``);
their model files are imported as modules of a synthetic package, so no repository ``__init__.py`` or ``build.py``
runs, with the import workarounds of ``../shared/specs/official_speed.md`` (a no-op ``register_model`` so that their
registrations do not collide with ours; a stub ``fvcore``, imported by MALA / RALA for FLOP counting only). Each pair
(authors' model, ours) is timed next to its dense timm twin with the same protocol: bf16 autocast, eager, inference at
224 px (batch 256) and, for the models that run at other sizes, 1024 px (batch 16); optionally the training step at
224 px (batch 128, AdamW). Sweeps alternate the model order; the median over sweeps is reported. ``--kernels`` also
profiles one call of each model's step and records the summed GPU time of its kernels (``kernels_ms``), so that a
wall-time ratio can be split into GPU time and host time; ``--phases train`` runs only the training step.

Usage (GPU machine):
    python benchmarks/authors_speed.py --authors-dir .authors --out benchmarks/results/h200 --train [--kernels]
Redraw a result's plot (anywhere): ``python benchmarks/authors_speed.py --replot FILE.json`` (writes ``FILE.png``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import statistics
import sys
import types
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._timing import kernels_ms  # noqa: E402
from visionlin.train.bench import train_step, write_json  # noqa: E402

DEIT, SWIN = "deit_small_patch16_224", "swin_tiny_patch4_window7_224"


@contextlib.contextmanager
def _import_stubs() -> Iterator[None]:
    """A no-op ``timm.models.registry.register_model`` and a stub ``fvcore.nn`` while the authors' files import."""
    saved = {k: sys.modules.get(k) for k in ("timm.models.registry", "fvcore", "fvcore.nn")}
    registry = types.ModuleType("timm.models.registry")
    registry.register_model = lambda fn: fn  # type: ignore[attr-defined]
    fv = types.ModuleType("fvcore")
    fvnn = types.ModuleType("fvcore.nn")
    fvnn.FlopCountAnalysis = fvnn.flop_count_table = None  # type: ignore[attr-defined]
    fv.nn = fvnn  # type: ignore[attr-defined]
    sys.modules.update({"timm.models.registry": registry, "fvcore": fv, "fvcore.nn": fvnn})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _module(package: str, folder: Path, name: str) -> types.ModuleType:
    """``folder/name.py`` imported as ``package.name`` of a synthetic package (the folder's ``__init__`` never runs)."""
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"{folder / (name + '.py')} not found: check --authors-dir")
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(folder)]  # type: ignore[attr-defined]
        sys.modules[package] = pkg
    with _import_stubs():
        return importlib.import_module(f"{package}.{name}")


def _agent_deit_s(d: Path) -> nn.Module:
    m = _module("off_agent", d / "Agent-Attention/agent_transformer/models", "agent_deit")
    return m.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1, agent_num=["49"] * 4
    )


def _agent_swin_t(d: Path) -> nn.Module:
    m = _module("off_agent", d / "Agent-Attention/agent_transformer/models", "agent_swin")
    return m.AgentSwinTransformer(
        img_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=56,
        drop_path_rate=0.2, agent_num=["9", "16", "49", "49"], attn_type="AAAB",
    )  # fmt: skip


def _flatten_swin_t(d: Path) -> nn.Module:
    m = _module("off_flatten", d / "FLatten-Transformer/models", "flatten_swin")
    return m.FLattenSwinTransformer(
        img_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=56,
        drop_path_rate=0.2, focusing_factor=3, kernel_size=5, attn_type="LLSS",
    )  # fmt: skip


def _flatten_pvt_s(d: Path) -> nn.Module:
    m = _module("off_flatten", d / "FLatten-Transformer/models", "flatten_pvt")
    return m.flatten_pvt_small(
        drop_path_rate=0.1, focusing_factor=3, kernel_size=5, attn_type="LLLL", la_sr_ratios="1111"
    )


def _agent_pvt_s(d: Path) -> nn.Module:
    m = _module("off_agent", d / "Agent-Attention/agent_transformer/models", "agent_pvt")
    return m.agent_pvt_small(drop_path_rate=0.1)  # their defaults: agent_num 9-16-49-49, AAAA, agent_sr_ratios 1111


def _nalaformer_t(d: Path) -> nn.Module:
    return _module("off_nala", d / "NaLaFormer/NaLaformer", "NALA").NALAFORMER_T(args=None)


def _mavit_t(d: Path) -> nn.Module:
    return _module("off_mala", d / "MALA/classfication_release", "model").MALA_T(args=None)


def _ravlt_t(d: Path) -> nn.Module:
    return _module("off_rala", d / "RALA/classfication", "RALA").RAVLT_T(args=None)


class _InfSAWrapper(nn.Module):
    """A timm ``Block.attn`` that runs the authors' ``InfSAAttention(x, x, x)[0]`` (their integration)."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.attn(x, x, x)[0]


def _infsa_vit_s(d: Path) -> nn.Module:
    import timm

    root = str(d / "infinite-self-attention")
    if root not in sys.path:
        sys.path.insert(0, root)
    attention = importlib.import_module("infsa.attention")
    model = timm.create_model(DEIT, dynamic_img_size=True, drop_path_rate=0.1)
    for block in model.blocks:
        block.attn = _InfSAWrapper(attention.InfSAAttention(384, 6, variant="linear_infsa"))
    return model


#: name -> (builder of the authors' model, our entrypoint, dense twin, sizes besides 224 the authors' code runs at)
PAIRS: dict[str, tuple[Callable[[Path], nn.Module], str, str, tuple[int, ...]]] = {
    "agent_deit_s": (_agent_deit_s, "agent_deit_small", DEIT, ()),
    "infsa_vit_s": (_infsa_vit_s, "infvit_small", DEIT, (1024,)),
    "flatten_swin_t": (_flatten_swin_t, "flatten_swin_tiny", SWIN, ()),
    "flatten_pvt_s": (_flatten_pvt_s, "flatten_pvt_small", SWIN, ()),
    "agent_swin_t": (_agent_swin_t, "agent_swin_tiny", SWIN, ()),
    "mavit_t": (_mavit_t, "mavit_tiny", SWIN, (1024,)),
    "ravlt_t": (_ravlt_t, "ravlt_tiny", SWIN, (1024,)),
    "agent_pvt_s": (_agent_pvt_s, "agent_pvt_small", SWIN, ()),
    "nalaformer_t": (_nalaformer_t, "nalaformer_tiny", SWIN, (1024,)),
}
BATCH = {224: 256, 1024: 16}


def _twin(name: str, size: int) -> nn.Module:
    import timm

    kw = {"dynamic_img_size": True} if name == DEIT else {}
    return timm.create_model(name, img_size=size, **kw) if size != 224 else timm.create_model(name)


def _ms_per_call(fn: Callable[[], None], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _step(model: nn.Module, x: torch.Tensor, train: bool) -> Callable[[], None]:
    if not train:
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

        return infer
    model.train()
    target = torch.randint(0, 1000, (x.shape[0],), device=x.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    return functools.partial(train_step(model, opt, target), x)


def measure(builders: dict[str, Callable[[], nn.Module]], size: int, batch: int, train: bool, args) -> dict:
    """img/s (median over sweeps in alternating order) and peak MiB of each model; failures recorded as text."""
    x = torch.randn(batch, 3, size, size, device="cuda")
    models: dict[str, nn.Module] = {}
    rows: dict[str, dict] = {}
    for name, build in builders.items():
        try:
            models[name] = build().cuda()
        except Exception as e:  # an authors' model that cannot be built at this size: recorded, not fatal
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    times: dict[str, list[float]] = {n: [] for n in models}
    steps: dict[str, Callable[[], None]] = {}
    order = list(models)
    for sweep in range(args.repeats):
        for name in order if sweep % 2 == 0 else order[::-1]:
            if "error" in rows.get(name, {}):
                continue
            torch.cuda.reset_peak_memory_stats()
            try:
                steps[name] = _step(models[name], x, train)
                ms = _ms_per_call(steps[name], args.warmup, args.iters)
            except Exception as e:
                rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                torch.cuda.empty_cache()
                continue
            times[name].append(ms)
            peak = torch.cuda.max_memory_allocated() / 2**20
            rows[name] = {"peak_mib": max(peak, rows.get(name, {}).get("peak_mib", 0.0))}
    for name, ts in times.items():
        if ts and "error" not in rows[name]:
            ms = statistics.median(ts)
            rows[name].update(ms=ms, img_s=batch * 1e3 / ms, sweeps_ms=ts)
            if args.kernels:  # after the timed sweeps: the profiler's cost is not in them
                rows[name]["kernels_ms"] = kernels_ms(steps[name])
    del models, x
    torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    import timm  # noqa: F401

    import visionlin  # noqa: F401  (registers our models)
    from benchmarks._meta import gpu_meta
    from benchmarks._timing import add_timing_flags, check_timing_flags

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--replot"]:  # --replot FILE.json: redraw FILE.png from a result (no GPU, no authors' code)
        if len(argv) != 2 or not Path(argv[1]).is_file():
            p.error(f"--replot takes one existing result file, got {argv[1:]}")
        try:
            results = json.loads(Path(argv[1]).read_text())["results"]
        except (ValueError, KeyError, TypeError) as e:
            p.error(f"--replot {argv[1]}: not an authors_speed result ({type(e).__name__}: {e})")
        _plot(results, Path(argv[1]).with_suffix(".png"))
        return 0
    p.add_argument("--authors-dir", required=True, type=Path, help="folder holding the authors' checkouts")
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    p.add_argument("--train", action="store_true", help="also the training step at 224 px, batch 128")
    p.add_argument(
        "--phases", choices=("all", "train"), default="all", help="train: the training step only (with --train)"
    )
    p.add_argument("--kernels", action="store_true", help="also each step's summed kernel time (one profiled call)")
    add_timing_flags(p, iters=15, warmup=5)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    unknown = sorted(set(args.pairs.split(",")) - set(PAIRS))
    if unknown:
        p.error(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    if args.phases == "train" and not args.train:
        p.error("--phases train needs --train")
    if not args.authors_dir.is_dir():
        p.error(f"--authors-dir {args.authors_dir} is not a folder")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = gpu_meta(argv, args.commit)
    results = []
    for pair in args.pairs.split(","):
        build_theirs, ours, twin, extra_sizes = PAIRS[pair]
        phases = (
            [] if args.phases == "train" else [(224, BATCH[224], False)] + [(s, BATCH[s], False) for s in extra_sizes]
        )
        if args.train:
            phases.append((224, 128, True))
        for size, batch, train in phases:
            builders = {
                f"authors:{pair}": partial(build_theirs, args.authors_dir),
                f"ours:{ours}": partial(timm.create_model, ours, img_size=size),
                f"twin:{twin}": partial(_twin, twin, size),
            }
            rows = measure(builders, size, batch, train, args)
            theirs_ = rows.get(f"authors:{pair}", {}).get("img_s")
            ours_ = rows.get(f"ours:{ours}", {}).get("img_s")
            twin_ = rows.get(f"twin:{twin}", {}).get("img_s")
            rec = {
                "pair": pair, "size": size, "batch": batch, "phase": "train" if train else "infer", "rows": rows,
                "ours_vs_authors": ours_ / theirs_ if ours_ and theirs_ else None,
                "ours_vs_twin": ours_ / twin_ if ours_ and twin_ else None,
                "authors_vs_twin": theirs_ / twin_ if theirs_ and twin_ else None,
            }  # fmt: skip
            gpu_theirs = rows.get(f"authors:{pair}", {}).get("kernels_ms")
            gpu_ours = rows.get(f"ours:{ours}", {}).get("kernels_ms")
            if gpu_theirs and gpu_ours:  # > 1: our kernels take less GPU time than theirs
                rec["ours_vs_authors_gpu"] = gpu_theirs / gpu_ours
            results.append(rec)
            cells = "  ".join(
                f"{n} {r['img_s']:.0f} img/s" if "img_s" in r else f"{n} {r.get('error', 'n/a')[:60]}"
                for n, r in rows.items()
            )
            ratio = "n/a" if rec["ours_vs_authors"] is None else f"{rec['ours_vs_authors']:.2f}x"
            if "ours_vs_authors_gpu" in rec:
                ratio += f" (GPU time {rec['ours_vs_authors_gpu']:.2f}x)"
                cells += "  kernels ms: " + ", ".join(
                    f"{n.split(':')[0]} {r['kernels_ms']:.1f} of {r['ms']:.1f}"
                    for n, r in rows.items()
                    if "kernels_ms" in r
                )
            print(f"{pair} {rec['phase']} {size}px bs{batch}: ours/authors {ratio}   {cells}", flush=True)
            # after every phase: a run stopped by a time limit still leaves what it measured, marked partial
            _write(args.out, meta, results, partial=True)
    _write(args.out, meta, results)
    _plot(results, args.out / "authors_speed.png")
    return 0


def _write(out: Path, meta: dict, results: list[dict], partial: bool = False) -> None:
    write_json(out / "authors_speed.json", {"meta": meta, "results": results}, partial=partial, indent=2)


def _gpu_vs_twin(rec: dict) -> tuple[float, float]:
    """(authors', ours) speed relative to the twin in GPU time (twin kernel ms over theirs), 0.0 where not profiled."""
    ms = {name.split(":")[0]: row.get("kernels_ms") for name, row in rec["rows"].items()}
    twin = ms.get("twin")
    return tuple(twin / ms[k] if twin and ms.get(k) else 0.0 for k in ("authors", "ours"))  # type: ignore[return-value]


def _plot(results: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("authors_speed.png skipped: matplotlib is not installed")
        return
    done = [r for r in results if r["ours_vs_twin"] or r["authors_vs_twin"]]
    if not done:
        return
    labels = [f"{r['pair']}\n{r['phase']} {r['size']}" for r in done]
    xs = range(len(done))
    gpu = [_gpu_vs_twin(r) for r in done]
    panels = 2 if any(g != (0.0, 0.0) for g in gpu) else 1
    fig, axes = plt.subplots(1, panels, figsize=(max(6, 1.1 * len(done)) * panels, 4), squeeze=False)
    wall = [(r["authors_vs_twin"] or 0.0, r["ours_vs_twin"] or 0.0) for r in done]
    titles = ("wall time (bf16, eager, same process)", "GPU time: summed kernels of one profiled step")
    for ax, values, title in zip(axes[0], (wall, gpu)[:panels], titles[:panels], strict=True):
        ax.bar([x - 0.2 for x in xs], [v[0] for v in values], 0.4, label="authors' code")
        ax.bar([x + 0.2 for x in xs], [v[1] for v in values], 0.4, label="visionlin")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_ylabel("speed relative to the dense timm twin")
        ax.set_title(f"Authors' implementations vs visionlin: {title}", fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
