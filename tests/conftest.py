"""Shared test setup: tests marked ``gpu`` skip, with the reason, where no CUDA GPU and CuPy are usable.

The reason is computed once per session by cupyflash.errors.gpu_unavailable_reason (shared with the benchmarks
and the demo); it names the first thing missing (torch CUDA, CuPy, a device, compute capability), so a skipped
GPU run says exactly why.
"""
from __future__ import annotations

import pytest

from cupyflash.errors import gpu_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        reason = reason or gpu_unavailable_reason()
        if reason is None:
            return
        item.add_marker(pytest.mark.skip(reason=reason))
