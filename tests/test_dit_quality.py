"""``benchmarks/dit_quality.py`` (the converter's quality study on Fashion-MNIST) on the CPU with ``--tiny`` sizes and
fake Fashion-MNIST IDX files: every method row present with finite metrics, the metrics' sanity on sets with known
answers, and the flag checks. The real run is on the GPU: ``scripts/gpu_check.sh OUT COMMIT dit-quality``."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from cli_utils import fresh_accelerate_state  # noqa: F401  (autouse in this module)

pytest.importorskip("diffusers")

from test_train import _write_fashion  # noqa: E402

METHODS = ["sparse", "sla", "hybrid", "linear", "agent"]
# The smallest run that still goes through every stage: one step of each training, one sampler step.
TINY = ["--tiny", "--device", "cpu", "--samples", "4", "--sample-batch", "4", "--sampler-steps", "1", "--train-steps",
        "1", "--classifier-steps", "1", "--finetune-steps", "1", "--kid-subsets", "2", "--real-test", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("benchmarks.dit_quality")


def test_tiny_cpu_run_writes_every_method_row_finite(script, tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    _write_fashion(data, n=12)
    out = tmp_path / "out"
    assert script.main([*TINY, "--data-dir", str(data), "--out", str(out)]) == 0
    result = json.loads((out / "dit_quality.json").read_text())
    assert result["benchmark"] == "dit_quality" and result["meta"]["gpu"] is None
    assert "partial" not in result  # the complete write (the saves during the run say "partial": true)
    assert result["meta"]["command"].startswith("benchmarks/dit_quality.py --tiny")
    assert result["classifier"]["feature_dim"] == 128 and 0 <= result["classifier"]["test_top1"] <= 1
    assert result["dit"]["steps_done"] == 1 and result["dit"]["tokens"] == 16  # 8 px, patch 2
    rows = {(r["method"], r["mode"]): r for r in result["rows"]}
    expected = [("real", "train images"), ("dense", "training-free")]
    expected += [(m, mode) for mode in ("training-free", "fine-tuned") for m in METHODS]
    assert [(r["method"], r["mode"]) for r in result["rows"]] == expected
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        for metric in ("fid", "kid", "kid_std"):
            assert math.isfinite(r[metric]), (key, metric)
        if key[0] != "real":
            assert math.isfinite(r["ms_per_call"]) and r["calls_timed"] == 1
        if key[0] not in ("real", "dense"):
            assert math.isfinite(r["psnr_mean"]) and math.isfinite(r["psnr_median"])
        if key[1] == "fine-tuned":
            assert r["finetune"]["steps"] == 1 and r["finetune"]["trainable"] == "all"
    assert rows[("sla", "training-free")]["options"] == {"sparsity": 0.75, "block_size": 32}
    assert result["target"]["what"].startswith("sla fine-tuned KID") and isinstance(result["target"]["met"], bool)
    md = (out / "dit_quality.md").read_text()
    assert md.count("\n| ") == 1 + len(expected)  # the header and one line per row
    for png in ("dit_quality_samples.png", "dit_quality.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_on_sets_with_known_answers(script):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 16, generator=g, dtype=torch.float64)
    shift = torch.full((16,), 0.5, dtype=torch.float64)
    same, same_std = script.kid(a, a.clone(), subsets=20, subset_size=200)
    other, _ = script.kid(a, a + shift, subsets=20, subset_size=200)
    # identical sets: an unbiased estimate of 0, within its subset noise (a few % of the shifted sets' value)
    assert other > 0.5 and abs(same) < 0.1 * other and same_std < 0.2 * other
    # FID: equal covariances, so exactly the squared distance of the means
    assert script.fid(a, a) == pytest.approx(0.0, abs=1e-9)
    assert script.fid(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)
    # PSNR: [-1, 1] images mapped to [0, 1]; an offset of 0.2 is 0.1 there: MSE 0.01, 20 dB; identical: the cap
    x = torch.rand(3, 1, 4, 4, generator=g) - 0.5
    torch.testing.assert_close(script.psnr(x + 0.2, x), torch.full((3,), 20.0), rtol=0, atol=1e-3)
    assert torch.equal(script.psnr(x, x), torch.full((3,), 100.0))
    with pytest.raises(ValueError, match="at least 2 samples"):
        script.kid(a[:1], a)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--finetune-steps", "501"], "exceeds the study's limit of 500"),
        (["--samples", "-5"], "--samples: -5 must be a positive number"),
        (["--train-steps", "0"], "--train-steps: 0 must be a positive number"),
        (["--train-time", "nan"], "--train-time: nan must be a positive number"),
        (["--img-size", "31"], "must be even"),
        (["--samples", "1"], "must be >= 2"),
        (["--methods", "sla,sparse"], "dense included"),
        (["--methods", "sla,nope,dense"], "distinct, comma-separated names"),
        (["--set", "sla.sparsity=1.5"], "sparsity=1.5 must be a number in"),
        (["--set", "sla.nothing=1"], "unknown option"),
        (["--time-budget", "-1"], "--time-budget: -1.0 must be a positive"),
        (["--finetune-lr", "0"], "--finetune-lr: 0.0 must be a positive"),
    ],
)
def test_bad_flags_are_refused_with_the_value(script, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        script.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_cpu_at_full_size_is_refused(script, tmp_path, capsys):
    with pytest.raises(SystemExit):
        script.parse_args(["--device", "cpu", "--out", str(tmp_path)])
    assert "add --tiny" in capsys.readouterr().err
