"""Neighborhood attention at the op level: our Triton kernels against dense SDPA over all tokens (what a neighborhood
kernel must beat to be worth having) and the gather reference, forward and forward + backward; with a bias table, the
Triton kernels again with the table frozen (the cost of its gradient by difference), and a per-kernel profile of the
Triton forward + backward.

Each row has the eager time per call (``ms``, CUDA events around a loop of calls: host and GPU) and, but for the
reference, ``graph_ms``: the same call replayed from a CUDA graph (GPU time alone; on a slow host the eager forward +
backward of the Triton kernels is bound by its launches, and the two differ).

Default shape: NAT-T stage 1 (B=64, 56 x 56 tokens, 2 heads, head dim 32, kernel 7, with NAT's rpb), bf16. The issue's
target: forward + backward at least 3x faster than dense SDPA over the same tokens (dense SDPA forward took 0.80 ms
there on an H200). ``--sweep`` also times the Triton kernels over their tile settings (``TUNING`` in
``visionlin/kernels/triton/neighborhood.py``) and records every one, the fastest first.

``--tile-sweep`` (alone): the query-tile width and the forward's keys per block / the backward's query block at
NAT-T's and DiNAT-T's attention shapes (``--tile-shapes``), each kernel replayed from a CUDA graph, written to
``neighborhood_op_tiles.json``. ``--bias-grad-sweep`` (alone): the backward's bias-gradient reduction
(``_bias_grad_kernel``) at those shapes over its sums per program (``BIAS_GRAD_ELEMENTS``) and programs per SM
(``BIAS_GRAD_PER_SM``), written to ``neighborhood_op_bias_grad.json``. ``--bwd-block-sweep`` (alone): the backward
at each shape's shipped key tile over its query block, warps and register cap, written to
``neighborhood_op_bwd_block.json``. ``--packed-ab``: forward + backward from one packed ``qkv``, the split call on
its views against ``neighborhood_attention_qkv``'s packed gradient (``packed_ab`` in the result).

Usage (on a GPU machine):
    python benchmarks/neighborhood_op.py --out benchmarks/results/h200 [--sweep] [--commit SHA]
        [--batch 64 --size 56 --heads 2 --dim 32 --kernel 7 --dilation 1 --dtype bf16 --no-rpb]

Writes ``neighborhood_op.json`` (rows + meta: command, commit, date, GPU, versions) and ``neighborhood_op.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._meta import gpu_meta  # noqa: E402
from benchmarks._plot import finish, grouped_bars  # noqa: E402
from benchmarks._timing import DTYPES, add_timing_flags, check_timing_flags, cuda_ms, graph_ms, tuned  # noqa: E402
from visionlin.kernels import neighborhood_attention, neighborhood_attention_reference  # noqa: E402
from visionlin.train.bench import write_result  # noqa: E402
from visionlin.train.bench_op import kernel_rows  # noqa: E402

STEM = "neighborhood_op"
#: NAT-T's and DiNAT-T's attention calls at 224 px (map side, heads, dilation; head dim 32, kernel 7, NAT's bias) and
#: their calls per training step: what ``--tile-sweep`` times (at ``--batch``; 128 for the models' steps).
TILE_SHAPES = {
    "nat_t_s1": (56, 2, 1, 3),
    "nat_t_s2": (28, 4, 1, 4),
    "nat_t_s3": (14, 8, 1, 18),
    "nat_t_s4": (7, 16, 1, 5),
    "dinat_t_s1_d8": (56, 2, 8, 1),
    "dinat_t_s2_d4": (28, 4, 4, 2),
    "dinat_t_s3_d2": (14, 8, 2, 9),
}


def _inputs(args: argparse.Namespace, grad: bool):
    dt = DTYPES[args.dtype]
    shape = (args.batch, args.size, args.size, args.heads, args.dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=grad) for _ in range(3))
    rpb = None
    if args.rpb:
        rpb = torch.randn(args.heads, 2 * args.kernel - 1, 2 * args.kernel - 1, device="cuda", requires_grad=grad)
    return q, k, v, rpb


def _methods(args: argparse.Namespace) -> dict[str, Callable]:
    def triton(q, k, v, rpb):
        return neighborhood_attention(q, k, v, args.kernel, args.dilation, rpb=rpb, backend="triton")

    def reference(q, k, v, rpb):
        return neighborhood_attention_reference(q, k, v, args.kernel, args.dilation, rpb=rpb)

    def sdpa_dense(q, k, v, rpb):
        # Every query against all X * Y keys (no mask, no bias): the cost a neighborhood kernel has to beat.
        b, x, y, h, d = q.shape
        qt, kt, vt = (t.reshape(b, x * y, h, d).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).reshape(b, x, y, h, d)

    def triton_frozen_rpb(q, k, v, rpb):
        # the bias table without a gradient: what the bias-gradient pass (atomics + scatter) costs, by difference
        return triton(q, k, v, None if rpb is None else rpb.detach())

    methods = {"triton": triton, "sdpa_dense": sdpa_dense}
    if args.rpb:
        methods["triton_frozen_rpb"] = triton_frozen_rpb
    if not args.no_reference:
        methods["reference"] = reference
    return methods


def _measure(name: str, fn: Callable, args: argparse.Namespace) -> list[dict]:
    rows = []
    for mode in ("forward", "forward_backward"):
        grad = mode == "forward_backward"
        row = {"method": name, "mode": mode, "status": "ok"}
        try:
            q, k, v, rpb = _inputs(args, grad)
            go = torch.randn_like(q)
            if grad:
                ins = [t for t in (q, k, v, rpb) if t is not None]

                def step(fn=fn, q=q, k=k, v=v, rpb=rpb, go=go, ins=ins):
                    # the dense baseline has no bias: its rpb gradient is None (allow_unused), not an error
                    torch.autograd.grad(fn(q, k, v, rpb), ins, go, allow_unused=True)
            else:

                def step(fn=fn, q=q, k=k, v=v, rpb=rpb):
                    with torch.no_grad():
                        fn(q, k, v, rpb)

            torch.cuda.reset_peak_memory_stats()
            row["ms"] = cuda_ms(step, args.warmup, args.iters, args.repeats)
            row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            if name != "reference":  # GPU time alone (replayed from a CUDA graph): the call without the host's part
                try:
                    row["graph_ms"] = graph_ms(step, args.warmup, args.iters)
                except Exception as e:  # noqa: BLE001 (recorded; the eager time stands)
                    row["graph_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        except torch.cuda.OutOfMemoryError as e:
            row |= {"status": "oom", "error": str(e).splitlines()[0][:300]}
        except Exception as e:  # noqa: BLE001 (recorded; the other methods still run)
            row |= {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _speedups(rows: list[dict], key: str) -> dict[str, float]:
    """Dense SDPA's time over the Triton kernels' per mode, from the rows' ``key`` (``ms`` or ``graph_ms``)."""
    by = {(r["method"], r["mode"]): r.get(key) for r in rows}
    return {
        m: by[("sdpa_dense", m)] / by[("triton", m)]
        for m in ("forward", "forward_backward")
        if by.get(("triton", m)) and by.get(("sdpa_dense", m))
    }


