"""Converter calibration (per-layer settings under an error budget) and fine-tuning (distillation from the same model
with the conversion off): tiny diffusers models built offline, CPU only."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from cli_utils import fresh_accelerate_state  # noqa: F401  (autouse in this module)

diffusers = pytest.importorskip("diffusers")

from test_convert import _dit, _inputs, _run, _sd3  # noqa: E402

import visionlin  # noqa: E402
from visionlin.convert import (  # noqa: E402
    calibrate,
    convert,
    disabled,
    distillation_loss,
    load_conversion,
    load_finetuned,
    revert,
    save_conversion,
)
from visionlin.convert.finetune import _teacher_mode  # noqa: E402
from visionlin.kernels import block_sparse_attention, softmax_attention  # noqa: E402
from visionlin.train import checkpoint as ckpt  # noqa: E402


def _finetune(*args, **kwargs):
    """:func:`visionlin.finetune` on the CPU (where the tiny models and their inputs are), on a GPU machine too."""
    return visionlin.finetune(*args, **{"cpu": True, **kwargs})


def _tiny_dit(seed=0):
    """One block over a 4 x 4 token grid: fast enough for optimizer steps on a shared CPU."""
    torch.manual_seed(seed)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    ).eval()  # fmt: skip


def _data(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(n, 4, 8, 8, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "class_labels": torch.randint(0, 10, (n,), generator=g),
    }


def _sla(model=None):
    model = _tiny_dit() if model is None else model
    convert(model, "sla", sparsity=0.75, block_size=4)
    return model


# calibrate


def _layer_inputs(model, family, layer):
    """The q / k / v / scale one layer's core receives in a dense run (captured independently of calibrate)."""
    got = []
    convert(model, "dense")
    core = dict(model.named_modules())[layer].visionlin_core
    h = core.register_forward_hook(lambda m, args, out: got.append((args, out)))
    _run(model, family)
    h.remove()
    revert(model)
    return got


def test_calibrate_meets_budget_and_tighter_budget_is_denser():
    loose = calibrate(_dit(), _inputs("dit"), budget=0.3, block_size=8, apply=False)
    tight = calibrate(_dit(), _inputs("dit"), budget=0.1, block_size=8, apply=False)
    assert [r.name for r in loose.layers] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for rep in (loose, tight):
        for r in rep.layers:
            assert r.calls == 1
            assert r.value is not None and r.error <= rep.budget
            # the first candidate (cheapest first) within the budget, and every sparser one over it
            errs = dict(r.errors)
            assert errs[r.value] == r.error
            assert all(e > rep.budget for v, e in r.errors if v > r.value)
    for a, b in zip(loose.layers, tight.layers, strict=True):
        assert b.value <= a.value
    assert any(b.value < a.value for a, b in zip(loose.layers, tight.layers, strict=True))
    # the reported error is the one measured independently on the layer's own inputs
    layer = loose.layers[1]
    ((args, dense_out),) = _layer_inputs(_dit(), "dit", layer.name)
    q, k, v, scale = args
    sparse = block_sparse_attention(q, k, v, topk=1 - layer.value, block_q=8, block_k=8, scale=scale)
    torch.testing.assert_close(dense_out, softmax_attention(q, k, v, scale=scale))
    expect = float((sparse - dense_out).norm() / dense_out.norm())
    assert layer.error == pytest.approx(expect, rel=1e-5)


