"""Model-level step time of converted diffusers transformers: one denoising step (the transformer's forward; with
``--train`` also forward + backward) of a Wan2.1-T2V-1.3B-shaped ``WanTransformer3DModel`` at 480p x 81 frames and a
FLUX.1-shaped ``FluxTransformer2DModel`` at 1024 px, dense (the stock processors: PyTorch SDPA) against each
``visionlin.convert`` method, side by side in one process.

* Models: random weights (seeded) in the published configurations, built offline, cast to ``--dtype`` (bf16: how the
  pipelines load them), no autocast. Wan2.1-T2V-1.3B: 30 blocks, 12 heads x 128, FFN 8960, text dim 4096, patches
  (1, 2, 2); 480 x 832 x 81 frames -> latent 16 x 21 x 60 x 104 -> 21 x 30 x 52 = 32,760 tokens, 512 text tokens
  (cross-attention). FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, guidance embedding; 1024 px -> 64 x 64
  = 4,096 packed image tokens + 512 text tokens in every joint attention. ``--layers N`` builds N blocks (Flux: N
  double + 2N single, the real ratio) instead; the JSON's ``config`` states what was built.
* Methods: ``dense`` is the unconverted model (the stock processors, PyTorch SDPA, which picks flash / cuDNN itself);
  every other is ``visionlin.convert(model, method, **options)`` on the same model, reverted afterwards (defaults:
  ``sla`` at sparsity 0.95 and ``sparse`` at 0.9, the issue's targets; ``hybrid`` and ``linear`` at their defaults;
  ``--set METHOD.OPTION=VALUE`` changes one). A fresh ``sla`` / ``hybrid`` / ``linear`` conversion has zero-initialised
  converter parameters: their speed does not depend on the values.
* Timing: ``--repeats`` rounds, the methods in alternating order (forward, then reversed), each round ``--warmup``
  untimed and ``--iters`` timed steps per method (CUDA events; ``perf_counter`` on the CPU); a row's ``ms`` is the
  median of all its timed steps, ``ratio`` = dense ms / method ms (> 1: faster than dense). ``peak_mib``: the largest
  ``max_memory_allocated`` over the row's rounds (weights included). ``--train``: all weights require gradients
  (full fine-tuning; the converter's own parameters too), the step is forward + ``backward`` of a fixed random
  output gradient (no optimizer); ``--grad-checkpointing`` turns on diffusers' gradient checkpointing.
* Attention share (forward only): one extra forward per method with CUDA events around every converted self-attention
  module (the same modules for ``dense``): ``attn_ms`` and ``attn_share`` of that forward. ``--profile`` adds a
  ``torch.profiler`` kernel table (GPU time by category, top kernels) of one step per method and mode.
* ``--time-budget S``: once S seconds have passed (each model gets an equal share of what is left when it starts), no
  further method or round starts (one already running finishes); rows without a timed step are ``"skipped"``, the
  others keep what they measured (``iters`` says how many). The JSON is rewritten after every measurement, so a run
  cut short keeps its rows.

Usage (on a GPU machine)::

    python benchmarks/convert_speed.py [--models wan,flux] [--train] [--layers N] [--out DIR] [--commit SHA]
    python benchmarks/convert_speed.py --tiny --device cpu --out /tmp/x      # smoke test, tiny configs

Writes ``convert_speed.json`` (rows + command, commit, date, GPU and versions) and ``convert_speed.png`` to ``--out``
(default ``benchmarks/results/<gpu>/``, ``benchmarks/results/cpu/`` on the CPU).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._convert_options import method_option, resolve_options  # noqa: E402
from benchmarks._plot import finish  # noqa: E402
from visionlin._io import atomic_write  # noqa: E402
from visionlin.train.bench import device_slug, run_meta, write_result  # noqa: E402

MODELS = ("wan", "flux")
METHODS = ("dense", "sparse", "sla", "hybrid", "linear", "agent")
DEFAULT_METHODS = ("dense", "sparse", "sla", "hybrid", "linear")
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"sla": {"sparsity": 0.95}, "sparse": {"sparsity": 0.9}}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Published configurations (diffusers argument names). Wan2.1-T2V-1.3B's transformer/config.json; FLUX.1-dev's.
WAN_CONFIG = {
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}  # fmt: skip
FLUX_CONFIG = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
# Smoke-test sizes (--tiny): the same classes and code paths, a few hundred tokens.
WAN_TINY = {**WAN_CONFIG, "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
            "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 2, "rope_max_seq_len": 32}  # fmt: skip
FLUX_TINY = {**FLUX_CONFIG, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
             "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
             "axes_dims_rope": (4, 6, 6)}  # fmt: skip


# Models and inputs ----------------------------------------------------------------------------------------------------
def model_config(name: str, tiny: bool, layers: int | None) -> dict[str, Any]:
    """The diffusers constructor arguments of ``name`` (``layers``: that many blocks; Flux N double + 2N single)."""
    cfg = dict((WAN_TINY if tiny else WAN_CONFIG) if name == "wan" else (FLUX_TINY if tiny else FLUX_CONFIG))
    if layers is not None:
        cfg["num_layers"] = layers
        if name == "flux":
            cfg["num_single_layers"] = 2 * layers
    return cfg


def build_model(name: str, cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer with seeded random weights, built directly on ``device`` and cast to ``dtype``."""
    import diffusers

    cls = diffusers.WanTransformer3DModel if name == "wan" else diffusers.FluxTransformer2DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**cfg)
    # As ``from_pretrained(torch_dtype=dtype)`` loads it: the class's ``_keep_in_fp32_modules`` stay float32.
    keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(torch.float32 if keep & set(name.split(".")) else dtype)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the float32 construction's blocks (Flux: 48 GB)
    return model.eval().requires_grad_(False)


