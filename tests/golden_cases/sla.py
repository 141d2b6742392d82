"""Golden case: SLA (thu-ml/SLA main branch) through the converter's SLA core and ``sparse_linear_attention``.

The authors' ``topk`` ratio is truncated to a block count (``int(0.5 * 5) = 2`` of 5 key blocks); ours rounds up
(``ceil``, at least one block), so the ratio is passed as ``count / blocks``. ``variant="code"`` is their main branch
(linear attention over all keys, ``1e-5`` in the denominator); ``variant="paper"`` with ``k_low = 0`` is the SLA-1
branch's complement linear attention (their ``io['output_sla1_semantics']``, which has no epsilon).
"""

from __future__ import annotations

import torch

from visionlin.convert._methods import SLACore, validate_options
from visionlin.kernels import block_sparse_attention, sla_block_map, sparse_linear_attention


def _sla(spec, state_dict, io):
    kw = spec["official_kwargs"]
    q, k, v = (io[n].transpose(1, 2) for n in ("q", "k", "v"))  # (B, H, L, D) -> heads-last
    blocks = -(-q.shape[1] // kw["BLKK"])
    topk = min(blocks, int(kw["topk"] * blocks)) / blocks
    options = validate_options(
        "sla", {"sparsity": 1.0 - topk, "variant": "code", "block_size": (kw["BLKQ"], kw["BLKK"]),
                "feature_map": kw["feature_map"]},
    )  # fmt: skip
    core = SLACore(options, kw["head_dim"]).eval()
    core.load_state_dict({"proj.weight": state_dict["proj_l.weight"], "proj.bias": state_dict["proj_l.bias"]})
    scale = kw["head_dim"] ** -0.5
    common = {"topk": topk, "block_q": kw["BLKQ"], "block_k": kw["BLKK"], "scale": scale}
    # The block selection itself: the authors' sparse_map (selected key blocks per query block), exactly.
    selected = sla_block_map(q, k, topk=topk, block_q=kw["BLKQ"], block_k=kw["BLKK"]) == 1
    assert torch.equal(selected, io["sparse_map"].bool()), "critical blocks differ from the authors' sparse_map"
    eye = torch.eye(kw["head_dim"])
    o_s = block_sparse_attention(q, k, v, **common)
    o_l = sparse_linear_attention(q, k, v, eye, k_low=0.0, variant="code", **common) - o_s
    sla1 = sparse_linear_attention(
        q, k, v, state_dict["proj_l.weight"], state_dict["proj_l.bias"], k_low=0.0, variant="paper", **common
    )
    out = {
        "output": core(q, k, v, scale),
        "output_sparse_branch": o_s,
        "output_linear_branch_before_proj": o_l,
        "output_sla1_semantics": sla1,
    }
    return {name: t.transpose(1, 2) for name, t in out.items()}


CASES = {"sla_attention": _sla}
