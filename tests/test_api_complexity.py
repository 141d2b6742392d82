"""visionlin.model_complexity: parameters and MACs on fake tensors, against hand-counted models and timm's own
model, and its bad-input errors."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import visionlin


class _ConvLinear(nn.Module):
    """3x3 conv 3 -> 8 (padding 1) then a linear 8 -> 5 on the pooled features: MACs counted by hand below."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_hand_counted_module_and_shape_forms():
    model = _ConvLinear().train()
    h, w = 10, 12
    r = visionlin.model_complexity(model, (h, w))
    assert r["params_m"] * 1e6 == pytest.approx(3 * 8 * 9 + 8 * 5 + 5)
    assert r["gmacs"] * 1e9 == pytest.approx(h * w * 8 * 3 * 9 + 8 * 5)
    assert model.training  # the mode is restored
    assert visionlin.model_complexity(model, 10)["gmacs"] * 1e9 == pytest.approx(10 * 10 * 8 * 27 + 40)
    assert all(p.device.type == "cpu" and not p.grad for p in model.parameters())


def test_name_equals_module_and_timm_attention_is_counted():
    by_name = visionlin.model_complexity("deit_tiny_patch16_224")
    by_module = visionlin.model_complexity(timm.create_model("deit_tiny_patch16_224"))
    assert by_name == pytest.approx(by_module)
    # DeiT-T's published 1.3 GFLOPs (MACs in the DeiT paper's convention) at 224 px, 5.7 M parameters
    assert by_name["gmacs"] == pytest.approx(1.26, rel=0.03) and by_name["params_m"] == pytest.approx(5.72, rel=0.01)
    # MACs grow with the tokens: the attention products are counted, not only the linear layers
    small = visionlin.model_complexity("deit_tiny_patch16_224", 224, dynamic_img_size=True)["gmacs"]
    large = visionlin.model_complexity("deit_tiny_patch16_224", 448, dynamic_img_size=True)["gmacs"]
    assert large > 4 * small


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((3,), {}, "model must be a model name or an nn.Module"),
        ((_ConvLinear(), 0), {}, r"img_size=0 must be a positive int"),
        ((_ConvLinear(), (8, 8, 8)), {}, r"must be a positive int or a pair"),
        ((_ConvLinear(), True), {}, r"img_size=True"),
        ((_ConvLinear(),), {}, r"img_size is needed: _ConvLinear has no pretrained_cfg"),
        ((_ConvLinear(), 8), {"num_classes": 3}, r"\['num_classes'\] only apply to a model name"),
        ((_ConvLinear(), 8), {"cpu_sdpa": "no"}, r"cpu_sdpa='no' must be True or False"),  # (was read as on)
        ((_ConvLinear().to("meta"), 8), {}, r"the module is on the meta device"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        visionlin.model_complexity(*args, **kwargs)


def test_cpu_sdpa_products_are_optional():
    with_attn = visionlin.model_complexity("deit_tiny_patch16_224")["gmacs"]
    without = visionlin.model_complexity("deit_tiny_patch16_224", cpu_sdpa=False)["gmacs"]
    tokens, dim, depth = 197, 192, 12
    assert (with_attn - without) * 1e9 == pytest.approx(2 * tokens * tokens * dim * depth)  # q k^T and p v per block


def test_input_follows_the_models_channels_dtype_and_size():
    """The fake image has the model's input channels (``in_chans=1``), its parameters' dtype (a half model) and, with
    no ``img_size``, the size it was built for (``img_size=64``, not the configuration's 224); numpy ints are sizes.
    Each of these failed or counted another size before."""
    import numpy as np

    at64 = visionlin.model_complexity("infvit_tiny", 64)["gmacs"]
    assert visionlin.model_complexity("infvit_tiny", np.int64(64))["gmacs"] == at64
    assert visionlin.model_complexity(timm.create_model("infvit_tiny", img_size=64))["gmacs"] == at64
    assert visionlin.model_complexity(timm.create_model("infvit_tiny").to(torch.bfloat16), 64)["gmacs"] == at64
    one = visionlin.model_complexity("infvit_tiny", 64, in_chans=1)
    assert one["gmacs"] < at64 and one["params_m"] < visionlin.model_complexity("infvit_tiny", 64)["params_m"]
    assert visionlin.model_complexity("nat_mini", 64, in_chans=1)["gmacs"] > 0