def test_calibrate_applies_a_per_layer_plan_that_saves_and_loads(tmp_path):
    model = _sd3()
    report = calibrate(model, _inputs("sd3"), budget=0.2, block_size=8, method="sla")
    assert report.conversion is not None
    chosen = {r.name: r.value for r in report.layers}
    assert len(set(chosen.values())) > 1  # the layers differ, so the plan is really per layer
    cores = {n: m.visionlin_core for n, m in model.named_modules() if hasattr(m, "visionlin_core")}
    assert {n: c.options["sparsity"] for n, c in cores.items()} == chosen
    assert {r.name: r.options["sparsity"] for r in report.conversion.converted} == chosen
    assert "layer options" in str(report.conversion) and "within the budget; applied" in str(report)
    out = _run(model, "sd3")
    save_conversion(model, tmp_path)
    fresh = _sd3()
    load_conversion(fresh, tmp_path)
    torch.testing.assert_close(_run(fresh, "sd3"), out, rtol=0, atol=0)
    # apply=False leaves the model as it was; report.apply converts it the same way
    other = _sd3()
    ref = _run(other, "sd3")
    plan = calibrate(other, _inputs("sd3"), budget=0.2, block_size=8, method="sla", apply=False)
    assert not any(hasattr(m, "visionlin_core") for m in other.modules())
    torch.testing.assert_close(_run(other, "sd3"), ref, rtol=0, atol=0)
    assert plan.plan == {"model": {"layers": list(chosen), "layer_options": {n: {"sparsity": s} for n, s in
                                                                              chosen.items()}}}  # fmt: skip
    plan.apply(other)
    torch.testing.assert_close(_run(other, "sd3"), out, rtol=0, atol=0)


def test_calibrate_zero_budget_keeps_layers_dense_and_other_options():
    report = calibrate(_dit(), _inputs("dit"), budget=0.0, block_size=8, candidates=[0.9, 0.5], apply=False)
    assert all(r.value is None for r in report.layers) and "dense" in str(report)
    with pytest.raises(ValueError, match="no layer meets budget=0.0"):
        report.apply(_dit())
    # a window-like option of another method, with explicit candidates (cheapest first)
    hybrid = calibrate(_dit(), _inputs("dit"), budget=10.0, method="hybrid", option="kernel_size",
                       candidates=[3, 5], apply=False)  # fmt: skip
    assert [r.value for r in hybrid.layers] == [3, 3]


def test_calibrate_pipeline_measures_every_step():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8,
        layers_per_block=1, sample_size=32,
    )  # fmt: skip
    pipe = diffusers.DiTPipeline(_dit(), vae, diffusers.DDIMScheduler(), id2label={0: "cat", 1: "dog"})
    call = {"class_labels": [1], "num_inference_steps": 3, "guidance_scale": 4.0, "output_type": "latent",
            "generator": torch.Generator().manual_seed(0)}  # fmt: skip
    report = visionlin.calibrate(pipe, call, budget=0.3, block_size=8)
    assert {r.component for r in report.layers} == {"transformer"}
    assert all(r.calls == 3 for r in report.layers)
    assert {r.component for r in report.conversion.layers} == {"transformer"}
    revert(pipe)
    # dense warm-up: steps at or above the threshold are dense after conversion, so they are not measured
    warm = visionlin.calibrate(pipe, call, budget=0.3, block_size=8, dense_above_timestep=500, apply=False)
    measured = int((pipe.scheduler.timesteps < 500).sum())
    assert 0 < measured < 3 and all(r.calls == measured for r in warm.layers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": -0.1}, r"budget=-0.1 must be a finite number >= 0"),
        ({"budget": float("nan")}, "budget=nan"),
        ({"metric": "mse"}, r"unknown metric='mse'"),
        ({"method": "nope"}, r"unknown method='nope'"),
        (
            {"option": "k_low", "method": "sla", "candidates": [0.99]},
            r"candidate k_low=0.99: k_low=0.99 .* sparsity=0.95",
        ),
        ({"option": "colour"}, r"option='colour' is not an option of method='sparse'"),
        ({"candidates": []}, r"candidates=\[\] must be a non-empty list"),
        ({"candidates": [1.5]}, r"candidate sparsity=1.5: sparsity=1.5 must be a number in \[0, 1\)"),
        ({"sparsity": 0.5}, r"sparsity=0.5 is fixed in \*\*options but option='sparsity' is calibrated"),
        ({"method": "dense"}, r"method='dense' has no default option"),
        ({"method": "hybrid", "option": "kernel_size"}, r"option='kernel_size' has no default candidates"),
        ({"method": "linear", "option": "eps", "candidates": [1e-4]}, "changes the attention's query / key"),
        ({"apply": 1}, r"apply=1 must be True or False"),
    ],
)
def test_calibrate_bad_input(kwargs, match):
    model = _dit()
    ref = _run(model, "dit")
    with pytest.raises(ValueError, match=match):
        calibrate(model, _inputs("dit"), **kwargs)
    assert not any(hasattr(m, "visionlin_core") for m in model.modules())
    torch.testing.assert_close(_run(model, "dit"), ref, rtol=0, atol=0)


