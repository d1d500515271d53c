"""Benchmarks run only on a CUDA GPU; elsewhere every benchmark is skipped with the reason."""
from __future__ import annotations

import pytest

from cupyflash.errors import gpu_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
