"""The converter's hybrid / linear / agent methods and the HunyuanVideo family, on tiny models built offline (CPU):
every family x every method runs a full model call and reverts bitwise; options are validated; save / load
round-trips; the methods' defining properties hold inside real models."""

from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from test_convert import FAMILIES, _dit, _inputs, _processors  # noqa: E402

import visionlin  # noqa: E402
from visionlin.convert import METHODS, convert, load_conversion, revert, save_conversion  # noqa: E402
from visionlin.convert._methods import CORE_ATTR  # noqa: E402

NEW_METHODS = ("hybrid", "linear", "agent")


def _hunyuan(seed=0):
    torch.manual_seed(seed)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=32, rope_axes_dim=(2, 2, 4), guidance_embeds=False,
    ).eval()  # fmt: skip


def _hunyuan_inputs(text_lengths=(7, 4)):
    """Video latent ``[B, C, F, H, W]`` = 3 x 4 x 6 tokens after the 2 x 2 patches; text padded to 7 tokens, sample
    ``i`` keeping ``text_lengths[i]`` of them (HunyuanVideo's text-padding mask)."""
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(7)[None] < torch.tensor(text_lengths)[:, None]).long()
    return {
        "hidden_states": torch.randn(2, 4, 3, 8, 12, generator=g), "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=g), "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(2, 32, generator=g),
    }  # fmt: skip


ALL_FAMILIES = {**FAMILIES, "hunyuan_video": _hunyuan}
# Settings that make each method differ from dense attention on the tiny grids (at most 16 x 16 tokens).
SMALL = {"sparse": {"block_size": 8}, "sla": {"block_size": 8, "sparsity": 0.75}, "hybrid": {"kernel_size": 3}}


@torch.no_grad()
def _run(model, family, **kw):
    x = _hunyuan_inputs(**kw) if family == "hunyuan_video" else _inputs(family)
    return model(**x).sample