def _accuracy(args: argparse.Namespace) -> dict:
    """Relative error of the Triton kernels against the float32 reference at the benchmark shape (batch capped at 4)."""
    small = argparse.Namespace(**{**vars(args), "batch": min(args.batch, 4)})
    q, k, v, rpb = _inputs(small, True)
    go = torch.randn_like(q)
    ins = [t for t in (q, k, v, rpb) if t is not None]
    out = neighborhood_attention(q, k, v, args.kernel, args.dilation, rpb=rpb, backend="triton")
    grads = torch.autograd.grad(out, ins, go)
    ref = neighborhood_attention_reference(*(t.float() for t in (q, k, v)), args.kernel, args.dilation, rpb=rpb)
    ref_grads = torch.autograd.grad(ref, ins, go.float())
    rel = {"out": ((out.float() - ref).norm() / ref.norm()).item()}
    for name, a, b in zip(("dq", "dk", "dv", "drpb"), grads, ref_grads, strict=False):
        rel[name] = ((a.float() - b.float()).norm() / b.float().norm()).item()
    return rel


def _profile(args: argparse.Namespace, steps: int = 5) -> list[dict]:
    """GPU time per step of each kernel in a Triton forward + backward (torch.profiler), the largest first: which part
    of the backward costs what."""
    from torch.profiler import ProfilerActivity, profile

    fn = _methods(args)["triton"]
    q, k, v, rpb = _inputs(args, True)
    go = torch.randn_like(q)
    ins = [t for t in (q, k, v, rpb) if t is not None]
    for _ in range(3):
        torch.autograd.grad(fn(q, k, v, rpb), ins, go)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.autograd.grad(fn(q, k, v, rpb), ins, go)
        torch.cuda.synchronize()
    return kernel_rows(prof.key_averages(), steps)


