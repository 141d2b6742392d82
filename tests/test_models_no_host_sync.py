"""No registered model's CUDA forward path reads tensor values on the host (a host sync stalls the launch queue: on a
GPU every one costs the overlap of host and device work).

Each model runs on fake CUDA tensors (``FakeTensorMode``: no GPU needed; the Triton backends are chosen as on a GPU
and their custom ops run their fake implementations), in eval and train mode under bf16 autocast. A fake tensor has no
values: any operation that needs them (``.item()``, ``bool(tensor)``, boolean indexing, ``nonzero``) raises. The
kernels' eager value checks, which skip fake tensors by design, are forced on here, so that a check a model's layer
triggers on every forward (a sync per call on a GPU) fails the test too. Backward is not covered: autograd's engine
needs a real CUDA device.
"""

from __future__ import annotations

import pytest
import torch
from test_models import MODELS, _create
from torch._subclasses.fake_tensor import FakeTensorMode


@pytest.mark.parametrize("name", MODELS)
def test_cuda_forward_reads_no_values(name, monkeypatch):
    from visionlin.kernels import _common, scan

    monkeypatch.setattr(_common, "values_are_checkable", lambda *t: True)
    monkeypatch.setattr(scan, "values_are_checkable", lambda *t: True)
    model = _create(name)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to("cuda")
        x = torch.randn(2, 3, 64, 64, device="cuda")
        for train in (False, True):
            model.train(train)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            assert out.shape == (2, model.num_classes) and out.device.type == "cuda"
