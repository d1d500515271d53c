"""Errors a user can hit, each a one-sentence message saying what happened and what to do.

The CLI prints ``str(err)`` of any ``CupyflashError`` and exits with code 2, so messages must stand alone:
no raw CuPy traceback, the cause named in words, the fix in the same sentence.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Tensor-core paths (mma.sync bf16, cp.async) need Ampere or newer.
MIN_COMPUTE_CAPABILITY = 80

INSTALL_CUPY = "pip install 'cupyflash[cuda13]' (or 'cupyflash[cuda12]' for a CUDA 12 driver)"
INSTALL_NVRTC = "pip install 'cuda-toolkit[nvrtc]==13.*' (CUDA 13) or nvidia-cuda-nvrtc-cu12 (CUDA 12)"


class CupyflashError(Exception):
    """Base of every error cupyflash reports to a user; ``str(err)`` is the whole message."""


class CupyNotFoundError(CupyflashError):
    pass


class NoGPUError(CupyflashError):
    pass


class NVRTCNotFoundError(CupyflashError):
    pass


class UnsupportedGPUError(CupyflashError):
    pass


class KernelCompileError(CupyflashError):
    """A kernel variant failed to compile; the message names the variant, the arch and NVRTC's first error."""


@dataclass(frozen=True)
class GPUInfo:
    device_id: int
    name: str
    compute_capability: int  # 90 for sm_90

    @property
    def arch(self) -> str:
        return f"sm_{self.compute_capability}"


def _cupy():
    try:
        import cupy
    except ImportError as err:
        log.debug("import cupy failed: %r", err)
        raise CupyNotFoundError(f"CuPy is not installed ({err}); {INSTALL_CUPY}.") from None
    return cupy


def _runtime_error_text(err: Exception) -> str:
    # CuPy's CUDARuntimeError reads "cudaErrorNoDevice: no CUDA-capable device is detected"; keep the words.
    return str(err).split(": ", 1)[-1]


def require_gpu(device_id: int | None = None) -> GPUInfo:
    """Checks CuPy, a visible CUDA device and compute capability >= 8.0; raises the matching CupyflashError."""
    cupy = _cupy()
    if device_id is None:
        device_id = _current_device(cupy)
    return _checked_device(device_id)


def _current_device(cupy) -> int:
    try:
        return cupy.cuda.runtime.getDevice()
    except cupy.cuda.runtime.CUDARuntimeError as err:
        raise _no_gpu(err) from None


def _no_gpu(err: Exception) -> NoGPUError:
    log.debug("CUDA runtime: %r", err)
    cupy = _cupy()
    # With no driver at all CUDA says "driver version is insufficient", which reads like an upgrade hint.
    cause = ("no NVIDIA driver is loaded" if cupy.cuda.runtime.driverGetVersion() == 0
             else _runtime_error_text(err))
    return NoGPUError(f"No usable CUDA GPU ({cause}); run on a machine with an NVIDIA GPU (sm_80 or newer) and "
                      f"its driver, or pass CPU tensors to use the exact CPU path.")


# Positive results only (exceptions are not cached): the CUDA path calls this on every launch.
@functools.cache
def _checked_device(device_id: int) -> GPUInfo:
    cupy = _cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
    except cupy.cuda.runtime.CUDARuntimeError as err:
        raise _no_gpu(err) from None
    if count == 0:
        raise NoGPUError("No CUDA GPU is visible (check CUDA_VISIBLE_DEVICES and the driver with nvidia-smi); "
                         "pass CPU tensors to use the exact CPU path.")
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info = GPUInfo(device_id, name, props["major"] * 10 + props["minor"])
    if info.compute_capability < MIN_COMPUTE_CAPABILITY:
        raise UnsupportedGPUError(f"GPU {device_id} ({info.name}) is {info.arch}, and the cupyflash kernels need "
                                  f"sm_80 (Ampere) or newer; use a newer GPU or CPU tensors.")
    return info


def gpu_unavailable_reason() -> str | None:
    """None when torch and the kernels can use torch's current GPU, else why not, in one line: the demo falls back
    to the CPU with it, and GPU tests and benchmarks skip with it."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable: {err}"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        require_gpu(torch.cuda.current_device())
    except CupyflashError as err:
        return str(err)
    return None


def require_nvrtc() -> tuple[int, int]:
    """NVRTC's (major, minor) version; raises NVRTCNotFoundError when CuPy cannot load the library."""
    cupy = _cupy()
    try:
        return cupy.cuda.nvrtc.getVersion()
    except Exception as err:  # CuPy raises RuntimeError/OSError/NVRTCError depending on how loading failed.
        log.debug("nvrtc.getVersion failed: %r", err)
        raise NVRTCNotFoundError(f"NVRTC, the CUDA runtime compiler, could not be loaded "
                                 f"({type(err).__name__}); {INSTALL_NVRTC}.") from None
