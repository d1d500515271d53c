"""Shared test setup: tests marked ``gpu`` skip, with the reason, where no CUDA GPU and CuPy are usable.

The reason is computed once per session; it names the first thing missing (torch CUDA, CuPy, a device,
compute capability), so a skipped GPU run says exactly why.
"""
from __future__ import annotations

import functools

import pytest

# The kernels use bf16 mma.sync / ldmatrix / cp.async, which need Ampere (sm_80) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    """None when a CUDA GPU is usable from both torch and CuPy, else why not (one line)."""
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable: {err}"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    try:
        import cupy
    except Exception as err:  # ImportError, or a CUDA library missing at import
        return f"CuPy is not importable: {type(err).__name__}: {err}"
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError: driver too old for CuPy's CUDA, ...
        return f"CuPy cannot use the CUDA driver: {type(err).__name__}: {err}"
    if n_devices == 0:
        return "no CUDA GPU: cupy.cuda.runtime.getDeviceCount() is 0"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_COMPUTE_CAPABILITY:
        return (f"GPU {torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}; the kernels need "
                f"sm_{MIN_COMPUTE_CAPABILITY[0]}{MIN_COMPUTE_CAPABILITY[1]} or newer")
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        reason = reason or gpu_unavailable_reason()
        if reason is None:
            return
        item.add_marker(pytest.mark.skip(reason=reason))
