"""Benchmarks run only on a CUDA GPU; elsewhere every benchmark is skipped with the reason."""
from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def gpu_unavailable_reason() -> str | None:
    try:
        import torch
    except ImportError as err:
        return f"torch is not importable: {err}"
    if not torch.cuda.is_available():
        return "no CUDA GPU: torch.cuda.is_available() is False"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))
