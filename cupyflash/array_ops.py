"""The few array operations code shared by both faces needs, for torch tensors and NumPy-like arrays (CuPy on the
GPU; NumPy, whose API CuPy mirrors, for host checks) alike: such code is written once over `ops_for(x)`, and
neither library is imported unless an array of it is passed (the CuPy face runs without torch).

Everything else such code uses (reshape, indexing, comparisons, & | ~) is spelled the same in both libraries.
"""
from __future__ import annotations

import functools
import importlib


class TorchOps:
    def __init__(self):
        import torch
        import torch.nn.functional as F

        self._torch, self._F = torch, F

    def pad_end(self, x, rows: int, cols: int, value: float):
        """`x` with `rows` more entries at the end of its second-last dim and `cols` at the end of its last."""
        return self._F.pad(x, (0, cols, 0, rows), value=value)

    def minmax(self, x, axis: int):
        """(min, max) over `axis`, in one read of `x`."""
        return self._torch.aminmax(x, dim=axis)

    def amin(self, x, axis: int):
        return x.amin(dim=axis)

    def amax(self, x, axis: int):
        return x.amax(dim=axis)

    def all(self, x, axis: int):
        return x.all(dim=axis)

    def where(self, cond, a, b):
        return self._torch.where(cond, a, b)

    def float32(self, x):
        return x.to(self._torch.float32)

    def int8(self, x):
        return x.to(self._torch.int8)


class NumpyLikeOps:
    """`xp`: the cupy or numpy module."""

    def __init__(self, xp):
        self._xp = xp

    def pad_end(self, x, rows: int, cols: int, value: float):
        widths = [(0, 0)] * (x.ndim - 2) + [(0, rows), (0, cols)]
        return self._xp.pad(x, widths, mode="constant", constant_values=value)

    def minmax(self, x, axis: int):
        # Two reads of `x`: neither library has a fused min-max reduction.
        return x.min(axis=axis), x.max(axis=axis)

    def amin(self, x, axis: int):
        return x.min(axis=axis)

    def amax(self, x, axis: int):
        return x.max(axis=axis)

    def all(self, x, axis: int):
        return x.all(axis=axis)

    def where(self, cond, a, b):
        return self._xp.where(cond, a, b)

    def float32(self, x):
        return x.astype(self._xp.float32, copy=False)

    def int8(self, x):
        return x.astype(self._xp.int8)


@functools.lru_cache(maxsize=None)
def _ops_for_library(library: str):
    if library == "torch":
        return TorchOps()
    return NumpyLikeOps(importlib.import_module(library))


def ops_for(x) -> TorchOps | NumpyLikeOps:
    """The operations for `x`'s library: a torch.Tensor, cupy.ndarray or numpy.ndarray."""
    library = type(x).__module__.partition(".")[0]
    if library not in ("torch", "cupy", "numpy"):
        raise TypeError(f"expected a torch.Tensor, cupy.ndarray or numpy.ndarray, got "
                        f"{type(x).__module__}.{type(x).__name__}")
    return _ops_for_library(library)
