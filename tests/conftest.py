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


#: Tests that take 20-50 s each on the 2-core CI machine (``--durations``): run first, so that the two xdist workers
#: do not end with one of them alone on a long multi-process or interpreter test while the other idles.
_SLOW_FIRST = ("test_train_ddp.py::", "test_kernels_sm90_compile.py::", "::test_interpreter_",
               "test_cli.py::test_failing_")  # fmt: skip


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not any(s in item.nodeid for s in _SLOW_FIRST))  # stable: the rest keep their order
