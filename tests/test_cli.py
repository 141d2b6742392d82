"""The ``visionlin`` console command: packaged demo runs from any folder, bad flags are usage errors, no hangs.

Subprocesses run from a temporary folder outside the checkout, each with a timeout, so that a hang fails the test
instead of stalling CI. Flag checks run in-process (they happen before any worker starts; ``measure`` is replaced so
that a check that lets a bad value through fails the test at once instead of running the full demo).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_utils import usage_error

import visionlin
from visionlin import cli
from visionlin.train import scaling

TIMEOUT = 240  # seconds per subprocess: generous on a loaded 2-core machine, finite so that a hang fails
EXE_DIR = Path(sys.executable).parent


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def _console_script() -> str:
    exe = shutil.which("visionlin", path=str(EXE_DIR))
    assert exe, f"no `visionlin` console script next to {sys.executable}; install the package: pip install -e ."
    return exe


# End to end, through subprocesses -------------------------------------------------------------------------------------
def test_console_script_runs_a_tiny_demo_outside_the_checkout(tmp_path):
    proc = _run(
        [_console_script(), "demo", "--models", "infvit_tiny", "--sizes", "32", "--repeats", "1", "--threads", "1"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    result = json.loads((tmp_path / "scaling.json").read_text())  # default --out: the current folder
    assert result["command"] == "visionlin demo --models infvit_tiny --sizes 32 --repeats 1 --threads 1"
    assert re.fullmatch(r"[0-9a-f]{40}|visionlin \S+", result["commit"]), result["commit"]
    assert result["date"] and result["device"] and result["torch_device"] == "cpu"
    assert set(result["versions"]) >= {"python", "torch", "timm", "visionlin"}
    [row] = result["rows"]
    assert row["model"] == "infvit_tiny" and row["size"] == 32 and row["latency_ms"] > 0
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"  # matplotlib is in the test extra
    assert "infvit_tiny" in proc.stdout and "wrote" in proc.stdout


def test_module_form_reports_a_bad_flag_as_a_usage_error(tmp_path):
    proc = _run([sys.executable, "-m", "visionlin.cli", "demo", "--sizes", "abc"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: visionlin demo" in proc.stderr and "'abc' is not a positive integer" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


BROKEN_MODELS = """
import os
import signal
import sys

import torch
from timm.models import register_model


@register_model
def demo_test_fails_to_build(pretrained=False, **kwargs):
    raise RuntimeError("deliberate failure while building the model")


class KilledInForward(torch.nn.Module):
    def forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does


@register_model
def demo_test_killed(pretrained=False, **kwargs):
    return KilledInForward()


if __name__ == "__main__":
    from visionlin.cli import main

    sys.exit(main(["demo", "--models", "demo_test_fails_to_build,demo_test_killed", "--sizes", "16", "--out", "o"]))
