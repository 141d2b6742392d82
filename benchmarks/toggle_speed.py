"""The fast-path switches, each off and on, side by side in one process: the inference forward and the training step
(forward, cross-entropy, backward, AdamW) of each model with each switch off and on, in alternating order, so that a
switch is made the default on a measured ratio, not on a guess. ``--modes graphs``: the training step compiled with CUDA
graphs (``torch.compile(mode="reduce-overhead")``, one compiled model per config), the setting of the training-speed
bar.

Switches (each a process-wide setting read at every forward):

* ``default``: the settings as shipped (nothing changed; for the profiling scripts, not in this script's default list);
* ``baseline``: every switch below off (whatever the shipped defaults are);
* ``pre_norm``: ``visionlin.layers.norm.FAST_PATHS["pre_norm"]`` (the ``layer_norm`` op, Triton first): the blocks'
  float32 LayerNorm and the bfloat16 cast of the ``Linear`` after it in one pass (inference only: where gradients are
  taken the blocks keep ``nn.LayerNorm``);
* ``stem_nhwc``: ``FAST_PATHS["stem_channels_last"]``: the convolutional image stems channels-last;
* ``patch_gemm``: ``FAST_PATHS["patch_gemm"]``: the non-overlapping patch stems (DeiT 16 x 16, Swin / PVT 4 x 4) as
  one matrix product over the patches instead of cuDNN's convolution;
* ``conv_strip``: the token depthwise convolution's strip kernels (``visionlin.kernels.triton.conv.TUNING["conv"]``
  and ``["weight_grad"]`` ``"strip"``; off: ``"tile"``);
* ``rope_fused``: ``FAST_PATHS["rope_fused"]``: the softmax stages' queries and keys rotated by one Triton pass;
* ``focus_tiles``: FLatten's focusing kernels at their shipped launch settings
  (``visionlin.kernels.triton.focus.TUNING``: tiles of 2048 entries; off: ``focus.NARROW``, the 8- / 4-token tiles
  before stop 41);
* ``focus_keep``: the shipped settings (as ``default``, the config to compare it with) plus
  ``focus.TUNING["keep_features"]``: FLatten's focused features and state kept from the forward for the backward
  (off: recomputed there, two focusing passes and the state kernel per layer);
* ``strip_s42``: the shipped settings with the token conv's strip settings of stop 42
  (``visionlin.kernels.triton.conv.STRIP`` / ``WG_STRIP`` as :data:`STRIP_S42` holds them), to compare with
  ``default``: the A/B of stop 43's per-kernel-size strip settings;
* ``na_tiles_s43``: the shipped settings with neighborhood attention's 2-D tiles of stop 43 (64-query 8 x 8 tiles
  everywhere, key blocks at least 16 columns: :data:`NA_TILES_S43`, ``narrow_cols`` off), to compare with
  ``default``: the A/B of stop 44's tiles by group row (``neighborhood.MEASURED_TILES``);
* ``na_s45``: the shipped settings with neighborhood attention's tiles and bias-gradient reduction of stop 45
  (:data:`NA_TILES_S45`: the backward's register cap of 128 at rows of 8 and longer, 4 warps at rows of 8;
  :data:`NA_BIAS_GRAD_PER_SM_S45`: 2 programs per SM at every map), to compare with ``default``: the A/B of s46's
  settings;
* ``na_packed``: :data:`visionlin.layers.neighborhood.FAST_PATHS` ``["qkv_packed"]`` (on since s50): the neighborhood
  layers hand q, k, v to the op packed (one packed gradient) instead of split (three gradients that autograd
  concatenates);
* ``na_split``: the shipped settings with that switch off (s47-s49's layer), to compare with ``default`` (until s50
  the config ``na_qkv_packed``, the packed call against the then shipped split one);
* ``gla_packed``: :data:`visionlin.layers.gla.FAST_PATHS` ``["qkv_packed"]`` (on since s51): ViG's layers hand their
  projections' outputs to the bidirectional GLA op packed (one gradient for ``qkv_proj``'s output and one for the
  gates) instead of split (the two directions' ten gradients that autograd sums and concatenates);
* ``gla_split``: the shipped settings with that switch off (s48-s50's layer), to compare with ``default`` (until s51
  the config ``gla_qkv_packed``, the packed call against the then shipped split one);
* ``gla_token_conv``: the shipped settings with ViG's locality convolution on the token layout
  (:data:`visionlin.layers.gla.FAST_PATHS` ``["token_conv"]``, off: 1.003x on ViG-S at s51) instead of a
  ``Conv2d`` between layout changes, to compare with ``default``;
* ``all``: every switch on (``focus_keep``, ``strip_s42``, ``na_tiles_s43``, ``na_s45``, ``na_split``,
  ``gla_split`` and ``gla_token_conv`` excepted: none is a fast path of its own).

Usage (on a GPU machine):
    python benchmarks/toggle_speed.py --out benchmarks/results/h200 [--models nat_tiny,...] [--configs ...]

Writes ``toggle_speed.json`` (rows: model, mode, config, ms per call, img/s, ratio to the model's ``baseline`` in the
same sweeps, or to ``default`` where no ``baseline`` was asked for: ``speedup_vs_<reference>``; meta: command, commit,
date, GPU, versions) and ``toggle_speed.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
import unittest.mock
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish, grouped_bars  # noqa: E402
from benchmarks._timing import tuned  # noqa: E402
from visionlin.train.bench import _compile_scope, train_step, write_result  # noqa: E402

STEM = "toggle_speed"
CONFIGS = (
    "default",
    "baseline",
    "pre_norm",
    "stem_nhwc",
    "patch_gemm",
    "conv_strip",
    "rope_fused",
    "focus_tiles",
    "focus_keep",
    "strip_s42",
    "na_tiles_s43",
    "na_s45",
    "na_packed",
    "na_split",
    "gla_packed",
    "gla_split",
    "gla_token_conv",
    "all",
)
#: The configs that change one shipped setting, compared with ``default`` (ask for both), not switches.
SHIPPED_VARIANTS = (
    "focus_keep", "strip_s42", "na_tiles_s43", "na_s45", "na_split", "gla_split", "gla_token_conv",
)  # fmt: skip
# this script's default: each switch against all off
TOGGLES = tuple(c for c in CONFIGS[1:] if c not in SHIPPED_VARIANTS)
#: The token conv's strip settings (forward, weight gradient) by kernel size at stop 42, before s43's sweep.
STRIP_S42 = (
    {1: (4, 32, 32), 3: (4, 32, 32), 5: (4, 32, 32), 7: (4, 32, 32)},
    {1: (8, 8, 64), 3: (8, 8, 64), 5: (8, 4, 64), 7: (4, 4, 64)},
)
#: Neighborhood attention's tiles at stop 43 (``neighborhood.MEASURED_TILES``' form): 64 queries in rows of 8, the
#: general rule's warps, forward and backward, at every group row.
NA_TILES_S43 = ((None, (64, 8, None, None), (64, 8, None, None)),)
#: Neighborhood attention's tiles at stop 45 (``neighborhood.MEASURED_TILES`` before s46's backward warps / register
#: caps) and its bias-gradient reduction's programs per SM then (``BIAS_GRAD_PER_SM``: 2 at every map).
NA_TILES_S45 = (
    (8, (64, 8, None, None), (64, 8, None, None)),
    (16, (32, 2, 2, None), (64, 16, None, None)),
    (32, (32, 2, 2, None), (16, 4, 2, None)),
    (None, (64, 8, None, None), (16, 2, 2, None)),
)
NA_BIAS_GRAD_PER_SM_S45 = ((None, 2),)
MODELS = "nat_tiny,nalaformer_tiny,flatten_pvt_small,mavit_tiny,swin_tiny_patch4_window7_224,infvit_small"
MODELS += ",agent_deit_small,flatten_deit_small,flatten_swin_tiny"


def add_configs_argument(parser: argparse.ArgumentParser) -> None:
    """``--configs`` of the profiling scripts (``profile_models.py``, ``host_overhead.py``): read with
    :func:`parse_configs`, applied with :func:`switches`."""
    parser.add_argument(
        "--configs",
        default="default",
        help="comma-separated fast-path settings of benchmarks/toggle_speed.py, each run in turn (default: the "
        "shipped settings; baseline: every switch off)",
    )


def parse_configs(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """``value`` (comma-separated config names) as a list; an unknown name is a usage error listing the allowed."""
    configs = [c for c in value.split(",") if c]
    if (bad := [c for c in configs if c not in CONFIGS]) or not configs:
        parser.error(f"--configs: unknown {bad or value!r}; allowed: {', '.join(CONFIGS)}")
    return configs


@contextlib.contextmanager
def switches(config: str) -> Iterator[None]:
    """The process-wide settings of ``config`` (``baseline``: every switch off, whatever the shipped defaults),
    restored afterwards."""
    from visionlin.kernels.triton import conv, focus
    from visionlin.kernels.triton import neighborhood as na
    from visionlin.layers import gla as gla_layer
    from visionlin.layers import neighborhood as na_layer
    from visionlin.layers import norm

    def on(switch: str) -> bool:
        return config in (switch, "all")

    keep = config in ("default", *SHIPPED_VARIANTS)  # the shipped settings, still restored afterwards
    strip = "strip" if on("conv_strip") else "tile"
    norm_kw = {} if keep else {
        "pre_norm": on("pre_norm"),
        "stem_channels_last": on("stem_nhwc"),
        "patch_gemm": on("patch_gemm"),
        "rope_fused": on("rope_fused"),
    }  # fmt: skip
    conv_kw = {} if keep else {"conv": strip, "weight_grad": strip}
    # the kept features are an opt-in memory trade: on in focus_keep only (not in all), off in the others but default
    focus_kw = {} if config == "default" else {"keep_features": config == "focus_keep"}
    if not keep and not on("focus_tiles"):
        focus_kw.update(focus.NARROW)
    with contextlib.ExitStack() as stack:
        if config == "strip_s42":  # kernel-size keys: updated inside tuned(), restored afterwards
            for table, values in zip((conv.STRIP, conv.WG_STRIP), STRIP_S42, strict=True):
                stack.enter_context(tuned(table))
                table.update(values)
        if config == "na_s45":
            stack.enter_context(unittest.mock.patch.object(na, "MEASURED_TILES", NA_TILES_S45))
            stack.enter_context(unittest.mock.patch.object(na, "BIAS_GRAD_PER_SM", NA_BIAS_GRAD_PER_SM_S45))
        if not keep:
            stack.enter_context(tuned(na_layer.FAST_PATHS, qkv_packed=on("na_packed")))
            stack.enter_context(tuned(gla_layer.FAST_PATHS, qkv_packed=on("gla_packed")))
        if config == "na_split":
            stack.enter_context(tuned(na_layer.FAST_PATHS, qkv_packed=False))
        if config == "gla_split":
            stack.enter_context(tuned(gla_layer.FAST_PATHS, qkv_packed=False))
        if config == "gla_token_conv":
            stack.enter_context(tuned(gla_layer.FAST_PATHS, token_conv=True))
        if config == "na_tiles_s43":
            stack.enter_context(tuned(na.TUNING, narrow_cols=False))
            stack.enter_context(unittest.mock.patch.object(na, "MEASURED_TILES", NA_TILES_S43))
        stack.enter_context(tuned(norm.FAST_PATHS, **norm_kw))
        stack.enter_context(tuned(conv.TUNING, **conv_kw))
        stack.enter_context(tuned(focus.TUNING, **focus_kw))
        yield


def reference(configs: list[str]) -> str:
    """The config the ratios are to: ``baseline`` (every switch off) if measured, else ``default`` (the shipped
    settings: for the configs that change one setting of them, :data:`SHIPPED_VARIANTS`)."""
    return "baseline" if "baseline" in configs else "default"


def _step(model: torch.nn.Module, mode: str, batch: int, size: int):
    """The timed call: an inference forward (``eval``, no grad) or a training step, under bf16 autocast."""
    x = torch.randn(batch, 3, size, size, device="cuda")
    if mode == "infer":
        model.eval()

        def infer() -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(x)

        return infer
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    labels = torch.randint(0, model.num_classes, (batch,), device="cuda")
    if mode == "graphs":  # compiled with CUDA graphs: the switches are read while it traces (its first calls)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        return functools.partial(train_step(compiled, opt, labels, new_step=True), x)
    return functools.partial(train_step(model, opt, labels), x)


def _seconds(fn, iters: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


#: The configs that switch one layer type's call (``visionlin.layers.<module>``'s token mixer): on a model without
#: such a layer they change nothing, and :func:`measure` records them as skipped instead of compiling and timing them.
LAYER_CONFIGS = {
    "na_packed": "neighborhood", "na_split": "neighborhood",
    "gla_packed": "gla", "gla_split": "gla", "gla_token_conv": "gla",
}  # fmt: skip


def inapplicable(model: torch.nn.Module, configs: list[str]) -> dict[str, str]:
    """``{config: reason}`` for the :data:`LAYER_CONFIGS` among ``configs`` that ``model`` has no layer for."""
    from visionlin.layers import gla, neighborhood

    kinds = {"neighborhood": neighborhood.NeighborhoodAttention, "gla": gla.GatedLinearAttention2D}
    present = {k for k, cls in kinds.items() if any(isinstance(m, cls) for m in model.modules())}
    return {
        c: f"no {LAYER_CONFIGS[c]} layer: the config changes nothing"
        for c in configs
        if c in LAYER_CONFIGS and LAYER_CONFIGS[c] not in present
    }


def measure(name: str, mode: str, configs: list[str], args) -> list[dict]:
    """Every config of one model and mode: warm-up each (compiles its kernels), then ``repeats`` sweeps over the
    configs in alternating order; the median seconds per call per config. A config that switches a layer the model
    does not have (:func:`inapplicable`) is a ``skipped`` row, not measured."""
    import timm

    import visionlin  # noqa: F401 (registers the models)

    torch.manual_seed(0)
    batch = args.batch_infer if mode == "infer" else args.batch_train
    skip = inapplicable(timm.create_model(name, device="meta"), configs)  # (meta: no memory, no init)
    rows = [{"model": name, "mode": mode, "config": c, "status": "skipped", "error": why} for c, why in skip.items()]
    configs = [c for c in configs if c not in skip]
    try:
        # graphs: a fresh dynamo cache per model (the models share forward code), a hit recompile limit raising
        with _compile_scope(mode == "graphs"):
            if mode == "graphs":  # one compiled model per config (same weights), each traced under its switches
                fns = {}
                for c in configs:
                    torch.manual_seed(0)
                    fns[c] = _step(timm.create_model(name).cuda(), mode, batch, args.size)
            else:
                fn = _step(timm.create_model(name).cuda(), mode, batch, args.size)
                fns = dict.fromkeys(configs, fn)
            for c in configs:
                with switches(c):
                    for _ in range(max(args.warmup, 3) if mode == "graphs" else args.warmup):  # graphs: record, replay
                        fns[c]()
            times: dict[str, list[float]] = {c: [] for c in configs}
            for r in range(args.repeats):
                for c in configs if r % 2 == 0 else configs[::-1]:
                    with switches(c):
                        times[c].append(_seconds(fns[c], args.iters))
    except torch.cuda.OutOfMemoryError as e:
        oom = str(e)[:200]
        return rows + [{"model": name, "mode": mode, "config": c, "status": "oom", "error": oom} for c in configs]
    except Exception as e:  # noqa: BLE001 (recorded; the other models still run)
        error = f"{type(e).__name__}: {e}"[:300]
        print(f"{name} {mode}: {error}", flush=True)
        return rows + [{"model": name, "mode": mode, "config": c, "status": "error", "error": error} for c in configs]
    finally:
        torch.cuda.empty_cache()
    ref = reference(configs)
    base = statistics.median(times[ref])
    for c in configs:
        s = statistics.median(times[c])
        row = {"model": name, "mode": mode, "config": c, "status": "ok", "batch": batch, "size": args.size,
               "ms": 1e3 * s, "img_s": batch / s, "sweeps_ms": [1e3 * t for t in times[c]]}  # fmt: skip
        row[f"speedup_vs_{ref}"] = base / s
        print(f"{name:32s} {mode:5s} {c:10s} {1e3 * s:8.2f} ms  {base / s:.3f}x vs {ref}", flush=True)
        rows.append(row)
    return rows


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"speedup_vs_{result['reference']}"
    rows = [r for r in result["rows"] if r["status"] == "ok" and key in r]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(modes)), figsize=(6 * max(1, len(modes)), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=False):
        mrows = [r for r in rows if r["mode"] == mode]
        models = list(dict.fromkeys(r["model"] for r in mrows))
        configs = list(dict.fromkeys(r["config"] for r in mrows))
        speedup = {(r["model"], r["config"]): r[key] for r in mrows}
        grouped_bars(ax, models, configs, lambda m, c, sp=speedup: sp.get((m, c), 0), fontsize=7, rotation=20)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"speed vs {result['reference']} (same sweeps)")
        ax.set_title(mode, fontsize=9)
        ax.legend(fontsize=7)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/toggle_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for toggle_speed.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--models", default=MODELS, help="comma-separated model names (visionlin's or timm's)")
    p.add_argument("--configs", default=",".join(TOGGLES), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument(
        "--modes",
        default="infer,train",
        help="comma-separated subset of infer, train, graphs (the training step compiled with CUDA graphs, "
        "torch.compile mode='reduce-overhead': one compiled model per config, ~1 min each)",
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-infer", type=int, default=256)
    p.add_argument("--batch-train", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args(argv)
    configs = args.configs.split(",")
    modes = args.modes.split(",")
    if bad := sorted(set(configs) - set(CONFIGS)):
        p.error(f"unknown config(s) {bad}; choose from {list(CONFIGS)}")
    if "baseline" not in configs and "default" not in configs:
        p.error("--configs must include baseline or default (the ratios are to baseline, else to default)")
    if bad := sorted(set(modes) - {"infer", "train", "graphs"}):
        p.error(f"unknown mode(s) {bad}; choose from ['infer', 'train', 'graphs']")
    for flag in ("size", "batch_infer", "batch_train", "warmup", "iters", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.size % 32:
        p.error(f"--size must be a multiple of 32 (the hierarchical models' stride), got {args.size}")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result = {"benchmark": STEM, "meta": gpu_meta(argv, args.commit), "reference": reference(configs), "rows": rows}
    for name in args.models.split(","):
        for mode in modes:
            rows += measure(name, mode, configs, args)
            write_result(result, args.out, STEM, partial=True)  # an interrupted run keeps what it measured
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
