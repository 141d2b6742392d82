"""visionlin.train.ema.ShardedEma (the EMA of ``--fsdp --model-ema``) in one process: on plain tensors it must be
timm's ModelEmaV3 exactly; the FSDP behaviour (shards, gather, resume) is tested with two processes in
test_train_ddp.py::test_fsdp_follows_ddp_and_resumes_exactly."""

from __future__ import annotations

import pytest
import torch
from timm.utils import ModelEmaV3
from torch import nn

from visionlin.train.ema import ShardedEma


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    m(torch.randn(5, 4))  # BatchNorm's running stats and its int64 counter move
    return m


@pytest.mark.parametrize("warmup", [False, True])
def test_matches_timms_model_ema_v3_on_plain_tensors(warmup):
    model = _model()
    theirs = ModelEmaV3(model, decay=0.9, use_warmup=warmup)
    mine = ShardedEma(model, decay=0.9, use_warmup=warmup)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(5, 4))
        theirs.update(model, step=step)
        mine.update(model, step=step)
    full = mine.full_state_dict(model)
    ref = theirs.module.state_dict()
    assert list(full) == list(ref)
    for k, v in ref.items():
        assert torch.equal(full[k], v), k
    assert not torch.equal(full["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy


def test_swapped_into_evaluates_the_average_and_restores_the_model_even_on_error():
    model = _model()
    ema = ShardedEma(model, decay=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    changed = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into(model):
        assert torch.equal(model[0].weight, before["0.weight"])
    assert all(torch.equal(v, changed[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="boom"), ema.swapped_into(model):
        raise RuntimeError("boom")
    assert all(torch.equal(v, changed[k]) for k, v in model.state_dict().items())


def test_load_full_state_dict_round_trips_and_names_mismatches():
    model = _model()
    ema = ShardedEma(model, decay=0.9)
    with torch.no_grad():
        model[2].bias.add_(2.0)
    ema.update(model, step=3)
    saved = ema.full_state_dict(model)
    other = ShardedEma(model, decay=0.9)
    other.load_full_state_dict(model, saved)
    assert all(torch.equal(other.full_state_dict(model)[k], v) for k, v in saved.items())
    with pytest.raises(ValueError, match=r"missing \['2.bias'\]"):
        other.load_full_state_dict(model, {k: v for k, v in saved.items() if k != "2.bias"})
    with pytest.raises(ValueError, match=r"'2.bias' has shape \(4,\); the model's is \(3,\)"):
        other.load_full_state_dict(model, {**saved, "2.bias": torch.zeros(4)})
