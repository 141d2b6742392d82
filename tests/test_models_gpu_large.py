"""Inputs past 32-bit element offsets on the GPU: a class token's head at 2**31 elements of tokens.

The largest-input search on the H100 (``benchmarks/results/h100/s54/bench_largest_3eb2ba7.json``) stopped InfViT-S,
InLine-DeiT-S and Agent-DeiT-S with ``CUBLAS_STATUS_NOT_SUPPORTED`` from the head's ``F.linear`` at 40,960 px
(6.55 M tokens of width 384): the class token sliced out of the tokens kept their row stride, past 2**31 elements,
which cuBLASLt refuses (``h200/s54/probe_cublas2.log``). The pooled token is copied compact since (at batch 1, where
``.contiguous()`` would return the slice unchanged); this builds only the head's input (5.0 GB of bf16 tokens), not the
forward that would make it.
"""

from __future__ import annotations

import pytest
import timm
import torch

import visionlin  # noqa: F401  (registers the models)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_gpu_class_token_head_past_int32_row_stride():
    model = timm.create_model("infvit_small", num_classes=10).cuda().eval()
    width = model.num_features
    n = (40960 // 16) ** 2 + 1  # the tokens of a 40,960 px input and the class token: the failing run's shape
    tokens = torch.empty(1, n, width, device="cuda", dtype=torch.bfloat16)
    tokens[:, 0].normal_(generator=torch.Generator("cuda").manual_seed(0))
    tokens[:, 1:].zero_()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model.forward_head(tokens)
        row = torch.empty(1, width, device="cuda", dtype=torch.bfloat16).copy_(tokens[:, 0])  # strides (width, 1)
        expected = model.head(row)
    assert tokens[:, 0].stride(0) >= 2**31 and row.stride() == (width, 1) and logits.shape == (1, 10)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)  # the same product on the same values
