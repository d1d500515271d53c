"""The compile reports of ``cupyflash doctor`` (registers, spills, stack per kernel variant), kept on disk beside
CuPy's kernel cache so a second run reads them instead of compiling every module again.

One JSON file per (module, arch), named ``<arch>-<pass>-<dtype>-d<head dim>-<fingerprint>.json``; the fingerprint
is ``jit.report_fingerprint`` (source with its headers, options, name expressions, NVRTC version), so any change
to what NVRTC would compile misses the cache. Storing a module's reports removes that module's older files, whose
compile time still serves as the estimate for the next compile. Failed compiles are never stored. A cache that
cannot be read or written only costs a compile (logged at debug level).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from . import jit
from .errors import cupy_cache_dir

log = logging.getLogger(__name__)

SUBDIR = "cupyflash-compile-reports"
_FIELDS = ("registers", "spill_stores", "spill_loads", "stack_bytes", "symbol", "serialized_wgmma")  # per variant


def cache_dir() -> Path:
    return Path(cupy_cache_dir()[0]) / SUBDIR


def _prefix(key: tuple, arch: str) -> str:
    kind, dtype, head_dim = key
    return f"{arch}-{kind}-{dtype}-d{head_dim}-"


def _path(key: tuple, arch: str) -> Path:
    return cache_dir() / f"{_prefix(key, arch)}{jit.report_fingerprint(key, arch)}.json"


def load(key: tuple, arch: str) -> list[jit.CompileReport] | None:
    """Module `key`'s reports for `arch` from the cache, or None (not there, or unreadable)."""
    try:
        entry = json.loads(_path(key, arch).read_text())
        fields = entry["reports"]
        return [jit.CompileReport(v, arch, shared_bytes=v.shared_bytes, **{f: fields[v.name][f] for f in _FIELDS})
                for v in jit.module_variants(key)]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.debug("compile report cache: %s %s unreadable (%r); compiling", key, arch, err)
        return None


def store(key: tuple, arch: str, reports: list[jit.CompileReport], seconds: float) -> None:
    """Writes module `key`'s reports (atomically: a reader sees the old file or the whole new one) and removes the
    module's stale files."""
    path = _path(key, arch)
    entry = dict(module=list(key), arch=arch, seconds=round(seconds, 2),
                 reports={r.variant.name: {f: getattr(r, f) for f in _FIELDS} for r in reports})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(entry, f)
        os.replace(f.name, path)
        for stale in path.parent.glob(_prefix(key, arch) + "*.json"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as err:
        log.debug("compile report cache: cannot write %s (%r)", path, err)


def last_seconds(key: tuple, arch: str) -> float | None:
    """How long module `key` last took to compile for `arch`, from its file (current or stale), if any."""
    for path in cache_dir().glob(_prefix(key, arch) + "*.json"):
        try:
            return float(json.loads(path.read_text())["seconds"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
