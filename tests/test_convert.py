"""The diffusers converter on tiny, randomly initialised models built offline from configs (CPU, no downloads)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import visionlin  # noqa: E402
from visionlin.convert import ConversionReport, convert, load_conversion, revert, save_conversion  # noqa: E402
from visionlin.convert import _convert as convert_impl  # noqa: E402

HEAD_DIM = 8


def _dit(seed=0):
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()  # fmt: skip


def _pixart(seed=0):
    torch.manual_seed(seed)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, caption_channels=32, sample_size=16, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False,
    ).eval()  # fmt: skip


def _unet(seed=0):
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=HEAD_DIM, norm_num_groups=8,
    ).eval()  # fmt: skip


def _sd3(seed=0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,),
    ).eval()  # fmt: skip


def _flux(seed=0):
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip


def _wan(seed=0):
    torch.manual_seed(seed)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=32, num_layers=2, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()  # fmt: skip


def _cogvideox(seed=0):
    torch.manual_seed(seed)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=2, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=7, use_rotary_positional_embeddings=True,
    ).eval()  # fmt: skip


FLUX_GRID = (8, 6)  # packed latent tokens (rows, columns): a non-square grid


def _inputs(family):
    g = torch.Generator().manual_seed(1)
    if family == "cogvideox":  # [B, F, C, H, W]: 3 x 4 x 6 tokens after the 2 x 2 patches, text prefix of 7
        return {
            "hidden_states": torch.randn(2, 3, 4, 8, 12, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
        }  # fmt: skip
    if family == "wan":  # video latent [B, C, F, H, W]: 3 x 4 x 6 tokens after the (1, 2, 2) patches
        return {
            "hidden_states": torch.randn(2, 4, 3, 8, 12, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
        }  # fmt: skip
    if family == "flux":
        h, w = FLUX_GRID
        ids = torch.zeros(h * w, 3)
        ids[:, 1], ids[:, 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
        return {
            "hidden_states": torch.randn(2, h * w, 4, generator=g),
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g), "timestep": torch.tensor([0.5, 0.25]),
            "img_ids": ids, "txt_ids": torch.zeros(7, 3),
        }  # fmt: skip
    x = torch.randn(2, 4, 16, 16, generator=g)
    if family == "dit":
        return {"hidden_states": x, "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 3])}
    ctx = torch.randn(2, 7, 32, generator=g)
    if family == "sd3":
        return {
            "hidden_states": x, "encoder_hidden_states": ctx, "pooled_projections": torch.randn(2, 32, generator=g),
            "timestep": torch.tensor([10, 500]),
        }  # fmt: skip
    if family == "pixart":
        return {
            "hidden_states": x, "encoder_hidden_states": ctx, "timestep": torch.tensor([10, 500]),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }  # fmt: skip
    return {"sample": x, "timestep": torch.tensor([10, 500]), "encoder_hidden_states": ctx}


FAMILIES = {
    "cogvideox": _cogvideox,
    "dit": _dit,
    "flux": _flux,
    "pixart": _pixart,
    "sd3": _sd3,
    "unet": _unet,
    "wan": _wan,
}


@torch.no_grad()
def _run(model, family):
    return model(**_inputs(family)).sample


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if type(m).__name__ == "Attention"}


def test_import_visionlin_does_not_import_diffusers():
    code = (
        "import sys, visionlin, visionlin.convert; assert callable(visionlin.convert); "
        "print('diffusers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# Settings under which the converted model computes the stock attention (SLA's projection starts at zero).
EXACT = [
    ("dense", {}),
    ("sparse", {"sparsity": 0.0, "block_size": 16}),
    ("sla", {"sparsity": 0.0, "block_size": 16}),
    ("sla", {"sparsity": 0.0, "block_size": (16, 8), "variant": "code"}),
    ("sla", {"sparsity": 0.9, "block_size": 256}),  # one block per sequence (at most 16 x 16 tokens): critical
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method,options", EXACT)
def test_exact_settings_reproduce_and_revert_is_bitwise(family, method, options):
    model = FAMILIES[family]()
    before = _processors(model)
    y0 = _run(model, family)
    report = convert(model, method, **options)
    # SD3 / Flux: joint attention (+ SD3.5's image-only attn2); the others: self-attention attn1 only.
    suffix = ("attn", "attn2") if family in ("sd3", "flux") else ("attn1",)
    assert report.converted and all(r.name.endswith(suffix) for r in report.converted)
    torch.testing.assert_close(_run(model, family), y0, atol=2e-6, rtol=1e-5)
    assert revert(model) == 1
    assert torch.equal(_run(model, family), y0)
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any("visionlin_core" in k for k in model.state_dict())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparse_and_sla_change_outputs_and_grid_comes_from_inputs(family):
    model = FAMILIES[family]()
    y0 = _run(model, family)
    convert(model, "sla", sparsity=0.75, block_size=8)
    for m in model.modules():
        if hasattr(m, "visionlin_core"):
            torch.nn.init.normal_(m.visionlin_core.proj.weight, std=0.1)
    y1 = _run(model, family)
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y0, atol=1e-4)
    grids = {n: m.visionlin_core.grid for n, m in model.named_modules() if hasattr(m, "visionlin_core")}
    if family == "unet":  # one grid per UNet level: 16 x 16 latent, then 8 x 8 after one downsample
        assert grids == {
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1": (16, 16),
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1": (16, 16),
            "up_blocks.1.attentions.1.transformer_blocks.0.attn1": (16, 16),
            "mid_block.attentions.0.transformer_blocks.0.attn1": (8, 8),
        }
    elif family == "cogvideox":
        assert grids == {"transformer_blocks.0.attn1": (3, 4, 6), "transformer_blocks.1.attn1": (3, 4, 6)}
    elif family == "wan":
        assert grids == {"blocks.0.attn1": (3, 4, 6), "blocks.1.attn1": (3, 4, 6)}
    elif family == "flux":
        assert grids == {"transformer_blocks.0.attn": FLUX_GRID, "single_transformer_blocks.0.attn": FLUX_GRID}
        assert {m.visionlin_core.text_len for m in model.modules() if hasattr(m, "visionlin_core")} == {7}
    else:
        assert set(grids.values()) == {(8, 8)}  # 16 x 16 latent, patch 2
        if family == "sd3":
            assert set(grids) == {
                "transformer_blocks.0.attn",
                "transformer_blocks.0.attn2",
                "transformer_blocks.1.attn",
            }
    revert(model)
    model2 = FAMILIES[family]()
    convert(model2, "sparse", sparsity=0.5, block_size=8)
    assert torch.isfinite(_run(model2, family)).all()


def test_report_contents_and_table():
    model = _unet()
    report = convert(model, "sla", sparsity=0.9, block_size=64)
    assert isinstance(report, ConversionReport) and report.method == "sla"
    assert report.options == {"sparsity": 0.9, "k_low": 0.1, "variant": "paper", "block_size": [64, 64],
                              "feature_map": "softmax", "dense_above_timestep": None}  # fmt: skip
    assert len(report.converted) == 4 and len(report.skipped) == 4
    assert all(r.reason == "cross-attention (text keys stay dense)" for r in report.skipped)
    assert all(r.name.endswith("attn2") for r in report.skipped)
    named = dict(model.named_modules())
    # UNet2DConditionModel's attention_head_dim=8 is its head COUNT (diffusers' legacy naming): head dims 2 and 4.
    head_dims = [named[r.name].inner_dim // named[r.name].heads for r in report.converted]
    assert head_dims == [2, 2, 2, 4]  # down, up, up, mid
    assert [r.new_parameters for r in report.converted] == [d * d + d for d in head_dims]
    assert report.new_parameters == sum(d * d + d for d in head_dims) == 38
    table = str(report)
    assert "method=sla" in table and "4 converted, 4 skipped, 38 new parameters" in table
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" in table and "cross-attention" in table


def test_layers_selection_and_strict():
    model = _dit()
    report = convert(model, "dense", layers=["transformer_blocks.1.attn1"])
    assert [r.name for r in report.converted] == ["transformer_blocks.1.attn1"]
    assert report.skipped[0].reason == "not selected (layers=...)"
    revert(model)
    with pytest.raises(ValueError, match=r"strict=True.*attn2: cross-attention"):
        convert(_unet(), "dense", strict=True)


def test_processor_swap_keeps_converter_parameters():
    model = _unet()
    convert(model, "sla", sparsity=0.5, block_size=16)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.visionlin_core.proj.weight"
    with torch.no_grad():
        model.get_parameter(key).fill_(0.25)
    model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor2_0())  # e.g. a LoRA / IP loader
    assert torch.equal(model.state_dict()[key], torch.full((2, 2), 0.25))
    assert key in dict(model.named_parameters())


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_save_load_roundtrip(tmp_path, family):
    model = FAMILIES[family]()
    convert(model, "sla", sparsity=0.5, block_size=16, variant="code")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visionlin_core" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    y = _run(model, family)
    save_conversion(model, tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp_path.iterdir():  # an ordinary new file's mode (they were mkstemp's 0600)
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))
    plan = json.loads((tmp_path / "conversion.json").read_text())
    entry = plan["components"]["model"]
    assert entry["method"] == "sla" and entry["options"]["variant"] == "code"
    assert all(name.endswith("attn1") for name in entry["layers"])
    fresh = FAMILIES[family]()
    report = load_conversion(fresh, tmp_path)
    assert len(report.converted) == len(entry["layers"])
    assert torch.equal(_run(fresh, family), y)
    with pytest.raises(ValueError, match="already converted"):
        load_conversion(fresh, tmp_path)
    other = _unet() if family == "dit" else _dit()
    with pytest.raises(ValueError, match="plan component 'model' is a"):
        load_conversion(other, tmp_path)
    assert not hasattr(other, "_visionlin_conversion")


def test_load_conversion_of_a_corrupt_weights_file_and_shared_components(tmp_path):
    """A truncated ``converter.safetensors`` is a ValueError naming the file (was a bare SafetensorError), the target
    unchanged; one model object under two pipeline components is refused (it was converted twice, and revert then
    restored the converter's processors without their cores)."""
    from types import SimpleNamespace

    model = _dit()
    convert(model, "sla", sparsity=0.5, block_size=16)
    save_conversion(model, tmp_path)
    weights = tmp_path / convert_impl.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:40])
    fresh = _dit()
    ref = _run(fresh, "dit")
    with pytest.raises(ValueError, match=rf"{weights.name}: not a readable safetensors file \(SafetensorError"):
        load_conversion(fresh, tmp_path)
    assert not any(hasattr(m, "visionlin_core") for m in fresh.modules())
    torch.testing.assert_close(_run(fresh, "dit"), ref, rtol=0, atol=0)
    # plan and weights edited by hand: each a ValueError naming the file or field (were TypeError / IndexError /
    # UnicodeDecodeError, or loaded: wrong dtypes and NaN weights were copied in)
    save_conversion(model, tmp_path)
    plan_path = tmp_path / convert_impl.PLAN_FILE
    good_plan, good_weights = plan_path.read_text(), weights.read_bytes()
    for edit, message in (
        (lambda p: p["components"]["model"].update(options=[1]), "needs 'class' and 'method' strings"),
        (lambda p: p["components"]["model"].update(layers=None), "'layers' a list of layer names"),
        (lambda p: p["components"]["model"]["options"].update(layers=["x"]), "'options' a dict of method options"),
    ):
        plan = json.loads(good_plan)
        edit(plan)
        plan_path.write_text(json.dumps(plan))
        with pytest.raises(ValueError, match=message):
            load_conversion(fresh, tmp_path)
    plan_path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_conversion(fresh, tmp_path)
    plan_path.write_text(good_plan)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    for change, message in (
        (lambda t: t.update(nocomponent=torch.zeros(1)), r"keys \['nocomponent'\] are not COMPONENT/PARAMETER"),
        (lambda t: t.update({k: torch.full_like(v, float("nan")) for k, v in list(t.items())[:1]}), "non-finite"),
        (lambda t: t.update({k: v.long() for k, v in list(t.items())[:1]}), "torch.int64 with non-finite or non-float"),
    ):
        edited = dict(tensors)
        change(edited)
        save_file(edited, str(weights))
        with pytest.raises(ValueError, match=message):
            load_conversion(fresh, tmp_path)
    weights.write_bytes(good_weights)
    with pytest.raises(ValueError, match="expected a diffusers pipeline or a model .* got str"):
        load_conversion("hello", tmp_path)
    assert not any(hasattr(m, "visionlin_core") for m in fresh.modules())
    torch.testing.assert_close(_run(fresh, "dit"), ref, rtol=0, atol=0)
    load_conversion(fresh, tmp_path)  # the files restored: it loads
    with pytest.raises(ValueError, match=r"unknown feature_map=\[\]"):  # (TypeError: unhashable type)
        convert(_dit(), "sla", feature_map=[])
    shared = _dit()
    pipe = SimpleNamespace(components={"transformer": shared, "transformer_2": shared})
    with pytest.raises(ValueError, match="components 'transformer' and 'transformer_2' are the same model object"):
        convert(pipe, "sla")
    assert not any(hasattr(m, "visionlin_core") for m in shared.modules())


