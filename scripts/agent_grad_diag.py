"""Agent-DeiT-T's parameter gradients per agent-attention backend and precision against the float32 reference
backend (one step, batch 4, 224 px): the fused kernels in float32 (a kernel error shows at ~1e-3 and above), and
SDPA / the fused kernels under bf16 autocast, per parameter, worst first. A diagnostic for the GPU machine."""

import sys

import timm
import torch

import visionlin  # noqa: F401  (registers the models)
from visionlin.kernels import agent as agent_op


def grads(model, x, backend, autocast):
    for mod in model.modules():
        if hasattr(mod, "agent_num"):
            mod.backend = backend
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        model(x).float().square().mean().backward()
    return {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    agent_op.TRITON_BACKWARD = True
    name = sys.argv[1] if len(sys.argv) > 1 else "agent_deit_tiny"
    torch.manual_seed(0)
    model = timm.create_model(name).cuda().train()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    ref = grads(model, x, "reference", False)
    runs = {"fused32": grads(model, x, "triton", False), "sdpa32": grads(model, x, "sdpa", False),
            "sdpa_bf16": grads(model, x, "sdpa", True), "fused_bf16": grads(model, x, "triton", True)}  # fmt: skip
    rows = [(n, {k: rel(g[n], ref[n]) for k, g in runs.items()}, ref[n].norm().item()) for n in ref]
    rows.sort(key=lambda r: -r[1]["fused_bf16"])
    for k in runs:
        errs = sorted(r[1][k] for r in rows)
        print(f"{k}: max {errs[-1]:.2e}, median {errs[len(errs) // 2]:.2e}")
    for n, e, norm in rows[:14]:
        print(f"{n:40s} |g| {norm:.2e} " + " ".join(f"{k} {v:.2e}" for k, v in e.items()))


if __name__ == "__main__":
    main()