def model_inputs(name: str, cfg: dict[str, Any], args: argparse.Namespace, device, dtype) -> tuple[dict, dict]:
    """Forward keywords of one denoising step and a description (latent shape, image / text tokens)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    b, text = args.batch, args.text_len

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if name == "wan":
        frames, (height, width) = args.frames, args.wan_size
        lat = ((frames - 1) // 4 + 1, height // 8, width // 8)  # the Wan VAE's 4 x 8 x 8 compression
        pt, ph, pw = cfg["patch_size"]
        grid = (lat[0] // pt, lat[1] // ph, lat[2] // pw)
        kwargs = {
            "hidden_states": randn(b, cfg["in_channels"], *lat), "timestep": torch.full((b,), 500, device=device),
            "encoder_hidden_states": randn(b, text, cfg["text_dim"]), "return_dict": False,
        }  # fmt: skip
        desc = {"video": f"{height}x{width}x{frames} frames", "latent": [cfg["in_channels"], *lat]}
    else:
        side = args.flux_size
        h = w = side // 16  # VAE / 8, then 2 x 2 packing
        ids = torch.zeros(h * w, 3)
        ids[:, 1], ids[:, 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        kwargs = {
            "hidden_states": randn(b, h * w, cfg["in_channels"]), "encoder_hidden_states": randn(b, text,
            cfg["joint_attention_dim"]), "pooled_projections": randn(b, cfg["pooled_projection_dim"]),
            "timestep": torch.full((b,), 0.5, device=device, dtype=dtype), "img_ids": ids.to(device, dtype),
            "txt_ids": torch.zeros(text, 3, device=device, dtype=dtype), "return_dict": False,
        }  # fmt: skip
        if cfg.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((b,), 3.5, device=device, dtype=dtype)
        grid = (h, w)
        desc = {"image": f"{side}x{side}", "packed_latent": [h, w, cfg["in_channels"]]}
    tokens = math.prod(grid)
    return kwargs, {**desc, "grid": list(grid), "image_tokens": tokens, "text_tokens": text, "batch": b}


# Measuring ------------------------------------------------------------------------------------------------------------
class _Clock:
    """Step timer: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)


def _step(model: torch.nn.Module, kwargs: dict, mode: str, grad: list) -> Callable[[], object]:
    """One denoising step: the forward (no autograd) or forward + backward of a fixed random output gradient."""
    if mode == "fwd":

        def fwd():
            with torch.inference_mode():
                return model(**kwargs)[0]

        return fwd

    def fwd_bwd():
        out = model(**kwargs)[0]
        if not grad:  # made once per model, from the first output's shape
            grad.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out))
        out.backward(grad[0])
        return out

    return fwd_bwd


