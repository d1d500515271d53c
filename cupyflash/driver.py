"""Kernel launches through the CUDA driver's cuLaunchKernel, each kernel's parameter struct packed once.

CuPy's kernel call converts every argument from a Python object at each launch; a plan's launch
(cupyflash/plan.py) passes the same struct at every call but for its buffers' addresses. Each kernel takes one
struct (kernels_cu/params.cuh), packed once by cupyflash/params.py; ``ArgBlock`` holds its bytes as the driver's
kernelParams (one host buffer, one pointer to it; the Hopper backward, which takes its parameters one by one: one
pointer to each) and a call writes only the address slots before ``launch``, which calls cuLaunchKernel through
CuPy's Cython binding of it (typed integers: no per-argument conversion as through ctypes). The kernels' handles
come from CuPy's modules (cupyflash/jit.py); torch, CuPy and the driver share the device's primary context, so the
launch sees the same context and stream as a CuPy launch would.
"""
from __future__ import annotations

import ctypes
import functools
import threading


class ArgBlock:
    """A kernel's parameter struct as cuLaunchKernel's kernelParams: one pointer to its bytes (`template`), or with
    `param_offsets` one to each parameter's (a kernel taking them one by one: params.Struct.param_offsets); `slots`
    ((byte offset, placeholder with a buffer ``name`` and ``writer()``: params.Slot, params.TmaSlot), ...) are
    written at each call, each by its writer made once (an address's is struct's own pack_into: no Python frame).
    The buffer is per thread (autograd runs the backward on its own thread) and reused: the driver copies the
    parameters during the launch."""

    def __init__(self, template: bytes, slots: tuple = (), param_offsets: tuple = (0,)):
        self._template = bytes(template)
        self._slots = tuple((start, slot.name, slot.writer()) for start, slot in slots)
        self._param_offsets = tuple(param_offsets)
        self._local = threading.local()

    def _buffers(self):
        try:
            return self._local.buffers
        except AttributeError:
            buf = ctypes.create_string_buffer(self._template, max(len(self._template), 1))
            base = ctypes.addressof(buf)
            params = (ctypes.c_void_p * len(self._param_offsets))(*(base + off for off in self._param_offsets))
            params.bytes = buf  # the pointers into buf keep it alive: a launch may hold only them (launch._run)
            params.address = ctypes.addressof(params)  # what cuLaunchKernel takes
            self._local.buffers = memoryview(buf).cast("B"), params  # the view keeps buf alive
            return self._local.buffers

    def params(self, ptrs: dict):
        """The kernelParams array with the call's addresses (`ptrs`: buffer name → device address) in the slots;
        valid until this thread's next call."""
        buf, params = self._buffers()
        for start, name, write in self._slots:
            write(buf, start, ptrs[name])
        return params


def dims(grid: tuple, block: tuple) -> tuple:
    """cuLaunchKernel's six grid and block sizes from 1- to 3-d tuples."""
    return (*grid, 1, 1)[:3] + (*block, 1, 1)[:3]


_CONTEXT_BOUND = threading.local()  # this thread has a current context (see launch)
_INVALID_CONTEXT = 201  # CUDA_ERROR_INVALID_CONTEXT


def launch(function: int, dims6: tuple, shared_bytes: int, stream_ptr: int, params) -> None:
    """cuLaunchKernel on the calling thread's current context, the device's primary one (the caller makes the
    device current), with `params` from ArgBlock.params; raises CuPy's driver error on failure, as a CuPy launch
    would. cudaGetDevice/cudaSetDevice need not bind the context to a new thread (autograd's device thread, a
    user's), which CuPy's own launch ensures first: so a thread's first launch that finds none binds it with
    cudaFree(0) and launches again."""
    launch_kernel, driver_error = _binding()
    try:
        launch_kernel(function, *dims6, shared_bytes, stream_ptr, params.address, 0)
    except driver_error as err:
        if err.status != _INVALID_CONTEXT or getattr(_CONTEXT_BOUND, "done", False):
            raise
        import cupy

        cupy.cuda.runtime.free(0)
        _CONTEXT_BOUND.done = True
        launch_kernel(function, *dims6, shared_bytes, stream_ptr, params.address, 0)


@functools.cache
def _binding():
    """CuPy's cuLaunchKernel and its error, imported once (an import statement at every launch costs 0.6 µs)."""
    from cupy_backends.cuda.api.driver import CUDADriverError, launchKernel

    return launchKernel, CUDADriverError
