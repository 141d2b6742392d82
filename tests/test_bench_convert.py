"""``benchmarks/convert_speed.py`` (the converter's model-level step time) on the CPU with ``--tiny`` configs: the
JSON's structure, one finite row per model x method x mode, the time budget, the flag checks and the plot. No timing
is asserted (a smoke test: the real run is on the GPU, ``scripts/gpu_check.sh OUT COMMIT bench-convert``)."""

from __future__ import annotations

import importlib
import json
import math

import pytest

pytest.importorskip("diffusers")

# A few dozen tokens per model: Wan 2 x 4 x 4 grid (5 frames at 64 x 64 px), Flux 8 x 8 packed (128 px), 8 text.
TINY = ["--tiny", "--device", "cpu", "--frames", "5", "--wan-size", "64x64", "--flux-size", "128", "--iters", "1"]
TINY += ["--warmup", "0", "--repeats", "1", "--no-plot"]
METHODS = ["dense", "sparse", "sla", "hybrid", "linear"]


@pytest.fixture(scope="module")
def script():
    return importlib.import_module("benchmarks.convert_speed")


def test_tiny_cpu_run_writes_every_row_finite(script, tmp_path):
    assert script.main([*TINY, "--train", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convert_speed.json").read_text())
    assert result["benchmark"] == "convert_speed"
    meta = result["meta"]
    for key in ("command", "commit", "date", "gpu", "torch", "diffusers", "visionlin"):
        assert key in meta, key
    assert meta["command"].startswith("benchmarks/convert_speed.py --tiny") and meta["gpu"] is None
    assert result["settings"]["train"] is True and result["settings"]["dtype"] == "fp32"
    assert [s["model"] for s in result["models"]] == ["wan", "flux"]
    for section in result["models"]:
        inp = section["input"]
        assert inp["image_tokens"] == math.prod(inp["grid"]) and inp["text_tokens"] == 8
        assert inp["grid"] == ([2, 4, 4] if section["model"] == "wan" else [8, 8])
        assert section["attention_modules"] >= 2 and section["parameters"] > 0
        assert section["layers"] == section["full_model_layers"]  # no --layers: the whole (tiny) model
        rows = section["rows"]
        assert sorted((r["method"], r["mode"]) for r in rows) == sorted(
            (m, mode) for m in METHODS for mode in ("fwd", "fwd+bwd")
        )
        for r in rows:
            assert r["status"] == "ok", r
            assert r["iters"] == 1 and len(r["samples"]) == 1
            assert math.isfinite(r["ms"]) and r["ms"] > 0
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0
            if r["method"] == "dense":
                assert r["ratio"] == 1.0
            if r["mode"] == "fwd":  # attention share of the forward, from its own timed forward
                assert 0 < r["attn_ms"] <= r["attn_step_ms"] and 0 < r["attn_share"] <= 1
        by = {r["method"]: r for r in rows if r["mode"] == "fwd"}
        assert by["sla"]["options"]["sparsity"] == 0.95 and by["sparse"]["options"]["sparsity"] == 0.9
        assert by["hybrid"]["options"]["kernel_size"] == 7 and by["dense"]["options"]["processor"].startswith("stock")


def test_layers_flag_and_options_are_recorded(script, tmp_path):
    argv = [*TINY, "--models", "flux", "--methods", "dense,sla", "--layers", "2", "--set", "sla.sparsity=0.5"]
    argv += ["--set", "sla.variant=code", "--train", "--grad-checkpointing"]
    assert script.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convert_speed.json").read_text())
    assert result["settings"]["grad_checkpointing"] is True
    (section,) = result["models"]
    assert section["layers"] == {"num_layers": 2, "num_single_layers": 4}
    assert section["full_model_layers"] == {"num_layers": 1, "num_single_layers": 2}  # the tiny config's own
    assert section["attention_modules"] == 6  # 2 double + 4 single blocks, one joint attention each
    assert all(r["status"] == "ok" and math.isfinite(r["ms"]) for r in section["rows"])  # checkpointed backward too
    sla = [r for r in section["rows"] if r["method"] == "sla"]
    assert len(sla) == 2 and all(r["options"]["sparsity"] == 0.5 and r["options"]["variant"] == "code" for r in sla)


def test_the_result_is_saved_after_every_measurement(script):
    args = script.parse_args([*TINY, "--models", "wan", "--methods", "dense,sparse", "--train"])
    measured = []
    script.run(args, save=lambda res: measured.append(sum(r["status"] == "ok" for r in res["models"][0]["rows"])))
    assert measured == [1, 2, 3, 4, 4]  # dense, sparse forward; dense, sparse forward + backward; the model's end


def test_spent_time_budget_records_every_row_as_skipped(script, tmp_path):
    assert script.main([*TINY, "--time-budget", "1e-9", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convert_speed.json").read_text())
    rows = [r for s in result["models"] for r in s["rows"]]
    assert len(rows) == 2 * len(METHODS)
    assert all(r["status"] == "skipped" and "time budget" in r["error"] and "ms" not in r for r in rows)


def test_real_configs_are_the_published_ones(script):
    wan = script.model_config("wan", tiny=False, layers=None)
    assert (wan["num_layers"], wan["num_attention_heads"], wan["attention_head_dim"], wan["ffn_dim"]) == (
        30, 12, 128, 8960
    )  # fmt: skip
    flux = script.model_config("flux", tiny=False, layers=None)
    assert (flux["num_layers"], flux["num_single_layers"], flux["num_attention_heads"]) == (19, 38, 24)
    args = script.parse_args(["--tiny", "--device", "cpu"])  # the real sizes' inputs on the meta device (no memory)
    args.frames, args.wan_size, args.flux_size, args.text_len = 81, (480, 832), 1024, 512
    import torch

    _, wan_in = script.model_inputs("wan", wan, args, "meta", torch.bfloat16)
    _, flux_in = script.model_inputs("flux", flux, args, "meta", torch.bfloat16)
    # Built on the meta device (no memory): the published parameter counts, every self-attention convertible.
    wan_m = script.build_model("wan", wan, torch.device("meta"), torch.bfloat16)
    flux_m = script.build_model("flux", flux, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in wan_m.parameters()) == 1_418_996_800  # Wan2.1-T2V-1.3B
    assert 11.85e9 < sum(p.numel() for p in flux_m.parameters()) < 11.95e9  # FLUX.1-dev: 11.9 B
    assert wan_m.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert wan_m.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules, as from_pretrained keeps it
    assert wan_in["grid"] == [21, 30, 52] and wan_in["image_tokens"] == 32760 and wan_in["latent"] == [16, 21, 60, 104]
    assert flux_in["image_tokens"] == 4096 and flux_in["text_tokens"] == 512


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cpu"], "add --tiny"),
        (["--tiny", "--device", "cpu", "--methods", "dense,fast"], "--methods must be distinct, comma-separated"),
        (["--tiny", "--device", "cpu", "--models", "wan,wan"], "--models must be distinct"),
        (["--tiny", "--device", "cpu", "--set", "sla.sparsity=1.5"], "sparsity=1.5 must be a number in [0, 1)"),
        (["--tiny", "--device", "cpu", "--set", "sla.speed=2"], "unknown option(s) ['speed'] for method='sla'"),
        (["--tiny", "--device", "cpu", "--set", "sparsity=0.9"], "is not METHOD.OPTION=VALUE"),
        (["--tiny", "--device", "cpu", "--wan-size", "480x830"], "both positive multiples of 16"),
        (["--tiny", "--device", "cpu", "--layers", "0"], "'0' is not a positive integer"),
        (["--tiny", "--device", "cpu", "--time-budget", "-1"], "'-1' is not a positive number"),
        (["--tiny", "--device", "cpu", "--profile"], "--profile needs --device cuda"),
        (["--tiny", "--device", "cpu", "--grad-checkpointing"], "add --train"),
        (["--tiny", "--device", "tpu"], "'tpu' is not a torch device"),
    ],
)
def test_bad_flags_are_usage_errors_naming_them(script, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        script.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_plot_draws_every_panel(script, tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(method=m, mode=mode, status="ok", ms=10.0 + i, ratio=10.0 / (10.0 + i), attn_share=0.5)
            for i, m in enumerate(METHODS) for mode in ("fwd", "fwd+bwd")]  # fmt: skip
    rows.append(dict(method="agent", mode="fwd", status="oom", error="out of memory"))
    meta = dict(commit="0123456789abcdef", gpu="NVIDIA H200", cpu="x", torch="2", triton="3", date="2026-11-30")
    models = [dict(model=n, rows=rows, layers={"num_layers": 30}, input={"image_tokens": 32760, "text_tokens": 512})
              for n in ("wan", "flux")]  # fmt: skip
    script.plot({"benchmark": "convert_speed", "meta": meta, "models": models}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_tiny_cuda_run_with_profile(script, tmp_path):
    """The CUDA paths (events, peak memory, attention share, the profiler table) on the tiny configs, bf16."""
    argv = ["--tiny", "--device", "cuda", "--iters", "2", "--warmup", "1", "--repeats", "2", "--train", "--profile"]
    assert script.main([*argv, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "convert_speed.json").read_text())
    assert result["meta"]["gpu"] and result["settings"]["dtype"] == "bf16"
    assert (tmp_path / "convert_speed.png").stat().st_size > 10_000
    for section in result["models"]:
        assert len(section["rows"]) == 2 * len(METHODS)
        for r in section["rows"]:
            assert r["status"] == "ok", r
            assert r["iters"] == 4 and math.isfinite(r["ms"]) and r["peak_mib"] > 0
            prof = r["profile"]
            assert prof["kernel_ms"] > 0 and prof["top_kernels"] and sum(prof["categories_ms"].values()) > 0
            if r["mode"] == "fwd":
                assert 0 < r["attn_share"] <= 1