def _perturb(model, std=0.2, seed=3):
    """Give the converter's parameters non-zero values (as fine-tuning would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if CORE_ATTR in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_methods_table_lists_the_new_methods():
    assert {"dense", "sparse", "sla", "hybrid", "linear", "agent"} <= set(METHODS)


# Every family x every method: a full model call, finite, changed where the method changes the math, then revert.
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_every_family_and_method_runs_and_reverts_bitwise(family, method):
    model = ALL_FAMILIES[family]()
    before = _processors(model)
    y0 = _run(model, family)
    options = SMALL.get(method, {})
    report = convert(model, method, **options)
    assert report.converted and all(r.method == method for r in report.converted)
    _perturb(model)
    y1 = _run(model, family)
    assert y1.shape == y0.shape and torch.isfinite(y1).all()
    if method != "dense":
        assert not torch.allclose(y1, y0, atol=1e-4), f"{method} left {family}'s output unchanged"
    assert revert(model) == 1
    assert torch.equal(_run(model, family), y0)
    after = _processors(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert not any(CORE_ATTR in k for k in model.state_dict())


# HunyuanVideo ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lengths", [(7, 7), (7, 4), (1, 3)], ids=["full", "padded", "one_text_token"])
@pytest.mark.parametrize(
    "method,options",
    [("dense", {}), ("sparse", {"sparsity": 0.0, "block_size": 16}), ("sla", {"sparsity": 0.0, "block_size": 16})],
)
def test_hunyuan_exact_settings_reproduce_stock_with_text_padding(method, options, lengths):
    model = _hunyuan()
    y0 = _run(model, "hunyuan_video", text_lengths=lengths)
    report = convert(model, method, **options)
    assert {r.name for r in report.converted} == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    (refiner,) = report.skipped
    assert refiner.name.startswith("context_embedder.") and "text token refiner" in refiner.reason
    torch.testing.assert_close(_run(model, "hunyuan_video", text_lengths=lengths), y0, atol=2e-6, rtol=1e-5)
    grids = {m.visionlin_core.grid for m in model.modules() if hasattr(m, CORE_ATTR)}
    assert grids == {(3, 4, 6)}  # from the forward's latent [B, C, 3, 8, 12] and patch (1, 2, 2)
    revert(model)
    assert torch.equal(_run(model, "hunyuan_video", text_lengths=lengths), y0)


def test_hunyuan_padded_text_keys_are_ignored():
    # Changing the padded text tokens must not change the converted model's output (the mask excludes them).
    model = _hunyuan()
    convert(model, "hybrid", kernel_size=3)
    _perturb(model)
    x = _hunyuan_inputs((7, 4))
    with torch.no_grad():
        y = model(**x).sample
        x["encoder_hidden_states"][1, 4:] += 5.0
        assert torch.equal(model(**x).sample[1], y[1])


def test_hunyuan_bad_mask_is_refused():
    model = _hunyuan()
    convert(model, "dense")
    attn = model.transformer_blocks[0].attn
    hs, ehs = torch.randn(1, 72, 16), torch.randn(1, 7, 16)
    holes = torch.ones(1, 1, 1, 79, dtype=torch.bool)
    holes[..., 75] = False
    holes[..., 77] = True
    holes[..., 76] = False  # valid text is not a prefix: 0..2 valid, 3 and 4 masked, 5 valid
    model.transformer_blocks[0].attn.visionlin_core.grid = (3, 4, 6)
    with pytest.raises(NotImplementedError, match="prefix of the text tokens"):
        attn(hs, ehs, attention_mask=holes)
    with pytest.raises(NotImplementedError, match="boolean key mask"):
        attn(hs, ehs, attention_mask=torch.zeros(1, 1, 1, 79))


# Method semantics inside real models -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["dit", "wan", "flux", "hunyuan_video"])
def test_hybrid_fresh_conversion_is_local_attention_and_full_window_is_stock(family):
    model = ALL_FAMILIES[family]()
    y0 = _run(model, family)
    report = convert(model, "hybrid", kernel_size=99)  # window = the whole grid, gate 0: dense softmax
    assert all(r.new_parameters == model.get_submodule(r.name).heads for r in report.converted)
    torch.testing.assert_close(_run(model, family), y0, atol=2e-6, rtol=1e-5)
    for m in model.modules():
        if hasattr(m, CORE_ATTR):
            assert torch.equal(m.visionlin_core.gate, torch.zeros_like(m.visionlin_core.gate))
    revert(model)
    convert(model, "hybrid", kernel_size=3)  # a 3 x 3 (x 3) window: local attention
    y_local = _run(model, family)
    assert not torch.allclose(y_local, y0, atol=1e-4)


@pytest.mark.parametrize("family", ["dit", "unet", "sd3", "cogvideox"])
def test_linear_starts_from_the_stock_projections(family):
    # The MLPs' last layers start at zero: q = to_q(x), k = to_k(x); so the fresh model equals plain elu + 1 linear
    # attention on the stock projections, and training the MLPs moves it.
    model = ALL_FAMILIES[family]()
    convert(model, "linear")
    y_init = _run(model, family)
    for m in model.modules():
        if hasattr(m, CORE_ATTR):
            x = torch.randn(2, 5, m.to_q.in_features)
            dq, dk = m.visionlin_core.qk_delta(m, x)
            assert not dq.any() and not dk.any()
    _perturb(model, std=0.05)
    assert not torch.allclose(_run(model, family), y_init, atol=1e-5)


def test_linear_delta_is_the_projection_of_the_mlp_input():
    # to_q(x + mlp_q(x)) computed directly equals the converter's stock projection + delta (LinFusion's q).
    model = _dit()
    convert(model, "linear", mid_dim_scale=2)
    _perturb(model)
    attn = model.transformer_blocks[0].attn1
    core = attn.visionlin_core
    assert core.mlp_q[0].out_features == attn.to_q.in_features // 2
    x = torch.randn(2, 9, attn.to_q.in_features)
    with torch.no_grad():
        dq, dk = core.qk_delta(attn, x)
        torch.testing.assert_close(attn.to_q(x) + dq, attn.to_q(x + core.mlp_q(x)), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(attn.to_k(x) + dk, attn.to_k(x + core.mlp_k(x)), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_delta_in_half_precision_computes_in_that_dtype(dtype):
    # Half activations: the MLPs run in their dtype (autocast), close to the float32 delta; the parameters stay float32.
    model = _dit()
    convert(model, "linear", mid_dim_scale=2)
    _perturb(model)
    attn = model.transformer_blocks[0].attn1
    core = attn.visionlin_core
    x = torch.randn(2, 9, attn.to_q.in_features)
    with torch.no_grad():
        want = core.qk_delta(attn, x)
        got = core.qk_delta(attn, x.to(dtype))
    assert core.mlp_q[0].weight.dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, atol=3e-2 * w.abs().max().item(), rtol=3e-2)


def test_linear_with_fused_projections_equals_unfused():
    model = ALL_FAMILIES["flux"]()
    convert(model, "linear")
    _perturb(model)
    y = _run(model, "flux")
    model.fuse_qkv_projections()
    assert any(getattr(m, "fused_projections", False) for m in model.modules())
    torch.testing.assert_close(_run(model, "flux"), y, atol=1e-5, rtol=1e-5)


def test_agent_large_cells_and_zero_shortcut_differ_from_defaults():
    model = _dit()
    y0 = _run(model, "dit")
    convert(model, "agent")
    y_default = _run(model, "dit")
    revert(model)
    convert(model, "agent", pool=[8, 8], k_scale2=1.0, k_shortcut=0.0)  # one agent over the 8 x 8 grid
    y_one = _run(model, "dit")
    assert not torch.allclose(y_default, y_one, atol=1e-4) and not torch.allclose(y_one, y0, atol=1e-4)
    revert(model)
    with pytest.raises(ValueError, match=r"pool=\[2, 2, 2\] gives 3 axes but DiTTransformer2DModel's token grid has 2"):
        convert(model, "agent", pool=[2, 2, 2])  # (refused at conversion; it failed at the first forward before)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_gradients_reach_the_new_parameters_and_bf16_runs(method):
    model = _dit()
    convert(model, method, **({"kernel_size": 3} if method == "hybrid" else {}))
    _perturb(model, std=0.05)
    params = {n: p for n, p in model.named_parameters() if CORE_ATTR in n}
    assert bool(params) == (method != "agent")  # agent is training-free: no parameters
    out = model(**_inputs("dit")).sample
    out.square().mean().backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.to(torch.bfloat16)
    x = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _inputs("dit").items()}
    with torch.no_grad():
        assert torch.isfinite(model(**x).sample.float()).all()


@pytest.mark.parametrize("method", ["hybrid", "agent"])
def test_dense_warm_up(method):
    model = _dit()
    y0 = _run(model, "dit")
    convert(model, method, dense_above_timestep=0.0, **({"kernel_size": 3} if method == "hybrid" else {}))
    _perturb(model)
    torch.testing.assert_close(_run(model, "dit"), y0, atol=2e-6, rtol=1e-5)


# Options, save / load ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,options,match",
    [
        ("hybrid", {"kernel_size": 4}, r"kernel_size=4 must be an odd int >= 1"),
        ("hybrid", {"kernel_size": [3, 3, 3, 3]}, r"kernel_size=\[3, 3, 3, 3\] must be an odd int"),
        ("hybrid", {"dilation": 0}, r"dilation=0 must be an int >= 1"),
        ("hybrid", {"feature_map": "softmax"}, r"feature_map='softmax' for method='hybrid'; choose one of"),
        ("hybrid", {"sparsity": 0.5}, r"unknown option\(s\) \['sparsity'\] for method='hybrid'"),
        ("linear", {"eps": 0}, r"eps=0 must be a finite number > 0"),
        ("linear", {"mid_dim_scale": 0}, r"mid_dim_scale=0 must be an int >= 1"),
        ("linear", {"feature_map": "identity"}, r"feature_map='identity' for method='linear'"),
        ("linear", {"dense_above_timestep": 500}, r"unknown option\(s\) \['dense_above_timestep'\]"),
        ("agent", {"pool": 0}, r"pool=0 must be an int >= 1"),
        ("agent", {"k_scale2": float("nan")}, r"k_scale2=nan must be a finite number"),
        ("agent", {"k_shortcut": "x"}, r"k_shortcut='x' must be a finite number"),
        ("agent", {"k_scale2": -1e10}, r"k_scale2=-10000000000.0 must be in \[-16, 16\]"),  # (overflowed at forward)
        ("agent", {"k_shortcut": 1e308}, r"k_shortcut=1e\+308 is not representable in float32"),  # (inf output)
    ],
)
def test_bad_options_name_the_values_and_leave_the_model(method, options, match):
    model = _dit()
    before, keys = _processors(model), set(model.state_dict())
    with pytest.raises(ValueError, match=match):
        convert(model, method, **options)
    assert _processors(model) == before and set(model.state_dict()) == keys


@pytest.mark.parametrize(
    "family,method,options",
    [
        ("dit", "hybrid", {"kernel_size": [3, 5], "dilation": 1}),
        ("wan", "hybrid", {"kernel_size": 3}),
        ("unet", "linear", {"mid_dim_scale": 2}),
        ("hunyuan_video", "linear", {}),
        ("cogvideox", "agent", {"pool": [1, 2, 3], "k_shortcut": 0.1}),
    ],
)
def test_save_load_roundtrip_and_revert(tmp_path, family, method, options):
    model = ALL_FAMILIES[family]()
    y0 = _run(model, family)
    convert(model, method, **options)
    _perturb(model)
    y = _run(model, family)
    save_conversion(model, tmp_path)
    entry = json.loads((tmp_path / "conversion.json").read_text())["components"]["model"]
    assert entry["method"] == method and all(entry["options"][k] == v for k, v in options.items())
    fresh = ALL_FAMILIES[family]()
    report = load_conversion(fresh, tmp_path)
    assert len(report.converted) == len(entry["layers"])
    assert torch.equal(_run(fresh, family), y)
    assert visionlin.revert(fresh) == 1 and torch.equal(_run(fresh, family), y0)
    assert revert(model) == 1 and torch.equal(_run(model, family), y0)


def test_cli_new_method_options(tmp_path, capsys):
    from visionlin.cli import main

    _dit().save_pretrained(tmp_path / "dit")
    out = tmp_path / "conv"
    rc = main(["convert", str(tmp_path / "dit"), "--method", "hybrid", "--kernel-size", "3", "5", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "transformer_blocks.0.attn1  converted  hybrid" in text
    assert json.loads((out / "conversion.json").read_text())["components"]["model"]["options"]["kernel_size"] == [3, 5]
    rc = main(["convert", str(tmp_path / "dit"), "--method", "agent", "--pool", "4", "--k-shortcut", "0.1"])
    assert rc == 0 and "converted  agent" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path / "dit"), "--method", "linear", "--pool", "2"])
    assert e.value.code == 2 and "unknown option(s) ['pool'] for method='linear'" in capsys.readouterr().err


# Full pipeline calls: every family's diffusers pipeline (no VAE, no text encoders: prompt embeddings and latent
# output), every method converted in turn, the stock output back after each revert.
def _cogvideox_no_rope(seed=0):
    torch.manual_seed(seed)
    return diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
        text_embed_dim=32, num_layers=1, sample_width=12, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=7,
    ).eval()  # fmt: skip


def _pipeline(family):
    """``(pipeline, call)``: ``call()`` runs two denoising steps and returns the latents."""
    pytest.importorskip("transformers")  # the text pipelines import it even with prompt embeddings given
    e = torch.Generator().manual_seed(5)
    emb, pooled = torch.randn(1, 7, 32, generator=e), torch.randn(1, 32, generator=e)
    common = {"num_inference_steps": 2, "output_type": "latent"}
    d = diffusers
    if family == "dit":
        vae = d.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
            norm_num_groups=8, layers_per_block=1, sample_size=32,
        )  # fmt: skip
        pipe = d.DiTPipeline(_dit(), vae, d.DDIMScheduler(), id2label={0: "cat", 1: "dog"})
        kw = {"class_labels": [1], "guidance_scale": 4.0}
    elif family == "pixart":
        pipe = d.PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=FAMILIES["pixart"](),
                                     scheduler=d.DPMSolverMultistepScheduler())  # fmt: skip
        kw = {"prompt_embeds": emb, "prompt_attention_mask": torch.ones(1, 7), "negative_prompt": None,
              "negative_prompt_embeds": emb.flip(1), "negative_prompt_attention_mask": torch.ones(1, 7),
              "use_resolution_binning": False, "height": 128, "width": 128}  # fmt: skip
    elif family == "sd3":
        pipe = d.StableDiffusion3Pipeline(
            transformer=FAMILIES["sd3"](), scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None,
            **{f"{n}{i}": None for n in ("text_encoder", "tokenizer") for i in ("", "_2", "_3")},
        )  # fmt: skip
        kw = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": emb.flip(1),
              "negative_pooled_prompt_embeds": pooled.flip(1), "height": 128, "width": 128}  # fmt: skip
    elif family == "flux":
        pipe = d.FluxPipeline(
            transformer=FAMILIES["flux"](), scheduler=d.FlowMatchEulerDiscreteScheduler(), vae=None,
            **{f"{n}{i}": None for n in ("text_encoder", "tokenizer") for i in ("", "_2")},
        )  # fmt: skip
        kw = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "height": 64, "width": 96}
    elif family == "wan":
        pipe = d.WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=FAMILIES["wan"](),
                             scheduler=d.FlowMatchEulerDiscreteScheduler(shift=3.0))  # fmt: skip
        kw = {"prompt_embeds": emb, "negative_prompt_embeds": emb.flip(1), "height": 64, "width": 96, "num_frames": 9}
    elif family == "cogvideox":
        pipe = d.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=_cogvideox_no_rope(),
                                   scheduler=d.CogVideoXDDIMScheduler())  # fmt: skip
        kw = {"prompt_embeds": emb, "negative_prompt_embeds": emb.flip(1), "height": 64, "width": 96, "num_frames": 9}
    elif family == "hunyuan_video":
        pipe = d.HunyuanVideoPipeline(
            transformer=_hunyuan(), vae=None, scheduler=d.FlowMatchEulerDiscreteScheduler(),
            **{f"{n}{i}": None for n in ("text_encoder", "tokenizer") for i in ("", "_2")},
        )  # fmt: skip
        kw = {"prompt_embeds": emb, "pooled_prompt_embeds": pooled, "height": 64, "width": 96, "num_frames": 9,
              "prompt_attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0]])}  # fmt: skip
    else:  # unet
        pipe = d.StableDiffusionPipeline(
            vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["unet"](), scheduler=d.DDIMScheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        kw = {"prompt_embeds": emb, "negative_prompt_embeds": emb.flip(1), "height": 128, "width": 128}
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def call():
        out = pipe(**kw, **common, generator=torch.Generator().manual_seed(0))
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)

    return pipe, call


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_every_method_runs_a_full_pipeline_call(family):
    pipe, call = _pipeline(family)
    ref = call()
    for method in sorted(METHODS):
        report = visionlin.convert(pipe, method, **SMALL.get(method, {}))
        assert report.converted
        for comp in {r.component for r in report.converted}:
            _perturb(getattr(pipe, comp), std=0.05)
        out = call()
        assert out.shape == ref.shape and torch.isfinite(out).all(), method
        if method != "dense":
            assert not torch.equal(out, ref), f"{method} left the {family} pipeline's output unchanged"
        assert visionlin.revert(pipe) == 1
        assert torch.equal(call(), ref), method


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_conversion_under_model_cpu_offload(family):
    """``enable_model_cpu_offload`` (accelerate's hooks move each component to the execution device for its forward;
    the CPU stands in for it here): converting an offloaded pipeline gives exactly the outputs of converting a plain
    one, and revert restores the offloaded pipeline's stock outputs."""
    for method in ("sla", "hybrid"):
        pipe, call = _pipeline(family)
        visionlin.convert(pipe, method, **SMALL.get(method, {}))
        plain = call()
        pipe, call = _pipeline(family)
        pipe.enable_model_cpu_offload(device="cpu")
        ref = call()
        visionlin.convert(pipe, method, **SMALL.get(method, {}))
        assert torch.equal(call(), plain), method
        assert visionlin.revert(pipe) == 1
        assert torch.equal(call(), ref), method


