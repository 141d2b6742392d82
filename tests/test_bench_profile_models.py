"""``benchmarks/profile_models.py``'s plumbing on the CPU (the profile itself needs a GPU: stubbed)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import _meta, profile_models


def test_compile_mode_reaches_the_profile_and_the_row(monkeypatch, tmp_path, capsys):
    """``--compile --compile-mode reduce-overhead``: the model compiled in that mode, the training step told of each
    CUDA-graph iteration (``graphs=True``), and the row records the mode, dynamo's graphs and graph breaks and the
    kernels a step."""
    seen, compiled = [], []
    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **kw: self)
    monkeypatch.setattr(torch, "compile", lambda model, mode="default": compiled.append(mode) or model)
    monkeypatch.setattr(torch._dynamo, "reset", lambda: None)
    monkeypatch.setattr(_meta, "gpu_meta", lambda argv, commit, **extra: {"gpu": "fake", "commit": commit, **extra})

    def fake_profile(model, size, batch, train=False, graphs=False):
        seen.append((type(model).__name__, size, batch, train, graphs))
        return {"gpu_us": 1000.0, "wall_ms": 1.5, "kernels_per_step": 7, "distinct_kernels": 3,
                "categories_us": {"gemm": 1000.0}, "top_kernels": []}  # fmt: skip

    monkeypatch.setattr(profile_models, "profile", fake_profile)
    argv = ["--out", str(tmp_path), "--models", "nat_mini", "--twin", "deit_tiny_patch16_224", "--sizes", "64:2",
            "--train", "--compile", "--compile-mode", "reduce-overhead", "--name", "p"]  # fmt: skip
    assert profile_models.main(argv) == 0
    assert compiled == ["reduce-overhead"] * 2 and [s[3:] for s in seen] == [(True, True)] * 2
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["deit_tiny_patch16_224", "nat_mini"]
    assert {(r["compile_mode"], r["dynamo_graphs"], r["graph_breaks"], r["kernels_per_step"]) for r in rows} == {
        ("reduce-overhead", 0, 0, 7)
    }
    assert "7 kernels, 0 graphs, 0 breaks" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        profile_models.main([*argv[:-4], "--compile-mode", "max-autotune"])