def attention_time(model, names: list[str], step: Callable[[], object], clock: _Clock) -> tuple[float, float]:
    """(attention ms, step ms) of one step with a timer around each named module (converted self-attention)."""
    modules = dict(model.named_modules())
    marks: list[tuple[Any, Any]] = []
    hooks = []

    def mark():
        if clock.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    for n in names:
        hooks.append(modules[n].register_forward_pre_hook(lambda m, a: marks.append((mark(), None))))
        hooks.append(modules[n].register_forward_hook(lambda m, a, o: marks.__setitem__(-1, (marks[-1][0], mark()))))
    try:
        clock.sync()
        t0 = mark()
        step()
        t1 = mark()
        clock.sync()
    finally:
        for h in hooks:
            h.remove()

    def ms(a, b):
        return a.elapsed_time(b) if clock.cuda else (b - a) * 1e3

    return sum(ms(a, b) for a, b in marks), ms(t0, t1)


def _triton_kernel_names() -> set[str]:
    """Names of every Triton kernel in ``visionlin.kernels.triton`` (the converter's fused ops among them)."""
    import importlib
    import pkgutil

    try:
        import triton  # noqa: F401

        import visionlin.kernels.triton as pkg
    except ImportError:
        return set()
    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # noqa: BLE001 (a module that does not import has no kernel to name)
            continue
        for obj in vars(mod).values():
            fn = getattr(obj, "fn", None)
            if type(obj).__name__ in ("JITFunction", "Autotuner", "Heuristics") and fn is not None:
                names.add(getattr(fn, "__name__", getattr(getattr(fn, "fn", None), "__name__", "")))
    return names - {""}


