"""benchmarks/neighborhood_op.py: the tile sweep's flag checks on the CPU; a short tile sweep on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import neighborhood_op


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tile-shapes", "nat_t_s1,nope"], "--tile-shapes: unknown ['nope']; choose from nat_t_s1, nat_t_s2"),
        (["--tile-shapes", ","], "--tile-shapes: unknown ','"),
    ],
)
def test_bad_tile_shapes_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        neighborhood_op.main(["--out", "unused", "--tile-sweep", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_tile_shapes_are_the_models_calls():
    """NAT-T's blocks per stage (3, 4, 18, 5) and DiNAT-T's dilated ones (the middle one of 3 blocks in stage 1, every
    other block of stages 2 and 3: 1, 2, 9), at 224 px."""
    shapes = neighborhood_op.TILE_SHAPES
    nat = [shapes[f"nat_t_s{i}"] for i in (1, 2, 3, 4)]
    assert [(size, calls) for size, _, _, calls in nat] == [(56, 3), (28, 4), (14, 18), (7, 5)]
    dinat = [shapes[n] for n in ("dinat_t_s1_d8", "dinat_t_s2_d4", "dinat_t_s3_d2")]
    assert [(size, dilation, calls) for size, _, dilation, calls in dinat] == [(56, 8, 1), (28, 4, 2), (14, 2, 9)]
    for name, (size, _, dilation, _) in shapes.items():
        assert size % dilation == 0 and size // dilation >= 7, name  # kernel 7 fits every dilation group


@pytest.fixture
def no_gpu_needed(monkeypatch):
    """What the sweeps' plumbing asks of the GPU, stubbed: CUDA reported present, ``empty_cache`` a no-op, the run's
    meta fixed (the kernels and timers are stubbed by each test)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    meta = {"commit": "abc1234", "gpu": "stub", "cpu": "", "torch": torch.__version__, "triton": "-", "date": "today"}
    monkeypatch.setattr(neighborhood_op, "gpu_meta", lambda argv, commit: meta)


def test_tile_sweep_calls_each_shape_with_its_own_sizes(monkeypatch, tmp_path, no_gpu_needed):
    """Each shape of the sweep reaches the op with its map, heads and dilation (not the command line's), once each
    however often it is named, and every row records it; the op and the timer stubbed (no GPU here)."""
    seen = []

    def fake_na(q, k, v, kernel, dilation, rpb=None, backend=None):
        seen.append((q.shape[1], q.shape[3], dilation, kernel, backend))
        return q * k + v

    monkeypatch.setattr(neighborhood_op, "neighborhood_attention", fake_na)
    monkeypatch.setattr(neighborhood_op, "graph_ms", lambda step, warmup, iters, stream: step() or 1.0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)  # no capture stream: the backward's forward runs inline
    monkeypatch.setattr(neighborhood_op, "_inputs", lambda a, grad: (
        torch.zeros(1, a.size, a.size, a.heads, 4, requires_grad=grad), *[torch.zeros(1, a.size, a.size, a.heads, 4,
        requires_grad=grad) for _ in range(2)], None))  # fmt: skip
    argv = ["--out", str(tmp_path), "--tile-sweep", "--tile-shapes", "dinat_t_s2_d4,nat_t_s4,dinat_t_s2_d4,"]
    assert neighborhood_op.main(argv) == 0
    assert sorted(set(seen)) == [(7, 16, 1, 7, "triton"), (28, 4, 4, 7, "triton")]
    doc = json.loads((tmp_path / "neighborhood_op_tiles.json").read_text())
    assert [r["shape"] for r in doc["rows"]] == ["dinat_t_s2_d4"] * 36 + ["nat_t_s4"] * 36
    assert all(r["status"] == "ok" for r in doc["rows"]), [r for r in doc["rows"] if r["status"] != "ok"][:1]
    assert (tmp_path / "neighborhood_op_tiles.png").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_tile_sweep(tmp_path):
    """Every setting of one shape measured from a CUDA graph (the shipped one first), the launch settings restored."""
    from visionlin.kernels.triton import neighborhood as nt

    before = dict(nt.TUNING)
    args = ["--out", str(tmp_path), "--tile-sweep", "--tile-shapes", "nat_t_s4,dinat_t_s3_d2", "--batch", "2"]
    assert neighborhood_op.main([*args, "--warmup", "1", "--iters", "2"]) == 0
    doc = json.loads((tmp_path / "neighborhood_op_tiles.json").read_text())
    rows = doc["rows"]
    assert all(r["status"] == "ok" and r["graph_ms"] > 0 for r in rows), [r for r in rows if r["status"] != "ok"]
    for shape in ("nat_t_s4", "dinat_t_s3_d2"):
        modes = [r["mode"] for r in rows if r["shape"] == shape]
        assert modes == ["forward"] * 15 + ["backward"] * 21
        assert [r["config"] for r in rows if r["shape"] == shape][0] == {}
    assert (tmp_path / "neighborhood_op_tiles.png").is_file()
    assert before == nt.TUNING


