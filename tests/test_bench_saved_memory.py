"""benchmarks/saved_memory.py on the CPU: argument checks and a tiny run whose breakdowns add up."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import saved_memory


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--models", "agent_deit_tiny,nope"], r"unknown model\(s\) \['nope'\]"),
        (["--batch", "0"], "--batch must be"),
        (["--warmup", "-1"], r"--warmup >= 0, got 128, 224, -1"),
    ],  # fmt: skip
)
def test_bad_arguments_are_refused(args, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        saved_memory.main(["--out", str(tmp_path), "--device", "cpu", *args])
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_tiny_cpu_run_adds_up(tmp_path):
    args = ["--out", str(tmp_path), "--models", "agent_deit_tiny", "--batch", "1", "--size", "32", "--device", "cpu"]
    assert saved_memory.main(args) == 0
    (r,) = json.loads((tmp_path / "saved_memory.json").read_text())["results"]
    act = r["saved_mib"]["activation"]
    assert act > 0 and r["saved_mib"]["parameter cast"] > 0  # bf16 autocast copies of the Linear weights
    assert sum(r["activation_mib_by_module"].values()) == pytest.approx(act)
    assert sum(r["activation_mib_by_dtype"].values()) == pytest.approx(act)
    assert "AgentAttention" in r["activation_mib_by_module"]
    assert r["step_peak_mib_above_weights"] is None  # CPU: no peak
