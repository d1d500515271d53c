"""Kernel launches through the CUDA driver's cuLaunchKernel, each kernel's argument block packed once.

CuPy's kernel call converts every argument from a Python object at each launch, and our kernels take 20–55 of
them; a plan's launch (cupyflash/plan.py) passes the same values at every call but its buffers' addresses. So
``ArgBlock`` packs the values once into the driver's kernelParams form (one host buffer, one pointer per
argument) and a call writes only the address slots before ``launch``. The kernels' handles come from CuPy's
modules (cupyflash/jit.py); torch, CuPy and the driver share the device's primary context, so the launch sees
the same context and stream as a CuPy launch would.
"""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np


def _raw(value, index: int) -> bytes:
    """The bytes a kernel parameter holds: NumPy scalars only, whose C type is unambiguous (a Python int or float
    could be any width)."""
    if not isinstance(value, np.generic):
        raise TypeError(f"kernel argument {index} is a {type(value).__name__}; expected a NumPy scalar "
                        f"(np.int32, np.uint64, np.float32, a TMA map, ...)")
    return value.tobytes()


class ArgBlock:
    """`args` as cuLaunchKernel's kernelParams: each value at its own offset in one host buffer, with `slots`
    (indices of placeholders with ``nbytes`` and ``write(buf, start, ptrs)``: launch.Slot, launch.TmaSlot)
    written at each call. The buffer is per thread (autograd runs the backward on its own thread) and reused: the
    driver copies the values during the launch."""

    def __init__(self, args: tuple, slots: tuple = ()):
        offsets, parts, end = [], [], 0
        slot_set = set(slots)
        for i, a in enumerate(args):
            raw = bytes(a.nbytes) if i in slot_set else _raw(a, i)
            align = max(1, min(len(raw), 8))
            end = -(-end // align) * align
            offsets.append(end)
            parts.append(raw)
            end += len(raw)
        template = bytearray(end)
        for off, raw in zip(offsets, parts):
            template[off:off + len(raw)] = raw
        self._template = bytes(template)
        self._offsets = tuple(offsets)
        self._slots = tuple((offsets[i], args[i].write) for i in slots)
        self._local = threading.local()

    def _buffers(self):
        try:
            return self._local.buffers
        except AttributeError:
            buf = ctypes.create_string_buffer(self._template, max(len(self._template), 1))
            base = ctypes.addressof(buf)
            params = (ctypes.c_void_p * len(self._offsets))(*(base + off for off in self._offsets))
            self._local.buffers = memoryview(buf).cast("B"), params  # the view keeps buf alive
            return self._local.buffers

    def params(self, ptrs: dict):
        """The kernelParams array with the call's addresses (`ptrs`: buffer name → device address) in the slots;
        valid until this thread's next call."""
        buf, params = self._buffers()
        for start, write in self._slots:
            write(buf, start, ptrs)
        return params


@functools.cache
def _cu_launch_kernel():
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
    fn.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def dims(grid: tuple, block: tuple) -> tuple:
    """cuLaunchKernel's six grid and block sizes from 1- to 3-d tuples."""
    return (*grid, 1, 1)[:3] + (*block, 1, 1)[:3]


_CONTEXT_BOUND = threading.local()  # this thread has a current context (see launch)
_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


def launch(function: int, dims6: tuple, shared_bytes: int, stream_ptr: int, params) -> None:
    """cuLaunchKernel on the calling thread's current context, the device's primary one (the caller makes the
    device current); raises CuPy's driver error on failure, as a CuPy launch would. cudaGetDevice/cudaSetDevice
    need not bind the context to a new thread (autograd's device thread, a user's), which CuPy's own launch
    ensures first: so a thread's first launch that finds none binds it with cudaFree(0) and launches again."""
    status = _cu_launch_kernel()(function, *dims6, shared_bytes, stream_ptr, params, None)
    if status == _INVALID_CONTEXT and not getattr(_CONTEXT_BOUND, "done", False):
        import cupy

        cupy.cuda.runtime.free(0)
        _CONTEXT_BOUND.done = True
        status = _cu_launch_kernel()(function, *dims6, shared_bytes, stream_ptr, params, None)
    if status:
        from cupy_backends.cuda.api.driver import CUDADriverError

        raise CUDADriverError(status)
