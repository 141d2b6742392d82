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


def _long(item: pytest.Item) -> bool:
    """Tests that take tens of seconds on 2 CPU cores: Triton's interpreter, several processes, ptxas."""
    return (
        "interpreter" in item.name
        or item.get_closest_marker("multiprocess") is not None
        or item.get_closest_marker("slow") is not None
        or item.path.name == "test_kernels_sm90_compile.py"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long tests first (otherwise in collection order): under ``-n 2`` a long test collected last kept one worker
    busy minutes after the other ran out of work. (The Makefile's ``--maxschedchunk 2`` hands tests out two at a time;
    xdist's default first hands each worker a quarter of its share in one block, all the long tests to one worker.)"""
    items.sort(key=lambda item: not _long(item))
