"""Every Triton kernel compiles for the H100 / H200 (sm_90a) with its shipped tile settings and does not spill
registers at the head dims of the shipped models (32 and 64; the linear kernels also 128), checked on the CPU: Triton
compiles ahead of time for a named target, and ``ptxas -v`` (shipped with Triton) reports registers and spill bytes.
The interpreter tests check the kernels' math; this checks what the interpreter cannot (a non-constexpr global, a
``tl.dot`` on mismatched dtypes, shared memory, register pressure: a spill costs a large share of a memory-bound
kernel's speed).

Compiling every case takes ~17 CPU-minutes, so results are memoised in ``sm90_compile_results.json`` beside this file,
keyed by a hash of everything that determines them: Triton's hash of the kernel's source (its ``cache_key`` covers the
``@triton.jit`` functions it calls and the globals it reads), the signature, constants and compile options, the Triton
version and the ``ptxas`` version. A changed kernel (or Triton, or setting) misses and is compiled and checked; the
allowances are applied to memoised numbers as to fresh ones. ``VISIONLIN_SM90_RECOMPILE=1`` ignores the memo;
``VISIONLIN_SM90_RECORD=1`` adds the results compiled in this run to it (commit the file with the kernel change);
``VISIONLIN_SM90_RECORD=prune`` does too and, after a run of the whole file in one process with nothing failed, drops
the entries no case looked up (results of kernels or settings since changed), so the file does not only grow.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import inspect
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
# Pointer arguments (by name) that are float32 buffers whatever the inputs' dtype; other pointers carry the inputs'.
FP32_POINTERS = {"S", "GS", "ACC", "ACC_Q", "ACC_K", "CTX", "DQBAR", "W", "BIAS", "DW", "DB", "CS", "DC", "C", "Y",
                 "R", "SSQ", "BETA", "VA", "AB", "QB", "LSE", "DELTA", "DRPB", "DQACC", "DSBUF"}  # fmt: skip
POINTERS = FP32_POINTERS | {"Q", "K", "V", "Out", "G", "DQ", "DK", "DVv", "X", "RES", "OUT", "F", "DX", "A", "RPB"}
FLOATS = {"scale", "inv_m", "eps", "p", "inv_d", "inv_n", "norm_eps", "inv_c"}
# The RoPE tables and the RALA / Efficient Attention maxima and sums (triton/rope_linear.py) are float32.
FP32_POINTERS |= {"SIN", "COS", "AUX", "MATS"}
POINTERS |= {"SIN", "COS", "AUX", "MATS"}
# The selective scan (triton/scan.py): float32 states, parameters and partial sums; activations in the inputs' dtype.
FP32_POINTERS |= {"LAST", "STATES", "GLAST", "DBM", "DCM", "DA", "DDP", "DBIAS", "DP"}
POINTERS |= FP32_POINTERS | {"U", "DT", "BM", "CM", "Z", "YO", "DU", "DDT", "DZ"}
# Per kernel, pointers that are float32 although the name carries the inputs' dtype elsewhere.
FP32_HERE = {"_key_backward_kernel": {"G"}}
# Gated linear attention (triton/gla.py): the gates GG in the inputs' dtype, dq / dk float32 (dg is formed from them).
POINTERS |= {"GG", "OQ", "OK"}  # (OQ / OK: the RoPE pair's rotated queries and keys, triton/rope.py)
FP32_HERE |= {"_gla_bwd_q_kernel": {"DQ"}, "_gla_bwd_kv_kernel": {"DK"}, "_gla_bwd_intra_kernel": {"DQ", "DK"}}
FP32_HERE |= {"_gla_dg_kernel": {"DQ", "DKP"}}  # the walks' float32 dq and dk shares in; dg, dq, dk out in the dtype
POINTERS |= {"DKP", "DG", "DQO", "DKO"}
# the bidirectional op's first walk's float32 outputs, dv, dq and dk shares, added by the second walk
FP32_POINTERS |= {"PREV", "DVP", "PDQ", "PDKP"}
# the segmented walks' float32 states, adjoints and log-decay sums; the chunks' own dv terms
FP32_POINTERS |= {"INIT", "STATE", "GSUM", "ADJ", "DVI"}
POINTERS |= FP32_POINTERS
# Block-sparse attention (SLA): int32 block lists, float32 states / statistics, the inputs' dtype for O_s.
FP32_HERE["_bwd_dq_kernel"] = {"DQ"}
FP32_HERE["_readout_bwd_kernel"] = {"DQ"}  # the SLA read-out backward: dq, dH_i, dZ_i and dW in float32
FP32_HERE["_pool_kernel"] = {"OUT"}  # the block means
FP32_HERE["_qbar_share_kernel"] = {"DQ"}  # RALA's float32 dq before its last term (triton/rope_linear.py)
INT_POINTERS = {"LUT", "LUT_T", "CNT"}
FP32_POINTERS |= {"HI", "ZI", "LSE", "DELTA", "DHI", "DZI", "HS", "ZS", "MARG"}
POINTERS |= FP32_POINTERS | {"OS"} | INT_POINTERS
# Gated LayerNorm (triton/gated_norm.py): float32 per-row statistics; dout and dgate in the inputs' dtype.
FP32_POINTERS |= {"MEAN", "RSTD"}
POINTERS |= FP32_POINTERS | {"DOUT", "DG"}
# Agent attention (triton/agent.py): float32 partial sums, softmax statistics, V_A and its gradient, the agents'
# gradient; the biases' per-sample gradient tables in the inputs' dtype.
FP32_POINTERS |= {"PART", "STATS", "DA", "DVA"}
POINTERS |= FP32_POINTERS | {"DAB", "DQB"}
# Agent position biases (triton/agent_bias.py): float32 tables and table gradients (the parameters), biases and their
# gradients in the attention's dtype.
_BIAS_TABLES = {"AN", "NA_T", "AH", "AW", "HA", "WA", "AC", "CA"}
_BIAS_GRADS = {"DAN", "DNA", "DAH", "DAW", "DHA", "DWA", "DAC", "DCA"}
POINTERS |= _BIAS_TABLES | _BIAS_GRADS | {"OUT_A", "OUT_Q", "GA", "GQ"}
FP32_HERE |= {"_bias_fwd_kernel": _BIAS_TABLES, "_bias_bwd_kernel": _BIAS_GRADS}
FLOATS |= {"scale_y", "scale_x"}
# The gated RMS mix (triton/rms_mix.py): float32 weights and their partial gradients; Y / DY in the inputs' dtype.
FP32_POINTERS |= {"WX", "WY", "DWX", "DWY"}
POINTERS |= FP32_POINTERS | {"DY"}
FLOATS |= {"eps_x", "eps_y"}
# Per kernel, pointers in the inputs' dtype although the name is a float32 buffer elsewhere.
DTYPE_HERE = {"_rms_mix_fwd_kernel": {"Y"}, "_rms_mix_bwd_kernel": {"Y"}}
# Kernels compiled as the JIT specialises them at run time for head dims 64 / 128: 16-byte aligned pointers and
# integer arguments (strides, sizes) divisible by 16 (without these hints every load is scalar and the tiles spill; the
# token conv: channel counts that are multiples of 16, as in every shipped model).
DIVISIBLE_16 = {"visionlin.kernels.triton.sparse_linear", "visionlin.kernels.triton.conv"}  # by module (names repeat)


def _signature(fn, dtype: str, consts: dict) -> dict[str, str]:
    name = fn.fn.__name__
    sig = {}
    for p in inspect.signature(fn.fn).parameters:
        if p in consts:
            sig[p] = "constexpr"
        elif p in INT_POINTERS:
            sig[p] = "*i32"
        elif p == "HS" and consts.get("SPLIT_OUT"):
            sig[p] = "*bf16"  # the paper variant's per-key-block states, as high / low bfloat16 halves
        elif p in POINTERS:
            fp32 = (p in FP32_POINTERS or p in FP32_HERE.get(name, set())) and p not in DTYPE_HERE.get(name, set())
            sig[p] = "*fp32" if fp32 else f"*{dtype}"
        elif p in FLOATS:
            sig[p] = "fp32"
        else:
            sig[p] = "i32"
    return sig


SM90_SHARED = 227 * 1024  # the most shared memory one block of an H100 / H200 may use (Triton raises beyond it)
MEMO = Path(__file__).with_name("sm90_compile_results.json")
_MEMO: dict | None = None
_USED: set[str] = set()  # memo keys this process looked up or recorded


@functools.cache
def _ptxas_version() -> str:
    out = subprocess.run([PTXAS, "--version"], capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"unknown ({out.returncode})"


def _memo() -> dict:
    global _MEMO
    if _MEMO is None:
        _MEMO = json.loads(MEMO.read_text()) if MEMO.exists() else {}
    return _MEMO


@pytest.fixture(scope="module", autouse=True)
def _prune_memo(request):
    """``VISIONLIN_SM90_RECORD=prune``: after this module's tests, keep only the memo entries they looked up, when
    they were the whole file (no ``-k``, no node ids, no pytest-xdist worker) and none failed."""
    yield
    if os.environ.get("VISIONLIN_SM90_RECORD") != "prune":
        return
    cfg = request.config
    partial = cfg.getoption("keyword") or any("::" in a for a in cfg.args) or "PYTEST_XDIST_WORKER" in os.environ
    if partial or request.session.testsfailed or not _USED:
        print(f"{MEMO.name}: not pruned (a partial, failed or skipped run)")
        return
    memo = json.loads(MEMO.read_text())
    MEMO.write_text(json.dumps({k: v for k, v in sorted(memo.items()) if k in _USED}, indent=0) + "\n")
    print(f"{MEMO.name}: pruned {len(memo)} -> {len(_USED & memo.keys())} entries")


def _record(key: str, result: dict) -> None:
    """Add one result to the memo file (several pytest workers may write: the file is locked, re-read and merged)."""
    with open(MEMO.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        memo = json.loads(MEMO.read_text()) if MEMO.exists() else {}
        memo[key] = result
        MEMO.write_text(json.dumps(dict(sorted(memo.items())), indent=0) + "\n")


def _compile(
    fn, dtype: str, consts: dict, num_warps: int, num_stages: int | None = None, maxnreg: int | None = None
) -> tuple[int, int]:
    from triton.compiler import ASTSource

    params = list(inspect.signature(fn.fn).parameters)
    sig = _signature(fn, dtype, consts)
    attrs = {}
    if fn.fn.__module__ in DIVISIBLE_16:
        attrs = {(params.index(p),): [["tt.divisibility", 16]] for p, t in sig.items() if t[0] == "*" or t == "i32"}
    src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    options |= {"maxnreg": maxnreg} if maxnreg else {}
    key = hashlib.sha256(
        f"{src.hash()}|{sorted(options.items())}|sm_90a|{triton.__version__}|{_ptxas_version()}".encode()
    ).hexdigest()
    _USED.add(key)
    hit = None if os.environ.get("VISIONLIN_SM90_RECOMPILE") == "1" else _memo().get(key)
    regs, spills, shared = (hit["regs"], hit["spills"], hit["shared"]) if hit else _compile_now(src, options)
    assert shared <= SM90_SHARED, f"{shared} bytes of shared memory, more than an sm_90 block has ({SM90_SHARED})"
    if hit is None and os.environ.get("VISIONLIN_SM90_RECORD") in ("1", "prune"):
        _record(key, {"kernel": fn.fn.__name__, "regs": regs, "spills": spills, "shared": shared})
    return regs, spills


def _compile_now(src, options: dict) -> tuple[int, int, int]:
    """``(registers, spill bytes, shared memory bytes)`` of one compile for sm_90a, ``ptxas -v`` on its PTX."""
    from triton.backends.compiler import GPUTarget

    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    shared = kernel.metadata.shared
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        out = subprocess.run(
            [PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    assert out.returncode == 0, out.stderr[-2000:]
    regs = int(re.findall(r"Used (\d+) registers", out.stderr)[0])
    spills = int((re.findall(r"(\d+) bytes spill stores", out.stderr) or ["0"])[0])
    return regs, spills, shared


def _linear(dt, tdt):
    from visionlin.kernels.triton import linear

    cases = []
    for d in (32, 64, 128):
        x = torch.empty(1, 1, 1, d, dtype=tdt)
        lin = dict(FMAP=2, **linear._meta(x, x))
        bd, bdv = lin["BLOCK_D"], lin["BLOCK_DV"]

        def opts(settings, x=x):
            meta = linear._meta(x, x, settings)
            return {k: meta[k] for k in ("num_warps", "num_stages", "maxnreg") if k in meta}

        fwd, fused, bwd = (linear._forward_settings(bd, bdv, False), linear._forward_settings(bd, bdv, True),
                           linear._backward_settings(bd, bdv))  # fmt: skip
        cases += [
            (linear._state_kernel, dt, dict(lin, BLOCK_M=fwd["rows"]), opts(fwd)),
            (linear._readout_kernel, dt, dict(lin, NORM=0, BLOCK_N=fwd["rows"]), opts(fwd)),
            *(
                [(linear._fused_kernel, dt, dict(lin, NORM=0, SAVE_STATE=True, BLOCK_N=fused["rows"]), opts(fused))]
                if d <= 64
                else []
            ),  # fmt: skip
            (
                linear._readout_backward_kernel,
                dt,
                dict(lin, NORM=0, HAS_OUT=True, BLOCK_N=bwd["rows_backward"]),
                opts(bwd),
            ),
            # without the saved output: FLatten's op (identity map)
            (
                linear._readout_backward_kernel,
                dt,
                dict(lin, FMAP=0, NORM=0, HAS_OUT=False, BLOCK_N=bwd["rows_backward"]),
                opts(bwd),
            ),
            (linear._state_backward_kernel, dt, dict(lin, NORM=0, BLOCK_M=bwd["rows_backward"]), opts(bwd)),
        ]
    return cases


def _infsa(dt, tdt):
    from visionlin.kernels.triton import infsa, infsa_pure

    cases = []
    for d in (32, 64):
        x = torch.empty(1, 1, 1, d, dtype=tdt)
        fwd, bwd = infsa_pure._meta(x, x), infsa_pure._meta(x, x, backward=True)
        fw, bw = fwd.pop("num_warps"), bwd.pop("num_warps")
        blk = infsa._block(d)
        w = infsa._warps(blk)
        cases += [
            (infsa_pure._forward_kernel, dt, fwd, fw),
            (infsa_pure._backward_kv_kernel, dt, bwd, bw),
            (infsa_pure._backward_q_kernel, dt, bwd, bw),
            *((infsa._query_kernel, dt, dict(BLOCK_N=infsa.ROWS, BLOCK_D=blk, SPLIT=sp), w) for sp in (False, True)),
            *(
                (infsa._key_kernel, dt, dict(BLOCK_M=infsa.ROWS, BLOCK_D=blk, BLOCK_DV=blk, SPLIT=sp), w)
                for sp in (False, True)
            ),
            (infsa._key_backward_kernel, dt, dict(BLOCK_M=infsa.ROWS, BLOCK_D=blk, BLOCK_DV=blk), w),
            (infsa._query_backward_kernel, dt, dict(BLOCK_N=infsa.ROWS, BLOCK_D=blk), w),
        ]
    return cases


def _conv_and_focus(dt, tdt):
    from visionlin.kernels.triton import agent, conv, focus, pool

    cases = []
    for d in (32, 64):
        for na in (49, 64):
            ba = agent._pad(na)
            blocks = dict(HAS_BIAS=True, HALF=True, BLOCK_A=ba, BLOCK_D=d, BLOCK_DV=d)
            warps = agent._warps(ba, d, d)
            bwd_rows, bwd = agent._bwd_meta(d, d)  # the backward's launch settings
            cases += [
                # (SAVE: the log-sum-exp kept for a backward, or not: both as launched, not as a runtime int)
                *(
                    (agent._aggregate_kernel, dt, dict(blocks, SPLIT=sp, SAVE=save, BLOCK_M=agent.ROWS), warps)
                    for sp in (0, 1)
                    for save in (False, True)
                ),
                *((agent._combine_kernel, dt, dict(SAVE=save, BLOCK_A=ba, BLOCK_DV=d), 4) for save in (False, True)),
                (agent._broadcast_kernel, dt, dict(blocks, BLOCK_N=agent.ROWS), warps),
                *(
                    (fn, dt, dict(blocks, BIAS_GRAD=True, SPLIT=sp, **{rows: bwd_rows}), bwd)
                    for sp in (0, 1)
                    for fn, rows in (
                        (agent._broadcast_backward_kernel, "BLOCK_N"),
                        (agent._aggregate_backward_kernel, "BLOCK_M"),
                    )
                ),
            ]
    blocks = dict(BLOCK_T=conv.BLOCK_T, BLOCK_C=conv.BLOCK_C)
    for k in (1, 3, 5, 7):
        t1, t2, tile_t = conv.weight_grad_tile(k)
        cases += [
            # Channels are contiguous (the wrapper makes them so): the JIT specialises those unit strides, which
            # makes the loads vectors, as here.
            (
                conv._conv_kernel,
                dt,
                dict(K=k, FLIP=False, HAS_BIAS=True, HAS_RES=True, sx_c=1, sr_c=1, so_c=1, **blocks),
                conv.WARPS,
            ),  # fmt: skip
            (
                conv._weight_grad_taps_kernel,
                dt,
                dict(K=k, HAS_BIAS=True, sg_c=1, sx_c=1, **blocks),
                conv.WARPS_WEIGHT_GRAD,
            ),
        ]
        # the one-pass weight gradient, alone (shipped) and writing the input gradient too (opt-in "fused")
        cases += [
            (
                conv._weight_grad_tile_kernel,
                dt,
                dict(
                    K=k,
                    T1=t1,
                    T2=t2,
                    HAS_BIAS=True,
                    DX_OUT=dx_out,
                    I64=i64,
                    sg_c=1,
                    sx_c=1,
                    sd_c=1,
                    BLOCK_C=conv.BLOCK_C,
                    BLOCK_T=tile_t,
                ),
                conv.WARPS_WEIGHT_GRAD,
            )  # fmt: skip
            for dx_out, i64 in sorted({(False, False), (True, False), (False, k == 3)})  # int64 offsets once
        ]
        # the stacked-rows weight gradient (opt-in) at its default tile and the sweep's other one
        cases += [
            (
                conv._weight_grad_rows_kernel,
                dt,
                dict(K=k, T1=t1, T2=t2, HAS_BIAS=True, I64=False, sg_c=1, sx_c=1, BLOCK_C=conv.BLOCK_C, BLOCK_T=rows_t),
                conv.WARPS_WEIGHT_GRAD,
            )
            for rows_t in sorted({conv.weight_grad_tile(k, e)[2] for e in (8192, conv.ROWS_ELEMENTS)})
            if k <= conv.ROWS_MAX_K  # (larger kernels take the tile kernel)
        ]
        # the strip kernels (shipped): the forward / input gradient at its settings, the weight gradient at its own
        wg_c = conv.WG_STRIP[k][2]
        cases += [
            (
                conv._conv_strip_kernel,
                dt,
                dict(
                    K=k,
                    FLIP=flip,
                    HAS_BIAS=True,
                    HAS_RES=True,
                    S=conv.STRIP[k][0],
                    I64=i64,
                    BLOCK_R=conv.STRIP[k][1],
                    BLOCK_C=conv.STRIP[k][2],
                    sx_c=1,
                    sr_c=1,
                    so_c=1,
                ),
                conv.WARPS,
            )  # fmt: skip
            for flip, i64 in ((False, False), (True, False), (False, k == 3))  # int64 offsets once
        ]
        cases += [
            (
                conv._weight_grad_strip_kernel,
                dt,
                dict(
                    K=k,
                    T1=t1,
                    T2=t2,
                    HAS_BIAS=True,
                    S=conv.WG_STRIP[k][0],
                    I64=i64,
                    BLOCK_R=conv.WG_STRIP[k][1],
                    BLOCK_C=bc,
                    sx_c=1,
                    sg_c=1,
                ),
                conv.WARPS_WEIGHT_GRAD,
            )  # fmt: skip
            # the shipped channel block, and 32 where 64 ships (TUNING["wg_strip_c"]; at k = 5's 8 x 16 strips 32
            # channels spill 12 bytes in fp16, 64 spill 1.4 KB)
            for i64, bc in sorted({(False, wg_c), (k == 3, wg_c), (False, 32 if wg_c == 64 else wg_c)})
        ]
    # agent pooling (triton/pool.py): unit channel strides as the JIT specialises them for the models' tokens
    pt, pw = pool.TUNING, pool.TUNING["warps"]
    cases += [
        (pool._pool_fwd_kernel, dt, dict(BLOCK_O=16, BLOCK_W=bw, BLOCK_C=pt["block_c"], IEEE=False, sx_c=1), pw)
        for bw in (16, pt["block_w"])
    ]
    cases += [
        (
            pool._pool_bwd_kernel,
            dt,
            dict(SPAN_Y=sp, SPAN_X=sp, BLOCK_T=pt["block_t"], BLOCK_C=pt["block_c"]),
            pt["warps"],
        )
        for sp in (1, 2)
    ]
    # FLatten's channels: PVT 64-512 (64 per head), Swin 96-768 (32 per head), DeiT 192-768
    for h, d in ((1, 64), (2, 64), (5, 64), (8, 64), (3, 32), (3, 64), (6, 64), (12, 64)):
        m, mb = focus._meta(h, d, 4096, backward=False), focus._meta(h, d, 4096, backward=True)
        w, wb = m.pop("num_warps"), mb.pop("num_warps")
        cases += [  # without the next tile loaded ahead (one tile per program) and with it if shipped (TUNING)
            case
            for pf in sorted({False, bool(focus.TUNING["prefetch"])})
            for case in (
                (focus._focus_kernel, dt, dict(HAS_C=True, FLAT_X=True, PREFETCH=pf, **m), w),
                (focus._focus_kernel, dt, dict(HAS_C=True, FLAT_X=False, PREFETCH=pf, **m), w),
                (focus._focus_backward_kernel, dt,
                 dict(HAS_C=True, NEED_DC=True, FLAT_X=True, FLAT_G=True, PREFETCH=pf, **mb), wb),
                (focus._focus_backward_kernel, dt,
                 dict(HAS_C=True, NEED_DC=True, FLAT_X=False, FLAT_G=False, PREFETCH=pf, **mb), wb),
            )
        ]  # fmt: skip
    return cases


def _rope_linear(dt, tdt):
    """MALA / RALA / NaLa with RoPE and Efficient Attention (``triton/rope_linear.py``), every kernel at its rows."""
    from visionlin.kernels.triton import MAX_NORM_AWARE_HEAD_DIM
    from visionlin.kernels.triton import rope_linear as rl

    cases = []
    for d in (32, 64, 128):
        x = torch.empty(1, 1, 1, d, dtype=tdt)
        for mech, rope in ((0, True), (1, True), (2, True), (3, False)):
            if mech == 2 and d > MAX_NORM_AWARE_HEAD_DIM:
                continue  # refused by supports()
            meta, bmeta = rl._meta(mech, x, x, rope), rl._meta(mech, x, x, rope, backward=True)
            opts, bopts = ({k: m.pop(k) for k in ("num_warps", "num_stages") if k in m} for m in (meta, bmeta))
            bd, bf, bdv = meta["BLOCK_D"], meta["BLOCK_F"], meta["BLOCK_DV"]
            rows = {kernel: rl._rows(kernel, bf, bdv, tdt != torch.float32) for kernel in rl.ROWS}
            cases += [
                (rl._state_kernel, dt, dict(meta, BLOCK_M=rows["state"]), opts),
                (rl._readout_kernel, dt, dict(meta, BLOCK_N=rows["readout"]), opts),
                (rl._readout_backward_kernel, dt, dict(bmeta, BLOCK_N=rows["readout_backward"]), bopts),
                (rl._state_backward_kernel, dt, dict(bmeta, BLOCK_M=rows["state_backward"]), bopts),
            ]
            # the key-max and query-sum passes launch at Triton's default 4 warps
            if mech in (1, 3):
                cases.append((rl._kmax_kernel, dt, dict(MECH=mech, BLOCK_M=rows["state"], BLOCK_D=bd), 4))
            if mech == 1:
                cases.append((rl._qsum_kernel, dt, dict(BLOCK_N=rows["state"], BLOCK_D=bd), 4))
                rows_q = rl.QBAR_ELEMENTS // bd
                cases.append((rl._qbar_share_kernel, dt, dict(BLOCK_R=rows_q, BLOCK_D=bd, BLOCK_F=bf), 4))
    # the softmax stages' query / key rotation (triton/rope.py) at the models' heads x head dims, both directions
    from visionlin.kernels.triton import rope

    for heads, d in ((8, 32), (16, 32), (4, 64), (8, 64)):
        rows = max(1, min(64, rope.ELEMENTS // (heads * d)))
        cases += [
            (rope._rope_pair_kernel, dt, dict(D=d, BLOCK_R=rows, BLOCK_H=heads, BLOCK_D=d, BACKWARD=bwd), rope.WARPS)
            for bwd in (False, True)
        ]
    return cases


def _neighborhood(dt, tdt):
    from visionlin.kernels.triton import neighborhood as nt

    def kernels(nx, ny, k, rpb, d, bias_dot=None, half=True, ds_store=True):
        """The forward and the backward as the ops launch them at an ``nx x ny`` group with kernel ``k`` (each its
        own tile, warps and meta); ``bias_dot`` None: the shipped rpb / scale accumulator."""
        fwd_dot = rpb if bias_dot is None else bias_dot
        bwd_dot = rpb and bool(nt.TUNING["bwd_bias_dot"]) if bias_dot is None else bias_dot
        kx = min(k, nx)
        tx, ty, krows, kcols, fwd_warps, fwd_cap = nt._tile_plan(nx, ny, kx, k, rpb, d, False, half)
        btx, bty, _, bkcols, bwd_warps, bwd_cap = nt._tile_plan(nx, ny, kx, k, rpb, d, True, half)
        qrows, qcols = nt._bwd_block(bkcols, rpb, d)
        # dq stored directly where one key tile holds the group (na2d_bwd: TUNING["bwd_dq_direct"], one tile a group),
        # the delta pass fused as TUNING says: the kernel's defaults of these constexprs are not what launches pass
        direct = bool(nt.TUNING["bwd_dq_direct"]) and btx >= nx and bty >= ny and half
        fused = nt.TUNING["bwd_delta_fused"]
        # int32 query offsets as TUNING["bwd_int32_offsets"] says (None: unless direct; int64 past 2^31 elements too:
        # na2d_bwd's _bwd_i64)
        int32 = nt.TUNING["bwd_int32_offsets"]
        i64 = not (not direct if int32 is None else int32)
        bwd_flags = dict(DQ_DIRECT=direct, DELTA_FUSED=direct and rpb if fused is None else bool(fused), I64=i64)
        blocks = dict(HAS_RPB=rpb, HALF=half, BLOCK_D=d, BLOCK_DV=d)
        dt_ = dt if half else "fp32"
        return [
            (nt._fwd_kernel, dt_, dict(blocks, BIAS_DOT=fwd_dot and half, TX=tx, TY=ty, BLOCK_Q=tx * ty, KROWS=krows,
                                       KCOLS=kcols, I64=not nt.TUNING["fwd_int32_offsets"]),
             nt.launch_meta(tx * ty, krows * kcols, d, rpb, fwd_warps, fwd_cap)),
            (nt._bwd_kernel, dt_, dict(blocks, BIAS_DOT=bwd_dot and half, NEED_DRPB=rpb, DS_STORE=ds_store, TX=btx,
                                       TY=bty, BLOCK_K=btx * bty, QROWS=qrows, QCOLS=qcols, **bwd_flags),
             nt._bwd_meta(d, half, bwd_warps, bwd_cap)),
        ]  # fmt: skip

    cases = []
    for d in (32, 64):
        for k in (3, 7, 13):
            for rpb in (False, True):
                cases += kernels(56, 56, k, rpb, d)
    for size in (7, 14, 28):  # NAT-T's later stages and DiNAT-T's dilation groups: MEASURED_TILES' other rows
        for rpb in (False, True):  # (without a bias table: the general rule, as at 56)
            cases += kernels(size, size, 7, rpb, 32)
    if dt == "bf16":  # head dim 128 (8 warps, no cap) and the bias gradient's atomic path, in one dtype (slow)
        cases += kernels(56, 56, 7, True, 128)
        cases += kernels(56, 56, 7, True, 32, bias_dot=False)  # scale outside its range
        cases += kernels(56, 56, 7, True, 32, bias_dot=True)  # the backward's opt-in form
        cases += kernels(56, 56, 7, True, 32, ds_store=False)[1:]
        # opt-in: dq stored directly by a key tile that holds its group (the shipped 8 x 8 tile at a 7 x 7 map; the
        # whole 14 x 14 map in a 16 x 16 tile, TUNING["bwd_tile_q"] = 256, at 8 warps uncapped: at 4 warps it spilled
        # 1.1 KB uncapped, 3.6 KB capped at 128, and at 8 warps capped 0.7 KB)
        for tx, ty, warps in ((8, 8, None), (16, 16, 8)):
            qrows, qcols = nt._bwd_block(16 if ty == 16 else 8, True, 32)
            consts = dict(
                HAS_RPB=True,
                HALF=True,
                BLOCK_D=32,
                BLOCK_DV=32,
                BIAS_DOT=False,
                NEED_DRPB=True,
                DS_STORE=True,
                TX=tx,
                TY=ty,
                BLOCK_K=tx * ty,
                QROWS=qrows,
                QCOLS=qcols,
                DQ_DIRECT=True,
                DELTA_FUSED=False,
                I64=True,
            )
            cases.append((nt._bwd_kernel, dt, consts, nt._bwd_meta(32, True, warps or 2, 0)))  # uncapped
        # the delta pass fused into the backward (TUNING["bwd_delta_fused"]) at each shipped tile row, and the other
        # width of the query / key offsets (TUNING["bwd_int32_offsets"] / ["fwd_int32_offsets"] True or False)
        for size in (7, 14, 28, 56):
            (fwd, dt_, fwd_consts, fwd_meta), (fn, _, consts, meta) = kernels(size, size, 7, True, 32)
            cases.append((fn, dt_, dict(consts, DELTA_FUSED=True), meta))
            cases.append((fn, dt_, dict(consts, I64=not consts["I64"]), meta))
            cases.append((fwd, dt_, dict(fwd_consts, I64=not fwd_consts["I64"]), fwd_meta))
        for size in (7, 14, 28, 56):
            for rpb in (False, True):  # float32 inputs: IEEE products, no register cap, the general rule's tiles
                cases += kernels(size, size, 7, rpb, 32, bias_dot=False, half=False)
    for d in (32, 64):
        for rpb in (False, True):  # 1-D: one row of queries
            cases += kernels(1, 3136, 7, rpb, d)
    for dv in (32, 64, 128):  # the backward's delta pre-pass, with _delta's block sizes
        bdv = nt._blocks(dv)
        cases.append((nt._delta_kernel, dt, dict(BLOCK_R=max(8, 2048 // bdv), BLOCK_DV=bdv), {"num_warps": 8}))
    if dt == "bf16":  # the bias gradient's reduction (float32 whatever the inputs), windows of 7 x 7 and 13 x 13
        for kk in (49, 169):
            block_q, width = nt._bias_grad_block(kk)
            cases.append((nt._bias_grad_kernel, "fp32", dict(BLOCK_Q=block_q, BLOCK_W=width), {"num_warps": 4}))
    # every forward / backward case at both offset widths: the shipped rule picks one, and int64 still runs past 2^31
    # elements (_fwd_i64 / _bwd_i64) or with TUNING[...] = False; int32 with TUNING["bwd_int32_offsets"] = True
    seen = {(fn, dt_, tuple(sorted(c.items()))) for fn, dt_, c, _ in cases}
    for fn, dt_, consts, meta in list(cases):
        if "I64" in consts:
            other = dict(consts, I64=not consts["I64"])
            key = (fn, dt_, tuple(sorted(other.items())))
            if key not in seen:
                seen.add(key)
                cases.append((fn, dt_, other, meta))
    return cases


def _sparse_linear(dt, tdt):
    """Block-sparse softmax with SLA's fused linear branch (``triton/sparse_linear.py``) at D = 64 and 128, with the
    tiles and warps each launch uses (``*_config``)."""
    from visionlin.kernels.triton import sparse_linear as sl

    def split(cfg):
        cfg = dict(cfg)
        return cfg, {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}

    cases = []
    for d in (64, 128):
        for bq, bk in ((32, 32), (64, 64), (128, 64), (128, 128)):
            for linear, has_w in ((True, True), (True, False), (False, True)):
                consts, warps = split(sl.fwd_config(bq, bk, d, d, False, linear))
                flags = dict(LINEAR=linear, HAS_BIAS=linear, FMAP=0, HAS_W=has_w)
                if linear and not has_w:  # the folded read-out, as sla_fwd launches it on CUDA
                    flags["LIN_PREC"] = "bf16x3"
                cases.append((sl._fwd_kernel, dt, dict(consts, **flags), warps))
            cases.append((sl._bwd_dq_kernel, dt, *split(sl.dq_config(bq, bk, d, d, False))))
            cases.append((sl._bwd_dkdv_kernel, dt, *split(sl.dkdv_config(bq, bk, d, d, False))))
            for fmap in (0, 1):
                consts, warps = split(sl.readout_bwd_config(bq, d, d, False))
                cases.append((sl._readout_bwd_kernel, dt, dict(consts, FMAP=fmap), warps))
        for fmap in (0, 1, 2):  # the code variant's state kernel, as sla_states launches it
            block_n, opts = sl.STATES_TILES.get(tdt, sl.STATES_DEFAULT_TILES)
            consts = dict(BLOCK_N=block_n, BLOCK_D=d, BLOCK_DV=d, FMAP=fmap, PREC=sl._STATES_PREC[tdt], SPLIT_OUT=False)
            cases.append((sl._states_kernel, dt, consts, dict(opts)))
            for block in (64, 128):  # the paper variant's per-key-block states, as sla_block_states launches them
                tile, block_opts = sl.block_states_config(block, tdt)
                cases.append((sl._states_kernel, dt, dict(consts, BLOCK_N=tile, SPLIT_OUT=True), block_opts))
    for width in (16, 512):  # the pooling, as sla_pool launches it
        cases.append((sl._pool_kernel, dt, dict(BLOCK_T=16, BLOCK_C=width), 4))
    for width in (1, 64, 512, 4096):  # the block selection, as select_blocks launches it
        for marginal in (True, False):
            consts = dict(ROWS=max(1, min(16, 2048 // width)), BLOCK_J=width, MARGINAL=marginal)
            cases.append((sl._select_kernel, "fp32", consts, 4 if width <= 1024 else 8))
    return cases


def _scan(dt, tdt):
    from visionlin.kernels.triton import scan as st

    cases = []
    for n in (1, 8, 16, 64):
        cfg = st.scan_config(n)
        flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, T=cfg.chunk, BLOCK_N=cfg.block_n)
        bwd = dict(flags, HAS_GLAST=True, BLOCK_D=cfg.bwd_block_d)
        cases += [
            (st._fwd_kernel, dt, dict(flags, BLOCK_D=cfg.block_d), cfg.warps),
            (st._bwd_kernel, dt, dict(bwd, GROUPED=False), cfg.bwd_warps),
            (st._bwd_kernel, dt, dict(bwd, GROUPED=True), cfg.bwd_warps),
        ]
    return cases


def _gla(dt, tdt):
    from visionlin.kernels.triton import gla

    def walk(fn, bk, block_v, reverse, own, prec, **extra):
        consts = dict(REVERSE=reverse, G_OWN=own, PREC=prec, **extra, T=gla.CHUNK, BK=bk, BV=block_v)
        return fn, dt, consts, gla.warps(bk)

    cases = []
    for kd, vd in ((16, 32), (32, 64), (64, 64)):  # ViG: K = 32, V = 64
        bk, bv = gla._blocks(kd, vd)
        bv_fwd, bv_kv = min(bv, 64), min(bv, gla.KV_BLOCK_V)
        # G_OWN: the gates read through their own strides (ViG's layout), everywhere but the walks-only backward;
        # PREC: the tile products in IEEE float32 (float32, float16) or on the tensor cores (bfloat16: TF32, three
        # TF32 products in the backward of long sequences); FACTOR: the factored chunk blocks of the forward and
        # intra kernels (shipped) or the decay tile
        for own, prec, factor in (
            (False, "ieee", False), (True, "ieee", False), (True, "ieee", True), (True, "tf32", False),
            (True, "tf32", True), (True, "tf32x3", False), (True, "tf32x3", True),
        ):  # fmt: skip
            m = dict(own=own, prec=prec)
            fwd = gla._gla_fwd_kernel
            # ACC / DV_ACC: the packed bidirectional op's second walk adds the first's float32 outputs / dv (ViG's
            # layout only; the segmented walks differ before the store, not in it)
            acc = (False, True) if own else (False,)
            cases += [walk(fwd, bk, bv_fwd, False, **m, FACTOR=factor, SEGMENTED=s, ACC=False) for s in (False, True)]
            # (not with three TF32 products: 24 bytes spilled at K = 32, V = 64, so that walk does not accumulate)
            acc_fwd = own and prec != "tf32x3"
            cases += [walk(fwd, bk, bv_fwd, False, **m, FACTOR=factor, SEGMENTED=False, ACC=True)] if acc_fwd else []
            cases += [walk(gla._gla_seg_state_kernel, bk, bv_fwd, True, **m)]
            for seg in (False, True):
                for intra in (False, True) if not own else (True,):
                    cases += [walk(gla._gla_bwd_q_kernel, bk, bv, True, **m, SEGMENTED=seg, INTRA=intra)]
                    cases += [
                        walk(gla._gla_bwd_kv_kernel, bk, bv_kv, False, **m, SEGMENTED=seg, INTRA=intra, DV_ACC=a)
                        for a in (acc if not seg else (False,))
                    ]
            cases += [
                walk(gla._gla_bwd_intra_kernel, bk, bv, False, **m, FACTOR=factor),
                walk(gla._gla_seg_adj_kernel, bk, bv_kv, True, **m),
            ]
        cases += [
            (gla._gla_seg_carry_kernel, dt, dict(BK=bk, BV=bv_fwd), 4),
        ]
        cases += [(gla._gla_dg_kernel, dt, dict(REVERSE=False, PAIR=p, BL=gla.DG_ROWS, BK=bk), 4) for p in (0, 1, 2)]
    return cases


def _agent_bias(dt, tdt):
    """The forward with and without prefix tables; the backward at grid widths 16 (224 px DeiT / Swin windows) to the
    kernels' limit, each with the wrapper's tile rows and warps."""
    from visionlin.kernels.triton import agent_bias as ab

    t = ab.TUNING
    cases = [
        (ab._bias_fwd_kernel, dt, dict(HAS_PRE=pre, BLOCK_T=t["block_t"], BLOCK_A=t["block_a"]), t["warps"])
        for pre in (False, True)
    ]
    for bx in (16, 64, 256, ab.MAX_GRID_WIDTH):
        by, warps = ab.backward_tiles(bx)
        cases.append(
            (ab._bias_bwd_kernel, dt, dict(HAS_PRE=True, BLOCK_Y=by, BLOCK_X=bx, BLOCK_S=16, BLOCK_P=16), warps)
        )
    return cases


def _rms_mix(dt, tdt):
    """ViG's head widths (64) and the kernels' limit, with and without weights and SiLU."""
    from visionlin.kernels.triton import gated_norm, rms_mix

    cases = []
    for c in (64, 96, 512, rms_mix.MAX_CHANNELS):
        for kernel, backward in ((rms_mix._rms_mix_fwd_kernel, False), (rms_mix._rms_mix_bwd_kernel, True)):
            meta = gated_norm.meta(c, backward=backward)
            warps = meta.pop("num_warps")
            for has_w, silu in ((True, False), (True, True), (False, True)):
                cases.append((kernel, dt, dict(HAS_WX=has_w, HAS_WY=has_w, SILU=silu, **meta), warps))
    return cases


def _gated_norm(dt, tdt):
    """Every row width up to the kernels' limit: NaLaFormer's 64-640 (blocks of 64-1024 channels) and beyond."""
    from visionlin.kernels.triton import gated_norm

    cases = []
    for c in (64, 96, 200, 320, 512, 640, 768, 1536, gated_norm.MAX_CHANNELS):
        for kernel, backward in ((gated_norm._gated_norm_fwd_kernel, False), (gated_norm._gated_norm_bwd_kernel, True)):
            meta = gated_norm.meta(c, backward=backward)
            warps = meta.pop("num_warps")
            if not backward:
                meta["STATS"] = True
            for gate in (True, False):  # gated (NaLaFormer) and the plain pre-norm LayerNorm (layer_norm)
                cases.append((kernel, dt, dict(HAS_W=True, HAS_B=True, HAS_G=gate, **meta), warps))
            # layer_norm on the float32 residual stream (its output / incoming gradient in bfloat16): compiled with
            # every activation pointer float32, the widest loads it can see
            cases.append((kernel, "fp32", dict(HAS_W=True, HAS_B=True, HAS_G=False, **meta), warps))
            if not backward:  # PreNorm's inference path: no statistics
                cases.append(
                    (kernel, "fp32", dict(HAS_W=True, HAS_B=True, HAS_G=False, **{**meta, "STATS": False}), warps)
                )
    return cases


# Measured spills (bytes per thread) that a change may shrink but not grow, keyed (module, kernel, dtype, MECH,
# BLOCK_D); docs/kernels.md states them: the rope_linear read-out backward of NaLa at D = 64 (its features are
# 128 wide) and of MALA / RALA in float16 at D = 128; the opt-in SLA read-out backward at D = 128 (its resident
# [D, Dv] state, [Dv, Dv] projection and dH_i accumulator in float32 exceed the register file).
SPILL_ALLOWANCE = {
    # the linear kernels' launch settings (linear._forward_settings / _backward_settings) spill at head dims 32-64, and
    # were measured faster than the spill-free settings tried on the H200, graph-timed (bf16:
    # linear_settings_grid_69e6057, linear_settings_ab_d{32,64}_bfloat16_15c3a07: e.g. the head-dim-64 backward 0.366
    # vs 0.556 ms; fp16 at head dim 32: linear_settings_ab_d32_float16_15c3a07, 0.201 vs 0.266 ms; fp16 at head dim
    # 64 not measured)
    **{
        ("visionlin.kernels.triton.linear", name, dt, None, d): n
        for dt, name, d, n in (
            ("bf16", "_readout_backward_kernel", 32, 240),
            ("bf16", "_state_kernel", 64, 300),
            ("bf16", "_readout_kernel", 64, 420),
            ("bf16", "_fused_kernel", 64, 48),
            ("bf16", "_readout_backward_kernel", 64, 240),
            ("bf16", "_state_backward_kernel", 64, 100),
            ("fp16", "_readout_backward_kernel", 32, 80),
            ("fp16", "_state_backward_kernel", 32, 72),
            ("fp16", "_state_kernel", 64, 780),
            ("fp16", "_readout_kernel", 64, 32),
            ("fp16", "_fused_kernel", 64, 32),
            ("fp16", "_readout_backward_kernel", 64, 560),
            ("fp16", "_state_backward_kernel", 64, 72),
        )
    },
    # the RoPE-linear kernels at 4 warps (rope_linear.WARPS) spill at head dims 32-64; 4 warps were the fastest forward
    # and backward of the graph-timed search at head dim 64 (bf16: rope_settings_grid_6e8d144: the former 8 warps,
    # which spilled little, took 1.3-1.6x the forward time); head dim 32 and fp16 follow the same rule. Keyed MECH
    # 0 MALA, 1 RALA, 2 NaLa (128-wide features at head dim 64), 3 Efficient Attention.
    **{
        ("visionlin.kernels.triton.rope_linear", name, dt, mech, d): n
        for dt, name, mech, d, n in (
            ("bf16", "_state_kernel", 0, 32, 64),
            ("bf16", "_readout_backward_kernel", 0, 32, 128),
            ("bf16", "_readout_backward_kernel", 1, 32, 80),
            ("bf16", "_state_kernel", 2, 32, 500),
            ("bf16", "_readout_backward_kernel", 2, 32, 360),
            ("bf16", "_state_backward_kernel", 2, 32, 400),
            ("bf16", "_state_kernel", 0, 64, 720),
            ("bf16", "_readout_backward_kernel", 0, 64, 230),
            ("bf16", "_state_backward_kernel", 0, 64, 400),
            ("bf16", "_state_kernel", 1, 64, 1000),
            ("bf16", "_readout_backward_kernel", 1, 64, 160),
            ("bf16", "_state_backward_kernel", 1, 64, 740),
            ("bf16", "_state_kernel", 2, 64, 4100),
            ("bf16", "_readout_kernel", 2, 64, 640),
            ("bf16", "_readout_backward_kernel", 2, 64, 16),  # NaLa's backward at 8 warps (SEARCHED_BACKWARD)
            ("fp16", "_state_kernel", 0, 32, 64),
            ("fp16", "_readout_backward_kernel", 0, 32, 300),
            ("fp16", "_readout_backward_kernel", 1, 32, 200),
            ("fp16", "_state_kernel", 2, 32, 760),
            ("fp16", "_readout_backward_kernel", 2, 32, 450),
            ("fp16", "_state_backward_kernel", 2, 32, 380),
            ("fp16", "_state_kernel", 0, 64, 890),
            ("fp16", "_readout_backward_kernel", 0, 64, 400),
            ("fp16", "_state_backward_kernel", 0, 64, 540),
            ("fp16", "_state_kernel", 1, 64, 850),
            ("fp16", "_readout_backward_kernel", 1, 64, 280),
            ("fp16", "_state_backward_kernel", 1, 64, 860),
            ("fp16", "_state_kernel", 2, 64, 6200),
            ("fp16", "_readout_kernel", 2, 64, 510),
            ("fp16", "_readout_backward_kernel", 2, 64, 24),
            ("fp16", "_state_backward_kernel", 2, 64, 28),
            ("fp16", "_state_backward_kernel", 3, 64, 72),
        )
    },
    ("visionlin.kernels.triton.sparse_linear", "_readout_bwd_kernel", "bf16", None, 128): 900,
    ("visionlin.kernels.triton.sparse_linear", "_readout_bwd_kernel", "fp16", None, 128): 900,
    ("visionlin.kernels.triton.rope_linear", "_readout_backward_kernel", "fp16", 0, 128): 64,
    # layer_norm's backward with every activation in float32: 4 B at C = 64 with only 72 registers in use (a ptxas
    # stack slot, not register pressure; the bf16 / fp16 cases spill nothing)
    ("visionlin.kernels.triton.gated_norm", "_gated_norm_bwd_kernel", "fp32", None, None): 4,
    # the gated RMS mix's backward at C = 512 (4 rows x 512 in 8 warps): 8 B with 80 registers in use, the same kind
    # of stack slot; ViG's C = 64 and the other widths spill nothing
    ("visionlin.kernels.triton.rms_mix", "_rms_mix_bwd_kernel", "bf16", None, None): 8,
    ("visionlin.kernels.triton.rms_mix", "_rms_mix_bwd_kernel", "fp16", None, None): 8,
    ("visionlin.kernels.triton.rope_linear", "_readout_backward_kernel", "fp16", 1, 128): 44,
    # SLA at D = 128 in half precision: the forward's 64 x 64 tiles in 4 warps with the linear read-out, and the code
    # variant's bf16 state kernel with 128-key tiles, spill a little and still beat the settings that spill nothing
    # (8 warps: 2.8 against 1.6 ms forward; 64-key state tiles: 0.36 against 0.27 ms; benchmarks/sla_parts.py --tiles,
    # benchmarks/results/h200/sla_parts_*.json)
    ("visionlin.kernels.triton.sparse_linear", "_fwd_kernel", "bf16", None, 128): 272,
    ("visionlin.kernels.triton.sparse_linear", "_fwd_kernel", "fp16", None, 128): 152,
    ("visionlin.kernels.triton.sparse_linear", "_states_kernel", "bf16", None, 128): 136,
    # Neighborhood attention: 4-warp programs capped at 128 registers (four programs per SM against two) spill and
    # still beat every setting that spills nothing (benchmarks/neighborhood_op.py --sweep at NAT-T's stage-1 shape,
    # benchmarks/results/h200/neighborhood_op*.json): the backward at head dim 32, 0.57 against 0.75 ms with a bias
    # table and 0.48 against 0.53 without; the forward at 64 with a bias table, 0.20 against 0.29; the backward at 64
    # uncapped (255 registers) 0.80 against 0.92-1.28 for 16-query blocks or a cap. (At head dim 32 up to 328 bytes:
    # a 7 x 7 map without a bias table, dq stored directly, since s47.)
    **{("visionlin.kernels.triton.neighborhood", "_bwd_kernel", dt, None, 32): 336 for dt in ("bf16", "fp16")},
    **{("visionlin.kernels.triton.neighborhood", "_fwd_kernel", dt, None, 64): 800 for dt in ("bf16", "fp16")},
    **{("visionlin.kernels.triton.neighborhood", "_bwd_kernel", dt, None, 64): 160 for dt in ("bf16", "fp16")},
    # ... and at head dim 128 with the bias table (8 warps, not measured on the GPU yet): 48-72 bytes (the backward's
    # shipped form, the bias added after the products, 72; in them, 56)
    ("visionlin.kernels.triton.neighborhood", "_fwd_kernel", "bf16", None, 128): 64,
    ("visionlin.kernels.triton.neighborhood", "_bwd_kernel", "bf16", None, 128): 80,
    # The fused agent backward: 64-row blocks in 4 warps, one stage, spill 80-730 bytes and still ran fastest of 12
    # settings at head dim 64 (agent_backends.py --bwd-sweep: 326 / 435 / 351 us for both kernels at Agent-DeiT-S's
    # 224 / 1024 / 2048 px shapes against 526 / 618 / 551 for 32 rows in 8 warps, which spill nothing)
    **{
        ("visionlin.kernels.triton.agent", name, dt, None, d): allowance
        for dt in ("bf16", "fp16")
        for name, d, allowance in (
            ("_broadcast_backward_kernel", 32, 96),
            ("_aggregate_backward_kernel", 32, 480),
            ("_broadcast_backward_kernel", 64, 320),
            ("_aggregate_backward_kernel", 64, 768),
        )
    },
    # FLatten's focusing kernels (no products, 6-16 float32 registers per tile entry): at some tile / warp counts
    # ptxas settles on 64 or 128 registers with a 4-12 byte stack slot (the backward's 1024 entries over 8 warps at
    # 512 channels, the forward's 2048 over 4 warps at 1024 channels: 4 bytes; the prefetching backward's 1024 over 4
    # warps at 512 channels: 12 bytes, timed with it in focus_op_fe5053c.json; the neighbouring settings none), a few
    # L1-resident words per thread
    **{
        ("visionlin.kernels.triton.focus", name, dt, None, None): 12
        for name in ("_focus_kernel", "_focus_backward_kernel")
        for dt in ("bf16", "fp16")
    },
    # float32 inputs at head dim 32 (IEEE products on float32 tiles; 168-255 registers): 20-36 bytes
    ("visionlin.kernels.triton.neighborhood", "_fwd_kernel", "fp32", None, 32): 40,
    ("visionlin.kernels.triton.neighborhood", "_bwd_kernel", "fp32", None, 32): 40,
}


FAMILIES = (
    _linear, _infsa, _conv_and_focus, _rope_linear, _neighborhood, _sparse_linear, _scan, _gla, _gated_norm, _rms_mix,
    _agent_bias,
)  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__.strip("_"))
def test_every_case_sets_each_constexpr(family):
    """Each compiled case gives every ``tl.constexpr`` parameter of its kernel a value, as the launches do: one left
    out (even one with a Python default) compiles as a runtime integer, with both sides of its branches, and the record
    then describes a kernel no launch runs (``DQ_DIRECT`` / ``DELTA_FUSED`` / ``I64`` and the agent kernels' ``SAVE``
    had been, until s47)."""
    import triton.language as tl

    missing = set()
    for fn, _, consts, _ in family("bf16", torch.bfloat16):
        for name, p in inspect.signature(fn.fn).parameters.items():
            if (p.annotation is tl.constexpr or "constexpr" in str(p.annotation)) and name not in consts:
                missing.add(f"{fn.fn.__name__}.{name}")
    assert not missing, sorted(missing)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"Triton ships no ptxas at {PTXAS}")
@pytest.mark.parametrize(
    "family",
    [
        _linear,
        _infsa,
        _conv_and_focus,
        _rope_linear,
        _neighborhood,
        _sparse_linear,
        _scan,
        _gla,
        _gated_norm,
        _rms_mix,
        _agent_bias,
    ],
    ids=[
        "linear",
        "infsa",
        "conv-focus",
        "rope-linear",
        "neighborhood",
        "sparse-linear",
        "scan",
        "gla",
        "gated-norm",
        "rms-mix",
        "agent-bias",
    ],  # fmt: skip
)
@pytest.mark.parametrize(("dt", "tdt"), [("bf16", torch.bfloat16), ("fp16", torch.float16)], ids=["bf16", "fp16"])
def test_kernels_compile_for_sm90_without_spills(family, dt, tdt):
    spilled, failed, seen = [], [], set()
    for fn, dtype, consts, warps in family(dt, tdt):
        stages = maxnreg = None
        if isinstance(warps, dict):  # a launch's meta: num_warps, num_stages and a register cap
            warps, stages, maxnreg = warps["num_warps"], warps.get("num_stages"), warps.get("maxnreg")
        label = f"{fn.fn.__name__} {dtype} {consts} warps={warps} stages={stages} maxnreg={maxnreg}"
        if label in seen:  # several launch configurations compile to the same kernel
            continue
        seen.add(label)
        try:
            regs, spills = _compile(fn, dtype, consts, warps, stages, maxnreg)
        except Exception as e:  # noqa: BLE001 (collect every failure, then report them all)
            failed.append(f"{label}: {type(e).__name__}: {str(e)[:300]}")
            continue
        key = (fn.fn.__module__, fn.fn.__name__, dtype, consts.get("MECH"), consts.get("BLOCK_D"))
        if spills > SPILL_ALLOWANCE.get(key, 0):
            spilled.append(f"{label}: {regs} registers, {spills} bytes spilled")
    assert not failed, "\n".join(failed)
    assert not spilled, "\n".join(spilled)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"Triton ships no ptxas at {PTXAS}")
def test_rope_linear_float32_tiles_fit_sm90_shared_memory():
    """float32 inputs keep the RoPE kernels' former tiles (``rope_linear.ROWS_FLOAT32``, 8 warps): the half-precision
    tiles in float32 need more shared memory than an sm_90 block has (NaLa's state kernel at head dim 64, 64 rows, 4
    warps: 256 KiB). Head dim 64 has the largest tiles the rule gives below 128; ``_compile`` checks shared memory."""
    for fn, dtype, consts, warps in _rope_linear("fp32", torch.float32):
        if consts.get("BLOCK_D") != 64:
            continue
        stages = None
        if isinstance(warps, dict):
            warps, stages = warps["num_warps"], warps.get("num_stages")
        _compile(fn, dtype, consts, warps, stages)


@pytest.mark.skipif(not os.path.exists(PTXAS), reason=f"Triton ships no ptxas at {PTXAS}")
def test_conv_strip_kernels_load_each_input_column_once_per_kernel_row():
    """The strip kernels' speed rests on the compiler merging the loads that two taps share (the same operation on the
    same values, written once per tap in the source): a kernel row costs ``S + k - 1`` loads per strip, not ``S * k``
    (the weight gradient: ``S`` gradient columns plus ``k`` rows of ``S + k - 1``). Counted in the sm_90 PTX of the
    shipped settings (bf16), whose loads are one vector instruction per thread and column at most 16 bytes wide; a
    Triton that stopped merging them would fail here, not only run slower."""
    import math

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from visionlin.kernels.triton import conv

    def loads(fn, consts, warps):
        params = list(inspect.signature(fn.fn).parameters)
        sig = _signature(fn, "bf16", consts)
        attrs = {(params.index(p),): [["tt.divisibility", 16]] for p, t in sig.items() if t[0] == "*" or t == "i32"}
        src = ASTSource(fn, sig, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
        return len(re.findall(r"ld\.(?:volatile\.)?global", ptx))

    def vectors(elements: int, size: int) -> int:  # loads of a thread's share of a row, 16 bytes each at most
        return math.ceil(elements * size / 16)

    for k in (3, 5):
        s, r, c = conv.STRIP[k]
        per_thread = r * c // (32 * conv.WARPS)
        consts = dict(K=k, FLIP=False, HAS_BIAS=True, HAS_RES=True, S=s, I64=False, BLOCK_R=r, BLOCK_C=c)
        consts |= dict(sx_c=1, sr_c=1, so_c=1)
        # one kernel row (the loop over rows stays a loop): its columns, its k taps' weights; bias, residual columns
        want = (s + k - 1) * vectors(per_thread, 2) + (k + 1) * vectors(per_thread, 4) + s * vectors(per_thread, 2)
        assert loads(conv._conv_strip_kernel, consts, conv.WARPS) == want, k
        t1, t2, _ = conv.weight_grad_tile(k)
        s, r, c = conv.WG_STRIP[k]
        per_thread = r * c // (32 * conv.WARPS_WEIGHT_GRAD)
        consts = dict(K=k, T1=t1, T2=t2, HAS_BIAS=True, S=s, I64=False, BLOCK_R=r, BLOCK_C=c, sx_c=1, sg_c=1)
        want = (s + k * (s + k - 1)) * vectors(per_thread, 2)  # every kernel row unrolled: all k rows' columns
        assert loads(conv._weight_grad_strip_kernel, consts, conv.WARPS_WEIGHT_GRAD) == want, k
