"""Every fixture of ../shared/golden that visionlin implements, reproduced within the fixture's tolerance."""

from __future__ import annotations

import importlib
import pkgutil

import golden_cases
import pytest
import torch
from golden_utils import GOLDEN_DIR, fixture_names, load_fixture, relative_error

CASES = {}
for _info in pkgutil.iter_modules(golden_cases.__path__):
    _mod = importlib.import_module(f"golden_cases.{_info.name}")
    for _name, _fn in _mod.CASES.items():
        assert _name not in CASES, f"golden case {_name} defined twice"
        CASES[_name] = _fn

# Fixtures whose mechanisms this release implements; each must exist in CASES when its folder is present.
IMPLEMENTED = [
    "infsa_linear_attention",
    "infsa_pure_attention",
    "infvit_example",
    "infvit_example_linear",
    "flatten_attention",
    "agent_attention",
    "agent_attention_window",
    "agent_deit",
    "inline_attention",
    "inline_deit",
    "rala_attention",
    "mala_attention",
    "nala_attention",
    "efficient_attention",
    "nat_attention",
    "dinat_attention",
    "nat",
    "dinat",
    "mambavision_mixer",
    "mambavision",
    "vig_mixer",
    "vig",
    "mavit",
    "ravlt",
    "nalaformer",
    "sla_attention",
    "linfusion_attention",
    "flatten_pvt",
    "agent_pvt",
    "flatten_swin",
    "agent_swin",
]


def test_golden_dir_present():
    assert GOLDEN_DIR.is_dir(), f"golden fixtures not found at {GOLDEN_DIR} (set VISIONLIN_GOLDEN_DIR)"


@pytest.mark.parametrize("name", [n for n in IMPLEMENTED if n in fixture_names()])
def test_golden_case_exists(name):
    assert name in CASES, f"fixture {name} has no golden case"


@pytest.mark.parametrize("name", sorted(n for n in CASES if n in fixture_names()))
def test_golden(name):
    spec, state_dict, io = load_fixture(name)
    torch.manual_seed(0)
    with torch.no_grad():
        ours = CASES[name](spec, state_dict, io)
    assert "output" in ours, "a golden case must return at least the output"
    tol = spec["tolerance"]
    errors = {key: relative_error(val, io[key]) for key, val in ours.items()}
    bad = {key: err for key, err in errors.items() if not err <= tol}
    assert not bad, f"{name}: relative errors above tolerance {tol}: {bad}"
