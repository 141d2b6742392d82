"""Forward-kernel variants of the block-sparse softmax loop at Wan2.1's attention shape (N = 32,760, 12 heads, head
dim 128, bf16, 95% sparsity, 128 x 64 selection blocks), next to the shipped kernel: pointer loads vs TMA tensor
descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, zero-filled past each batch's keys), query tiles of
64 / 128 rows, key tiles of 32 / 64, 4 / 8 warps, 2-4 stages, and Triton's ``warp_specialize`` loop option; then the
state kernel's split and tile settings, the pooling kernel's tiles, and the whole ops (``sparse``, ``sla`` code /
paper, cuDNN SDPA) timed per call, back to back, as host time with the GPU busy and as a CUDA-graph replay, with a
kernel profile of both ``sla`` variants.

A measurement script, not a library path: its variant kernel exists to answer whether TMA loads or warp
specialisation make the shipped loop (``triton/sparse_linear.py``'s ``_fwd_kernel``) faster on Hopper (on the H200
at cc1834a: no, ``benchmarks/results/h200/sla_fwd_variants_cc1834a.json``). Every variant's output is checked against
the shipped kernel's (``err``, ``lse_err``).

Usage (on a GPU machine)::

    python benchmarks/sla_fwd_variants.py --out DIR [--commit SHA] [--ops-only]

``TRITON_INTERPRET=1 python benchmarks/sla_fwd_variants.py --out DIR`` runs three variants at a tiny size on the CPU
(a check of the variant kernel's math; no timings).
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import cuda_ms, graph_ms  # noqa: E402
from visionlin.train.bench import write_json  # noqa: E402

INTERP = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _exp_fwd(
    Q, K, V, LUT, Out, LSE, dq, dk, dv, do, N, M, H, n_c, nqb,
    sq_b, sq_n, sq_h, sk_b, sk_n, sk_h, sv_b, sv_n, sv_h, so_b, so_n, so_h, scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, QPB: tl.constexpr, KSUB: tl.constexpr,
    TMA: tl.constexpr, WS: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    i = tile // QPB
    row0 = tile * BLOCK_Q
    offs_q = tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    offs_k = tl.arange(0, BLOCK_K)
    b64 = b.to(tl.int64)
    if TMA:
        q = dq.load([b, row0, h * D]).reshape(BLOCK_Q, D)
    else:
        q_base = Q + b64 * sq_b + h * sq_h + row0.to(tl.int64) * sq_n
        q = tl.load(q_base + offs_q[:, None] * sq_n + offs_d[None, :], mask=(offs_q < N - row0)[:, None], other=0.0)
    k_base = K + b64 * sk_b + h * sk_h
    v_base = V + b64 * sv_b + h * sv_h
    lut = LUT + (bh.to(tl.int64) * nqb + i) * n_c
    qk_scale = scale * 1.4426950408889634
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    for t in tl.range(0, n_c * KSUB, warp_specialize=WS):
        col0 = tl.load(lut + t // KSUB) * (BLOCK_K * KSUB) + (t % KSUB) * BLOCK_K
        cmask = offs_k < M - col0
        if TMA:
            kb = dk.load([b, col0, h * D]).reshape(BLOCK_K, D)
            s = tl.dot(q, kb.T)
        else:
            kt = tl.load(k_base + col0.to(tl.int64) * sk_n + offs_k[None, :] * sk_n + offs_d[:, None],
                         mask=cmask[None, :], other=0.0)  # fmt: skip
            s = tl.dot(q, kt)
        s = tl.where(cmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TMA:
            vb = dv.load([b, col0, h * D]).reshape(BLOCK_K, D)
        else:
            vb = tl.load(v_base + col0.to(tl.int64) * sv_n + offs_k[:, None] * sv_n + offs_d[None, :],
                         mask=cmask[:, None], other=0.0)  # fmt: skip
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(vb.dtype), vb, acc)
        m_i = m_new
    o = acc / l_i[:, None]
    rmask = offs_q < N - row0
    tl.store(LSE + bh.to(tl.int64) * N + row0 + offs_q, m_i + tl.log2(l_i), mask=rmask)
    if TMA:
        do.store([b, row0, h * D], o.to(Out.dtype.element_ty).reshape(1, BLOCK_Q, D))
    else:
        o_base = Out + b64 * so_b + h * so_h + row0.to(tl.int64) * so_n
        tl.store(o_base + offs_q[:, None] * so_n + offs_d[None, :], o.to(Out.dtype.element_ty), mask=rmask[:, None])


def _desc(x, rows):
    b, n, h, d = x.shape
    return TensorDescriptor(x, [b, n, h * d], [x.stride(0), x.stride(1), 1], [1, rows, d])


def exp_fwd(q, k, v, lut, block_q, block_k, bq, bk, warps, stages, tma, ws):
    b, n, h, d = q.shape
    m = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=q.device, dtype=torch.float32)
    nqb, n_c = lut.shape[2], lut.shape[3]
    descs = (_desc(q, bq), _desc(k, bk), _desc(v, bk), _desc(out, bq)) if tma else (q, k, v, out)
    grid = (nqb * (block_q // bq), b * h)
    _exp_fwd[grid](q, k, v, lut, out, lse, *descs, n, m, h, n_c, nqb, *q.stride()[:3], *k.stride()[:3],
                   *v.stride()[:3], *out.stride()[:3], d**-0.5, D=d, BLOCK_Q=bq, BLOCK_K=bk, QPB=block_q // bq,
                   KSUB=block_k // bk, TMA=tma, WS=ws, num_warps=warps, num_stages=stages)  # fmt: skip
    return out, lse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/sla_fwd_variants.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--commit", default=None)
    p.add_argument("--ops-only", action="store_true", help="only the whole ops' timings and profiles")
    args = p.parse_args(argv)
    if not INTERP and not torch.cuda.is_available():
        print("sla_fwd_variants.py needs a CUDA GPU (or TRITON_INTERPRET=1 for the CPU check)", file=sys.stderr)
        return 2
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    ops_only = args.ops_only
    from visionlin.kernels import block_sparse_attention, sparse_linear_attention
    from visionlin.kernels.triton import sparse_linear as sl

    dev = "cpu" if INTERP else "cuda"
    if INTERP:
        b, n, h, d, bq_sel, bk_sel, topk = 1, 200, 2, 64, 64, 32, 0.3
    else:
        b, n, h, d, bq_sel, bk_sel, topk = 1, 32760, 12, 128, 128, 64, 0.05
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, device=dev, dtype=torch.bfloat16 if not INTERP else torch.float32,
                           generator=g) for _ in range(3))  # fmt: skip
    w = 0.02 * torch.randn(d, d, device=dev, generator=g)
    rows = []
    if INTERP:
        meta = {"device": "cpu (Triton interpreter)", "triton": triton.__version__, "torch": torch.__version__}
    else:
        from benchmarks._meta import gpu_meta

        meta = gpu_meta(argv, args.commit)
    res = {"benchmark": "sla_fwd_variants", "meta": meta, "rows": rows}

    def save(final: bool = False) -> None:  # the rows so far are marked partial until the last write
        write_json(out_dir / "sla_fwd_variants.json", res, partial=not final)

    with torch.no_grad():
        lut, _ = sl.select_blocks(q, k, topk, 0.0, bq_sel, bk_sel, marginal=False)
        base_out, _, base_lse = sl._fwd(q, k, v, lut, None, None, None, None, d**-0.5, 1.0, bq_sel, bk_sel, 0)
        if ops_only:
            variants = []
        elif INTERP:
            variants = [(64, 32, 4, 2, True, False), (32, 32, 4, 2, False, False), (64, 16, 4, 2, True, False)]
        else:
            variants = [
                (bq, bk, wp, st, tma, ws)
                for tma in (False, True)
                for (bq, bk) in ((64, 64), (128, 64), (128, 32))
                for wp in (4, 8)
                for st in (2, 3, 4)
                for ws in (False,)
            ] + [(128, 64, 8, 2, True, True), (128, 64, 8, 3, True, True), (128, 64, 4, 3, True, True),
                 (64, 64, 4, 3, True, True), (128, 32, 4, 3, True, True)]  # fmt: skip
        for bq, bk, wp, st, tma, ws in variants:
            name = f"fwd q{bq} k{bk} w{wp} s{st} {'tma' if tma else 'ptr'}{' ws' if ws else ''}"
            try:
                fn = functools.partial(exp_fwd, q, k, v, lut, bq_sel, bk_sel, bq, bk, wp, st, tma, ws)
                o, lse = fn()
                err = (o.float() - base_out.float()).abs().max().item()
                lerr = (lse - base_lse).abs().max().item()
                ms = None if INTERP else cuda_ms(fn, 3, 1, 20)
                row = {"name": name, "ms": ms, "err": err, "lse_err": lerr}
            except Exception as e:  # noqa: BLE001
                row = {"name": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}
            rows.append(row)
            print(row, flush=True)
            save()
        if not INTERP and variants:
            rows.append(
                {
                    "name": "fwd baseline (project)",
                    "ms": cuda_ms(
                        lambda: sl._fwd(q, k, v, lut, None, None, None, None, d**-0.5, 1.0, bq_sel, bk_sel, 0), 3, 1, 20
                    ),
                }
            )
            print(rows[-1], flush=True)
        if INTERP:
            save(final=True)
            return 0
        # states kernel settings (splits, tiles)
        base_states = sl.sla_states(k, v, 0)
        saved = (sl.STATES_MIN_ROWS, dict(sl.STATES_TILES))
        for min_rows in () if ops_only else (512, 256, 128):
            for tile, wp, st in ((128, 8, 3), (64, 4, 3), (64, 8, 2), (64, 4, 2), (32, 4, 3)):
                sl.STATES_MIN_ROWS = min_rows
                sl.STATES_TILES[torch.bfloat16] = (tile, {"num_warps": wp, "num_stages": st})
                name = f"states rows>={min_rows} n{tile} w{wp} s{st}"
                try:
                    hs, zs = sl.sla_states(k, v, 0)
                    err = (hs - base_states[0]).abs().max().item()
                    rows.append({"name": name, "ms": cuda_ms(lambda: sl.sla_states(k, v, 0), 3, 1, 20), "err": err})
                except Exception as e:  # noqa: BLE001
                    rows.append({"name": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(rows[-1], flush=True)
        sl.STATES_MIN_ROWS, sl.STATES_TILES = saved[0], saved[1]
        save()
        # pool kernel settings
        for bt, bc, wp in (
            () if ops_only else ((16, 512, 4), (32, 512, 4), (64, 256, 4), (16, 256, 4), (32, 256, 8), (64, 512, 8))
        ):
            out = torch.empty(b, h, -(-n // bq_sel), d, device=dev, dtype=torch.float32)

            def pool(out=out, bt=bt, bc=bc, wp=wp):
                sl._pool_kernel[(-(-n // bq_sel), b, -(-h * d // bc))](
                    q, out, n, h, d, bq_sel, *q.stride()[:3], BLOCK_T=bt, BLOCK_C=bc, num_warps=wp
                )

            rows.append({"name": f"pool t{bt} c{bc} w{wp}", "ms": cuda_ms(pool, 3, 1, 20)})
            print(rows[-1], flush=True)
        save()
        # whole ops: isolated per call, back to back, host per call, CUDA graph (GPU only)
        ops = {
            "sparse95": lambda: block_sparse_attention(q, k, v, topk=0.05, block_q=bq_sel, block_k=bk_sel,
                                                       backend="triton"),
            "sla-code95": lambda: sparse_linear_attention(q, k, v, w, None, topk=0.05, k_low=0.0, block_q=bq_sel,
                                                          block_k=bk_sel, variant="code", backend="triton"),
            "sla-paper95": lambda: sparse_linear_attention(q, k, v, w, None, topk=0.05, k_low=0.1, block_q=bq_sel,
                                                           block_k=bk_sel, variant="paper", backend="triton"),
        }  # fmt: skip
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

        def dense():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)

        ops["dense"] = dense
        for name, fn in ops.items():
            row = {"name": f"op {name}", "isolated_ms": cuda_ms(fn, 3, 1, 20), "b2b_ms": cuda_ms(fn, 3, 10, 5)}
            # host: launch 10 calls while the GPU is busy with a long dense call first
            torch.cuda.synchronize()
            for _ in range(3):
                dense()
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            row["host_us_per_call_busy_gpu"] = (time.perf_counter() - t0) / 10 * 1e6
            torch.cuda.synchronize()
            try:
                row["graph_ms"] = graph_ms(fn, 3, 20)
            except Exception as e:  # noqa: BLE001
                row["graph_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(row)
            print(row, flush=True)
            save()
        prof_rows = []
        from torch.profiler import ProfilerActivity, profile

        for name in ("sla-code95", "sla-paper95"):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    ops[name]()
                torch.cuda.synchronize()
            prof_rows.append(name + "\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
        res["profiles"] = prof_rows
        print("\n".join(prof_rows))
        save(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