def kernel_profile(step: Callable[[], object], clock: _Clock, top: int = 12) -> dict:
    """GPU kernel time of one step by category (``benchmarks/profile_models.py``'s, visionlin's Triton kernels
    first) and its ``top`` kernels."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    from benchmarks.profile_models import category

    ours = _triton_kernel_names()
    clock.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        clock.sync()
    kernels: dict[str, float] = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            kernels[evt.name] += getattr(evt, "device_time_total", 0.0) / 1e3
    cats: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        low = name.lower()
        if name in ours:
            cat = "attention (visionlin triton)"
        elif "natten" in low or any(f"na{d}d" in low for d in (1, 2, 3)):
            cat = "attention (natten)"
        else:
            cat = category(name)
        cats[cat] += ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    return {
        "kernel_ms": sum(kernels.values()),
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "ms": ms} for n, ms in ranked],
    }


def _error(e: BaseException) -> tuple[str, str]:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "oom", str(e).splitlines()[0][:200]
    return "error", f"{type(e).__name__}: {str(e)[:300]}"


def bench_model(
    name: str, args: argparse.Namespace, deadline: float | None, save: Callable[[], None], section: dict | None = None
) -> dict:
    """Every (method, mode) row of one model, filled into ``section`` (returned); ``save()`` after every
    measurement."""
    from visionlin.convert import convert, revert
    from visionlin.convert._methods import validate_options

    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    clock = _Clock(dev)
    cfg = model_config(name, args.tiny, args.layers)
    full = model_config(name, args.tiny, None)
    section = {} if section is None else section
    section.update(model=name, config={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, rows=[])
    section["layers"] = {k: cfg[k] for k in ("num_layers", "num_single_layers") if k in cfg}
    section["full_model_layers"] = {k: full[k] for k in ("num_layers", "num_single_layers") if k in full}
    modes = ["fwd", "fwd+bwd"] if args.train else ["fwd"]
    rows = {(m, mode): {"method": m, "mode": mode, "options": {}, "status": "skipped", "samples": [],
                        "peak_mib": None} for m in args.methods for mode in modes}  # fmt: skip
    section["rows"] = list(rows.values())
    if deadline is not None and time.monotonic() > deadline:
        for r in rows.values():
            r["error"] = "time budget spent before the model was built"
        return section
    try:
        model = build_model(name, cfg, dev, dtype)
        kwargs, section["input"] = model_inputs(name, cfg, args, dev, dtype)
    except Exception as e:  # noqa: BLE001 (the other model's rows still run)
        status, err = _error(e)
        for r in rows.values():
            r.update(status=status, error=f"building the model: {err}")
        return section
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()  # recomputes each block in the backward (only --train's step uses it)
    section["parameters"] = sum(p.numel() for p in model.parameters())
    section["weights_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    # The self-attention modules a conversion takes over (the same set times `dense`'s attention).
    attn_names = [r.name for r in convert(model, "dense").converted]
    revert(model)
    section["attention_modules"] = len(attn_names)
    inp = section["input"]
    print(f"{name}: {section['parameters'] / 1e6:,.1f} M parameters, {section['layers']}, {inp['image_tokens']} image "
          f"tokens {inp['grid']} + {inp['text_tokens']} text, batch {inp['batch']}, {args.dtype}, "
          f"{len(attn_names)} attention modules converted", flush=True)  # fmt: skip
    options = {m: validate_options(m, args.options.get(m, {})) for m in args.methods
               if m != "dense"}  # fmt: skip
    for (m, _), r in rows.items():
        r["options"] = options.get(m, {"processor": "stock (PyTorch SDPA)"})
    grad: list = []
    failed: set[tuple[str, str]] = set()
    dead = ""  # the row whose fault broke the CUDA context: every later call would fail too
    for rnd in range(args.repeats):
        if rnd and deadline is not None and time.monotonic() > deadline:
            break
        order = list(args.methods) if rnd % 2 == 0 else list(reversed(args.methods))
        for mode in modes:
            model.requires_grad_(mode == "fwd+bwd")
            for method in order:
                row = rows[(method, mode)]
                if dead and row["status"] == "skipped":
                    row["error"] = f"not run: the CUDA context broke in {dead}"
                    continue
                if (method, mode) in failed or (deadline is not None and time.monotonic() > deadline):
                    continue
                try:
                    if method != "dense":
                        convert(model, method, **args.options.get(method, {}))
                        model.requires_grad_(mode == "fwd+bwd")  # the new converter parameters too
                    step = _step(model, kwargs, mode, grad)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                    for _ in range(args.warmup):
                        step()
                    clock.sync()
                    row["samples"] += [clock.time(step) for _ in range(args.iters)]
                    if dev.type == "cuda":
                        peak = torch.cuda.max_memory_allocated(dev) / 2**20
                        row["peak_mib"] = max(row["peak_mib"] or 0.0, peak)
                    row["status"] = "ok"
                    if rnd == 0 and mode == "fwd" and attn_names:
                        a, t = attention_time(model, attn_names, step, clock)
                        row.update(attn_ms=a, attn_step_ms=t, attn_share=a / t if t > 0 else None)
                    if rnd == 0 and args.profile:
                        row["profile"] = kernel_profile(step, clock)
                except Exception as e:  # noqa: BLE001 (one failed method must not lose the others' rows)
                    row["status"], row["error"] = _error(e)
                    row["traceback"] = traceback.format_exc(limit=-12)
                    print(row["traceback"], file=sys.stderr, flush=True)
                    row.pop("profile", None)
                    failed.add((method, mode))
                finally:
                    try:
                        revert(model)
                        model.zero_grad(set_to_none=True)
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                    except Exception as e:  # noqa: BLE001 (a fault that broke the CUDA context: keep what ran)
                        row.setdefault("error", f"after the run: {_error(e)[1]}")
                        row["status"] = "error"
                        dead = f"{method} ({mode})"
                _summarise(section["rows"])
                print(_line(name, row), flush=True)
                save()
    for r in section["rows"]:
        if r["status"] == "skipped":
            r.setdefault("error", "time budget spent before its first timed step")
    _summarise(section["rows"])
    del model, kwargs, grad
    if dev.type == "cuda" and not dead:
        torch.cuda.empty_cache()
    return section


def _summarise(rows: list[dict]) -> None:
    for r in rows:
        if r["samples"]:
            r["ms"] = statistics.median(r["samples"])
            r["iters"] = len(r["samples"])
    for r in rows:
        dense = next((d for d in rows if d["method"] == "dense" and d["mode"] == r["mode"] and d.get("ms")), None)
        if r.get("ms") and dense is not None:
            r["ratio"] = dense["ms"] / r["ms"]


def _line(model: str, r: dict) -> str:
    if r["status"] != "ok":
        return f"{model:5s} {r['method']:7s} {r['mode']:8s} {r['status']}: {r.get('error', '')}"
    extra = f"  attention {r['attn_share']:.0%} of the forward" if r.get("attn_share") is not None else ""
    peak = f"  peak {r['peak_mib']:.0f} MiB" if r.get("peak_mib") else ""
    return (f"{model:5s} {r['method']:7s} {r['mode']:8s} {r['ms']:9.2f} ms  (x{len(r['samples'])})  "
            f"dense/method {r.get('ratio', float('nan')):.2f}{peak}{extra}")  # fmt: skip


def run(args: argparse.Namespace, save: Callable[[dict], None] = lambda result: None) -> dict:
    """Measure every model; ``save(result)`` after every measurement (a run cut short keeps its rows)."""
    t0 = time.monotonic()
    end = None if args.time_budget is None else t0 + args.time_budget
    meta = run_meta(_command(args.argv), args.device, args.commit or _git_commit(), diffusers=_diffusers_version())
    keys = ("dtype", "batch", "iters", "warmup", "repeats", "train", "grad_checkpointing", "tiny", "layers")
    settings = {k: getattr(args, k) for k in (*keys, "time_budget", "profile")}
    settings["order"] = "methods alternate: forward order in even rounds, reversed in odd ones"
    result: dict[str, Any] = {"benchmark": "convert_speed", "meta": meta, "settings": settings, "models": []}
    for i, name in enumerate(args.models):
        deadline = None if end is None else time.monotonic() + (end - time.monotonic()) / (len(args.models) - i)
        section: dict[str, Any] = {"model": name, "rows": []}
        result["models"].append(section)
        bench_model(name, args, deadline, lambda: save(result), section)
        save(result)
    return result


def _command(argv: list[str]) -> str:
    return " ".join(["benchmarks/convert_speed.py", *argv])


def _git_commit() -> str:
    from benchmarks._meta import git_commit

    return git_commit()


def _diffusers_version() -> str | None:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return None


# Plot -----------------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    """Bars of ms per step per method, one panel per model and mode; the forward's attention time darker; the
    dense / method ratio on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, mode) for s in result["models"] for mode in ("fwd", "fwd+bwd")
              if any(r["mode"] == mode for r in s["rows"])]  # fmt: skip
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4.2 * max(len(panels), 1), 4.6), squeeze=False)
    for ax, (s, mode) in zip(axes[0], panels, strict=False):
        rows = [r for r in s["rows"] if r["mode"] == mode]
        ms = [r.get("ms") or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), ms, color=[f"C{METHODS.index(r['method'])}" for r in rows], alpha=0.55)
        attn = [(r.get("attn_share") or 0.0) * (r.get("ms") or 0.0) for r in rows]  # the share of the median step
        ax.bar(range(len(rows)), attn, color=[f"C{METHODS.index(r['method'])}" for r in rows], hatch="//")
        for bar, r in zip(bars, rows, strict=True):
            label = f"{r['ratio']:.2f}x" if r.get("ratio") else r["status"]
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)  # fmt: skip
        ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30, fontsize=8)
        ax.set_ylabel("ms per step")
        layers = ", ".join(f"{k}={v}" for k, v in s.get("layers", {}).items())
        inp = s.get("input", {})
        ax.set_title(f"{s['model']} {mode}: {inp.get('image_tokens', '?')} + {inp.get('text_tokens', '?')} tokens\n"
                     f"{layers}  (hatched: self-attention, fwd)", fontsize=8)  # fmt: skip
    finish(fig, result, path)


