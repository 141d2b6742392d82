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
    """NAT-T's blocks per stage (3, 4, 18, 5) and DiNAT-T's dilated ones (every other block), at 224 px."""
    nat = [neighborhood_op.TILE_SHAPES[f"nat_t_s{i}"] for i in (1, 2, 3, 4)]
    assert [(size, calls) for size, _, _, calls in nat] == [(56, 3), (28, 4), (14, 18), (7, 5)]
    for name, (size, _, dilation, _) in neighborhood_op.TILE_SHAPES.items():
        assert size % dilation == 0 and size // dilation >= 7, name  # kernel 7 fits every dilation group


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