@pytest.mark.parametrize(
    ("method", "options"),
    [("hybrid", {"kernel_size": [3, 3, 3]}), ("hybrid", {"dilation": (1,)}), ("agent", {"pool": [2, 2, 2]})],
)
def test_per_axis_options_match_the_family_grid(method, options):
    """One value per token-grid axis (2 for an image model): checked at conversion, the model unchanged (it was
    converted and failed at the first forward); per-layer overrides too."""
    model = _dit()
    ref = _run(model, "dit")
    ((key, value),) = options.items()
    with pytest.raises(ValueError, match=rf"model: {key}={re.escape(str(list(value)))} gives {len(value)} axes but "
                       r"DiTTransformer2DModel's token grid has 2"):  # fmt: skip
        convert(model, method, **options)
    with pytest.raises(ValueError, match="gives .* axes"):
        convert(model, method, layer_options={"transformer_blocks.0.attn1": options})
    assert not any(hasattr(m, "visionlin_core") for m in model.modules())
    torch.testing.assert_close(_run(model, "dit"), ref, rtol=0, atol=0)


def test_dit_pipeline(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32,
    )  # fmt: skip

    def pipe_of(transformer):
        return diffusers.DiTPipeline(transformer, vae, diffusers.DDIMScheduler(), id2label={0: "cat", 1: "dog"})

    def sample(pipe):
        out = pipe(
            class_labels=[1], num_inference_steps=2, guidance_scale=4.0, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip
        return torch.as_tensor(out)

    pipe = pipe_of(_dit())
    ref = sample(pipe)
    report = visionlin.convert(pipe, "sla", sparsity=0.0, block_size=32)
    assert {r.component for r in report.layers} == {"transformer"}
    torch.testing.assert_close(sample(pipe), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "visionlin_core" in name:
                p.fill_(0.01)
    converted = sample(pipe)
    visionlin.save_conversion(pipe, tmp_path)
    pipe2 = pipe_of(_dit())
    visionlin.load_conversion(pipe2, tmp_path)
    assert torch.equal(sample(pipe2), converted)
    assert visionlin.revert(pipe) == 1
    assert torch.equal(sample(pipe), ref)


@pytest.mark.parametrize(
    "method,options,match",
    [
        ("linformer", {}, "unknown method='linformer'"),
        ("sla", {"sparsityy": 0.5}, r"unknown option\(s\) \['sparsityy'\]"),
        ("sla", {"sparsity": 1.0}, r"sparsity=1.0 must be a number in \[0, 1\)"),
        ("sparse", {"sparsity": -0.1}, "sparsity=-0.1"),
        ("sla", {"block_size": 0}, "block_size=0"),
        ("sla", {"variant": "v2"}, "variant='v2'"),
        ("sla", {"variant": "code", "k_low": 0.1}, "k_low=0.1"),
        ("sla", {"sparsity": 0.05, "k_low": 0.1}, r"k_low=0.1 .* sparsity=0.05"),
        ("dense", {"sparsity": 0.5}, r"unknown option\(s\) \['sparsity'\] for method='dense'"),
    ],
)
def test_bad_options_leave_model_unchanged(method, options, match):
    model = _dit()
    before = _processors(model)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match=match):
        convert(model, method, **options)
    assert _processors(model) == before and set(model.state_dict()) == keys


def test_bad_models():
    with pytest.raises(ValueError, match="unsupported model family Linear"):
        convert(torch.nn.Linear(2, 2), "dense")
    with pytest.raises(ValueError, match="expected a diffusers pipeline or a model"):
        convert("not a model", "dense")
    model = _dit()

    class CustomProcessor(diffusers.models.attention_processor.AttnProcessor2_0):
        pass

    for m in model.modules():
        if type(m).__name__ == "Attention":
            m.set_processor(CustomProcessor())
    before = _processors(model)
    with pytest.raises(ValueError, match="no convertible self-attention.*processor CustomProcessor"):
        convert(model, "sla")
    assert _processors(model) == before
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not attention modules"):
        convert(_dit(), "dense", layers=["nope"])
    converted = _dit()
    convert(converted, "dense")
    with pytest.raises(ValueError, match="already converted \\(method='dense'\\)"):
        convert(converted, "sla")


def test_failure_half_way_restores_the_model(monkeypatch):
    model = _unet()
    before = _processors(model)
    y0 = _run(model, "unet")
    calls = []
    real = convert_impl.build_core

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_impl, "build_core", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        convert(model, "sla", sparsity=0.5)
    assert _processors(model) == before
    assert not any("visionlin_core" in k for k in model.state_dict())
    assert not hasattr(model, "_visionlin_conversion")
    assert torch.equal(_run(model, "unet"), y0)


def test_cli_convert(tmp_path, capsys):
    from visionlin.cli import main

    _dit().save_pretrained(tmp_path / "dit")
    out = tmp_path / "conv"
    rc = main(["convert", str(tmp_path / "dit"), "--method", "sla", "--sparsity", "0.5", "--block-size", "16", "8",
               "--out", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0 and "transformer_blocks.0.attn1  converted  sla" in text and "2 converted, 0 skipped" in text
    assert json.loads((out / "conversion.json").read_text())["components"]["model"]["options"]["block_size"] == [16, 8]
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "dit"), "--method", "sparse", "--variant", "code"])
    assert e.value.code == 2 and "unknown option(s) ['variant'] for method='sparse'" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    for target, problem in ((afile, f"'{afile}' is a file, not a folder"),
                            (afile / "sub", f"'{afile}' (in '{afile / 'sub'}') is a file, not a folder")):  # fmt: skip
        with pytest.raises(SystemExit) as e:  # (refused after the whole conversion before)
            main(["convert", str(tmp_path / "dit"), "--method", "sla", "--out", str(target)])
        assert e.value.code == 2 and f"argument --out: {problem}" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_gradients_reach_the_projection_and_bf16_runs(family):
    model = FAMILIES[family]()
    convert(model, "sla", sparsity=0.5, block_size=8)
    model(**_inputs(family)).sample.square().mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "visionlin_core" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _inputs(family).items()}  # fmt: skip
    with torch.no_grad():
        out = model(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_load_refuses_mismatched_plans(tmp_path):
    model = _dit()
    convert(model, "sla", sparsity=0.5, block_size=16)
    save_conversion(model, tmp_path)
    torch.manual_seed(0)
    fewer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=1,
        sample_size=16, patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"layers \['transformer_blocks.1.attn1'\] are not attention modules"):
        load_conversion(fewer, tmp_path)
    wider = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"visionlin_core\.proj\.\w+ has shape \(8(, 8)?,?\) in the file, \(16"):
        load_conversion(wider, tmp_path)
    for target in (fewer, wider):  # nothing left half-converted
        assert not hasattr(target, "_visionlin_conversion")
        assert not any("visionlin_core" in k for k in target.state_dict())
    (tmp_path / "conversion.json").write_text('{"format": "visionlin.convert", "version": 1, "components": {"m": 1}}')
    with pytest.raises(ValueError, match="'components' must map each component to"):
        load_conversion(_dit(), tmp_path)
    (tmp_path / "conversion.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_conversion(_dit(), tmp_path)
    with pytest.raises(ValueError, match="lacks conversion.json"):
        load_conversion(_dit(), tmp_path / "missing")
    with pytest.raises(ValueError, match="has no converted component"):
        save_conversion(_dit(), tmp_path / "x")


@pytest.mark.parametrize("family", ["dit", "unet"])
def test_dense_warm_up_by_timestep(family):
    model = FAMILIES[family]()
    inputs = _inputs(family)
    late = {**inputs, "timestep": torch.tensor([20, 10])}
    with torch.no_grad():
        y_early, y_late = model(**inputs).sample, model(**late).sample  # timesteps [10, 500] / [20, 10]
    convert(model, "sla", sparsity=0.75, block_size=8, dense_above_timestep=400)
    for m in model.modules():
        if hasattr(m, "visionlin_core"):
            torch.nn.init.normal_(m.visionlin_core.proj.weight, std=0.1)
    with torch.no_grad():
        if family == "unet":  # the UNet's timestep positionally, as the SD pipelines pass it
            sample, t, ctx = inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]
            early = model(sample, t, encoder_hidden_states=ctx).sample
        else:
            early = model(**inputs).sample
        sparse = model(**late).sample
    torch.testing.assert_close(early, y_early, atol=2e-6, rtol=1e-5)  # max timestep 500 >= 400: stock attention
    assert not torch.allclose(sparse, y_late, atol=1e-4)
    with pytest.raises(ValueError, match="dense_above_timestep='x'"):
        convert(FAMILIES[family](), "sparse", dense_above_timestep="x")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_deep_copy_drives_its_own_layers(family):
    """The hooks that publish the token grid and the dense warm-up find the layers through the module they run on: a
    deep copy's forward sets the copy's cores (a closure over the original's modules set the original's: the copy's
    hybrid layers found no grid, its warm-up followed the original's flag)."""
    import copy

    model = FAMILIES[family]()
    inputs = _inputs(family)
    late = {**inputs, "timestep": inputs["timestep"] * 0 + (0.1 if family == "flux" else 1)}
    with torch.no_grad():
        stock, stock_late = model(**inputs).sample, model(**late).sample
    threshold = 0.3 if family == "flux" else 400  # Flux's timesteps are fractions; the warm-up reads the batch max
    convert(model, "hybrid", kernel_size=3, dense_above_timestep=threshold)
    twin = copy.deepcopy(model)
    cores = [m.visionlin_core for m in model.modules() if hasattr(m, "visionlin_core")]
    twin_cores = [m.visionlin_core for m in twin.modules() if hasattr(m, "visionlin_core")]
    assert cores and not {id(c) for c in cores} & {id(c) for c in twin_cores}
    with torch.no_grad():
        y_late = model(**late).sample  # original: sparse path, its grid set
        grids = [c.grid for c in cores]
        for c in cores:
            c.grid, c.dense_now = None, None
        torch.testing.assert_close(twin(**inputs).sample, stock, atol=2e-6, rtol=1e-5)  # warm-up: stock attention
        assert all(c.dense_now is True for c in twin_cores) and all(c.dense_now is None for c in cores)
        torch.testing.assert_close(twin(**late).sample, y_late)
    assert [c.grid for c in twin_cores] == grids and all(c.grid is None for c in cores)
    assert revert(twin) == 1
    assert not any(hasattr(m, "visionlin_core") for m in twin.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(**late).sample, y_late)  # the original stays converted, hooks in place
        torch.testing.assert_close(twin(**late).sample, stock_late, atol=2e-6, rtol=1e-5)