def test_calibrate_names_inputs_that_do_not_fit():
    with pytest.raises(ValueError, match=r"calibrate: inputs\[1\] \(keys \['bogus'\]\) do not fit the call of"):
        calibrate(_dit(), [_inputs("dit"), {"bogus": 1}], block_size=16, apply=False)  # (a bare KeyError)


def test_calibrate_refuses_non_finite_attention():
    """NaN calibration inputs: every candidate's error read NaN, ``max(0.0, nan)`` kept 0.0 and the most aggressive
    candidate was chosen as a perfect match; now a ValueError naming the layer, the model left as it was."""
    model = _dit()
    x = _inputs("dit")
    x["hidden_states"] = torch.full_like(x["hidden_states"], float("nan"))
    with pytest.raises(ValueError, match=r"dense attention output of model.transformer_blocks.0.attn1 is not finite"):
        calibrate(model, x, candidates=[0.9, 0.5], block_size=16, apply=False)
    assert not any(hasattr(m, "visionlin_core") for m in model.modules())


def test_calibrate_bad_inputs_and_models():
    with pytest.raises(ValueError, match="inputs must be a dict of call arguments or a non-empty list"):
        calibrate(_dit(), [])
    with pytest.raises(ValueError, match="inputs must be"):
        calibrate(_dit(), torch.zeros(2))
    converted = _dit()
    convert(converted, "sparse")
    with pytest.raises(ValueError, match=r"\['model'\] already converted; calibrate an unconverted model"):
        calibrate(converted, _inputs("dit"))
    with pytest.raises(ValueError, match="expected a diffusers pipeline or a model"):
        calibrate(object(), _inputs("dit"))
    model = _dit()
    with pytest.raises(ValueError, match=r"inputs\[0\] \(keys \['nonsense'\]\) do not fit"):  # the model restored
        calibrate(model, {"nonsense": 1})
    assert not any(hasattr(m, "visionlin_core") for m in model.modules())


# per-layer settings and disabled()


def test_layer_options_and_disabled():
    model = _dit()
    ref = _run(model, "dit")
    report = convert(model, "sla", sparsity=0.5, block_size=8,
                     layer_options={"transformer_blocks.0.attn1": {"sparsity": 0.875}})  # fmt: skip
    cores = [m.visionlin_core for n, m in model.named_modules() if n.endswith("attn1")]
    assert [c.options["sparsity"] for c in cores] == [0.875, 0.5]
    assert [c.options["k_low"] for c in cores] == [0.1, 0.1]
    assert "sparsity=0.875" in str(report)
    out = _run(model, "dit")
    assert not torch.allclose(out, ref)
    with disabled(model):
        torch.testing.assert_close(_run(model, "dit"), ref, rtol=0, atol=0)
    torch.testing.assert_close(_run(model, "dit"), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"layer_options names \['nope'\]"):
        convert(_dit(), "sla", layer_options={"nope": {}})
    with pytest.raises(ValueError, match=r"layer_options\['transformer_blocks.0.attn1'\]: sparsity=2"):
        convert(_dit(), "sla", layer_options={"transformer_blocks.0.attn1": {"sparsity": 2}})
    with pytest.raises(ValueError, match="layer_options=.* must map attention module names"):
        convert(_dit(), "sla", layer_options=["transformer_blocks.0.attn1"])
    with pytest.raises(ValueError, match="has no converted component"), disabled(_dit()):
        pass


# finetune


