"""benchmarks/toggle_speed.py: flag checks and the switches' set / restore on the CPU; a short run on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import toggle_speed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "baseline,nope"], "unknown config(s) ['nope']"),
        (["--configs", "pre_norm"], "--configs must include baseline or default"),
        (["--modes", "infer,fly"], "unknown mode(s) ['fly']"),
        (["--modes", "graphs,fly"], "choose from ['infer', 'train', 'graphs']"),
        (["--iters", "0"], "--iters must be a positive integer, got 0"),
        (["--size", "100"], "--size must be a multiple of 32"),
    ],
)
def test_bad_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        toggle_speed.main(["--out", "unused", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_default_configs_are_each_switch_against_all_off():
    assert toggle_speed.TOGGLES == ("baseline", "pre_norm", "stem_nhwc", "patch_gemm", "conv_strip", "rope_fused",
                                    "focus_tiles", "na_packed", "gla_packed", "all")  # fmt: skip


def test_switches_set_and_restore():
    from visionlin.kernels.triton import conv, focus
    from visionlin.kernels.triton import neighborhood as na
    from visionlin.layers import norm

    before, before_conv, before_focus = dict(norm.FAST_PATHS), dict(conv.TUNING), dict(focus.TUNING)
    narrow = dict(before_focus, **focus.NARROW)
    assert narrow != before_focus  # the shipped tiles are not the narrow ones
    with toggle_speed.switches("all"):
        assert all(norm.FAST_PATHS.values()) and len(norm.FAST_PATHS) == 4
        assert conv.TUNING["conv"] == conv.TUNING["weight_grad"] == "strip"
        assert dict(focus.TUNING) == before_focus  # the kept features are no fast-path switch
    with toggle_speed.switches("baseline"):
        assert not any(norm.FAST_PATHS.values())
        assert conv.TUNING["conv"] == conv.TUNING["weight_grad"] == "tile"
        assert dict(focus.TUNING) == narrow
    with toggle_speed.switches("focus_tiles"):
        assert not any(norm.FAST_PATHS.values()) and conv.TUNING["conv"] == "tile"
        assert dict(focus.TUNING) == before_focus
    with toggle_speed.switches("focus_keep"):  # the shipped settings plus the kept features
        assert dict(focus.TUNING) == dict(before_focus, keep_features=True) and before == norm.FAST_PATHS
        assert dict(conv.TUNING) == before_conv
    strips = dict(conv.STRIP), dict(conv.WG_STRIP)
    with toggle_speed.switches("strip_s42"):  # the shipped settings with stop 42's strip settings
        assert (conv.STRIP, conv.WG_STRIP) == toggle_speed.STRIP_S42 != strips
        assert before == norm.FAST_PATHS and dict(conv.TUNING) == before_conv and dict(focus.TUNING) == before_focus
    assert strips == (conv.STRIP, conv.WG_STRIP)
    tiles, na_tuning = na.MEASURED_TILES, dict(na.TUNING)
    with toggle_speed.switches("na_tiles_s43"):  # the shipped settings with stop 43's neighborhood tiles
        assert na.MEASURED_TILES == toggle_speed.NA_TILES_S43 and na.TUNING["narrow_cols"] is False
        assert dict(na.TUNING, narrow_cols=None) == na_tuning
        assert na.tile_config(14, 14, 7, 7, True, 32, True, True) == (8, 8, 2, 16)
        assert na._tile_plan(14, 14, 7, 7, True, 32, True, True)[4] is None
        assert before == norm.FAST_PATHS and dict(conv.TUNING) == before_conv and dict(focus.TUNING) == before_focus
    assert (na.MEASURED_TILES, dict(na.TUNING)) == (tiles, na_tuning) and na_tuning["narrow_cols"] is None
    bias_per_sm = na.BIAS_GRAD_PER_SM
    with toggle_speed.switches("na_s45"):  # the shipped settings with stop 45's tiles and reduction
        assert na.MEASURED_TILES == toggle_speed.NA_TILES_S45 and na.BIAS_GRAD_PER_SM == ((None, 2),)
        assert na._tile_plan(56, 56, 7, 7, True, 32, True, True)[4:] == (2, None)  # s46: (2, 0), uncapped
        assert dict(na.TUNING) == na_tuning and before == norm.FAST_PATHS
    assert (na.MEASURED_TILES, na.BIAS_GRAD_PER_SM) == (tiles, bias_per_sm) != (toggle_speed.NA_TILES_S45, ((None, 2),))
    from visionlin.layers import neighborhood as na_layer

    assert na_layer.FAST_PATHS == {"qkv_packed": True}  # shipped on since s50
    with toggle_speed.switches("na_split"):  # the shipped settings with the neighborhood layers' split call
        assert na_layer.FAST_PATHS == {"qkv_packed": False} and dict(na.TUNING) == na_tuning
        assert before == norm.FAST_PATHS and dict(conv.TUNING) == before_conv and dict(focus.TUNING) == before_focus
    assert na_layer.FAST_PATHS == {"qkv_packed": True}
    with toggle_speed.switches("na_packed"):  # a switch: on with everything else off
        assert na_layer.FAST_PATHS == {"qkv_packed": True} and not any(norm.FAST_PATHS.values())
    from visionlin.layers import gla as gla_layer

    shipped = {"qkv_packed": True, "token_conv": False}  # the packed call on since s51
    assert shipped == gla_layer.FAST_PATHS
    for config, change in (("gla_split", {"qkv_packed": False}), ("gla_token_conv", {"token_conv": True})):
        with toggle_speed.switches(config):  # the shipped settings with one of ViG's switches changed
            assert dict(shipped, **change) == gla_layer.FAST_PATHS
            assert na_layer.FAST_PATHS == {"qkv_packed": True} and before == norm.FAST_PATHS
            assert dict(conv.TUNING) == before_conv and dict(focus.TUNING) == before_focus
        assert shipped == gla_layer.FAST_PATHS
    with toggle_speed.switches("gla_packed"):  # a switch: on with everything else off
        assert shipped == gla_layer.FAST_PATHS and na_layer.FAST_PATHS == {"qkv_packed": False}
        assert not any(norm.FAST_PATHS.values())
    with toggle_speed.switches("baseline"):
        assert na_layer.FAST_PATHS == {"qkv_packed": False}  # every switch off
        assert gla_layer.FAST_PATHS == {"qkv_packed": False, "token_conv": False}
    assert shipped == gla_layer.FAST_PATHS
    with toggle_speed.switches("conv_strip"):
        assert not any(norm.FAST_PATHS.values())
        assert conv.TUNING["conv"] == conv.TUNING["weight_grad"] == "strip"
    with toggle_speed.switches("default"):
        assert before == norm.FAST_PATHS  # the shipped settings, untouched
    with toggle_speed.switches("stem_nhwc"):
        assert norm.FAST_PATHS == {
            "pre_norm": False,
            "stem_channels_last": True,
            "patch_gemm": False,
            "rope_fused": False,
        }
    with toggle_speed.switches("patch_gemm"):
        assert norm.FAST_PATHS == {
            "pre_norm": False,
            "stem_channels_last": False,
            "patch_gemm": True,
            "rope_fused": False,
        }
    with toggle_speed.switches("rope_fused"):
        assert [k for k, on in norm.FAST_PATHS.items() if on] == ["rope_fused"]
    with pytest.raises(RuntimeError), toggle_speed.switches("pre_norm"):
        raise RuntimeError  # restored on error too
    assert dict(norm.FAST_PATHS) == before and dict(conv.TUNING) == before_conv and dict(focus.TUNING) == before_focus


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_short_cuda_run(tmp_path):
    args = ["--out", str(tmp_path), "--models", "nalaformer_tiny", "--batch-infer", "4", "--batch-train", "4"]
    assert toggle_speed.main([*args, "--warmup", "1", "--iters", "1", "--repeats", "2"]) == 0
    doc = json.loads((tmp_path / "toggle_speed.json").read_text())
    status = {(r["mode"], r["config"]): r["status"] for r in doc["rows"]}
    # NaLaFormer has neither neighborhood attention nor GLA: their configs are skipped rows, every other one is timed
    layerless = {"na_packed", "gla_packed"}
    assert layerless <= set(toggle_speed.TOGGLES)
    assert status == {
        (m, c): "skipped" if c in layerless else "ok" for m in ("infer", "train") for c in toggle_speed.TOGGLES
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("configs", "reference"), [("baseline,rope_fused", "baseline"), ("default,strip_s42", "default")]
)
def test_short_cuda_graphs_run(tmp_path, configs, reference):
    """The CUDA-graph training step, one compiled model per config: both configs measured, a ratio between them (to
    ``baseline``, or to ``default`` where no ``baseline`` runs)."""
    args = ["--out", str(tmp_path), "--models", "ravlt_tiny", "--modes", "graphs", "--batch-train", "4"]
    assert toggle_speed.main([*args, "--configs", configs, "--iters", "2", "--repeats", "2"]) == 0
    doc = json.loads((tmp_path / "toggle_speed.json").read_text())
    rows = doc["rows"]
    assert doc["reference"] == reference
    assert [(r["mode"], r["config"], r["status"]) for r in rows] == [("graphs", c, "ok") for c in configs.split(",")]
    assert rows[0][f"speedup_vs_{reference}"] == 1.0 and rows[1][f"speedup_vs_{reference}"] > 0


def test_layer_configs_are_skipped_on_models_without_the_layer():
    """``na_*`` / ``gla_*`` configs switch one layer type's call: a model without it would compile and time a config
    that changes nothing, so it is a skipped row with the reason."""
    import timm

    import visionlin  # noqa: F401

    configs = ["default", "pre_norm", *toggle_speed.LAYER_CONFIGS]
    vig = timm.create_model("vig_tiny", device="meta")
    assert set(toggle_speed.inapplicable(vig, configs)) == {"na_packed", "na_split"}
    assert set(toggle_speed.LAYER_CONFIGS) <= set(toggle_speed.CONFIGS)
    nat = timm.create_model("nat_mini", device="meta")
    skipped = toggle_speed.inapplicable(nat, configs)
    assert set(skipped) == {"gla_packed", "gla_split", "gla_token_conv"}
    assert skipped["gla_packed"] == "no gla layer: the config changes nothing"
    deit = timm.create_model("deit_tiny_patch16_224", device="meta")
    assert set(toggle_speed.inapplicable(deit, configs)) == set(toggle_speed.LAYER_CONFIGS)