# Command line ---------------------------------------------------------------------------------------------------------
def _names(allowed: tuple[str, ...], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if not names or bad or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"{what} must be distinct, comma-separated names from {', '.join(allowed)}; got {text!r}"
            )
        return names

    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {'integer' if kind is int else 'number'}")
        return value

    return parse


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        h = w = 0
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH in pixels, both positive multiples of 16")
    return h, w


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/convert_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=_names(MODELS, "--models"), default=list(MODELS), help="default wan,flux")
    p.add_argument("--methods", type=_names(METHODS, "--methods"), default=list(DEFAULT_METHODS),
                   help=f"default {','.join(DEFAULT_METHODS)} (dense = the stock model; also: agent)")  # fmt: skip
    p.add_argument("--set", dest="set_options", type=method_option(METHODS), action="append", default=[],
                   metavar="M.OPT=VALUE",
                   help="a method option (repeatable; JSON values), e.g. sla.sparsity=0.9 hybrid.kernel_size=9 "
                   "(defaults: sla.sparsity=0.95, sparse.sparsity=0.9)")  # fmt: skip
    p.add_argument("--layers", type=_positive(int), default=None,
                   help="blocks to build (Flux: N double + 2N single); default: the full model")  # fmt: skip
    p.add_argument("--frames", type=_positive(int), default=81, help="Wan video frames (default 81)")
    p.add_argument("--wan-size", type=_size, default=(480, 832), help="Wan HEIGHTxWIDTH (default 480x832)")
    p.add_argument("--flux-size", type=_positive(int), default=1024, help="Flux side in pixels (default 1024)")
    p.add_argument("--text-len", type=_positive(int), default=512, help="text tokens (default 512)")
    p.add_argument("--batch", type=_positive(int), default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 (fp32 on the CPU)")
    p.add_argument("--train", action="store_true", help="also time forward + backward (all weights trainable)")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="diffusers' gradient checkpointing for --train (at 32,760 tokens the activations of 30 blocks "
                   "may not fit)")  # fmt: skip
    p.add_argument("--iters", type=_positive(int), default=3, help="timed steps per method and round (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method and round (default 1)")
    p.add_argument("--repeats", type=_positive(int), default=2, help="rounds in alternating order (default 2)")
    p.add_argument("--profile", action="store_true", help="torch.profiler kernel table of one step per row (GPU)")
    p.add_argument("--time-budget", type=_positive(float), default=None,
                   help="seconds; nothing starts after it, rows not measured are 'skipped' (default none)")  # fmt: skip
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test, with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and inputs (smoke test)")
    p.add_argument("--commit", default=None, help="commit to record (default: the checkout's HEAD)")
    p.add_argument("--out", type=Path, default=None, help="folder (default benchmarks/results/<gpu or cpu>)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: {args.device!r} is not a torch device")
    if dev.type not in ("cuda", "cpu"):
        p.error(f"argument --device: {args.device!r} is not measured; use cuda, cuda:N or cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU on this machine (use --device cpu --tiny for a smoke test)")
    if dev.type == "cpu" and not args.tiny:
        p.error("--device cpu measures nothing useful at the real sizes; add --tiny (smoke test)")
    if args.warmup < 0:
        p.error(f"argument --warmup: {args.warmup} must be >= 0")
    if args.grad_checkpointing and not args.train:
        p.error("--grad-checkpointing only changes the --train step; add --train")
    if args.profile and dev.type != "cuda":
        p.error("--profile needs --device cuda (it reads CUDA kernel times)")
    args.dtype = args.dtype or ("fp32" if dev.type == "cpu" else "bf16")
    if args.tiny:  # a few hundred tokens: 3 x 8 x 8 (Wan), 16 x 16 (Flux), 8 text tokens, unless given
        given = set(argv if argv is not None else sys.argv[1:])
        args.frames = 9 if "--frames" not in given else args.frames
        args.wan_size = (128, 128) if "--wan-size" not in given else args.wan_size
        args.flux_size = 256 if "--flux-size" not in given else args.flux_size
        args.text_len = 8 if "--text-len" not in given else args.text_len
    if args.flux_size % 16:
        p.error(f"argument --flux-size: {args.flux_size} is not a multiple of 16")
    args.options = resolve_options(p, DEFAULT_OPTIONS, args.set_options)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    slug = device_slug(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else "cpu"
    out = args.out or Path(__file__).resolve().parent / "results" / slug
    out.mkdir(parents=True, exist_ok=True)
    result = run(args, save=lambda res: write_result(res, out, "convert_speed", partial=True))
    for note in write_result(result, out, "convert_speed", plot=False):
        print(note)
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("convert_speed.png skipped: matplotlib is not installed")
        else:
            png = out / "convert_speed.png"
            atomic_write(png, lambda path: plot(result, path))
            print(f"wrote {png}")
    bad = [r for s in result["models"] for r in s["rows"] if r["status"] == "error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
