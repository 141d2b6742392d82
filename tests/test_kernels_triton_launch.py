"""``visionlin.kernels.triton._launch.launch``: the cached launch path gives what Triton's own launcher gives, for
every argument pattern Triton specialises on (alignment, ints equal to 1 or divisible by 16, constexpr values passed
by position or keyword, launch options), and falls back to Triton's path where it cannot key a call."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from visionlin.kernels.triton import _launch  # noqa: E402

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@triton.jit
def _axpb_kernel(X, OUT, n, stride, scale, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs * stride, mask=mask).to(tl.float32)
    tl.store(OUT + offs, (x * scale + SHIFT).to(OUT.dtype.element_ty), mask=mask)


def _run(x: torch.Tensor, scale: float, shift: int, block: int = 64, positional: bool = False, **options):
    n = x.numel()
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, block),)
    if positional:
        _launch.launch(_axpb_kernel, grid, x, out, n, x.stride(0), scale, shift, block, **options)
    else:
        _launch.launch(_axpb_kernel, grid, x, out, n, x.stride(0), scale, SHIFT=shift, BLOCK=block, **options)
    return out


def _expected(x: torch.Tensor, scale: float, shift: int) -> torch.Tensor:
    return (x.float() * scale + shift).to(x.dtype)


@gpu
@needs_cuda
def test_cached_launch_matches_and_keys_every_specialisation(monkeypatch):
    """The second call of a pattern takes the cache (no new entry) and is right; each change Triton specialises on
    (dtype, a 2-byte-offset view's alignment, n = 1, n divisible by 16, a constexpr by position or keyword, num_warps)
    makes a new entry whose result is right, never a stale kernel's."""
    monkeypatch.setattr(_launch, "_COMPILED", {})
    base = torch.randn(4096 + 8, device="cuda")
    cases = [
        (base[:4096], 2.0, 1, {}),
        (base[:4096].half(), 2.0, 1, {}),
        (base.half()[1:4097], 2.0, 1, {}),  # 2-byte offset: a pointer not 16-byte aligned
        (base[:1], 0.5, 3, {}),  # n == 1
        (base[:4095], 0.5, 3, {}),  # n not divisible by 16
        (base[:4096], 2.0, 7, {}),  # another constexpr value
        (base[:4096], 2.0, 7, {"num_warps": 2}),
        (base[: 2 * 4096 : 2], -1.0, 0, {}),  # strided input: stride 2
    ]
    for x, scale, shift, options in cases:
        before = len(_launch._COMPILED)
        first = _run(x, scale, shift, **options)
        second = _run(x, scale, shift, **options)  # the cache hit
        assert len(_launch._COMPILED) == before + 1, (x.dtype, x.numel(), shift, options)
        torch.testing.assert_close(first, _expected(x, scale, shift), rtol=0, atol=0)
        torch.testing.assert_close(second, first, rtol=0, atol=0)
    # the same constexpr by position: the key holds values, not positions' specs
    torch.testing.assert_close(_run(base[:4096], 2.0, 5, positional=True), _expected(base[:4096], 2.0, 5))
    torch.testing.assert_close(_run(base[:4096], 2.0, 9, positional=True), _expected(base[:4096], 2.0, 9))


@gpu
@needs_cuda
def test_cached_launch_switch_off_and_unhashable_args_use_triton(monkeypatch):
    monkeypatch.setattr(_launch, "_COMPILED", {})
    x = torch.randn(300, device="cuda")
    monkeypatch.setitem(_launch.TUNING, "fast_launch", False)
    torch.testing.assert_close(_run(x, 3.0, 2), _expected(x, 3.0, 2))
    assert not _launch._COMPILED
    monkeypatch.setitem(_launch.TUNING, "fast_launch", True)
    _run(x, 3.0, 2)
    assert len(_launch._COMPILED) == 1


@gpu
@needs_cuda
def test_cached_launch_follows_the_current_stream():
    """A hit launches on the current stream, as Triton's launcher does."""
    x = torch.randn(1 << 20, device="cuda")
    _run(x, 2.0, 1)  # compile and cache
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # hold the side stream: a launch queued on it cannot have run yet
        out = _run(x, 2.0, 1)
        done = torch.cuda.Event()
        done.record()
    assert not done.query()  # queued behind the sleep, on the side stream
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _expected(x, 2.0, 1))


def test_launch_falls_back_for_objects_it_cannot_key(monkeypatch):
    """Anything that is not a plain ``@triton.jit`` function (the interpreter's functions, autotuners, a stand-in)
    is launched through its own ``[grid](...)``, with the arguments unchanged."""
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs)) or "launched"

    k = Kernel()
    assert _launch.launch(k, (3, 2), 1, "a", BLOCK=4) == "launched"
    assert calls == [((3, 2), (1, "a"), {"BLOCK": 4})]
    assert _launch._PARAMS[id(k)] is None


def test_spec_refines_tritons_integer_specialisation():
    spec = _launch._spec
    assert spec(1) != spec(17) and spec(16) != spec(17) and spec(16) == spec(32)
    assert spec(2**31) != spec(2**31 - 16) and spec(2**63) != spec(2**63 - 16)
    assert spec(True) != spec(False) and spec(1.0) == spec(2.5) and spec(None) is None
    assert spec((1, 16)) == (spec(1), spec(16))


def test_host_cdiv_and_next_pow2_match_triton():
    """The plain-Python grid helpers equal Triton's constexpr functions (which cost microseconds per host call)."""
    cdiv, next_pow2 = _launch.cdiv, _launch.next_pow2
    for a in [*range(0, 300), 32760, 2**31 - 1, 2**31, 2**40 + 3]:
        for b in (1, 3, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
        if a >= 1:
            assert next_pow2(a) == triton.next_power_of_2(a), a


@gpu
@needs_cuda
def test_cached_launch_calls_an_installed_launch_hook(monkeypatch):
    """A hit skips Triton's launch metadata and hooks only while none is installed: with a launch-enter hook (as
    profilers install one) every launch, hits included, reaches it; once it is removed, hits no longer do."""
    monkeypatch.setattr(_launch, "_COMPILED", {})
    x = torch.randn(1000, device="cuda")
    rt = triton.knobs.runtime
    seen = []

    def hook(metadata):
        seen.append(metadata)

    chain = rt.launch_enter_hook
    if hasattr(chain, "add"):  # Triton 3.6+: a chain of hooks
        monkeypatch.setattr(chain, "calls", list(chain.calls))  # the original list comes back at teardown
        chain.add(hook)

        def remove():
            chain.remove(hook)
    else:
        monkeypatch.setattr(rt, "launch_enter_hook", hook)

        def remove():
            monkeypatch.setattr(rt, "launch_enter_hook", None)

    assert not _launch._hooks_idle()
    for _ in range(3):
        torch.testing.assert_close(_run(x, 2.0, 1), _expected(x, 2.0, 1))
    assert len(seen) == 3 and len(_launch._COMPILED) == 1
    remove()
    assert _launch._hooks_idle()
    torch.testing.assert_close(_run(x, 2.0, 1), _expected(x, 2.0, 1))
    assert len(seen) == 3
