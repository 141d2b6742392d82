"""What a training step asks of the GPU besides its kernels, without a GPU: the ATen graphs of one forward + backward
(as ``torch.compile`` hands them to its backend, or as eager autograd runs them), their non-view ops by target with
the bytes of their outputs, per model and per switch setting.

The step runs on ``meta`` tensors standing in for CUDA ones (bfloat16 weights, floating buffers and input, no
autocast: a meta device has none), so each layer takes the path it takes on a GPU: the Triton custom ops are selected
(their ``supports()`` sees a device they accept) and stay opaque nodes, while the PyTorch glue around them (casts,
copies, concatenations, sums of gradients) shows op by op. Compiled, these are the graphs Inductor receives, before
its fusions: a count of what there is to fuse or remove, not a timing (``profile_models.py`` on a GPU gives those).
Memory formats follow the meta kernels, which may differ from cuDNN's choices (a convolution's output layout, hence
the copies after it), and dense softmax attention decomposes into ``bmm`` / ``softmax`` with copies of its operands
(no flash kernel on meta): such rows need a GPU profile to confirm.

Usage:
    python benchmarks/graph_audit.py --models vig_small --toggles gla:qkv_packed [--mode compiled] [--batch 128]
        [--out DIR]

``--mode compiled`` (the default): the forward and backward graphs ``torch.compile`` hands its backend
(AOTAutograd's, functionalized, what Inductor fuses); ``--mode eager``: the step as eager autograd runs it.

``--toggles module:key`` (repeatable, comma-separated) names ``visionlin.layers.<module>.FAST_PATHS[key]`` switches:
each model is traced with every named switch off, then on. Writes ``graph_audit.json`` (rows: model, switches, ops,
output MiB, the targets by bytes; meta: command, commit, date, versions) and prints a table per row.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._plot import finish  # noqa: E402
from visionlin.train.bench import run_meta  # noqa: E402

#: Ops that only re-describe a tensor (no kernel, no bytes written): left out of the counts.
VIEWS = frozenset(
    {"aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.expand.default", "aten.transpose.int",
     "aten.permute.default", "aten.alias.default", "aten.split.Tensor", "aten.split_with_sizes.default",
     "<built-in function getitem>", "aten.slice.Tensor", "aten.unsqueeze.default", "aten.squeeze.dim",
     "aten.unbind.int", "aten.select.int", "aten.as_strided.default", "aten.detach.default", "aten.unflatten.int"}
)  # fmt: skip


@contextlib.contextmanager
def meta_as_cuda() -> Iterator[None]:
    """Within the context, the Triton backends accept ``meta`` tensors as CUDA ones (``supports()`` only: nothing is
    launched, the custom ops' fake implementations run), ``Tensor.is_cuda`` is true on ``meta`` (the layers' own
    fast-path checks: the fused RoPE pair, the channels-last stems), also as dynamo answers it while tracing (from the
    traced device, not through the property), and autocast counts as off on ``meta``. Checks of
    ``device.type == "cuda"`` still see ``"meta"`` (NATTEN's and FlexAttention's backends: not chosen on a GPU either
    where the Triton one runs)."""
    from torch._dynamo.variables.base import VariableTracker
    from torch._dynamo.variables.tensor import TensorVariable

    import visionlin.kernels.triton as kt

    unavailable, autocast_enabled = kt.triton_unavailable, torch.is_autocast_enabled
    own_is_cuda = "is_cuda" in torch.Tensor.__dict__  # (normally inherited from torch._C.TensorBase)
    previous_is_cuda = torch.Tensor.__dict__.get("is_cuda")

    def triton_unavailable(*tensors: torch.Tensor) -> list[str]:
        if all(t.device.type in ("cuda", "meta") for t in tensors):
            return [r for r in unavailable(*tensors) if "CUDA" not in r]
        return unavailable(*tensors)

    def is_autocast_enabled(*args) -> bool:
        return False if args and str(args[0]).startswith("meta") else autocast_enabled(*args)

    dynamo_is_cuda = TensorVariable.method_attr_is_cuda

    def method_attr_is_cuda(self, tx):
        if self.device is not None and self.device.type == "meta":
            return VariableTracker.build(tx, True)
        return dynamo_is_cuda(self, tx)

    kt.triton_unavailable, torch.is_autocast_enabled = triton_unavailable, is_autocast_enabled
    torch.Tensor.is_cuda = property(lambda self: self.device.type in ("cuda", "meta"))
    TensorVariable.method_attr_is_cuda = method_attr_is_cuda
    try:
        yield
    finally:
        kt.triton_unavailable, torch.is_autocast_enabled = unavailable, autocast_enabled
        TensorVariable.method_attr_is_cuda = dynamo_is_cuda
        if own_is_cuda:
            torch.Tensor.is_cuda = previous_is_cuda
        else:
            del torch.Tensor.is_cuda


@contextlib.contextmanager
def switches(toggles: list[str], on: bool) -> Iterator[None]:
    """``visionlin.layers.<module>.FAST_PATHS[key]`` set to ``on`` for each ``module:key`` in ``toggles``, restored
    afterwards (a ``ValueError`` names a malformed or unknown one)."""
    tables = []
    for toggle in toggles:
        module, _, key = toggle.partition(":")
        try:
            table = importlib.import_module(f"visionlin.layers.{module}").FAST_PATHS
        except (ImportError, AttributeError):
            table = None
        if table is None or key not in table:
            raise ValueError(
                f"graph_audit: toggle {toggle!r} names no visionlin.layers.<module>.FAST_PATHS[key] switch"
            )
        tables.append((table, key, table[key]))
    try:
        for table, key, _ in tables:
            table[key] = on
        yield
    finally:
        for table, key, old in tables:
            table[key] = old


MODES = ("eager", "compiled")


def audit(name: str, batch: int, size: int, top: int = 25, mode: str = "eager", **model_kwargs) -> dict:
    """The non-view ops of ``name``'s training step (forward, a sum of the logits, backward to every parameter) at
    ``batch`` x 3 x ``size`` x ``size`` on meta tensors: their count, the MiB of their outputs, and the ``top`` targets
    by output bytes (``model_kwargs`` go to ``timm.create_model``). ``mode`` ``"eager"``: the step as autograd runs
    it (``make_fx`` of forward and backward, one graph); ``"compiled"``: the forward and backward graphs
    ``torch.compile(fullgraph=True)`` hands its backend (AOTAutograd's, functionalized: in-place ops become
    ``*_scatter`` / ``copy``), per graph under ``"graphs"`` and summed."""
    import timm

    import visionlin  # noqa: F401 (registers the models)

    if mode not in MODES:
        raise ValueError(f"graph_audit: mode={mode!r}; allowed {MODES}")
    model = timm.create_model(name, **model_kwargs).train()
    with meta_as_cuda():
        x = torch.empty(batch, 3, size, size, device="meta", dtype=torch.bfloat16)
        graphs = _compiled_graphs(model, x) if mode == "compiled" else {"joint": _eager_graph(model, x)}
    tallies = {kind: _tally(graph) for kind, graph in graphs.items()}
    count, written = collections.Counter(), collections.Counter()
    for c, w in tallies.values():
        count.update(c)
        written.update(w)
    result = _summary(count, written, top)
    if mode == "compiled":
        result["graphs"] = {kind: _summary(c, w, top) for kind, (c, w) in tallies.items()}
    return result


def _eager_graph(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.Graph:
    from torch.fx.experimental.proxy_tensor import make_fx

    params = {
        k: torch.empty(v.shape, dtype=torch.bfloat16, device="meta", requires_grad=True)
        for k, v in model.named_parameters()
    }
    buffers = {k: v.to("meta", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in model.named_buffers()}

    def step(params, x):
        out = torch.func.functional_call(model, {**params, **buffers}, (x,))
        return torch.autograd.grad(out.float().sum(), list(params.values()))

    return make_fx(step)(params, x).graph


def _compiled_graphs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.fx.Graph]:
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.Graph] = []

    def keep(gm, _inputs):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    model = model.to("meta", torch.bfloat16)
    with torch.no_grad():  # bad input (a size the model refuses) raises its own error here, not inside dynamo's trace
        model(x)
    compiled = torch.compile(model, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x).float().sum().backward()
    torch._dynamo.reset()
    if len(graphs) != 2:
        raise RuntimeError(f"graph_audit: expected one forward and one backward graph, got {len(graphs)}")
    return dict(zip(("forward", "backward"), graphs, strict=True))


def _tally(graph: torch.fx.Graph) -> tuple[collections.Counter, collections.Counter]:
    """Non-view ops by target in ``graph``: their count and the bytes of their outputs."""
    count, written = collections.Counter(), collections.Counter()
    for node in graph.nodes:
        if node.op != "call_function" or str(node.target) in VIEWS:
            continue
        val = node.meta.get("val")
        outs = val if isinstance(val, (tuple, list)) else [val]
        count[str(node.target)] += 1
        written[str(node.target)] += sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
    return count, written


def _summary(count: collections.Counter, written: collections.Counter, top: int) -> dict:
    ranked = sorted(count, key=lambda t: (-written[t], t))[:top]
    return {
        "ops": sum(count.values()),
        "output_mib": round(sum(written.values()) / 2**20, 1),
        "targets": [{"target": t, "count": count[t], "output_mib": round(written[t] / 2**20, 1)} for t in ranked],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vig_small", help="comma-separated timm names")
    parser.add_argument("--toggles", action="append", default=[], help="module:key switches (repeatable)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--top", type=int, default=25, help="targets kept per row")
    parser.add_argument("--mode", choices=MODES, default="compiled", help="the graphs to audit (see audit())")
    parser.add_argument("--out", type=Path, default=None, help="directory for graph_audit.json")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.size < 1 or args.top < 1:
        parser.error(f"--batch, --size and --top must be >= 1, got {args.batch}, {args.size}, {args.top}")
    toggles = [t for group in args.toggles for t in group.split(",") if t]
    with switches(toggles, False):  # every named switch checked before the first trace
        pass
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        for on in [False, True] if toggles else [False]:
            with switches(toggles, on):
                row = {"model": name, "switches": {t: on for t in toggles}, "mode": args.mode}
                row |= audit(name, args.batch, args.size, args.top, mode=args.mode)
            rows.append(row)
            print(f"{name} {row['switches']} ({args.mode}): {row['ops']} ops, {row['output_mib']:.0f} MiB of outputs")
            for kind, graph in row.get("graphs", {}).items():
                print(f"  {kind}: {graph['ops']} ops, {graph['output_mib']:.0f} MiB")
            for t in row["targets"]:
                print(f"  {t['output_mib']:9.1f} MiB  x{t['count']:4d}  {t['target']}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        command = " ".join(["graph_audit.py", *(argv if argv is not None else sys.argv[1:])])
        meta = run_meta(
            command, "cpu", batch=args.batch, size=args.size, mode=args.mode, device_traced="meta (as cuda)"
        )
        result = {"meta": meta, "rows": rows}
        (args.out / "graph_audit.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(result, args.out / "graph_audit.png")
    return rows


def _label(row: dict) -> str:
    name = row["model"].split("_patch")[0]  # timm's long names: swin_tiny_patch4_window7_224 -> swin_tiny
    if not row["switches"]:
        return name
    return f"{name} ({'on' if any(row['switches'].values()) else 'off'})"


def plot(result: dict, path: Path) -> None:
    """Two panels of horizontal bars, one per (model, switches) row: non-view ops, and MiB of their outputs
    (``--out``'s PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [_label(r) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.28 * len(rows)), sharey=True)
    for ax, key, title in zip(axes, ("ops", "output_mib"), ("non-view ATen ops", "MiB of op outputs"), strict=True):
        bars = ax.barh(range(len(rows)), [r[key] for r in rows])
        ax.bar_label(bars, fmt="{:.0f}", fontsize=6)
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(f"training step, {title}", fontsize=8)
    axes[0].invert_yaxis()  # (the axes share y: once) the first row on top
    toggles = sorted({t for r in rows for t in r["switches"]})
    finish(fig, result, path, note=f" (meta trace, before Inductor; on / off: {', '.join(toggles) or 'none'})")


if __name__ == "__main__":
    main()
