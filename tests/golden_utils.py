"""Loading the fixtures in ``../shared/golden`` (see its README) and comparing against them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(os.environ.get("VISIONLIN_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def fixture_names() -> list[str]:
    if not GOLDEN_DIR.is_dir():
        return []
    return sorted(p.name for p in GOLDEN_DIR.iterdir() if (p / "spec.json").is_file())


def load_fixture(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(spec, official_state_dict, io)`` of one fixture folder."""
    folder = GOLDEN_DIR / name
    spec = json.loads((folder / "spec.json").read_text())
    return spec, load_file(str(folder / "state_dict.safetensors")), load_file(str(folder / "io.safetensors"))


def relative_error(ours: torch.Tensor, saved: torch.Tensor) -> float:
    """The fixtures' metric: ``max |ours - saved| / std(saved)``."""
    assert ours.shape == saved.shape, (ours.shape, saved.shape)
    return ((ours.double() - saved.double()).abs().max() / saved.double().std()).item()