# GPU: the lead runs these on the H200 (`pytest -m gpu tests/test_convert_methods.py`).
def _to(x, device, dtype):
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    return x


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_gpu_converted_model_matches_cpu(family, method, dtype, device="cuda"):
    # The same converted model (trained-looking converter parameters) on the GPU and on the CPU in float32: the GPU
    # backends (NATTEN, SDPA, Triton where chosen) must agree with the CPU references; bfloat16 within its precision.
    model = ALL_FAMILIES[family]()
    convert(model, method, **SMALL.get(method, {}))
    _perturb(model, std=0.05)
    x = _hunyuan_inputs() if family == "hunyuan_video" else _inputs(family)
    # float32 on the GPU means float32: cuDNN's convolutions default to TF32 (10-bit mantissa), which alone gave the
    # conv-heavy families (UNet, Wan, HunyuanVideo) 3e-4 to 5e-3 even under the dense method (H200 run at 3f3582c).
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        ref = model(**x).sample.double()
        model.to(device, dtype)
        out = model(**_to(x, device, dtype)).sample.double().cpu()
    err = (out - ref).abs().max() / ref.abs().max()
    assert torch.isfinite(out).all() and err <= (1e-4 if dtype == torch.float32 else 5e-2), float(err)
    assert revert(model) == 1
