"""Errors a user can hit, each a one-sentence message saying what happened and what to do.

The CLI prints ``str(err)`` of any ``CupyflashError`` and exits with code 2, so messages must stand alone:
no raw CuPy traceback, the cause named in words, the fix in the same sentence.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Tensor-core paths (mma.sync bf16, cp.async) need Ampere or newer.
MIN_COMPUTE_CAPABILITY = 80
MIN_ARCH = f"sm_{MIN_COMPUTE_CAPABILITY}"

INSTALL_CUPY = "pip install 'cupyflash[cuda13]' (or 'cupyflash[cuda12]' for a CUDA 12 driver)"
INSTALL_NVRTC = "pip install 'cuda-toolkit[nvrtc]==13.*' (CUDA 13) or nvidia-cuda-nvrtc-cu12 (CUDA 12)"
CUPY_DEFAULT_CACHE_DIR = "~/.cupy/kernel_cache"  # CuPy's kernel cache when CUPY_CACHE_DIR is unset


class CupyflashError(Exception):
    """Base of every error cupyflash reports to a user; ``str(err)`` is the whole message."""


class CupyNotFoundError(CupyflashError):
    pass


class CupyCacheDirError(CupyflashError):
    """CuPy creates its kernel cache directory on import, and its import fails when it cannot."""


class TorchNotFoundError(CupyflashError):
    pass


class UnsupportedArchError(CupyflashError):
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


def cupy_cache_dir() -> tuple[str, bool]:
    """(path, from_env): where CuPy keeps compiled kernels, as CuPy reads it (the variable's value is taken as
    is; only the default has its ``~`` expanded)."""
    if "CUPY_CACHE_DIR" in os.environ:
        return os.environ["CUPY_CACHE_DIR"], True
    return os.path.expanduser(CUPY_DEFAULT_CACHE_DIR), False


def require_cupy():
    """The cupy module; CupyNotFoundError or CupyCacheDirError (one sentence each) when it cannot be imported."""
    try:
        import cupy
    except ImportError as err:
        log.debug("import cupy failed: %r", err)
        raise CupyNotFoundError(f"CuPy is not installed ({err}); {INSTALL_CUPY}.") from None
    except OSError as err:
        cache_error = _cache_dir_error(err)
        if cache_error is None:
            raise
        raise cache_error from None
    return cupy


def _cache_dir_error(err: OSError) -> CupyCacheDirError | None:
    """The error to report when `err` (raised by ``import cupy``) is CuPy failing to create its cache directory."""
    path, from_env = cupy_cache_dir()
    failed = os.path.abspath(err.filename) if err.filename else None
    target = os.path.abspath(path)
    if failed is None or not (target == failed or target.startswith(failed.rstrip(os.sep) + os.sep)):
        return None
    log.debug("import cupy failed: %r", err)
    where = f"CUPY_CACHE_DIR={path}" if from_env else f"CuPy's default kernel cache {path}"
    what = ("is a file, not a directory" if os.path.isfile(path)
            else f"cannot be created ({err.strerror}: {err.filename})")
    fix = ("point CUPY_CACHE_DIR at a directory you can write, or unset it" if from_env
           else "set CUPY_CACHE_DIR to a directory you can write")
    return CupyCacheDirError(f"CuPy cannot start: {where} {what}; {fix}.")


def require_torch(command: str):
    """torch, or TorchNotFoundError saying that `command` needs it."""
    try:
        import torch
    except ImportError as err:
        log.debug("import torch failed: %r", err)
        raise TorchNotFoundError(f"{command} needs torch, which is not installed ({err}); pip install torch "
                                 f"(the CuPy API and `cupyflash doctor` work without it).") from None
    return torch


def check_arch(arch: str, nvrtc_archs: tuple[int, ...] | None) -> str:
    """`arch` ("sm_90", normalised) when the kernels can be compiled for it: sm_80 or newer, and one NVRTC can target
    (`nvrtc_archs`, its compute capabilities; None: NVRTC is not loaded, so that part is not checked)."""
    match = re.fullmatch(r"sm_(\d+)", arch)
    number = int(match.group(1)) if match else None
    if number is not None and number >= MIN_COMPUTE_CAPABILITY and (nvrtc_archs is None or number in nvrtc_archs):
        return f"sm_{number}"
    supported = [f"sm_{n}" for n in nvrtc_archs or () if n >= MIN_COMPUTE_CAPABILITY]
    choices = f"one of {', '.join(supported)}" if supported else f"{MIN_ARCH} or newer, as sm_XX"
    if number is None:
        why = "is not an architecture name of the form sm_XX"
    elif number < MIN_COMPUTE_CAPABILITY:
        why = f"is older than {MIN_ARCH} (Ampere), the oldest the cupyflash kernels support"
    else:
        why = "is not one this NVRTC can compile for"
    raise UnsupportedArchError(f"--arch {arch} {why}; pass {choices}.")


def _runtime_error_text(err: Exception) -> str:
    # CuPy's CUDARuntimeError reads "cudaErrorNoDevice: no CUDA-capable device is detected"; keep the words.
    return str(err).split(": ", 1)[-1]


def require_gpu(device_id: int | None = None) -> GPUInfo:
    """Checks CuPy, a visible CUDA device and compute capability >= 8.0; raises the matching CupyflashError."""
    cupy = require_cupy()
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
    cupy = require_cupy()
    # With no driver at all CUDA says "driver version is insufficient", which reads like an upgrade hint.
    cause = ("no NVIDIA driver is loaded" if cupy.cuda.runtime.driverGetVersion() == 0
             else _runtime_error_text(err))
    return NoGPUError(f"No usable CUDA GPU ({cause}); run on a machine with an NVIDIA GPU (sm_80 or newer) and "
                      f"its driver, or pass CPU tensors to use the exact CPU path.")


# Positive results only (exceptions are not cached): the CUDA path calls this on every launch.
@functools.cache
def _checked_device(device_id: int) -> GPUInfo:
    cupy = require_cupy()
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


def gpu_missing(script: str) -> bool:
    """For a GPU-only script's main(): prints "<script> needs a CUDA GPU: <why>" to stderr and returns True where
    gpu_unavailable_reason() gives a reason (the script then exits with status 2)."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"{script} needs a CUDA GPU: {reason}", file=sys.stderr)
    return reason is not None


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


def nvrtc_archs() -> tuple[int, ...] | None:
    """The compute capabilities NVRTC can compile for (80, 86, 90, ...); None when NVRTC cannot be loaded."""
    try:
        require_nvrtc()
    except (CupyNotFoundError, NVRTCNotFoundError):
        return None
    return tuple(require_cupy().cuda.nvrtc.getSupportedArchs())


def require_nvrtc() -> tuple[int, int]:
    """NVRTC's (major, minor) version; raises NVRTCNotFoundError when CuPy cannot load the library."""
    cupy = require_cupy()
    try:
        return cupy.cuda.nvrtc.getVersion()
    except Exception as err:  # CuPy raises RuntimeError/OSError/NVRTCError depending on how loading failed.
        log.debug("nvrtc.getVersion failed: %r", err)
        raise NVRTCNotFoundError(f"NVRTC, the CUDA runtime compiler, could not be loaded "
                                 f"({type(err).__name__}); {INSTALL_NVRTC}.") from None