def _bias_dot_ab(args: argparse.Namespace, rounds: int = 3) -> list[dict]:
    """The Triton forward and backward kernels' GPU time (:func:`_profile`) with the bias added after the score
    product (``BIAS_DOT_SCALES`` emptied) and inside its accumulator (the shipped range), alternating ``rounds``
    times in one process: the bias-in-the-product change measured side by side."""
    from visionlin.kernels.triton import neighborhood as nt

    shipped, rows = nt.BIAS_DOT_SCALES, []
    try:
        for r in range(rounds):
            for setting, scales in (("after", (1.0, 0.0)), ("in_product", shipped)):
                nt.BIAS_DOT_SCALES = scales
                kernels = {p["kernel"]: p["ms_per_step"] for p in _profile(args)}
                row = {"round": r, "bias": setting, "fwd_ms": kernels.get("_fwd_kernel"),
                       "bwd_ms": kernels.get("_bwd_kernel")}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        nt.BIAS_DOT_SCALES = shipped
    return rows


def _packed_ab(args: argparse.Namespace, rounds: int = 3) -> list[dict]:
    """Forward + backward from one packed ``qkv`` leaf ``[B, X, Y, 3, H, D]`` (a projection's output): the split call
    on its ``unbind`` views (autograd concatenates the three gradients) against ``neighborhood_attention_qkv`` (one
    packed gradient), alternating ``rounds`` times, GPU time per call replayed from a CUDA graph."""
    from visionlin.kernels import neighborhood_attention_qkv

    q, _, _, rpb = _inputs(args, grad=True)
    qkv = torch.randn(*q.shape[:3], 3, *q.shape[3:], device="cuda", dtype=q.dtype, requires_grad=True)
    go = torch.randn_like(q)
    ins = [t for t in (qkv, rpb) if t is not None]

    def split():
        out = neighborhood_attention(*qkv.unbind(3), args.kernel, args.dilation, rpb=rpb, backend="triton")
        torch.autograd.grad(out, ins, go)

    def packed():
        out = neighborhood_attention_qkv(qkv, args.kernel, args.dilation, rpb=rpb, backend="triton")
        torch.autograd.grad(out, ins, go)

    rows = []
    for r in range(rounds):
        for name, fn in (("split", split), ("packed", packed)):
            rows.append({"round": r, "call": name, "graph_ms": graph_ms(fn, args.warmup, args.iters)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _bias_grad_ab(args: argparse.Namespace, rounds: int = 3) -> list[dict]:
    """The backward's bias-gradient reduction at the benchmark's shape (one float32 slice per batch element, as the
    backward stores them): the Triton kernel against ``torch.sum`` over the slices + the table index built from
    ``neighborhood_indices`` + ``scatter_add_`` (what ran before; under CUDA graphs the index was built every call),
    alternating ``rounds`` times, GPU time per call replayed from a CUDA graph."""
    from visionlin.kernels import neighborhood as na
    from visionlin.kernels.triton import neighborhood as nt

    (kx, dx), (ky, dy) = (na.effective_window(args.size, args.kernel, args.dilation),) * 2
    shape = (args.heads, 2 * args.kernel - 1, 2 * args.kernel - 1)
    ds = torch.randn(args.batch, args.heads, args.size, args.size, kx * ky, device="cuda")
    drpb = torch.zeros(shape, device="cuda")

    def kernel():
        nt._bias_grad(ds, drpb, args.size, args.size, kx, ky, dx, dy)

    def torch_path():
        _, bix = na.neighborhood_indices(args.size, args.kernel, dx, ds.device)
        _, biy = na.neighborhood_indices(args.size, args.kernel, dy, ds.device)
        index = (bix[:, None, :, None] * shape[2] + biy[None, :, None, :]).reshape(1, -1).expand(shape[0], -1)
        drpb.view(shape[0], -1).scatter_add_(1, index, ds.sum(0).view(shape[0], -1))

    drpb.zero_()
    kernel()
    got = drpb.clone()
    drpb.zero_()
    torch_path()
    rows = [{"max_abs_diff": float((got - drpb).abs().max()), "max_abs": float(drpb.abs().max())}]
    for r in range(rounds):
        for name, fn in (("torch", torch_path), ("kernel", kernel)):
            rows.append({"round": r, "method": name, "graph_ms": graph_ms(fn, args.warmup, args.iters)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _time_setting(args: argparse.Namespace, fn: Callable, mode: str, config: dict, timer: Callable, key: str,
                  stream: torch.cuda.Stream | None = None, **extra) -> dict:  # fmt: skip
    """One launch setting (``config``: keys of ``TUNING``, the rest at their defaults) timed by ``timer(step)`` into
    ``row[key]``: the forward alone, without a gradient, or the backward alone (one saved forward, its graph kept,
    run on ``stream`` when given: the stream a graph timer captures on); an error is recorded in the row (the other
    settings still run). ``extra`` leads the row; the row is printed."""
    from visionlin.kernels.triton import neighborhood as nt

    row = {**extra, "method": "triton", "mode": mode, "status": "ok", "config": config}
    try:
        with tuned(nt.TUNING, **config):
            q, k, v, rpb = _inputs(args, mode == "backward")
            if mode == "forward":

                def step():
                    with torch.no_grad():
                        fn(q, k, v, rpb)
            else:
                ins = [t for t in (q, k, v, rpb) if t is not None]
                if stream is not None:
                    stream.wait_stream(torch.cuda.current_stream())
                with contextlib.nullcontext() if stream is None else torch.cuda.stream(stream):
                    out = fn(q, k, v, rpb)
                    go = torch.randn_like(out)

                def step():
                    torch.autograd.grad(out, ins, go, retain_graph=True)

            row[key] = timer(step)
    except Exception as e:  # noqa: BLE001 (recorded; the other settings still run)
        row |= {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print(json.dumps(row), flush=True)
    return row


def _sweep(args: argparse.Namespace) -> list[dict]:
    """The forward alone over the forward's settings, then the backward alone over the backward's: query block,
    warps, register cap (:func:`_time_setting`, eager); rows sorted fastest first per mode."""
    fn = _methods(args)["triton"]
    rows = []

    def run(mode: str, config: dict) -> None:
        timer = functools.partial(cuda_ms, warmup=args.warmup, iters=args.iters, repeats=args.repeats)
        rows.append(_time_setting(args, fn, mode, config, timer, "ms"))

    for block_k, warps, stages, maxnreg in itertools.product((16, 32), (4, 8), (1, 2), (0, 128)):
        run("forward", dict(block_k=block_k, warps=warps, stages=stages, maxnreg=maxnreg))
    for block, warps, maxnreg in itertools.product((16, 32), (4, 8), (0, 128)):  # 0: no register cap
        run("backward", dict(bwd_block=block, bwd_warps=warps, bwd_stages=1, bwd_maxnreg=maxnreg))
    return sorted(rows, key=lambda r: (r["mode"], r.get("ms", float("inf"))))


def _tile_sweep(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    """At each of ``--tile-shapes``: the forward alone over query-tile widths with and without narrow key blocks
    (``TUNING["narrow_cols"]``) and over 16- / 32-query tiles (``tile_q``) at 2 and 4 warps, the backward alone over the
    same and its query blocks, each replayed from a CUDA graph (kernel time: at NAT-T's late stages an eager call is
    the launcher's host time). The query tile sets the key tile of the backward too. ``save`` gets the rows after
    each shape (a run cut by a time limit keeps what it measured)."""
    rows = []
    stream = torch.cuda.Stream()  # the backward's forward runs where its graph is captured
    timer = functools.partial(graph_ms, warmup=args.warmup, iters=args.iters, stream=stream)
    for name in args.tile_shapes:
        size, heads, dilation, calls = TILE_SHAPES[name]
        shape = argparse.Namespace(**{**vars(args), "size": size, "heads": heads, "dilation": dilation})
        fn = _methods(shape)["triton"]  # the shape's dilation, not the command line's
        # query-tile widths with and without narrow key blocks; 16- and 32-query tiles (narrow) at 2 and 4 warps
        small = [dict(narrow_cols=True, tile_q=q, tile_y=ty) for q, ty in ((16, 2), (16, 4), (32, 2), (32, 4))]
        fwd = [dict(tile_q=64, tile_y=ty, narrow_cols=n) for n in (False, True) for ty in (4, 8, 16)]
        fwd += [c | dict(warps=w) for c in small for w in (2, 4)]
        bwd = [
            dict(tile_q=64, tile_y=ty, narrow_cols=n, bwd_block=bb)
            for n in (False, True)
            for ty in (4, 8, 16)
            for bb in (16, 32)
        ]
        bwd += [c | dict(bwd_warps=w) for c in small for w in (2, 4)]
        for mode, configs in (("forward", [{}, *fwd]), ("backward", [{}, *bwd])):
            for config in configs:  # {}: the shipped settings
                row = _time_setting(shape, fn, mode, config, timer, "graph_ms", stream, shape=name, calls=calls)
                rows.append(row)
                torch.cuda.empty_cache()
        save(rows)
    _print_best(rows, args.tile_shapes, ("forward", "backward"))
    return rows


#: ``(bwd_block, bwd_warps, bwd_maxnreg)`` settings ``--bwd-block-sweep`` times at each shape's shipped key tile.
BWD_BLOCK_SETTINGS = tuple(itertools.product((16, 32, 64, 128, 256), (2, 4, 8), (None, 0)))
#: And then the shipped settings with dq stored directly where a key tile holds its group (``bwd_dq_direct``, s46; on
#: since s47), the backward's own key tiles of 128 / 256 keys (``bwd_tile_q``) at 4 / 8 warps, uncapped, and (s47) the
#: delta pass fused into the backward everywhere (``bwd_delta_fused``), and the query offsets in int32 everywhere /
#: int64 everywhere (``bwd_int32_offsets``; shipped since s51: int32 except at one key tile a group).
BWD_TILE_CONFIGS = (
    {"bwd_dq_direct": True},
    *(dict(bwd_tile_q=t, bwd_warps=w, bwd_maxnreg=0, bwd_dq_direct=True) for t in (128, 256) for w in (4, 8)),
    {"bwd_delta_fused": True},  # (s47) rowsum(dO * O) in the backward kernel, no pass of its own
    {"bwd_int32_offsets": True},  # (s47) the backward loop's query offsets in int32, direct dq too
    {"bwd_int32_offsets": False},  # (s51) in int64 everywhere: s50's shipped backward
)
#: The forward's other settings ``--bwd-block-sweep`` times after the backward's, against the shipped forward.
FWD_CONFIGS = ({"fwd_int32_offsets": False},)  # the forward loop's key offsets in int64 (s50's shipped forward)


def _bwd_block_sweep(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    """At each of ``--tile-shapes``: the backward alone at the shipped key tile (``MEASURED_TILES``' row for the
    shape's group row, set explicitly) over :data:`BWD_BLOCK_SETTINGS`: query blocks of 16 to 256 (at NAT-T's 14 x 14
    and 7 x 7 maps a key tile's whole inverse neighbourhood in one or two blocks instead of a row at a time), 2 / 4 / 8
    warps, the default register cap or none; then :data:`BWD_TILE_CONFIGS`; then the forward, shipped and with
    :data:`FWD_CONFIGS`; each replayed from a CUDA graph, the shipped settings first."""
    from visionlin.kernels.triton import neighborhood as nt

    rows = []
    stream = torch.cuda.Stream()
    timer = functools.partial(graph_ms, warmup=args.warmup, iters=args.iters, stream=stream)
    for name in args.tile_shapes:
        size, heads, dilation, calls = TILE_SHAPES[name]
        shape = argparse.Namespace(**{**vars(args), "size": size, "heads": heads, "dilation": dilation})
        fn = _methods(shape)["triton"]
        ny = size // dilation
        queries, width = next(r for r in nt.MEASURED_TILES if r[0] is None or ny <= r[0])[2][:2]
        tile = dict(tile_q=queries, tile_y=width, narrow_cols=True)
        configs = [{}] + [
            tile | dict(bwd_block=bb, bwd_warps=w) | ({} if cap is None else dict(bwd_maxnreg=cap))
            for bb, w, cap in (() if args.bwd_tiles_only else BWD_BLOCK_SETTINGS)
        ]
        configs += list(BWD_TILE_CONFIGS)
        timed = [("backward", c) for c in configs] + [("forward", c) for c in ({}, *FWD_CONFIGS)]
        for mode, config in timed:
            row = _time_setting(shape, fn, mode, config, timer, "graph_ms", stream, shape=name, calls=calls)
            rows.append(row)
            torch.cuda.empty_cache()
        save(rows)
    _print_best(rows, args.tile_shapes, ("backward", "forward"))
    return rows


DEVICE = "cuda"  # (the CPU test of the sweep's plumbing sets "cpu")
#: ``(BIAS_GRAD_ELEMENTS, programs per SM)`` settings ``--bias-grad-sweep`` times besides the shipped one (the programs
#: per SM at every map: ``BIAS_GRAD_PER_SM = ((None, s),)``).
BIAS_GRAD_SETTINGS = tuple(itertools.product((1024, 2048, 4096, 8192), (1, 2, 4, 8, 16, 32)))


def _bias_grad_sweep(args: argparse.Namespace, save: Callable[[list[dict]], None]) -> list[dict]:
    """At each of ``--tile-shapes``: the bias-gradient reduction of one backward (float32 ``dS`` slices, one per batch
    element, as the backward stores them at these shapes) over :data:`BIAS_GRAD_SETTINGS`, each replayed from a CUDA
    graph, with the largest difference from the shipped setting's table relative to its largest entry (float32 atomics:
    the order of the adds differs). The module's constants are restored; ``save`` gets the rows after each shape."""
    from visionlin.kernels import neighborhood as na
    from visionlin.kernels.triton import neighborhood as nt

    shipped = (nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM)
    rows = []
    for name in args.tile_shapes:
        size, heads, dilation, calls = TILE_SHAPES[name]
        (kx, dx), (ky, dy) = (na.effective_window(size, args.kernel, dilation),) * 2
        ds = torch.randn(args.batch, heads, size, size, kx * ky, device=DEVICE)
        drpb = torch.zeros(heads, 2 * args.kernel - 1, 2 * args.kernel - 1, device=DEVICE)

        def step(ds=ds, drpb=drpb, size=size, kx=kx, ky=ky, dx=dx, dy=dy):
            drpb.zero_()
            nt._bias_grad(ds, drpb, size, size, kx, ky, dx, dy)

        want = None
        for config in ({}, *(dict(elements=e, per_sm=s) for e, s in BIAS_GRAD_SETTINGS)):
            row = {"shape": name, "calls": calls, "method": "triton", "mode": "bias_grad", "status": "ok"}
            row["config"] = config
            try:
                nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM = (
                    config.get("elements", shipped[0]),
                    ((None, config["per_sm"]),) if "per_sm" in config else shipped[1],
                )
                step()
                got = drpb.clone()
                want = got if want is None else want
                row["max_rel_diff"] = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
                row["graph_ms"] = graph_ms(step, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - a setting that fails is recorded, the others still run
                row |= {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
            finally:
                nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM = shipped
            rows.append(row)
            print(json.dumps(row), flush=True)
        del ds, drpb
        torch.cuda.empty_cache()
        save(rows)
    _print_best(rows, args.tile_shapes, ("bias_grad",))
    return rows


def _print_best(rows: list[dict], shapes: list[str], modes: tuple[str, ...]) -> None:
    """The best setting per shape and mode against the shipped one (``config == {}``)."""
    for mode in modes:
        for name in shapes:
            mine = [r for r in rows if r["shape"] == name and r["mode"] == mode and r["status"] == "ok"]
            shipped = next((r["graph_ms"] for r in mine if not r["config"]), None)
            best = min(mine, key=lambda r: r["graph_ms"], default=None)
            if shipped and best:
                print(f"sweep {name} {mode}: shipped {shipped:.4f} ms, best {best['graph_ms']:.4f} ms "
                      f"({shipped / best['graph_ms']:.2f}x) {best['config']}", flush=True)  # fmt: skip


#: Settings per shape drawn as bars by :func:`_plot_tiles` (more: dots).
_MAX_BARS = 24


def _plot_tiles(result: dict, path: Path) -> None:
    """Per mode: each shape's settings as speed relative to the shipped one (above 1: faster): bars with a legend up to
    :data:`_MAX_BARS` settings, else one dot per setting and the fastest named (a legend of 90 settings hid the
    bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def label(row: dict) -> str:
        return ",".join(f"{k}={v}" for k, v in row["config"].items()) or "shipped"

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["forward"]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.5 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mine = [r for r in rows if r["mode"] == mode]
        shapes = list(dict.fromkeys(r["shape"] for r in mine))
        labels = list(dict.fromkeys(label(r) for r in mine))
        ms = {(r["shape"], label(r)): r["graph_ms"] for r in mine}
        shipped = {s: ms.get((s, "shipped")) for s in shapes}

        def speed(shape: str, label: str, ms=ms, shipped=shipped) -> float:
            t = ms.get((shape, label))
            return shipped[shape] / t if t and shipped[shape] else 0.0

        if len(labels) <= _MAX_BARS:
            grouped_bars(ax, shapes, labels, speed, fontsize=7)
            ax.legend(fontsize=5, ncol=4)
        else:
            ticks, top = [], 1.3
            for j, shape in enumerate(shapes):
                speeds = [(speed(shape, lab), lab) for lab in labels if (shape, lab) in ms]
                ax.scatter([j] * len(speeds), [v for v, _ in speeds], s=8, alpha=0.6)
                best, name = max(speeds)
                top = max(top, 1.05 * best)
                ax.scatter([j], [best], s=30, marker="*", color="black")
                ticks.append("\n".join([shape, f"best {best:.2f}x:", *textwrap.wrap(name.replace(",", ", "), 24)]))
            ax.set_xticks(range(len(shapes)), ticks, fontsize=5)
            ax.set_ylim(0, top)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"{mode}: speed vs shipped (CUDA graph)")
    finish(fig, result, path, fontsize=7)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    modes = ("forward", "forward_backward")
    ms = {(r["mode"], r["method"]): r["ms"] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4))
    grouped_bars(ax, modes, methods, lambda m, method: ms.get((m, method), 0.0), label_fmt="%.2f", label_size=7)
    ax.set_ylabel("ms per call (median)")
    ax.set_yscale("log")
    s = result["shape"]
    ax.set_title(
        f"NA {s['batch']}x{s['size']}x{s['size']}, {s['heads']} heads, D={s['dim']}, k={s['kernel']}, "
        f"d={s['dilation']}, rpb={s['rpb']}, {s['dtype']}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    finish(fig, result, path, fontsize=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/neighborhood_op.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for neighborhood_op.json / .png")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: the checkout's HEAD)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=56, help="feature-map side (tokens)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--dilation", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--no-rpb", dest="rpb", action="store_false", help="no relative positional bias")
    p.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) gather reference")
    p.add_argument("--sweep", action="store_true", help="also time the Triton kernels over their tile settings")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-kernel profile")
    p.add_argument(
        "--tile-sweep", action="store_true",
        help="only time the Triton kernels' query tiles and blocks at --tile-shapes (CUDA-graph replays), nothing else",
    )  # fmt: skip
    p.add_argument(
        "--bias-grad-sweep", action="store_true",
        help="only time the bias gradient's reduction over its block and programs per SM at --tile-shapes",
    )  # fmt: skip
    p.add_argument(
        "--bwd-block-sweep", action="store_true",
        help="only time the backward's query blocks, warps and register cap at each --tile-shapes' shipped key tile",
    )  # fmt: skip
    p.add_argument(
        "--bwd-tiles-only", action="store_true",
        help="with --bwd-block-sweep: only the shipped backward and BWD_TILE_CONFIGS (no query-block settings)",
    )  # fmt: skip
    p.add_argument("--tile-shapes", default=",".join(TILE_SHAPES), help=f"subset of {', '.join(TILE_SHAPES)}")
    p.add_argument(
        "--bias-dot-ab", action="store_true",
        help="also profile the kernels with the bias added after the score product and inside it, alternating",
    )  # fmt: skip
    p.add_argument(
        "--bias-grad-ab", action="store_true",
        help="also time the bias gradient's reduction kernel against torch's sum + index + scatter, alternating",
    )  # fmt: skip
    p.add_argument(
        "--packed-ab", action="store_true",
        help="also time forward + backward from one packed qkv: the split call on its views against the packed call",
    )  # fmt: skip
    add_timing_flags(p, warmup=5, repeats=5)
    args = p.parse_args(argv)
    check_timing_flags(p, args)
    shapes = [n for n in args.tile_shapes.split(",") if n]
    if (bad := [n for n in shapes if n not in TILE_SHAPES]) or not shapes:
        p.error(f"--tile-shapes: unknown {bad or args.tile_shapes!r}; choose from {', '.join(TILE_SHAPES)}")
    args.tile_shapes = list(dict.fromkeys(shapes))  # each once, in the order given
    sweeps = {"tile": _tile_sweep, "bias_grad": _bias_grad_sweep, "bwd_block": _bwd_block_sweep}
    chosen = [key for key in sweeps if getattr(args, f"{key}_sweep")]
    if len(chosen) > 1:
        names = ", ".join(f"--{key.replace('_', '-')}-sweep" for key in chosen)
        p.error(f"{names} each run alone: choose one")
    if args.bwd_tiles_only and not args.bwd_block_sweep:
        p.error("--bwd-tiles-only goes with --bwd-block-sweep")
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    if chosen:
        stem, sweep = f"{STEM}_{'tiles' if chosen[0] == 'tile' else chosen[0]}", sweeps[chosen[0]]
        result = {"benchmark": stem, "meta": gpu_meta(argv, args.commit), "batch": args.batch}
        result |= {"dtype": args.dtype, "rows": []}

        def save(rows: list[dict]) -> None:
            write_result(result | {"rows": rows}, args.out, stem, partial=True)

        result["rows"] = sweep(args, save)
        for note in write_result(result, args.out, stem, plot=_plot_tiles):
            print(note)
        return 0
    rows = []
    for name, fn in _methods(args).items():
        for row in _measure(name, fn, args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    speedups = {key: _speedups(rows, key) for key in ("ms", "graph_ms")}
    for key, label in (("ms", ""), ("graph_ms", ", CUDA graph")):
        for mode, ratio in speedups[key].items():
            print(f"{mode}{label}: sdpa_dense / triton = {ratio:.2f}x")
    shape = {k: getattr(args, k) for k in ("batch", "size", "heads", "dim", "kernel", "dilation", "dtype", "rpb")}
    result = {
        "benchmark": STEM,
        "meta": gpu_meta(argv, args.commit),
        "shape": shape,
        "accuracy_vs_reference": _accuracy(args),
        "speedup_vs_sdpa_dense": speedups["ms"],
        "speedup_vs_sdpa_dense_graph": speedups["graph_ms"],
        "rows": rows,
    }
    if args.profile:
        result["profile_forward_backward"] = _profile(args)
        for row in result["profile_forward_backward"][:8]:
            print(f"profile: {row['ms_per_step']:.3f} ms  x{row['calls_per_step']:.0f}  {row['kernel']}")
    if args.bias_dot_ab:
        result["bias_dot_ab"] = _bias_dot_ab(args)
    if args.bias_grad_ab:
        result["bias_grad_ab"] = _bias_grad_ab(args)
    if args.packed_ab:
        result["packed_ab"] = _packed_ab(args)
    if args.sweep:
        result["sweep"] = _sweep(args)
        for mode in ("forward", "backward"):
            best = next((r for r in result["sweep"] if r["mode"] == mode and r["status"] == "ok"), None)
            print(f"sweep best {mode}: {best}")
    print(json.dumps(result["accuracy_vs_reference"]))
    for note in write_result(result, args.out, STEM, plot=_plot):
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