def test_bias_grad_sweep_sets_and_restores_each_setting(monkeypatch, tmp_path, no_gpu_needed):
    """``--bias-grad-sweep``: at each shape the reduction runs with the shipped constants first, then with each of
    :data:`BIAS_GRAD_SETTINGS` set while it runs (and its difference from the shipped table recorded), the module's
    constants restored after; the kernel (a torch sum seeing the constants) and the timer stubbed (no GPU here)."""
    from visionlin.kernels.triton import neighborhood as nt

    shipped = (nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM)
    seen = []

    def fake_bias_grad(ds, drpb, x, y, kx, ky, dx, dy):
        seen.append((tuple(ds.shape), x, dx, nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM))
        drpb += ds.sum() * (1.0 if nt.BIAS_GRAD_PER_SM != ((None, 32),) else 2.0)  # one setting "wrong": its diff

    monkeypatch.setattr(nt, "_bias_grad", fake_bias_grad)
    monkeypatch.setattr(neighborhood_op, "DEVICE", "cpu")
    monkeypatch.setattr(neighborhood_op, "graph_ms", lambda step, warmup, iters: step() or 1.0)
    argv = ["--out", str(tmp_path), "--bias-grad-sweep", "--tile-shapes", "nat_t_s4,dinat_t_s3_d2", "--batch", "2"]
    assert neighborhood_op.main(argv) == 0
    assert shipped == (nt.BIAS_GRAD_ELEMENTS, nt.BIAS_GRAD_PER_SM)
    settings = [shipped, *((e, ((None, s),)) for e, s in neighborhood_op.BIAS_GRAD_SETTINGS)]
    per_shape = [(e, s) for e, s in settings for _ in range(2)]  # one check call and one timed call each
    assert [c[3:] for c in seen] == per_shape * 2
    assert {c[:3] for c in seen} == {((2, 16, 7, 7, 49), 7, 1), ((2, 8, 14, 14, 49), 14, 2)}
    doc = json.loads((tmp_path / "neighborhood_op_bias_grad.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 2 * len(settings) and all(r["status"] == "ok" and r["mode"] == "bias_grad" for r in rows)
    assert {r["config"].get("per_sm") == 32 for r in rows if r["max_rel_diff"] > 0.5} == {True}
    assert all(r["max_rel_diff"] == 0 for r in rows if r["config"].get("per_sm") != 32)
    assert (tmp_path / "neighborhood_op_bias_grad.png").is_file()


def test_bwd_block_sweep_times_the_shipped_key_tile(monkeypatch, tmp_path, no_gpu_needed):
    """``--bwd-block-sweep``: at each shape the shipped backward first, then its group row's key tile from
    ``MEASURED_TILES`` (set explicitly, narrow key blocks) with each query block / warps / register cap; the backward
    alone at the shape's own sizes (the timing stubbed: no GPU here)."""
    seen = []

    def fake_time(args, fn, mode, config, timer, key, stream=None, **extra):
        seen.append((extra["shape"], args.size, args.heads, args.dilation, mode, config))
        return {**extra, "method": "triton", "mode": mode, "status": "ok", "config": config, key: 1.0}

    monkeypatch.setattr(neighborhood_op, "_time_setting", fake_time)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: None)
    argv = ["--out", str(tmp_path), "--bwd-block-sweep", "--tile-shapes", "nat_t_s3,nat_t_s2"]
    assert neighborhood_op.main(argv) == 0
    settings, extra = neighborhood_op.BWD_BLOCK_SETTINGS, list(neighborhood_op.BWD_TILE_CONFIGS)
    fwd = [{}, *neighborhood_op.FWD_CONFIGS]
    assert len(seen) == 2 * (1 + len(settings) + len(extra) + len(fwd))
    assert [s[5] for s in seen if s[4] == "forward"] == fwd * 2  # the forward's opt-in settings after the backward's
    seen[:] = [s for s in seen if s[4] == "backward"]
    for name, size, heads, tile in (("nat_t_s3", 14, 8, (64, 16)), ("nat_t_s2", 28, 4, (16, 4))):
        mine = [s for s in seen if s[0] == name]
        assert {s[1:4] for s in mine} == {(size, heads, 1)}
        assert mine[0][5] == {}
        for (bb, w, cap), s in zip(settings, mine[1 : 1 + len(settings)], strict=True):
            want = dict(tile_q=tile[0], tile_y=tile[1], narrow_cols=True, bwd_block=bb, bwd_warps=w)
            assert s[5] == want | ({} if cap is None else {"bwd_maxnreg": cap})
        assert [s[5] for s in mine[1 + len(settings) :]] == extra
    doc = json.loads((tmp_path / "neighborhood_op_bwd_block.json").read_text())
    assert len(doc["rows"]) == len(seen) + len(fwd) * 2
    assert (tmp_path / "neighborhood_op_bwd_block.png").is_file()
    seen.clear()  # --bwd-tiles-only: the shipped backward and the key-tile settings, no query-block settings
    assert neighborhood_op.main([*argv, "--bwd-tiles-only"]) == 0
    assert [s[5] for s in seen] == ([{}] + extra + fwd) * 2


def test_bwd_tiles_only_needs_the_bwd_block_sweep(capsys):
    with pytest.raises(SystemExit) as e:
        neighborhood_op.main(["--out", "unused", "--tile-sweep", "--bwd-tiles-only"])
    assert e.value.code == 2 and "--bwd-tiles-only goes with --bwd-block-sweep" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--tile-sweep", "--bias-grad-sweep"], "--tile-sweep, --bias-grad-sweep"),
        (["--bias-grad-sweep", "--bwd-block-sweep"], "--bias-grad-sweep, --bwd-block-sweep"),
    ],
)
def test_the_sweeps_run_alone(flags, names, capsys):
    with pytest.raises(SystemExit) as e:
        neighborhood_op.main(["--out", "unused", *flags])
    assert e.value.code == 2 and f"{names} each run alone" in capsys.readouterr().err


