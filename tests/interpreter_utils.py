"""Running a kernel test script under Triton's interpreter (``TRITON_INTERPRET=1``) in a fresh Python process: the
interpreter has to be switched on before Triton is imported, so each file's CPU check of its Triton kernels runs as a
subprocess with the checkout and ``tests/`` on ``PYTHONPATH``, as pytest has them (its scripts import helpers from
``tests.<module>``, whose imports include this module)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_interpreter(script: str, timeout: int = 900, fast: bool = True) -> None:
    """Run ``script`` (Python source) under the interpreter; it must exit 0 and print ``interpreter ok``. ``fast``:
    with :func:`interpreter_fast.install`'s slice-wise reductions and scans."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    if fast:  # custom-combine reductions and scans on whole slices (tests/interpreter_fast.py: same values)
        script = "import interpreter_fast\ninterpreter_fast.install()\n" + script
    if os.environ.get("VISIONLIN_INTERP_PROFILE"):  # a directory: each script's cProfile lands there, named by test
        name = os.environ.get("PYTEST_CURRENT_TEST", "script").split(" ")[0].replace("/", "_").replace("::", "-")
        out = os.path.join(os.environ["VISIONLIN_INTERP_PROFILE"], name + ".prof")
        script = f"import cProfile\ncProfile.run(compile({script!r}, 'script', 'exec'), {out!r})\n"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, proc.stderr[-3000:]


def saved_for_backward(fn, *args, **kwargs) -> list:
    """``(shape, dtype)`` of every tensor autograd saves while ``fn(*args, **kwargs)`` runs, once per storage: what a
    training step keeps alive from the forward to the backward."""
    import torch

    seen, saved = set(), []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    return saved


def assert_fakes_match(fn) -> None:
    """``fn()`` (a tensor or a tuple of tensors, from custom ops) has the same shapes, strides and dtypes run for real
    as under ``FakeTensorMode``, which is what ``torch.compile`` trusts (real tensors may be passed in)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    def meta(out):
        return [(tuple(t.shape), t.stride(), t.dtype) for t in ((out,) if isinstance(out, torch.Tensor) else out)]

    real = meta(fn())
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = meta(fn())
    assert real == fake, (real, fake)


def assert_same_forward_backward(a, b, leaves) -> None:
    """``a`` and ``b``, one computation reached two ways (a custom op through the dispatcher and its eager bypass),
    are bitwise equal, and so are their gradients to ``leaves`` for one random output gradient."""
    import torch

    assert torch.equal(a, b)
    do = torch.randn_like(b)
    grads_a, grads_b = torch.autograd.grad(a, leaves, do), torch.autograd.grad(b, leaves, do)
    assert all(torch.equal(p, q) for p, q in zip(grads_a, grads_b, strict=True))
