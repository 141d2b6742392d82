import sys
from pathlib import Path

import pytest
import torch

# tests/ (helper modules such as golden_utils) and the checkout (the benchmarks package, imported by the tests of the
# benchmark scripts)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state: a result never depends on test order or luck."""
    torch.manual_seed(0)