def test_packed_ab_alternates_the_split_and_packed_calls(monkeypatch):
    """``--packed-ab``: one packed ``qkv`` leaf, the split call on its views and the packed call, alternating, each
    replayed (the ops and the timer stubbed: no GPU here)."""
    import argparse

    import visionlin.kernels as vk

    calls = []

    def fake_split(q, k, v, kernel, dilation, rpb=None, backend=None):
        calls.append(("split", q.shape, q._base is not None, backend))
        return q * k + v

    def fake_packed(qkv, kernel, dilation, rpb=None, backend=None):
        calls.append(("packed", qkv.shape, backend))
        return qkv.sum(3)

    monkeypatch.setattr(neighborhood_op, "neighborhood_attention", fake_split)
    monkeypatch.setattr(vk, "neighborhood_attention_qkv", fake_packed)
    monkeypatch.setattr(neighborhood_op, "graph_ms", lambda step, warmup, iters: step() or 1.0)
    monkeypatch.setattr(neighborhood_op, "_inputs", lambda a, grad: (torch.zeros(2, 5, 5, 3, 4), None, None, None))
    real_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *s, device=None, **kw: real_randn(*s, **kw))  # no CUDA here
    args = argparse.Namespace(kernel=3, dilation=1, warmup=1, iters=1)
    rows = neighborhood_op._packed_ab(args, rounds=2)
    assert [r["call"] for r in rows] == ["split", "packed", "split", "packed"]
    assert calls == [("split", (2, 5, 5, 3, 4), True, "triton"), ("packed", (2, 5, 5, 3, 3, 4), "triton")] * 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_packed_ab(tmp_path):
    args = ["--out", str(tmp_path), "--batch", "2", "--size", "14", "--no-reference", "--no-profile", "--packed-ab"]
    assert neighborhood_op.main([*args, "--warmup", "1", "--iters", "2", "--repeats", "1"]) == 0
    rows = json.loads((tmp_path / "neighborhood_op.json").read_text())["packed_ab"]
    assert [r["call"] for r in rows] == ["split", "packed"] * 3 and all(r["graph_ms"] > 0 for r in rows)
