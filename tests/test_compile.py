"""``torch.compile`` over every registered token mixer inside a tiny isotropic model.

``fullgraph=True`` proves there is no graph break (no host sync, no untraceable Python); the ``aot_eager`` backend
traces forward and backward through AOTAutograd with fake tensors, which is what Inductor consumes, without paying
for C++ code generation on CI's 2 cores.
"""

from __future__ import annotations

import pytest
import torch

from visionlin.layers import ATTN_LAYERS
from visionlin.models.vit import EfficientVisionTransformer

# Keywords a mechanism needs in a 32-wide, 2-head (head_dim 16) model.
EXTRA = {"agent": {"agent_num": 4}}


@pytest.mark.parametrize("attn", sorted(ATTN_LAYERS))
def test_compile_fullgraph(attn):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = EfficientVisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=5,
        attn_layer=attn,
        attn_kwargs=EXTRA.get(attn, {}),
    )
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