def test_finetune_lowers_the_distillation_loss():
    model = _sla()
    data = _data()
    with torch.no_grad():
        before = float(distillation_loss(model, data))
        with_features = float(distillation_loss(model, data, feature_weight=1.0))
    assert with_features > before > 0
    result = _finetune(model, data, steps=5, lr=1e-2)
    with torch.no_grad():
        after = float(distillation_loss(model, data))
    assert result.step == 5 and len(result.losses) == 5 and result.trainable_parameters == 72
    assert result.losses[0] == pytest.approx(before, rel=1e-5)  # step 1's loss is the untrained model's
    assert after < 0.9 * before
    assert all(p.requires_grad for p in model.parameters())  # the flags are restored
    with pytest.raises(ValueError, match=r"batch keywords \['bogus'\] do not fit DiTTransformer2DModel's call"):
        distillation_loss(model, {"bogus": 1})  # (a bare KeyError, where the docstring promised ValueError)


def test_finetune_resume_continues_identically(tmp_path):
    data = _data(n=6)
    kw = {"batch_size": 3, "lr": 1e-2, "feature_weight": 0.5, "trainable": "lora+converter", "lora_rank": 2}
    straight = _finetune(_sla(), data, steps=4, output_dir=tmp_path / "a", **kw)
    model = _sla()
    first = _finetune(model, data, steps=2, output_dir=tmp_path / "b", **kw)
    with pytest.raises(ValueError, match="already has checkpoints"):
        _finetune(_sla(), data, steps=4, output_dir=tmp_path / "b", **kw)
    resumed_model = _sla()
    second = _finetune(resumed_model, data, steps=4, output_dir=tmp_path / "b", resume="auto", **kw)
    assert second.start_step == 2
    assert first.losses + second.losses == straight.losses  # bitwise
    a = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "a"))
    b = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "b"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("start", 0), ("train", 2), ("end", 2), ("start", 2),
                                                         ("train", 4), ("end", 4)]  # fmt: skip
    assert [r["step"] for r in records if r["kind"] == "start"] == [0, 2]
    assert (tmp_path / "b" / "conversion" / "conversion.json").is_file()
    assert (tmp_path / "b" / "lora.safetensors").is_file()
    # the run folder re-creates the fine-tuned model (conversion, converter weights, LoRA adapters) on a fresh one
    fresh = _tiny_dit()
    load_finetuned(fresh, tmp_path / "b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).sample, resumed_model(**data).sample, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"trainable': 'lora'"):
        _finetune(_sla(), data, steps=6, output_dir=tmp_path / "b", resume="auto", **{**kw, "trainable": "lora"})


def test_finetune_lora_trains_only_lora_and_teacher_is_the_original():
    model = _sla()
    data = _data()
    reference = _tiny_dit()
    ref_out = reference(**data).sample
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _finetune(model, data, steps=3, lr=1e-2, trainable="lora", lora_rank=2)
    after = model.state_dict()
    lora = [k for k in after if "lora_" in k]
    base = {k.replace(".base_layer.", "."): v for k, v in after.items() if k not in lora}  # peft's wrapped layers
    assert lora and base.keys() == before.keys()
    assert result.trainable_parameters == sum(after[k].numel() for k in lora)
    for k, v in before.items():  # every other weight, the converter's projection included, is unchanged
        torch.testing.assert_close(base[k], v, rtol=0, atol=0)
    assert any(after[k].abs().sum() > 0 for k in lora if "lora_B" in k)  # B started at zero and trained
    with torch.no_grad(), _teacher_mode(model):  # conversion and adapters off: the original model exactly
        torch.testing.assert_close(model(**data).sample, ref_out, rtol=0, atol=0)
    with torch.no_grad(), disabled(model):  # conversion off but LoRA on: not the original
        assert not torch.allclose(model(**data).sample, ref_out)


def test_finetune_all_weights_distils_from_the_frozen_original(tmp_path):
    model = _sla()
    data = _data()
    with torch.no_grad():
        target = _tiny_dit()(**data).sample  # the original model
        before = float(torch.nn.functional.mse_loss(model(**data).sample, target))
    result = _finetune(model, data, steps=4, lr=1e-3, trainable="all", output_dir=tmp_path)
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    assert result.losses[0] == pytest.approx(before, rel=1e-5)
    assert result.losses[-1] < result.losses[0]
    with torch.no_grad():  # every weight moved towards the original model's predictions
        assert float(torch.nn.functional.mse_loss(model(**data).sample, target)) < 0.9 * before
    fresh = _tiny_dit()
    load_finetuned(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data).sample, model(**data).sample, rtol=0, atol=0)
    other = _tiny_dit()
    with pytest.raises(ValueError, match="has no conversion/"):
        load_finetuned(other, tmp_path / "checkpoints")
    assert not any(hasattr(m, "visionlin_core") for m in other.modules())


