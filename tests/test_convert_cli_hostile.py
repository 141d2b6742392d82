"""``visionlin convert`` / ``finetune-conversion`` against hostile input (found by hostile-user probes): broken model
and pipeline folders, --shared keys that shadow --data keys, a non-finite --lora-alpha, a resume with other conversion
settings, an empty --output and method flags given with --conversion, data the model cannot run, edited LoRA files.
Each was a traceback, a half-changed model or a silently wrong run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from cli_utils import fresh_accelerate_state, usage_error  # noqa: F401  (the fixture is autouse in this module)

pytest.importorskip("diffusers")

from test_convert_tune import _data, _finetune, _sla, _tiny_dit  # noqa: E402

from visionlin.convert import convert, load_finetuned  # noqa: E402
from visionlin.train import checkpoint as ckpt  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny DiT saved with ``save_pretrained`` (``dit/``) and 4 samples for it (``data.safetensors``)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hostile")
    _tiny_dit().save_pretrained(root / "dit")
    save_file(_data(), str(root / "data.safetensors"))
    return root


def _ft(files, *flags) -> list[str]:
    return ["finetune-conversion", str(files / "dit"), "--data", str(files / "data.safetensors"), "--cpu", *flags]


def _sla_flags() -> list[str]:
    return ["--method", "sla", "--sparsity", "0.75", "--block-size", "4"]


# 11: --shared keys that --data has too (shared's value won: trained on the zeros)


def test_shared_keys_also_in_data_are_refused(files, tmp_path, capsys):
    from safetensors.torch import save_file

    shared = tmp_path / "shared.safetensors"
    save_file({"hidden_states": torch.zeros(4, 4, 8, 8), "extra": torch.zeros(2)}, str(shared))
    err = usage_error(capsys, _ft(files, *_sla_flags(), "--shared", str(shared), "--output", str(tmp_path / "run")))
    assert f"argument --shared: keys ['hidden_states'] are in --data '{files / 'data.safetensors'}' too" in err
    assert not (tmp_path / "run").exists()
    # the API: checked before anything runs for a dict or a list of batches, batch by batch for a callable
    zeros = {"hidden_states": torch.zeros(4, 4, 8, 8)}
    for data, where in ((_data(), "data"), ([_data(), _data()], "data[0]"), (lambda s, g: _data(), "data of step 0")):
        with pytest.raises(
            ValueError, match=rf"{re.escape(where)} and shared both give the keywords \['hidden_states'\]"
        ):
            _finetune(_sla(), data, shared=zeros, steps=1)


def test_data_without_samples_says_so():
    """Every tensor with 0 rows was reported as "batch_size=0 x 1 process(es) exceeds the 0 samples"."""
    empty = {k: v[:0] for k, v in _data().items()}
    with pytest.raises(ValueError, match=r"the data holds no samples: every tensor's leading dimension is 0"):
        _finetune(_sla(), empty, steps=1)


# 12: --lora-alpha nan / inf / 0 / negative (nan: NaN losses, a checkpoint written, exit 0)


@pytest.mark.parametrize("alpha", ["nan", "inf", "0", "-2"])
def test_lora_alpha_must_be_finite_and_positive(files, tmp_path, capsys, alpha):
    argv = _ft(files, *_sla_flags(), "--trainable", "lora", "--lora-alpha", alpha, "--output", str(tmp_path / "r"))
    usage_error(capsys, argv, f"argument --lora-alpha: {float(alpha)!r} must be a finite number > 0")
    assert not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match=r"lora_alpha=.* must be a finite number > 0"):
        _finetune(_sla(), _data(), trainable="lora", lora_alpha=float(alpha))


# 13: a resume with other conversion settings went on silently (and rewrote the saved conversion)


def test_resume_with_other_conversion_settings_is_refused(files, tmp_path, capsys, monkeypatch):
    from visionlin.cli import main

    run = tmp_path / "run"
    # (--method left out: sla, the default)
    assert main(_ft(files, "--sparsity", "0.75", "--block-size", "4", "--output", str(run), "--steps", "1")) == 0
    capsys.readouterr()
    plan = (run / "conversion" / "conversion.json").read_text()
    for flags, diff in (
        (["--sparsity", "0.25", "--block-size", "4"], "sparsity: 0.75 -> 0.25"),
        (["--sparsity", "0.75", "--block-size", "2"], "block_size: [4, 4] -> [2, 2]"),
        (["--method", "sparse", "--sparsity", "0.75", "--block-size", "4"], "method: 'sla' -> 'sparse'"),
    ):
        err = usage_error(capsys, _ft(files, *flags, "--output", str(run), "--steps", "2", "--resume", "auto"))
        assert "trained another conversion (" in err and diff in err, err
    assert (run / "conversion" / "conversion.json").read_text() == plan
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000000001"]
    # a checkpoint written before the conversion was recorded in it: the run's saved conversion is compared
    read = ckpt.read_weights_metadata
    old = lambda path: {k: v for k, v in read(path).items() if k != "conversion"}  # noqa: E731
    monkeypatch.setattr(ckpt, "read_weights_metadata", old)
    model = _tiny_dit()
    convert(model, "sla", sparsity=0.5, block_size=4)
    with pytest.raises(ckpt.CheckpointError, match=r"trained another conversion \(sparsity: 0.75 -> 0.5: checkpoint"):
        _finetune(model, _data(), steps=2, output_dir=run, resume="auto")
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000000001"]


# 16: broken model folders gave tracebacks from inside diffusers


def _broken(root, files):
    config = (files / "dit" / "config.json").read_text()
    weights = (files / "dit" / "diffusion_pytorch_model.safetensors").read_bytes()
    cases = {
        "noweights": (config, None, "cannot load the DiTTransformer2DModel (OSError: Error no file named"),
        "garbled": (config, b"garbage", "cannot load the DiTTransformer2DModel (OSError: Unable to load weights"),
        "wrongtype": (config.replace('"num_layers": 1', '"num_layers": "x"'), weights, "(TypeError: "),
        "scheduler": ('{"_class_name": "DDPMScheduler"}', None, "_class_name='DDPMScheduler' is not a diffusers model"),
        "list": ("[1, 2]", None, "config.json holds a JSON list, not an object with a _class_name"),
        "notjson": ("{x", None, "config.json is not valid JSON: "),
    }
    assert '"num_layers": 1' in config
    for name, (text, blob, message) in cases.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(text)
        if blob is not None:
            (root / name / "diffusion_pytorch_model.safetensors").write_bytes(blob)
        yield root / name, message


def test_broken_model_folders_are_clean_errors(files, tmp_path, capsys):
    for folder, message in _broken(tmp_path, files):
        err = usage_error(capsys, ["convert", str(folder)])
        assert f"{folder}" in err and message in err, err
    # finetune-conversion loads the same way
    argv = ["finetune-conversion", str(tmp_path / "garbled"), "--data", str(files / "data.safetensors")]
    err = usage_error(capsys, [*argv, "--output", str(tmp_path / "run")])
    assert f"{tmp_path / 'garbled'}: cannot load the DiTTransformer2DModel (OSError" in err
    assert not (tmp_path / "run").exists()


# 20: an empty --output (the run went into the current directory); method flags ignored beside --conversion


def test_empty_output_and_method_flags_with_a_saved_conversion(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    usage_error(capsys, _ft(files, *_sla_flags(), "--output", ""), "argument --output: '' is not a folder name")
    usage_error(capsys, ["convert", str(files / "dit"), "--out", ""], "argument --out: '' is not a folder name")
    assert list(tmp_path.iterdir()) == []
    for flags, given in (
        (["--method", "sla", "--sparsity", "0.75"], "--method, --sparsity"),
        (["--block-size", "4", "--layers", "a", "--strict"], "--layers, --block-size, --strict"),
    ):
        err = usage_error(capsys, _ft(files, "--conversion", str(tmp_path / "conv"), *flags, "--output", "run"))
        assert f"argument --conversion: {given} cannot be given with it" in err, err
    assert list(tmp_path.iterdir()) == []


# stop 55: broken model_index.json (tracebacks: 'NoneType' object has no attribute 'pop', module diffusers has no
# attribute ...)


def test_broken_pipeline_folders_are_clean_errors(tmp_path, capsys):
    cases = {
        "null": ("null", "model_index.json holds a JSON NoneType, not an object with a _class_name"),
        "str": ('"x"', "model_index.json holds a JSON str, not an object with a _class_name"),
        "unknown": ('{"_class_name": "NoSuchPipeline"}', "_class_name='NoSuchPipeline' is not a diffusers pipeline"),
        "model": ('{"_class_name": "DiTTransformer2DModel"}', "_class_name='DiTTransformer2DModel' is not a diffusers"),
        "listname": ('{"_class_name": ["a", "b"]}', "_class_name=['a', 'b'] is not a diffusers pipeline"),
        "notjson": ("{x", "model_index.json is not valid JSON: "),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(text)
        err = usage_error(capsys, ["convert", str(tmp_path / name)])
        assert f"{tmp_path / name}" in err and message in err, err


# stop 55: data the model cannot run failed at the first step with the model's own error (AttributeError,
# RuntimeError ...), the run folder already written; only the LoRA modes tried the data first


@pytest.mark.parametrize("trainable", ["converter", "all"])
def test_data_the_model_cannot_run_is_refused_before_the_run_folder(files, tmp_path, capsys, trainable):
    from safetensors.torch import save_file

    bad = {
        "notimestep": {"hidden_states": _data()["hidden_states"]},  # (AttributeError inside diffusers)
        "channels": {**_data(), "hidden_states": torch.randn(4, 3, 8, 8)},  # (RuntimeError: expected 4 channels)
        "labels": {**_data(), "class_labels": torch.zeros(4)},  # float class labels (RuntimeError: indices)
    }
    for name, data in bad.items():
        model = _sla()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"the data does not run through DiTTransformer2DModel \("):
            _finetune(model, data, trainable=trainable, steps=1, output_dir=tmp_path / name)
        assert not (tmp_path / name).exists()
        assert model.state_dict().keys() == before.keys()
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        save_file(data, str(tmp_path / f"{name}.safetensors"))
        argv = ["finetune-conversion", str(files / "dit"), "--data", str(tmp_path / f"{name}.safetensors"), "--cpu"]
        err = usage_error(capsys, [*argv, *_sla_flags(), "--steps", "1", "--output", str(tmp_path / f"cli-{name}")])
        assert "the data does not run through DiTTransformer2DModel" in err, err
        assert not (tmp_path / f"cli-{name}").exists()


def test_finetune_output_dir_and_learning_rate_bounds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for output_dir in ("", "  ", 3):  # ("" wrote checkpoints/, conversion/ and log.jsonl into the current folder)
        with pytest.raises(ValueError, match=rf"output_dir={re.escape(repr(output_dir))} must be a folder path"):
            _finetune(_sla(), _data(), steps=1, output_dir=output_dir)
    for name in ("lr", "weight_decay", "clip_grad"):  # (lr=1e300: the optimizer's "cannot be converted" RuntimeError)
        with pytest.raises(ValueError, match=rf"{name}=1e\+300 must be at most 3\.403e\+38"):
            _finetune(_sla(), _data(), steps=1, **{name: 1e300})
    assert list(tmp_path.iterdir()) == []
    np = pytest.importorskip("numpy")
    result = _finetune(_sla(), _data(), steps=1, lr=np.float32(1e-3), weight_decay=np.float64(0.0))
    assert result.step == 1


# stop 55: load_finetuned took a lora.safetensors with a tensor missing (left at its random init) or holding NaN, and
# on a refused file left peft's layers in the model


def test_load_finetuned_refuses_edited_lora_files_and_leaves_the_model_as_it_was(tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    _finetune(_sla(), _data(), steps=1, trainable="lora", lora_rank=2, output_dir=run)
    path = run / "lora.safetensors"
    original = path.read_bytes()
    meta = ckpt.read_weights_metadata(path)
    weights = load_file(str(path))
    first = sorted(weights)[0]
    edits = {
        "missing": ({k: v for k, v in weights.items() if k != first}, r"do not match"),
        "extra": ({**weights, "transformer_blocks.0.attn1.to_q.lora_A.visionlin.bias": torch.zeros(2)}, "do not match"),
        "nan": ({**weights, first: torch.full_like(weights[first], float("nan"))}, r"hold NaN or inf values"),
        "shape": ({**weights, first: weights[first][:1]}, r"do not match"),
    }
    for name, (edited, message) in edits.items():
        save_file(edited, str(path), metadata=meta)
        model = _tiny_dit()
        keys = list(model.state_dict())
        modules = [n for n, _ in model.named_modules()]
        with pytest.raises(ValueError, match=message):
            load_finetuned(model, run)
        assert list(model.state_dict()) == keys, name
        assert [n for n, _ in model.named_modules()] == modules, name
        assert not hasattr(model, "peft_config") and not any(hasattr(m, "visionlin_core") for m in model.modules())
    path.write_bytes(original)
    model = _tiny_dit()
    load_finetuned(model, run)
    assert any("lora_A" in k for k in model.state_dict())
    assert json.loads(meta["lora_config"])["r"] == 2


def test_a_pipeline_whose_libraries_are_missing_says_which(tmp_path, capsys, monkeypatch):
    """Without transformers, diffusers' pipeline names are stand-ins (DummyObject): the class check called such a
    pipeline "not a diffusers pipeline class"; it names the missing libraries now."""
    import diffusers

    class DummyObject(type):  # the name diffusers' stand-ins' metaclass has
        pass

    class NeedsTransformersPipeline(metaclass=DummyObject):
        _backends = ["torch", "transformers"]

    monkeypatch.setattr(diffusers, "NeedsTransformersPipeline", NeedsTransformersPipeline, raising=False)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text('{"_class_name": "NeedsTransformersPipeline"}')
    err = usage_error(capsys, ["convert", str(tmp_path / "p")])
    assert "NeedsTransformersPipeline needs ['torch', 'transformers'] installed" in err, err
