"""``scripts/gpu_check.sh`` runs under ``set -u``: a stage that expands an optional variable left unset must not end
the whole script with "unbound variable" (s53's ``bench-authors`` read ``$AUTHORS_ARGS`` bare). ``python3`` is a stub
here: only the shell's own expansion is under test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: optional variables of the stages below (each must be allowed to be unset)
OPTIONAL = ("AUTHORS_ARGS", "AUTHORS_PAIRS", "AUTHORS_LIMIT", "COMPILED_SIZES", "COMPILED_LIMIT", "LARGEST_CAP",
            "LARGEST_LIMIT", "TEST_FILES", "TEST_K", "TESTS_LIMIT")  # fmt: skip


@pytest.mark.parametrize("stage", ["bench-authors", "bench-compiled", "bench-largest", "tests-files"])
def test_stage_runs_with_its_optional_variables_unset(tmp_path, stage):
    stub = tmp_path / "bin" / "python3"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "stub python3 $*"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in OPTIONAL}
    env["PATH"] = f"{stub.parent}{os.pathsep}{env['PATH']}"
    out = tmp_path / "out"
    out.mkdir()
    run = subprocess.run(["bash", "scripts/gpu_check.sh", str(out), "abc1234", stage, "bench-op"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert "unbound variable" not in run.stderr, run.stderr
    assert "== bench-op" in run.stdout  # the stage after it ran: the script went on
