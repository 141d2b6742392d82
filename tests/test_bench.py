"""``visionlin bench``: flag checks, the measuring code on tiny CPU runs, out-of-memory handling and the largest-input
search (with fakes whose memory limit the test sets). No timing is asserted: the benchmarks are scripts."""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest
import torch
from cli_utils import usage_error
from torch import nn

from visionlin import cli
from visionlin.train import bench, bench_op

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
TINY = ["--device", "cpu", "--models", "infvit_tiny", "--twin", "deit_tiny_patch16_224", "--warmup", "1"]
TINY += ["--iters", "1", "--repeats", "1"]


def _oom(msg: str = "CUDA out of memory (fake)") -> torch.cuda.OutOfMemoryError:
    return torch.cuda.OutOfMemoryError(msg)


# Flag checks ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_measuring(monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("a bad flag got past the checks")

    for name in ("bench_models", "bench_train", "bench_largest"):
        monkeypatch.setattr(bench, name, fail)
    monkeypatch.chdir(tmp_path)


def _usage_error(capsys, argv: list[str]) -> str:
    return usage_error(capsys, ["bench", *argv], f"usage: visionlin bench {argv[0]}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["models", "--models", "nope_model"], "unknown model 'nope_model'; valid models: agent_deit_base, "),
        (["models", "--models", "infvit_smal"], "unknown model 'infvit_smal' (did you mean infvit_small"),
        (["models", "--models", "deit_small_patch16_224"], "unknown model 'deit_small_patch16_224'"),
        (["models", "--models", ""], "no model given in ''"),
        (["models", "--sizes", "40"], "'40' is not a positive multiple of 16"),
        (["models", "--sizes", "0"], "'0' is not a positive multiple of 16"),
        (["models", "--sizes", "-32"], "'-32' is not a positive multiple of 16"),
        (["models", "--sizes", "224,224"], "224 given more than once"),
        (["models", "--batch-sizes", "224:4"], "'224:4' is not SIZE=BATCH"),
        (["models", "--batch-sizes", "224=0"], "'0' is not a positive integer"),
        (["models", "--device", "cpu", "--sizes", "224", "--batch-sizes", "512=4"], "512 is not one of --sizes 224"),
        (["models", "--device", "cpu", "--sizes", "224", "--compile-sizes", "1024"], "1024 is not one of --sizes"),
        (["models", "--modes", "jit"], "unknown mode 'jit'; choose from eager, compiled"),
        (
            ["models", "--device", "cpu", "--quick", "--modes", "compiled", "--sizes", "512,2048"],
            "--quick compiles nothing of --sizes; not compiled: 512,2048, and --modes compiled has no eager mode",
        ),
        (["models", "--iters", "0"], "argument --iters: '0' is not a positive integer"),
        (["models", "--time-budget", "-1"], "'-1' is not a positive number of seconds"),
        (["models", "--twin", "deit_smal_patch16_224"], "'deit_smal_patch16_224' is not a timm model (did you mean"),
        (["models", "--twin", "vit_small_patch14_dinov2"], "has patch size 14; the twin needs 16 or a divisor of it"),
        (["models", "--backends", "cuda"], "unknown backend 'cuda'; choose from auto, "),
        (
            ["models", "--device", "cpu", "--models", "nat_mini", "--sizes", "240"],
            "240 is not a multiple of nat_mini's total stride 32",
        ),  # (each row failed)
        (
            ["models", "--device", "cpu", "--models", "agent_deit_small,nat_mini", "--backends", "auto,sdpa"],
            "'sdpa' cannot run nat_mini: backend 'sdpa' is not available for every mixer",
        ),  # (each row failed)
        (["models", "--device", "tpu"], "argument --device: 'tpu' is not a torch device"),
        (["models", "--device", "meta"], "'meta' is not measured; use 'cuda' or 'cuda:N', or 'cpu' for a smoke"),
        pytest.param(["models"], "'cuda' is not available on this machine", marks=NO_GPU),
        pytest.param(["train"], "'cuda' is not available on this machine", marks=NO_GPU),
        (["train", "--size", "100"], "'100' is not a positive multiple of 16"),
        (["largest", "--device", "cpu"], "'cpu' is not measured; use 'cuda' or 'cuda:N' (this benchmark needs a GPU)"),
        pytest.param(["largest"], "visionlin bench measures on a CUDA GPU", marks=NO_GPU),
        (["op", "--device", "cpu"], "(this benchmark needs a GPU)"),
        (["plot", "missing.json"], "'missing.json' is not a file"),
        (["models", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flag_is_a_usage_error_naming_it(capsys, no_measuring, argv, message):
    assert message in _usage_error(capsys, argv)


def test_unwritable_out_is_a_usage_error(capsys, no_measuring, tmp_path):
    (tmp_path / "a_file").write_text("")
    assert "'a_file' exists and is not a folder" in _usage_error(capsys, ["models", *TINY, "--out", "a_file"])
    assert "cannot write to folder 'a_file/sub'" in _usage_error(capsys, ["train", *TINY, "--out", "a_file/sub"])
    (tmp_path / "res" / "bench_models.json").mkdir(parents=True)
    assert "'res/bench_models.json' is a folder" in _usage_error(capsys, ["models", *TINY, "--out", "res"])


def test_plot_refuses_a_json_it_did_not_write(capsys, no_measuring, tmp_path):
    (tmp_path / "other.json").write_text('{"rows": []}')
    assert "is not a result written by visionlin bench" in _usage_error(capsys, ["plot", "other.json"])


def test_defaults_are_every_small_model_and_quick_settings(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(models, **kwargs):
        seen.update(models=models, **kwargs)
        return []

    monkeypatch.setattr(bench, "bench_models", fake)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "models", "--device", "cpu", "--quick", "--iters", "7"]) == 0
    assert seen["models"] == bench.default_models()
    assert {"infvit_small", "infvit_pure_small", "flatten_deit_small", "agent_deit_small"} <= set(seen["models"])
    assert all(m.endswith("_small") for m in seen["models"])
    assert seen["sizes"] == [224, 512, 1024, 2048, 4096] and seen["compile_sizes"] == [224, 1024]
    assert "note: --quick compiles only 224,1024 of --sizes; not compiled: 512,2048,4096" in capsys.readouterr().err
    assert seen["iters"] == 7 and seen["warmup"] == 2 and seen["repeats"] == 3  # an explicit flag wins over --quick
    assert seen["twin"] == "deit_small_patch16_224" and seen["backends"] == [None]
    assert (tmp_path / "benchmarks" / "results" / "cpu" / "bench_models.json").is_file()  # the default --out
    # the hierarchical families' twin, a patch-4 Swin: its patch size divides 16 (its stride, 32, does not)
    swin = "swin_tiny_patch4_window7_224"
    assert cli.main(["bench", "models", "--device", "cpu", "--quick", "--models", "nat_tiny", "--twin", swin]) == 0
    assert seen["twin"] == swin


def test_append_splits_a_suite_over_calls(monkeypatch, tmp_path):
    def fake(models, *, modes, **kwargs):
        rows = [{"model": m, "backend": "auto", "mode": mode, "size": 224, "batch": 2, "status": "ok", "img_s": 1.0,
                 "peak_mib": 1.0, "ratio_vs_twin": 1.0} for m in models for mode in modes]  # fmt: skip
        kwargs["on_rows"](rows)
        return rows

    monkeypatch.setattr(bench, "bench_train", fake)
    monkeypatch.setattr(bench, "plot_result", lambda result, path: path.write_bytes(b""))
    base = ["bench", "train", "--device", "cpu", "--models", "infvit_tiny", "--out", str(tmp_path)]
    assert cli.main([*base, "--modes", "eager"]) == 0
    assert cli.main([*base, "--modes", "compiled", "--append"]) == 0
    assert cli.main([*base, "--modes", "compiled", "--append"]) == 0  # measured again: replaced, not duplicated
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert [(r["model"], r["mode"]) for r in result["rows"]] == [("infvit_tiny", "eager"), ("infvit_tiny", "compiled")]
    assert [m["config"]["modes"] for m in result["meta"]["earlier_runs"]] == [["eager"], ["compiled"]]
    assert cli.main([*base, "--modes", "eager"]) == 0  # without --append: a fresh result
    assert "earlier_runs" not in json.loads((tmp_path / "bench_train.json").read_text())["meta"]


@pytest.mark.parametrize("flag", [None, "--no-cudnn-benchmark", "--cudnn-benchmark"])
def test_cudnn_benchmark_is_on_while_measuring_unless_turned_off_and_restored_after(monkeypatch, tmp_path, flag):
    seen = []
    monkeypatch.setattr(bench, "bench_train", lambda models, **kw: seen.append(torch.backends.cudnn.benchmark) or [])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    base = ["bench", "train", "--device", "cpu", "--models", "infvit_tiny", "--out", str(tmp_path)]
    assert cli.main([*base, *([flag] if flag else [])]) == 0
    want = flag != "--no-cudnn-benchmark"  # on by default, as timm's benchmark.py and train.py
    assert seen == [want] and torch.backends.cudnn.benchmark is False
    assert json.loads((tmp_path / "bench_train.json").read_text())["config"]["cudnn_benchmark"] is want


def test_cudnn_benchmark_is_restored_when_a_benchmark_raises(monkeypatch, tmp_path):
    def boom(models, **kw):
        assert torch.backends.cudnn.benchmark is True
        raise RuntimeError("boom")

    monkeypatch.setattr(bench, "bench_train", boom)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["bench", "train", "--device", "cpu", "--models", "infvit_tiny", "--out", str(tmp_path)])
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.parametrize(("flag", "want"), [(None, False), ("--cudnn-benchmark", True)])
def test_cudnn_benchmark_is_off_by_default_for_the_largest_input_search(monkeypatch, tmp_path, flag, want):
    seen = []
    monkeypatch.setattr(bench, "_check_device", lambda parser, text, cpu_ok: torch.device("cpu"))  # a GPU's path
    monkeypatch.setattr(bench, "bench_largest", lambda models, **kw: seen.append(torch.backends.cudnn.benchmark) or [])
    monkeypatch.setattr(bench, "plot_result", lambda result, path: path.write_bytes(b""))
    argv = ["bench", "largest", "--models", "infvit_tiny", "--out", str(tmp_path), *([flag] if flag else [])]
    assert cli.main(argv) == 0
    assert seen == [want]


def test_default_batches_and_device_slug():
    assert [bench.default_batch(s) for s in (224, 512, 1024, 2048, 4096)] == [256, 64, 16, 4, 1]
    assert bench.default_batch(448) == 64 and bench.default_batch(8192) == 1
    assert bench.device_slug("NVIDIA H200") == "h200"
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "h100"
    assert bench.device_slug("NVIDIA GeForce RTX 4090") == "rtx_4090"


def test_importing_needs_neither_triton_nor_cuda():
    # Module level only (function bodies run when a benchmark does): no triton import, no torch.cuda call.
    for module in (bench, bench_op, cli):
        tree = ast.parse(Path(module.__file__).read_text())
        body = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        for node in (n for stmt in body for n in ast.walk(stmt)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "triton" for n in names), (module.__name__, names)
            assert "torch.cuda" not in (ast.unparse(node) if isinstance(node, ast.Call) else ""), module.__name__


# Tiny CPU runs --------------------------------------------------------------------------------------------------------
def test_models_benchmark_on_cpu_writes_json_and_png(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(
        bench, "_compile", lambda module, mode="compiled": module
    )  # the compiled path, without inductor's C++ build
    argv = ["bench", "models", *TINY, "--sizes", "32,48", "--batch-sizes", "32=2,48=1", "--compile-sizes", "32"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_models.json").read_text())
    assert (tmp_path / "bench_models.png").read_bytes()[:4] == b"\x89PNG"
    meta = result["meta"]
    assert meta["command"].startswith("visionlin bench models --device cpu --models infvit_tiny")
    assert {"commit", "date", "device", "gpu", "torch", "triton", "timm", "visionlin", "python"} <= set(meta)
    assert result["benchmark"] == "models" and result["config"]["sizes"] == [32, 48]
    blocks = [(r["model"], r["mode"], r["size"], r["batch"]) for r in result["rows"]]
    assert blocks == [
        ("infvit_tiny", "eager", 32, 2),
        ("deit_tiny_patch16_224", "eager", 32, 2),
        ("infvit_tiny", "eager", 48, 1),
        ("deit_tiny_patch16_224", "eager", 48, 1),
        ("infvit_tiny", "compiled", 32, 2),
        ("deit_tiny_patch16_224", "compiled", 32, 2),
    ]
    for row in result["rows"]:
        assert row["status"] == "ok" and row["img_s"] > 0 and row["twin_img_s"] > 0 and row["peak_mib"] is None
        assert row["ratio_vs_twin"] == pytest.approx(row["img_s"] / row["twin_img_s"])
        assert row["backend"] == ("twin" if row["model"].startswith("deit") else "auto")
    assert "infvit_tiny" in capsys.readouterr().out


def test_models_benchmark_builds_for_the_input_or_at_the_default_size(monkeypatch, tmp_path, capsys):
    """--build-size input (default) builds each model for the input size; default builds it at its own default size
    and feeds larger inputs through dynamic_img_size; the rows say which."""
    built, real = [], bench._create

    def create(name, device, size=None):
        built.append(size)
        return real(name, device, size)

    monkeypatch.setattr(bench, "_create", create)
    argv = ["bench", "models", *TINY, "--sizes", "32", "--batch-sizes", "32=1", "--modes", "eager", "--out",
            str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    assert built == [32, 32]
    assert {r["built_for"] for r in json.loads((tmp_path / "bench_models.json").read_text())["rows"]} == {32}
    built.clear()
    assert cli.main([*argv, "--build-size", "default"]) == 0
    assert built == [None, None]
    rows = json.loads((tmp_path / "bench_models.json").read_text())["rows"]
    assert {r["built_for"] for r in rows} == {"default"} and all(r["status"] == "ok" for r in rows)
    with pytest.raises(ValueError, match="build_size='native'"):
        bench.bench_models(["infvit_tiny"], sizes=[32], device="cpu", build_size="native")
    with pytest.raises(SystemExit):
        cli.main([*argv, "--build-size", "native"])
    assert "invalid choice: 'native'" in capsys.readouterr().err


def test_train_benchmark_on_cpu(tmp_path):
    assert cli.main(["bench", "train", *TINY, "--size", "32", "--batch", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench_train.json").read_text())
    assert [(r["model"], r["status"], r["size"], r["batch"]) for r in result["rows"]] == [
        ("infvit_tiny", "ok", 32, 2),
        ("deit_tiny_patch16_224", "ok", 32, 2),
    ]
    assert result["rows"][0]["ratio_vs_twin"] > 0
    assert (tmp_path / "bench_train.png").is_file()
    png = tmp_path / "bench_train.png"
    png.unlink()
    assert cli.main(["bench", "plot", str(tmp_path / "bench_train.json")]) == 0  # redrawn from the JSON alone
    assert png.is_file()


class _LimitedModel(nn.Module):
    """Runs inputs whose side is at most ``limit``; larger ones raise the CUDA out-of-memory error."""

    def __init__(self, limit: int, num_classes: int = 10):
        super().__init__()
        self.limit, self.num_classes = limit, num_classes
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        if x.shape[-1] > self.limit:
            raise _oom()
        return self.head(x.mean((-2, -1)))


def test_out_of_memory_is_recorded_and_the_run_continues(monkeypatch):
    real = bench._create

    def create(name, device, size=None):
        if name == "infvit_tiny":
            return _LimitedModel(limit=32).to(device)
        if name == "flatten_deit_tiny" and size == 48:
            raise _oom("while building")
        return real(name, device, size)

    monkeypatch.setattr(bench, "_create", create)
    rows = bench.bench_models(
        ["infvit_tiny", "flatten_deit_tiny"], twin="deit_tiny_patch16_224", sizes=[32, 48], batches={32: 2, 48: 1},
        modes=["eager"], device="cpu", warmup=1, iters=1, repeats=2,
    )  # fmt: skip
    status = {(r["model"], r["size"]): r["status"] for r in rows}
    assert status == {
        ("infvit_tiny", 32): "ok",
        ("flatten_deit_tiny", 32): "ok",
        ("deit_tiny_patch16_224", 32): "ok",
        ("infvit_tiny", 48): "oom",
        ("flatten_deit_tiny", 48): "oom",
        ("deit_tiny_patch16_224", 48): "ok",
    }
    oom = next(r for r in rows if r["model"] == "infvit_tiny" and r["size"] == 48)
    assert oom["img_s"] is None and oom["ratio_vs_twin"] is None and "out of memory" in oom["error"]
    assert oom["twin_img_s"] > 0  # the twin of the same block still measured


def test_an_error_other_than_oom_is_an_error_row_and_exit_status_1(capsys, monkeypatch, tmp_path):
    real = bench._create

    def create(name, device, size=None):
        if name == "infvit_tiny":
            raise RuntimeError("deliberate")
        return real(name, device, size)

    monkeypatch.setattr(bench, "_create", create)
    argv = ["bench", "models", *TINY, "--sizes", "32", "--batch-sizes", "32=1", "--modes", "eager"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 1
    assert "infvit_tiny at 32 px: RuntimeError: deliberate" in capsys.readouterr().err
    rows = json.loads((tmp_path / "bench_models.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["error", "ok"]


def test_time_budget_skips_the_remaining_blocks_and_warmups(monkeypatch):
    monkeypatch.setattr(bench._Budget, "spent", lambda self: True)
    rows = bench.bench_models(["infvit_tiny"], twin=None, sizes=[32], modes=["eager"], device="cpu", time_budget=1)
    assert [r["status"] for r in rows] == ["skipped"] and "time budget" in rows[0]["error"]
    calls = iter([False, False, True])  # spent after the first warm-up (the twin's)
    monkeypatch.setattr(bench._Budget, "spent", lambda self: next(calls, True))
    monkeypatch.setattr(bench, "_create", lambda name, device, size=None: _LimitedModel(1024))
    rows = bench.bench_models(["infvit_tiny"], twin="deit_tiny_patch16_224", sizes=[32], batches={32: 1},
                              modes=["eager"], device="cpu", warmup=1, iters=1, repeats=3, time_budget=1)  # fmt: skip
    assert [(r["model"], r["status"]) for r in rows] == [("infvit_tiny", "skipped"), ("deit_tiny_patch16_224", "ok")]
    assert len(rows[1]["img_s_sweeps"]) == 1  # no sweep after the first once the budget is spent


def test_console_row_flags_noisy_sweeps(capsys):
    row = {"model": "m", "mode": "compiled", "size": 224, "batch": 256, "status": "ok", "img_s": 12570.0,
           "ratio_vs_twin": 0.48, "backend": "auto", "peak_mib": 438.0, "spread": 0.274}  # fmt: skip
    bench._report(row)
    bench._report({**row, "spread": 0.02})
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("(0.48x twin), peak 438 MiB; NOISY: the sweeps spread 27%")
    assert second.endswith("(0.48x twin), peak 438 MiB")


# Largest input --------------------------------------------------------------------------------------------------------
def _fake_run_at(limit: int, seen: list[int]):
    def run_at(side: int) -> float:
        seen.append(side)
        if side > limit:
            raise _oom()
        return float(side)  # "peak MiB"

    return run_at


def test_largest_search_doubles_then_bisects_to_the_limit():
    seen: list[int] = []
    found = bench.search_largest(_fake_run_at(1000, seen), start=224, max_size=131072, time_cap=1e9)
    assert found["largest_px"] == 992 and found["first_oom_px"] == 1008 and found["limited_by"] == "memory"
    assert found["peak_mib"] == 992.0 and found["tokens"] == 62**2
    sizes = [p["size"] for p in found["probes"]]  # (``seen`` also holds the warm re-runs)
    assert sizes[:4] == [224, 448, 896, 1792] and set(seen) == set(sizes)
    assert all(s % 16 == 0 for s in sizes) and len(sizes) <= 4 + 7
    assert [p["ok"] for p in found["probes"]] == [s <= 1000 for s in sizes]


@pytest.mark.parametrize("limit", [224, 240, 447, 4000, 4096])
def test_largest_search_finds_every_limit(limit):
    found = bench.search_largest(_fake_run_at(limit, []), start=224, max_size=4096, time_cap=1e9)
    assert found["largest_px"] == limit // 16 * 16
    assert found["limited_by"] == ("max_size" if limit >= 4096 else "memory")


def test_largest_search_out_of_memory_at_the_start():
    found = bench.search_largest(_fake_run_at(100, []), start=224, time_cap=1e9)
    assert found["largest_px"] is None and found["first_oom_px"] == 224 and found["limited_by"] == "oom_at_start"


@pytest.mark.parametrize("oom_at", [None, 5000, 1200])
def test_largest_search_takes_another_error_above_a_success_as_a_limit(oom_at):
    """A library's limit that is not memory (the H100 run at 3eb2ba7: cuBLAS refused InfViT-S's head at 40,960 px,
    the class token's row stride past 2**31 elements) bounds the search like an out-of-memory and is named; before
    this, it discarded every side the model had run."""

    def run_at(side: int) -> float:
        if oom_at is not None and side > oom_at:
            raise _oom()
        if side > 1000:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul`\nmore")
        return float(side)

    found = bench.search_largest(run_at, start=224, max_size=131072, time_cap=1e9)
    assert found["largest_px"] == 992 and found["peak_mib"] == 992.0
    assert found["first_error_px"] == 1008 and found["limited_by"] == "error"
    assert found["error"] == "RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul`"
    # an out-of-memory is kept apart: the smallest side that ran out (above 1,200 px when one did) or none
    failed = [p for p in found["probes"] if not p["ok"]]
    assert all(("error" in p) == (oom_at is None or p["size"] <= oom_at) for p in failed)
    ooms = [p["size"] for p in failed if "error" not in p]
    assert found["first_oom_px"] == (min(ooms) if ooms else None) and (oom_at == 1200) == bool(ooms)


def test_largest_search_raises_an_error_before_any_success():
    def run_at(side: int) -> float:
        raise ValueError(f"broken at {side}")

    with pytest.raises(ValueError, match="broken at 224"):
        bench.search_largest(run_at, start=224, time_cap=1e9)


def test_largest_search_smallest_failure_out_of_memory_is_memory():
    def run_at(side: int) -> float:
        if side > 1500:
            raise RuntimeError("an int32 limit")
        if side > 1000:
            raise _oom()
        return 0.0

    found = bench.search_largest(run_at, start=224, max_size=131072, time_cap=1e9)
    assert (found["largest_px"], found["limited_by"], found["first_oom_px"]) == (992, "memory", 1008)
    assert found["first_error_px"] == 1792 and found["error"] == "RuntimeError: an int32 limit"


def test_largest_search_stops_before_a_probe_that_would_pass_the_time_cap():
    now = [0.0]

    def run_at(side: int) -> float:
        now[0] += (side / 224) ** 2  # one second at 224 px, quadratic in the side
        return 0.0

    found = bench.search_largest(run_at, start=224, max_size=131072, time_cap=100.0, clock=lambda: now[0])
    # 224 (twice: the first probe has no prediction, so it is timed warm too), 448, 896, 1792 cost
    # 1 + 1 + 4 + 16 + 64 = 86 s; the next (256 s) would end past 100 s.
    assert found["largest_px"] == 1792 and found["limited_by"] == "time" and found["first_oom_px"] is None
    assert found["search_s"] == 86.0
    assert [p.get("warm_seconds") for p in found["probes"]] == [1.0, None, None, None]


def test_largest_search_times_a_slow_first_call_warm():
    """A one-time cost (Triton compiling at the first call, or at a new kernel variant) must not end the search: the
    slow probe is timed again and the warm time is extrapolated (the c72cf89 run stopped InLine-DeiT-S at 1,792 px)."""
    now, compiled = [0.0], set()

    def run_at(side: int) -> float:
        variant = side >= 1024  # a second kernel variant from 1,024 px on
        if variant not in compiled:
            compiled.add(variant)
            now[0] += 8.0
        if side > 3000:
            raise _oom()
        now[0] += 0.01 * (side / 224) ** 2
        return 0.0

    found = bench.search_largest(run_at, start=224, max_size=131072, time_cap=30.0, clock=lambda: now[0])
    assert found["largest_px"] == 2992 and found["limited_by"] == "memory", found["probes"]
    slow = [p["size"] for p in found["probes"] if "warm_seconds" in p]
    assert slow == [224, 1792] and all(p["warm_seconds"] < 1.0 for p in found["probes"] if "warm_seconds" in p)


def test_largest_search_skips_the_warm_rerun_the_time_cap_has_no_room_for():
    now = [0.0]

    def run_at(side: int) -> float:
        now[0] += 20.0 if side == 224 else 0.01  # a first call of 20 s under a 30 s cap
        return 0.0

    found = bench.search_largest(run_at, start=224, max_size=448, time_cap=30.0, clock=lambda: now[0])
    assert "warm_seconds" not in found["probes"][0] and found["search_s"] == 20.0
    assert found["largest_px"] == 224 and found["limited_by"] == "time"


def test_largest_benchmark_with_fake_models_on_cpu(monkeypatch, tmp_path):
    limits = {"infvit_tiny": 300, "deit_tiny_patch16_224": 100}
    monkeypatch.setattr(bench, "_create", lambda name, device, size=None: _LimitedModel(limits[name]))
    freed = []
    monkeypatch.setattr(bench, "_free", lambda device: freed.append(device))
    rows = bench.bench_largest(["infvit_tiny"], twin="deit_tiny_patch16_224", device="cpu", start=64, max_size=4096)
    mine, twin = rows
    assert (mine["largest_px"], mine["first_oom_px"], mine["limited_by"], mine["status"]) == (288, 304, "memory", "ok")
    assert mine["side_ratio_vs_twin"] == pytest.approx(288 / 96)
    assert (twin["backend"], twin["largest_px"]) == ("twin", 96)
    assert len(freed) >= sum(not p["ok"] for r in rows for p in r["probes"])  # memory freed after every OOM
    result = {"benchmark": "largest", "meta": bench.run_meta("test", "cpu"), "rows": rows}
    assert bench.write_result(json.loads(json.dumps(result)), tmp_path, "bench_largest")[-1].startswith("wrote")
    assert (tmp_path / "bench_largest.png").read_bytes()[:4] == b"\x89PNG"


def test_op_plot_from_a_result_json(tmp_path):
    row = {"case": "c", "dtype": "torch.bfloat16", "triton_fwd_GBs": 1.0, "torch_fwd_GBs": 0.5, "triton_bwd_GBs": 1.0}
    meta = {"gpu": "fake", "commit": "abc", "torch": "t", "triton": "x", "copy_bandwidth_GBs": 2.0}
    bench.plot_result({"benchmark": "op", "meta": meta, "rows": [row]}, tmp_path / "op.png")
    assert (tmp_path / "op.png").read_bytes()[:4] == b"\x89PNG"


def test_op_profile_rows_and_flag(monkeypatch, tmp_path, capsys):
    """``bench op --profile``: each case's Triton kernels by GPU time per step (``kernel_rows``: host-only events left
    out, the largest first), in the row as ``triton_kernels`` (the GPU parts stubbed: no CUDA here)."""
    from types import SimpleNamespace as Ev

    events = [
        Ev(key="host_op", count=10, self_device_time_total=0),
        Ev(key="_state_kernel", count=10, self_device_time_total=300.0),
        Ev(key="_readout_kernel", count=10, self_device_time_total=500.0),
    ]
    rows = bench_op.kernel_rows(events, steps=5)
    assert rows == [
        {"kernel": "_readout_kernel", "ms_per_step": 0.1, "calls_per_step": 2.0},
        {"kernel": "_state_kernel", "ms_per_step": 0.06, "calls_per_step": 2.0},
    ]
    times = {f"{i}_{p}_ms": 1.0 for i in ("triton", "torch") for p in ("fwd", "bwd", "fwd_graph")}
    times |= {"triton_bwd_graph_ms": 2.0, "triton_fwd_GBs": 1.0}
    monkeypatch.setattr(bench_op, "CASES", bench_op.CASES[:1])
    monkeypatch.setattr(bench_op, "copy_bandwidth", lambda: 2.0)
    shape = {"dtype": "torch.bfloat16", "B": 1, "N": 1, "H": 1, "D": 1}
    monkeypatch.setattr(bench_op, "run_case", lambda *case, **kw: {"case": case[0], **shape, **times})
    monkeypatch.setattr(bench_op, "profile_triton", lambda *case: rows)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(
        bench, "run_meta", lambda *a, **kw: {"gpu": "fake", "commit": "abc", "torch": "t", "triton": "x", **kw}
    )
    args = bench_op.add_arguments(argparse.ArgumentParser()).parse_args(["--profile"])
    args.out = tmp_path  # (the validated folder, as the cli hands it on)
    assert bench_op.execute(args, "bench op --profile") == 0
    result = json.loads((tmp_path / "op_linear.json").read_text())
    assert result["config"] == {"sweep": False, "profile": True} and result["rows"][0]["triton_kernels"] == rows
    assert "profile: 0.1000 ms x2 _readout_kernel" in capsys.readouterr().out


def test_cudagraphs_mode_compiles_with_reduce_overhead_and_marks_steps(monkeypatch, tmp_path):
    """``--modes cudagraphs``: the model and the twin go through ``torch.compile(mode="reduce-overhead")`` and each
    training step tells the CUDA graphs an iteration begins (here on the CPU, with the compile recorded, not run)."""
    compiled, marks = [], []
    monkeypatch.setattr(bench, "_compile", lambda module, mode="compiled": compiled.append(mode) or module)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    argv = ["bench", "train", *TINY, "--size", "32", "--batch", "2", "--modes", "cudagraphs", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "bench_train.json").read_text())["rows"]
    assert {(r["mode"], r["status"]) for r in rows} == {("cudagraphs", "ok")}
    assert compiled == ["cudagraphs", "cudagraphs"] and marks
    assert bench.COMPILE_MODES == {"compiled": "default", "cudagraphs": "reduce-overhead"}
    with pytest.raises(SystemExit):
        cli.main(["bench", "train", *TINY, "--modes", "graphs", "--out", str(tmp_path)])


def test_peak_counts_the_calls_after_the_first_as_cuda_graph_recording_allocates(monkeypatch):
    """Under CUDA graphs the activations are allocated while a graph is recorded (the second call) and a replay
    allocates nothing: the peak is the largest of the calls after the first (the first compiles: its workspaces do not
    count), not of the timed replays alone (which read the weights and optimizer state alone until s51). CUDA's
    allocator counters faked: no GPU here."""
    mib = 2**20
    state = {"allocated": 0, "peak": 0}

    def transient(n: int) -> None:
        state["peak"] = max(state["peak"], state["allocated"] + n)

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["peak"])
    reset = lambda device=None: state.update(peak=state["allocated"])  # noqa: E731
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    calls = []

    def build(e):
        def step(x):
            calls.append(e.label)
            n = calls.count(e.label)
            transient({1: 300 * mib, 2: 40 * mib}.get(n, 0))  # compile, record, then replays

        e.step, e.own_bytes = step, 10 * mib

    specs = [bench._Entry(label="m", model="m", backend=None, twin=False)]
    bench._run_block(specs, build, torch.zeros(2), torch.device("cuda"), warmup=2, iters=1, repeats=2, min_time=0,
                     budget=bench._Budget(None))  # fmt: skip
    assert specs[0].status == "ok" and len(calls) == 5  # compile, record, the untimed call, two sweeps
    assert max(specs[0].peaks) == 50  # the weights (10 MiB) and the recording's 40 MiB, not the compile's 300
    assert len(specs[0].peaks) == 3  # the recording and the two sweeps (not the untimed call: it may recompile)


def test_sweeps_run_with_the_heap_frozen():
    """The timed sweeps run with the objects alive before them frozen out of the collector's reach (not the warm-up
    calls, which compile), and the heap is unfrozen after, also when a sweep raises."""
    import gc

    frozen = []

    def build(e):
        e.step, e.own_bytes = (lambda x: frozen.append(gc.get_freeze_count())), 0

    specs = [bench._Entry(label="m", model="m", backend=None, twin=False)]
    gc.unfreeze()
    bench._run_block(specs, build, torch.zeros(2), torch.device("cpu"), warmup=2, iters=1, repeats=2, min_time=0,
                     budget=bench._Budget(None))  # fmt: skip
    assert frozen[:3] == [0, 0, 0] and all(n > 0 for n in frozen[3:]) and len(frozen) == 5
    assert gc.get_freeze_count() == 0
    with pytest.raises(KeyboardInterrupt), bench._frozen_heap():
        raise KeyboardInterrupt
    assert gc.get_freeze_count() == 0


def test_a_partial_write_says_so_and_the_complete_one_does_not(tmp_path):
    """Benchmark scripts save their rows so far while they run (a run cut by a time limit keeps them): such a JSON
    carries ``"partial": true`` and leaves no PNG of an earlier run beside it; the last, complete write drops the
    key."""
    (tmp_path / "x.png").write_bytes(b"an earlier run's plot")
    result = {"benchmark": "x", "meta": {}, "rows": [{"status": "ok"}]}
    notes = bench.write_result(result, tmp_path, "x", partial=True)
    assert json.loads((tmp_path / "x.json").read_text())["partial"] is True and "partial" in notes[0]
    assert not (tmp_path / "x.png").exists() and "partial" not in result  # the caller's dict untouched
    bench.write_result({**result, "partial": True}, tmp_path, "x", plot=False)
    assert "partial" not in json.loads((tmp_path / "x.json").read_text())


def test_write_json_is_atomic_and_marks_partial(tmp_path, monkeypatch):
    """``write_json`` (the scripts' mid-run writes: authors_speed, hires_every_model, sla_fwd_variants): a write that
    fails leaves the previous file whole; ``partial`` adds the marker, a complete write drops it; ``allow_nan=False``
    refuses a NaN before anything is written."""
    path = tmp_path / "r.json"
    bench.write_json(path, {"rows": [1]}, partial=True, indent=2)
    assert json.loads(path.read_text()) == {"rows": [1], "partial": True} and path.read_text().endswith("\n")
    assert path.read_text().startswith('{\n  "rows"')  # the indent asked for
    with pytest.raises(ValueError, match="Out of range float"):
        bench.write_json(path, {"rows": [float("nan")]}, allow_nan=False)
    assert json.loads(path.read_text())["partial"] is True  # the earlier file, whole
    bench.write_json(path, {"rows": [float("nan")], "partial": True})
    assert "partial" not in json.loads(path.read_text()) and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
