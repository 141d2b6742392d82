import os
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


@pytest.fixture(autouse=True)
def _release_cuda_cache(request: pytest.FixtureRequest):
    """Under xdist on the GPU machine (``gpu_check.sh`` runs the ``gpu`` tests with up to 12 workers on one card) each
    worker's caching allocator would keep the peak of every test it ran: at 12 workers s52's first shard ran the card
    out of memory (20 tests, plus 7 'unknown error's in the workers whose module loads had failed). Each ``gpu`` test
    hands its cached blocks back when it ends, so the card holds only what the running tests use."""
    yield
    if (
        os.environ.get("PYTEST_XDIST_WORKER")
        and request.node.get_closest_marker("gpu") is not None
        and torch.cuda.is_initialized()
    ):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


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