def test_finetune_data_forms_and_progress_bar(capsys):
    data = _data(n=2)
    as_list = [data]
    result_list = _finetune(_sla(), as_list, steps=2, lr=1e-2)
    result_dict = _finetune(_sla(), data, steps=2, lr=1e-2)  # batch = every row, in a seeded order
    assert result_list.losses[0] == pytest.approx(result_dict.losses[0], rel=1e-5)

    def generate(step, generator):
        return {"hidden_states": torch.randn(2, 4, 8, 8, generator=generator), "timestep": torch.tensor([5, 900]),
                "class_labels": torch.tensor([1, 2])}  # fmt: skip

    one = _finetune(_sla(), generate, steps=2, lr=1e-2, progress=True)
    two = _finetune(_sla(), generate, steps=2, lr=1e-2)
    assert one.losses == two.losses
    assert "finetune" in capsys.readouterr().err  # the tqdm bar


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trainable": "heads"}, r"unknown trainable='heads'"),
        ({"steps": 0}, r"steps=0 must be an integer >= 1"),
        ({"lr": -1.0}, r"lr=-1.0 must be a finite number >= 0"),
        ({"lr": 0}, r"lr=0 would train nothing"),  # (as clip_grad=0)
        ({"clip_grad": 0.0}, r"clip_grad=0 would zero every gradient"),  # (a run that trained nothing, exit 0)
        ({"feature_weight": -1}, r"feature_weight=-1"),
        ({"batch_size": 9}, r"batch_size=9 x 1 process\(es\) exceeds the 4 samples"),
        ({"mixed_precision": "fp8"}, r"mixed_precision='fp8'"),
        ({"resume": "auto"}, "resume needs output_dir"),
        ({"lora_targets": "to_q"}, r"lora_targets='to_q' must be a non-empty list"),
        ({"trainable": "lora", "lora_targets": ["ff"]}, r"no module \['ff'\] in the converted attention modules"),
    ],
)
def test_finetune_bad_input(kwargs, match):
    model = _sla()
    with pytest.raises(ValueError, match=match):
        _finetune(model, _data(), **kwargs)


def test_finetune_bad_models_and_data():
    with pytest.raises(ValueError, match="has no converted component"):
        _finetune(_tiny_dit(), _data())
    sparse = _tiny_dit()
    convert(sparse, "sparse", block_size=4)
    with pytest.raises(ValueError, match="the 'sparse' conversion has no parameters of its own"):
        _finetune(sparse, _data())
    bad = {**_data(), "timestep": torch.zeros(3)}
    with pytest.raises(ValueError, match="different leading sizes"):
        _finetune(_sla(), bad)
    with pytest.raises(ValueError, match=r"\['scale'\] are not"):
        _finetune(_sla(), {**_data(), "scale": 1.0})
    with pytest.raises(ValueError, match="data must be a dict of tensors"):
        _finetune(_sla(), "data.safetensors")
    with pytest.raises(ValueError, match="returned list"):
        _finetune(_sla(), lambda step, g: [])
    # non-finite data: the loss was NaN and every step wrote NaN into the trained weights (the whole model's with
    # trainable="all"), with no error
    model = _sla()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nan = _data()
    nan["hidden_states"][0, 0, 0, 0] = float("nan")
    for data, where in ((nan, "data"), ([_data(), nan], "data[1]"), (lambda step, g: nan, "data(0, generator)")):
        with pytest.raises(ValueError, match=rf"{re.escape(where)}: \['hidden_states'\] hold NaN or inf values"):
            _finetune(model, data, trainable="all")
    with pytest.raises(ValueError, match=r"shared: \['extra'\] hold NaN or inf"):
        _finetune(model, _data(), shared={"extra": torch.tensor([float("inf")])})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # data the model cannot run (a bare KeyError); with LoRA it had injected the adapters first and left them in the
    # model; every mode tries the first batch before anything changes
    for trainable in ("converter", "lora", "lora+converter"):
        with pytest.raises(ValueError, match=r"the data does not run through DiTTransformer2DModel \(KeyError"):
            _finetune(model, {"bogus": torch.zeros(4, 3)}, trainable=trainable)
    assert model.state_dict().keys() == before.keys()