def test_revert_inside_disabled_leaves_a_working_stock_model():
    """``revert`` inside ``disabled``: the exit restores nothing on a model that is no longer converted (it put the
    converter's processors back on modules without their cores: every forward failed, convert and revert refused)."""
    from visionlin.convert import disabled

    model = _dit()
    y0 = _run(model, "dit")
    convert(model, "sla", sparsity=0.5, block_size=8)
    with disabled(model):
        assert revert(model) == 1
    assert torch.equal(_run(model, "dit"), y0)
    assert revert(model) == 0
    convert(model, "sparse", sparsity=0.5, block_size=8)  # converts again
    with disabled(model):
        assert revert(model) == 1
        convert(model, "dense")  # a new conversion inside: the exit leaves it alone
        y1 = _run(model, "dit")
    torch.testing.assert_close(_run(model, "dit"), y1)
    assert revert(model) == 1 and torch.equal(_run(model, "dit"), y0)


def test_numpy_scalars_are_options_and_come_out_json_ready():
    """numpy numbers are numbers (``sparsity=np.float32(0.5)`` was refused as "must be a number in [0, 1)");
    the validated options are plain Python values (the plan is JSON); an int too large for a float is refused."""
    np = pytest.importorskip("numpy")
    from visionlin.convert._methods import validate_options

    opts = validate_options("sla", {"sparsity": np.float32(0.5), "block_size": np.int64(8)})
    assert opts["sparsity"] == 0.5 and opts["block_size"] == [8, 8]
    assert type(opts["sparsity"]) is float and all(type(b) is int for b in opts["block_size"])
    opts = validate_options("hybrid", {"kernel_size": [np.int32(3), 5], "dense_above_timestep": np.float32(400)})
    assert opts["kernel_size"] == [3, 5] and all(type(x) is int for x in opts["kernel_size"])
    assert type(opts["dense_above_timestep"]) is float
    opts = validate_options("linear", {"eps": np.float32(1e-3), "mid_dim_scale": np.int64(2)})
    assert type(opts["eps"]) is float and type(opts["mid_dim_scale"]) is int
    json.dumps(validate_options("agent", {"pool": np.int8(2), "k_scale2": np.float32(0.3)}))
    for option, value in (("sparsity", 10**400), ("dense_above_timestep", -(10**400))):
        with pytest.raises(ValueError, match=rf"{option}=-?1000"):  # (OverflowError from math.isfinite)
            validate_options("sparse", {option: value})