"""


def test_failing_workers_end_the_run_with_an_error_not_a_hang(tmp_path):
    # The models pass the parent's checks (registered with timm there) and fail only in the worker processes, which
    # re-import this script: one raises while building, one is killed in its forward. Before the fix the first one hung
    # the parent.
    script = tmp_path / "broken_models.py"
    script.write_text(textwrap.dedent(BROKEN_MODELS))
    proc = _run([sys.executable, str(script)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "demo_test_fails_to_build failed: RuntimeError: deliberate failure while building the model" in proc.stderr
    assert "demo_test_killed failed at 16 px: worker process was killed by SIGKILL" in proc.stderr
    assert "2 of 2 models failed" in proc.stderr
    rows = json.loads((tmp_path / "o" / "scaling.json").read_text())["rows"]
    assert [(r["model"], r["size"]) for r in rows] == [("demo_test_fails_to_build", None), ("demo_test_killed", 16)]
    assert "deliberate failure" in rows[0]["traceback"] and all("error" in r for r in rows)
    assert not (tmp_path / "o" / "scaling.png").exists()


# Flag checks, in-process ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_measuring(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("a bad flag got past the checks")

    monkeypatch.setattr(scaling, "measure", fail)
    monkeypatch.chdir(tmp_path)


def _usage_error(capsys, argv: list[str]) -> str:
    return usage_error(capsys, argv, f"usage: visionlin {argv[0]}")


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sizes", "abc"], "argument --sizes: 'abc' is not a positive integer"),
        (["--sizes", "224 448"], "'224 448' is not a positive integer; sizes are comma-separated"),
        (["--sizes", "0"], "'0' is not a positive integer"),
        (["--sizes", "-32"], "'-32' is not a positive integer"),
        (["--sizes", "22.4"], "'22.4' is not a positive integer"),
        (["--sizes", ""], "no size given in ''"),
        (["--sizes", "224,,448"], "empty item in '224,,448'"),
        (["--sizes", "224,224"], "224 given more than once"),
        (["--sizes", "224,0224"], "a size is given more than once in '224,0224'"),
        (["--sizes", "40"], "40 not a multiple of 16; every size must be a multiple of 16 px"),
        (["--sizes", "99999999"], f"99999999 px is too large; sizes are at most {scaling.MAX_SIZE} px"),
        (["--models", ""], "argument --models: no model given in ''"),
        (["--models", "nope_model"], "unknown model 'nope_model'; choose visionlin models (`visionlin list`)"),
        (["--models", "infvit_tiyn"], "unknown model 'infvit_tiyn' (did you mean infvit_tiny"),
        (["--models", "INFVIT_TINY"], "unknown model 'INFVIT_TINY' (did you mean infvit_tiny"),
        (["--models", "infvit_tiny,infvit_tiny"], "infvit_tiny given more than once"),
        (["--models", "infvit_tiny,"], "empty item in 'infvit_tiny,'"),
        (
            ["--models", "vit_small_patch14_dinov2,infvit_tiny", "--sizes", "224,64"],
            "64 not a multiple of 112; every size must be a multiple of 112 px for these models "
            "(stride 14: vit_small_patch14_dinov2; stride 16: infvit_tiny)",
        ),
        (
            ["--models", "nat_mini,infvit_tiny", "--sizes", "48,64"],  # (48 failed inside the run, 64 never measured)
            "48 not a multiple of 32; every size must be a multiple of 32 px for these models "
            "(stride 16: infvit_tiny; stride 32: nat_mini)",
        ),
        (["--device", "tpu"], "argument --device: 'tpu' is not a torch device; use 'cpu', or 'cuda'"),
        (["--device", ""], "argument --device: '' is not a torch device"),
        (["--device", "meta"], "'meta' is a torch device the demo does not measure"),
        pytest.param(["--device", "cuda"], "'cuda' is not available on this machine", marks=NO_GPU),
        (["--device", "cuda:99"], "argument --device: 'cuda:99'"),
        (["--repeats", "0"], f"'0' is not an integer from 1 to {scaling.MAX_REPEATS}"),
        (["--repeats", "two"], "argument --repeats: 'two' is not an integer"),
        (["--threads", "-1"], "argument --threads: '-1' is not an integer from 0 to"),
        (["--threads", "100000"], "'100000' is not an integer from 0 to"),
        (["--sizes"], "argument --sizes: expected one argument"),
        (["--out", ""], "argument --out: '' is not a folder name"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_demo_flag_is_a_usage_error_naming_it(capsys, no_measuring, flags, message):
    assert message in _usage_error(capsys, ["demo", *flags])


def test_unwritable_out_is_a_usage_error(capsys, no_measuring, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert "'a_file' exists and is not a folder" in _usage_error(capsys, ["demo", "--out", "a_file"])
    assert "cannot write to folder 'a_file/sub'" in _usage_error(capsys, ["demo", "--out", "a_file/sub"])
    (tmp_path / "res" / "scaling.json").mkdir(parents=True)
    assert "'res/scaling.json' is a folder" in _usage_error(capsys, ["demo", "--out", "res"])


def _fake_measure(models, sizes, device, repeats, threads, command=""):
    rows = [{"model": m, "size": s, "latency_ms": 1.0, "peak_mib": 1.0} for m in models for s in sizes]
    meta = {"command": command, "commit": scaling._source_commit(), "date": "d", "device": "cpu"}
    return {**meta, "versions": {"torch": torch.__version__}, "models": models, "sizes": sizes, "rows": rows}


def test_results_without_matplotlib_are_the_json_and_a_hint(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(scaling, "measure", _fake_measure)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--models", "infvit_tiny", "--sizes", "32", "--out", "new/nested"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "new" / "nested" / "scaling.json").read_text())
    assert result["command"] == "visionlin demo --models infvit_tiny --sizes 32 --out new/nested"
    assert not (tmp_path / "new" / "nested" / "scaling.png").exists()
    assert "scaling.png skipped: matplotlib is not installed; install it with pip install 'visionlin[bench]'" in out


def test_commit_outside_a_checkout_is_the_package_version(tmp_path):
    installed = f"visionlin {visionlin.__version__}"
    assert scaling._source_commit(tmp_path) == installed
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    # An installation inside some other repository (a virtual environment in a user's project) is not a checkout.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=60)
    site = tmp_path / "venv" / "site-packages"
    (site / "visionlin").mkdir(parents=True)
    assert scaling._source_commit(site) == installed


# `visionlin list` -----------------------------------------------------------------------------------------------------
def test_list_with_a_wildcard(capsys):
    assert cli.main(["list", "infvit_t*"]) == 0
    assert capsys.readouterr().out.split() == ["infvit_tiny"]


@pytest.mark.parametrize(
    ("filter", "message"),
    [
        ("123", "no visionlin model matches '123'. The filter is a wildcard over model names"),
        ("infvit", "no visionlin model matches 'infvit' (did you mean '*infvit*'?)"),
    ],
)
def test_list_without_a_match_says_why(capsys, filter, message):
    assert cli.main(["list", filter]) == 1
    captured = capsys.readouterr()
    assert message in captured.err and not captured.out


def test_list_with_two_filters_is_a_usage_error(capsys):
    assert "unrecognized arguments: b" in _usage_error(capsys, ["list", "a", "b"])
