"""``benchmarks/graph_audit.py``: the ATen graph of a training step traced on meta tensors standing in for CUDA."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import graph_audit  # noqa: E402


def _targets(row):
    return {t["target"]: t["count"] for t in row["targets"]}


def test_audit_sees_the_gpu_path_and_the_packed_call():
    """Traced as on a GPU: ViG's layers reach the Triton custom ops (opaque nodes), and the packed switch replaces the
    two directions' ops and the concatenations of their gradients (two ``cat`` a layer fewer, the switch restored)."""
    from visionlin.layers import gla

    rows = {}
    for on in (False, True):
        with graph_audit.switches(["gla:qkv_packed"], on):
            rows[on] = graph_audit.audit("vig_tiny", 2, 64, top=100, depth=2, img_size=64)
    assert gla.FAST_PATHS["qkv_packed"] is True  # shipped on since s51; the context restored it
    split, packed = _targets(rows[False]), _targets(rows[True])
    assert split["visionlin.gla_fwd.default"] == 4 and split["visionlin.gla_bwd.default"] == 4  # 2 layers x 2 ways
    assert packed["visionlin.bigla_qkv_fwd.default"] == 2 and packed["visionlin.bigla_qkv_bwd.default"] == 2
    assert "visionlin.gla_fwd.default" not in packed
    assert packed["aten.cat.default"] == split["aten.cat.default"] - 4  # two a layer: q, k, v and the gates
    assert rows[True]["ops"] < rows[False]["ops"] and rows[True]["output_mib"] < rows[False]["output_mib"]
    assert not any(t in graph_audit.VIEWS for t in split)
    assert not torch.empty(1, device="meta").is_cuda  # the context restored Tensor.is_cuda


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_meta_stands_in_for_cuda_in_the_layers_own_checks(mode):
    """The layers' own ``is_cuda`` fast-path checks see meta tensors as CUDA ones, under dynamo too (which answers
    ``x.is_cuda`` from the traced device, not the property): NaLaFormer's softmax stages rotate q and k with the
    fused Triton pair, so no PyTorch ``neg`` / ``stack`` of the unfused rotation is in the step."""
    row = graph_audit.audit("nalaformer_tiny", 2, 64, top=200, mode=mode, depths=(1, 1, 1, 1))
    targets = _targets(row)
    unfused = {"aten.neg.default", "aten.stack.default"} & set(targets)
    assert not unfused and any("rope" in t for t in targets), targets
    assert not torch.empty(1, device="meta").is_cuda


def test_cli_writes_rows_and_refuses_bad_toggles(tmp_path, monkeypatch):
    def fake(name, batch, size, top, mode):
        return {"ops": 1, "output_mib": 0.5, "targets": []}

    monkeypatch.setattr(graph_audit, "audit", fake)
    rows = graph_audit.main(["--models", "vig_tiny", "--toggles", "gla:qkv_packed", "--out", str(tmp_path)])
    assert [r["switches"] for r in rows] == [{"gla:qkv_packed": False}, {"gla:qkv_packed": True}]
    assert {r["mode"] for r in rows} == {"compiled"}
    saved = json.loads((tmp_path / "graph_audit.json").read_text())
    assert saved["rows"] == rows and saved["meta"]["command"].startswith("graph_audit.py --models vig_tiny")
    for bad in ("gla:nope", "nomodule:qkv_packed", "gla"):
        with pytest.raises(ValueError, match="names no visionlin.layers"):
            graph_audit.main(["--toggles", bad])
    with pytest.raises(SystemExit):
        graph_audit.main(["--batch", "0"])
    with pytest.raises(SystemExit):
        graph_audit.main(["--mode", "jit"])


def test_compiled_mode_reports_the_forward_and_backward_graphs():
    """``mode="compiled"``: the two graphs AOTAutograd hands the backend, summed; functionalized, so FLatten's key
    encoding (out of place in training) leaves no ``slice_scatter`` / ``copy`` of the projection in either."""
    row = graph_audit.audit("flatten_deit_small", 2, 64, top=200, mode="compiled", depth=2, img_size=64)
    fwd, bwd = row["graphs"]["forward"], row["graphs"]["backward"]
    assert (
        row["ops"] == fwd["ops"] + bwd["ops"] and abs(row["output_mib"] - fwd["output_mib"] - bwd["output_mib"]) < 0.2
    )
    assert "visionlin.focused_linear_fwd.default" in _targets(
        fwd
    ) and "visionlin.focused_linear_bwd.default" in _targets(bwd)
    for graph in (fwd, bwd):
        assert not {"aten.slice_scatter.default", "aten.copy.default"} & set(_targets(graph)), _targets(graph)
    with pytest.raises(ValueError, match="not divisible by patch_size"):  # the model's own message, not dynamo's
        graph_audit.audit("vig_tiny", 1, 60, mode="compiled", depth=1, img_size=64)
    with pytest.raises(ValueError, match="mode='jit'; allowed"):
        graph_audit.audit("flatten_deit_small", 2, 64, mode="jit")
