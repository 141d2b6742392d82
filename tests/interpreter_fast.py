"""Triton's interpreter runs a ``tl.reduce`` or ``tl.associative_scan`` with a combine function of its own
(multi-value reductions such as the focusing kernel's row sums, the selective scan's affine pairs) one element at a
time in Python, which took two thirds of some interpreter scripts' time. A combine function is elementwise by Triton's
definition, so the same left fold (reduce) or running fold (scan) can call it on whole slices across the axis, in the
same order, giving the same values: :func:`install` swaps that in for the interpreter's slow fallbacks. The fast cases
(sum, min, max, argmin, argmax, cumsum, cumprod) are Triton's own and untouched. It also patches the language once
per launch instead of once per ``@triton.jit`` helper call (:func:`_once_per_launch`) and builds the dtype table once
(:func:`_memoised_np_dtype`). If Triton's interpreter no longer has what a piece replaces, that piece is left alone
(the slow path is correct, only slower)."""

from __future__ import annotations

import numpy as np


def install() -> bool:
    """Replace ``ReduceOps.generic_reduce`` and ``ScanOps.generic_scan`` in Triton's interpreter, and wrap its
    ``_patch_lang`` and ``_get_np_dtype`` where it has them; ``False`` (nothing changed) when it has no reduce / scan
    fallbacks to replace."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    if not all(hasattr(c, m) for c, m in ((ti.ReduceOps, "generic_reduce"), (ti.ScanOps, "generic_scan"))):
        return False

    def combine(op, acc, new, dtypes):
        """One combine call on slices; values cast back to the inputs' dtypes, as the element loop stores them."""
        tensors = [op.to_tensor(a, t) for a, t in zip(acc + new, dtypes + dtypes, strict=True)]
        out = op.combine_fn.fn(*tensors)
        out = out if isinstance(out, tuple) else (out,)
        return [
            (o.handle.data if isinstance(o, ti.tl.core.tensor) else np.asarray(o))
            .astype(a.dtype, copy=False)
            .reshape(a.shape)
            for o, a in zip(out, acc, strict=True)
        ]

    def generic_reduce(self, input):
        original_axis = self.axis
        input, axis = self.unravel(input, self.axis)
        dtypes = [x.dtype for x in input]
        data = [np.moveaxis(x.handle.data, axis, 0) for x in input]
        acc = [d[0].copy() for d in data]
        for i in range(1, data[0].shape[0]):
            acc = combine(self, acc, [d[i] for d in data], dtypes)
        ret = []
        for a, x in zip(acc, input, strict=True):
            if self.keep_dims:
                a = np.expand_dims(a, axis) if original_axis is not None else a.reshape((1,) * x.handle.data.ndim)
            elif original_axis is None:
                a = a.item()
            ret.append(self.to_tensor(a, x.dtype))
        return ret

    def generic_scan(self, input):
        dtypes = [x.dtype for x in input]
        data = [np.moveaxis(x.handle.data, self.axis, 0) for x in input]
        out = [np.empty_like(d) for d in data]
        acc = [d[0].copy() for d in data]
        for o, a in zip(out, acc, strict=True):
            o[0] = a
        for i in range(1, data[0].shape[0]):
            acc = combine(self, acc, [d[i] for d in data], dtypes)
            for o, a in zip(out, acc, strict=True):
                o[i] = a
        return [self.to_tensor(np.moveaxis(o, 0, self.axis), t) for o, t in zip(out, dtypes, strict=True)]

    ti.ReduceOps.generic_reduce = generic_reduce
    ti.ScanOps.generic_scan = generic_scan
    if hasattr(ti, "_patch_lang") and hasattr(ti, "_LangPatchScope"):
        ti._patch_lang = _once_per_launch(ti, ti._patch_lang)
    if hasattr(ti, "_get_np_dtype"):
        ti._get_np_dtype = _memoised_np_dtype(ti, ti._get_np_dtype)
    return True


def _once_per_launch(ti, patch_lang):
    """The interpreter patches ``triton.language`` for a launch and again for every ``@triton.jit`` helper call inside
    it (``inspect.getmembers`` over the language modules each time: a fifth to two fifths of some scripts' time). The
    second patching changes nothing (patched members are no longer builtins), so a helper whose language modules the
    running launch (or an earlier helper in it) has already patched skips it; the launch's own patching and restore
    are unchanged."""
    import inspect

    tl = ti.tl
    active = []  # the language modules the running launch patched (one entry while a launch runs)

    seen = {}  # (function, size of its globals) -> the language modules among them (the interpreter adds names)

    def langs(fn):
        key = (fn, len(fn.__globals__))
        if key not in seen:
            seen[key] = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}
        return seen[key]

    def patched(fn):
        mods = langs(fn)
        if active and mods and mods <= active[-1]:
            return ti._LangPatchScope()  # nothing changed, nothing to restore
        scope = patch_lang(fn)
        if active:  # a helper in a module the launch had not patched (Triton's own jit functions, over tl.core)
            active[-1] = active[-1] | mods  # its patching is never restored, so it too holds until the launch ends
        else:  # a launch (helpers are only called inside one): remembered until its restore
            active.append(mods)
            restore = scope.restore

            def restore_and_forget():
                active.clear()
                restore()

            scope.restore = restore_and_forget
        return scope

    return patched


def _memoised_np_dtype(ti, get_np_dtype):
    """``_get_np_dtype`` builds its table of 19 types on every call (hundreds of thousands of calls per script); the
    same answers from a table built once, and the original for anything not in it."""
    tl = ti.tl
    names = [
        "int1",
        "float16",
        "float32",
        "float64",
        "int8",
        "uint8",
        "int16",
        "uint16",
        "int32",
        "uint32",
        "int64",
        "uint64",
        "bfloat16",
    ]
    names += ["float8e5", "float8e5b16", "float8e4nv", "float8e4b8", "float8e4b15"]
    table = {getattr(tl, n): get_np_dtype(getattr(tl, n)) for n in names if hasattr(tl, n)}

    def np_dtype(tt_dtype):
        if isinstance(tt_dtype, tl.pointer_type):
            return get_np_dtype(tt_dtype)
        key = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        found = None if isinstance(key, tl.pointer_type) else table.get(key)
        return get_np_dtype(tt_dtype) if found is None else found

    return np_dtype
