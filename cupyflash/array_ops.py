"""The few array operations code shared by both faces needs, for torch tensors and NumPy-like arrays (CuPy on the
GPU; NumPy, whose API CuPy mirrors, for host checks) alike: such code is written once over `ops_for(x)`, and
neither library is imported unless an array of it is passed (the CuPy face runs without torch). The CUDA path of both
faces (cupyflash/cuda_path.py) reads arrays through the adapter methods of TorchOps and CupyOps: address, strides in
elements, dtype name, device, allocation on the array's device and the library's current stream.

Everything else such code uses (reshape, indexing, comparisons, & | ~) is spelled the same in both libraries.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import math


def token_major_strides(shape) -> tuple:
    """The strides (in elements) of a (B, H, N, D) array whose memory is (B, N, H, D): `.transpose(1, 2)` of it is
    contiguous. The torch face's dq, dk and dv have it, and its out where the caller asks (as SDPA's outputs): models
    make q, k and v as views (B, N, H, D) → (B, H, N, D) of a projection and take the output back the same way
    (nanoGPT, transformers), so neither the gradients nor the output need a transpose copy. One fixed layout, not the
    input's (torch.empty_like's order of symbolic strides was fixed at trace time under dynamic shapes)."""
    _, heads, n, d = shape
    return (n * heads * d, d, heads * d, 1)


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

    # ---- the CUDA path's adapter
    def address(self, x) -> int:
        return x.data_ptr()

    def strides(self, x) -> tuple:
        return x.stride()

    def dtype_name(self, x) -> str:
        return str(x.dtype).removeprefix("torch.")

    def signature(self, x) -> tuple:
        """What a call's plan reads of an input: shape, strides, dtype, device, address modulo 16."""
        return x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15

    def device_id(self, x) -> int:
        return x.device.index

    def on_device(self, x):
        return contextlib.nullcontext()  # torch allocates on `like`'s device, launches name theirs

    def empty(self, shape, dtype: str, like):
        return self._torch.empty(shape, dtype=getattr(self._torch, dtype), device=like.device)

    def zeros(self, shape, dtype: str, like):
        return self._torch.zeros(shape, dtype=getattr(self._torch, dtype), device=like.device)

    def allocator(self, shape, dtype: str, like):
        """A function of no arguments that returns a new contiguous `shape` array on `like`'s device: for a call
        repeated with one layout. Its arguments bound once and `size=` (torch parses a positional tuple against
        more overloads) make it 2.2 µs on the CPU stub, where empty() is 5."""
        return functools.partial(self._torch.empty, size=tuple(shape), dtype=getattr(self._torch, dtype),
                                 device=like.device)

    def token_major_allocator(self, shape, dtype: str, like):
        """allocator's twin for a (B, H, N, D) `shape` whose memory is (B, N, H, D) (token_major_strides)."""
        return functools.partial(self._torch.empty_strided, tuple(shape), token_major_strides(shape),
                                 dtype=getattr(self._torch, dtype), device=like.device)

    def grad_allocator(self, a):
        """New gradients of `a`: (B, H, N, D) tensors shaped like it, on its device, in (B, N, H, D) memory."""
        return self.token_major_allocator(a.shape, self.dtype_name(a), a)

    def contiguous(self, x):
        return x.contiguous()

    def copy_into(self, dst, src):
        return dst.copy_(src)

    def fresh_copy(self, x):
        """A contiguous copy in a new allocation (aligned as the allocator aligns), even of a contiguous `x`."""
        return x.clone(memory_format=self._torch.contiguous_format)

    def is_bool(self, x) -> bool:
        return x.dtype == self._torch.bool

    def astype(self, x, dtype: str):
        return x.to(getattr(self._torch, dtype))

    def mask_as_bias(self, mask, like):
        """A keep-mask (True = keep) as the additive 0 / -inf bias in `like`'s dtype."""
        return self._torch.where(mask, self._torch.zeros((), dtype=like.dtype, device=like.device),
                                 self._torch.full((), float("-inf"), dtype=like.dtype, device=like.device))

    def stream_ptr(self, device_id: int) -> int:
        """torch's current stream on the device, as the raw cudaStream_t. torch._C._cuda_getCurrentRawStream is what
        Inductor's generated code calls before each launch: 0.2 µs, where torch.cuda.current_stream(device) builds a
        Stream object first (6 µs on an H100's host, benchmarks/results/host-overhead-NVIDIA_H100_80GB_HBM3.log)."""
        raw = getattr(self._torch._C, "_cuda_getCurrentRawStream", None)
        return raw(device_id) if raw is not None else self._torch.cuda.current_stream(device_id).cuda_stream


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


class CupyOps(NumpyLikeOps):
    """CuPy arrays, with the CUDA path's adapter: allocations on the current device (on_device enters the array's),
    kernels on CuPy's current stream."""

    def __init__(self):
        super().__init__(importlib.import_module("cupy"))

    def address(self, x) -> int:
        return x.data.ptr

    def strides(self, x) -> tuple:
        return tuple(s // x.itemsize for s in x.strides)

    def dtype_name(self, x) -> str:
        return str(x.dtype)

    def signature(self, x) -> tuple:
        """What a call's plan reads of an input: shape, strides, dtype, device, address modulo 16."""
        return x.shape, x.strides, x.dtype, x.device.id, x.data.ptr & 15

    def device_id(self, x) -> int:
        return x.device.id

    def on_device(self, x):
        return x.device

    def empty(self, shape, dtype: str, like):
        return self._xp.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype: str, like):
        return self._xp.zeros(shape, dtype=dtype)

    def allocator(self, shape, dtype: str, like):
        return functools.partial(self._xp.empty, tuple(shape), dtype=dtype)

    def grad_allocator(self, a):
        """New contiguous arrays shaped like `a` (the CuPy face's gradients), on the current device."""
        return functools.partial(self._xp.empty, tuple(a.shape), dtype=a.dtype)

    def contiguous(self, x):
        return self._xp.ascontiguousarray(x)

    def copy_into(self, dst, src):
        dst[...] = src
        return dst

    def fresh_copy(self, x):
        return x.copy(order="C")

    def is_bool(self, x) -> bool:
        return x.dtype == self._xp.bool_

    def astype(self, x, dtype: str):
        return x.astype(dtype, copy=False)

    def mask_as_bias(self, mask, like):
        xp = self._xp
        return xp.where(mask, xp.zeros((), dtype=like.dtype), xp.full((), -math.inf, dtype=like.dtype))

    def stream_ptr(self, device_id: int) -> int:
        return self._xp.cuda.get_current_stream().ptr


@functools.lru_cache(maxsize=None)
def _ops_for_library(library: str):
    if library == "torch":
        return TorchOps()
    if library == "cupy":
        return CupyOps()
    return NumpyLikeOps(importlib.import_module(library))


def ops_for(x) -> TorchOps | NumpyLikeOps:
    """The operations for `x`'s library: a torch.Tensor, cupy.ndarray or numpy.ndarray."""
    library = type(x).__module__.partition(".")[0]
    if library not in ("torch", "cupy", "numpy"):
        raise TypeError(f"expected a torch.Tensor, cupy.ndarray or numpy.ndarray, got "
                        f"{type(x).__module__}.{type(x).__name__}")
    return _ops_for_library(library)