def test_cli_finetune_conversion(tmp_path, capsys):
    from safetensors.torch import save_file

    from visionlin.cli import main

    _tiny_dit().save_pretrained(tmp_path / "dit")
    save_file(_data(), str(tmp_path / "data.safetensors"))
    run = tmp_path / "run"
    argv = ["finetune-conversion", str(tmp_path / "dit"), "--data", str(tmp_path / "data.safetensors"),
            "--method", "sla", "--sparsity", "0.75", "--block-size", "4", "--output", str(run), "--lr", "1e-2",
            "--cpu"]  # fmt: skip
    assert main([*argv, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "visionlin conversion: method=sla" in out and "finetuned steps 0 -> 2" in out
    assert main([*argv, "--steps", "3", "--resume", "auto"]) == 0
    assert "finetuned steps 2 -> 3" in capsys.readouterr().out
    # the saved conversion is the fine-tuned one: same outputs as the API run of three steps
    api = _sla()
    _finetune(api, _data(), steps=3, lr=1e-2)
    fresh = _tiny_dit()
    load_conversion(fresh, run / "conversion")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**_data()).sample, api(**_data()).sample, rtol=0, atol=0)
    with pytest.raises(SystemExit) as e:
        main(["finetune-conversion", str(tmp_path / "dit"), "--data", str(tmp_path / "nope.safetensors"),
              "--output", str(run)])  # fmt: skip
    assert e.value.code == 2
    assert "is not a file" in capsys.readouterr().err
    (tmp_path / "data.txt").write_text("not tensors")
    afile = tmp_path / "data.txt"
    for flags, message in (
        (["--data", str(afile), "--output", str(tmp_path / "r2")], f"argument --data: '{afile}' is not a safetensors"),
        ([*argv[2:4], "--output", str(afile)], f"argument --output: '{afile}' is a file, not a folder"),
    ):  # (each a traceback, the second after the conversion)
        with pytest.raises(SystemExit) as e:
            main(["finetune-conversion", str(tmp_path / "dit"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--steps", "3", "--trainable", "all"])  # a run folder with checkpoints and no --resume
    assert "already has checkpoints" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_finetune_two_processes_follow_one_with_the_same_global_batch(tmp_path):
    """``torchrun`` with two CPU processes (gloo) x 3 rows per step against one process x 6 rows: the same rows of
    each step's draw, gradients averaged by DDP, so the same losses step by step and the same trained projection."""
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    _tiny_dit().save_pretrained(tmp_path / "dit")
    save_file(_data(n=8), str(tmp_path / "data.safetensors"))
    common = ["finetune-conversion", str(tmp_path / "dit"), "--data", str(tmp_path / "data.safetensors"),
              "--method", "sla", "--sparsity", "0.75", "--block-size", "4", "--steps", "3", "--lr", "1e-2",
              "--log-interval", "1", "--cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "visionlin.cli", *common, "--batch-size", "3", "--output", str(tmp_path / "two")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from visionlin.cli import main

    assert main([*common, "--batch-size", "6", "--output", str(tmp_path / "one")]) == 0

    def losses(run):
        lines = (tmp_path / run / "log.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]

    assert len(losses("one")) == 3
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
    one = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "one"))["model"]
    two = ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "two"))["model"]
    assert one.keys() == two.keys()
    # Adam divides by sqrt(v): a near-zero gradient entry summed in another order moves by up to ~lr x 1e-2 in
    # 3 steps of lr 1e-2 (the weights themselves move by up to 3e-2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-4)
    assert any(one[k].abs().max() > 1e-3 for k in one)  # the projection trained (it starts at zero)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_calibrate_and_finetune():
    """On the GPU: calibrate a CUDA model (its errors within the budget, the plan applied) and fine-tune it, in
    float32 (the loss falls) and under bf16 autocast (finite losses, the projection stays float32)."""
    model = _dit().cuda()
    inputs = {k: v.cuda() for k, v in _inputs("dit").items()}
    report = calibrate(model, inputs, budget=0.3, block_size=8, method="sla")
    assert all(r.value is not None and r.error <= 0.3 for r in report.layers)
    data = {k: v.cuda() for k, v in _data(n=4, seed=5).items()}
    small = _sla(_tiny_dit().cuda())
    with torch.no_grad():
        before = float(distillation_loss(small, data))
    result = visionlin.finetune(small, data, steps=5, lr=1e-2)
    with torch.no_grad():
        assert float(distillation_loss(small, data)) < 0.9 * before
    assert result.losses[0] == pytest.approx(before, rel=1e-4)
    half = visionlin.finetune(model, {k: v.cuda() for k, v in _data(n=2).items() if k != "hidden_states"}
                              | {"hidden_states": torch.randn(2, 4, 16, 16, device="cuda")}, steps=3, lr=1e-3,
                              mixed_precision="bf16")  # fmt: skip
    assert all(torch.isfinite(torch.tensor(half.losses)))
    assert all(m.visionlin_core.proj.weight.dtype == torch.float32 for m in model.modules()
               if hasattr(m, "visionlin_core"))  # fmt: skip


def test_two_finetunes_with_different_precision_in_one_process():
    """accelerate keeps one process-wide state: a second run with another mixed_precision was refused ("AcceleratorState
    has already been initialized"), found by the GPU test; each run now starts from fresh settings."""
    data = _data(n=4, seed=5)
    first = _finetune(_sla(_tiny_dit()), data, steps=1, lr=1e-3)
    second = _finetune(_sla(_tiny_dit()), data, steps=1, lr=1e-3, mixed_precision="bf16")
    assert len(first.losses) == len(second.losses) == 1 and all(map(math.isfinite, first.losses + second.losses))


def test_finetune_a_pipeline_and_load_the_run_into_a_fresh_one(tmp_path):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(8,), latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16,
    )  # fmt: skip

    def pipe_of(transformer):
        return diffusers.DiTPipeline(transformer, vae, diffusers.DDIMScheduler(), id2label={0: "cat", 1: "dog"})

    def sample(pipe):
        out = pipe(class_labels=[1], num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        return torch.as_tensor(out)

    pipe = pipe_of(_tiny_dit())
    convert(pipe, "sla", sparsity=0.75, block_size=4)
    result = _finetune(pipe, _data(), steps=2, lr=1e-2, trainable="lora", lora_rank=2, output_dir=tmp_path)
    assert result.step == 2
    plan = json.loads((tmp_path / "conversion" / "conversion.json").read_text())
    assert list(plan["components"]) == ["transformer"]
    fresh = pipe_of(_tiny_dit())
    load_finetuned(fresh, tmp_path)
    torch.testing.assert_close(sample(fresh), sample(pipe), rtol=0, atol=0)
    assert any("lora_B" in n for n, _ in fresh.transformer.named_parameters())


@pytest.mark.parametrize(
    ("method", "options"),
    [("hybrid", {"kernel_size": 3}), ("linear", {}), ("sla", {"sparsity": 0.75, "block_size": 4, "variant": "code"})],
)
def test_finetune_trains_every_method_with_parameters(method, options):
    model = _tiny_dit()
    convert(model, method, **options)
    data = _data()
    cores = [m.visionlin_core for m in model.modules() if hasattr(m, "visionlin_core")]
    with torch.no_grad():
        before = float(distillation_loss(model, data))
    start = [p.detach().clone() for c in cores for p in c.parameters()]
    result = _finetune(model, data, steps=4, lr=1e-2)
    assert result.trainable_parameters == sum(p.numel() for p in start)
    assert any(not torch.equal(p, q) for p, q in zip(start, [p for c in cores for p in c.parameters()], strict=True))
    with torch.no_grad():
        assert float(distillation_loss(model, data)) < before
