"""``cupyflash doctor``: what this machine has, where compiled kernels are cached, and whether every kernel
variant compiles for its GPU (for sm_80 and sm_90 when there is none, so CPU-only CI still checks them)."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import jit, report_cache
from .errors import (INSTALL_CUPY, CupyflashError, CupyNotFoundError, UnsupportedGPUError, check_arch,
                     cupy_cache_dir, nvrtc_archs, require_cupy, require_gpu, require_nvrtc)
from .progress import Progress

log = logging.getLogger(__name__)

# Without a GPU, check the two architectures the kernels target: Ampere (mma.sync) and Hopper.
NO_GPU_ARCHES = ("sm_80", "sm_90")
# A module's compile time per variant where none was measured yet on this machine (the estimate before a cold run):
# issue 17 timed all 416 variants for sm_80 and sm_90 at 3 min 15 s on 2 cores, about 0.9 core-seconds each.
SECONDS_PER_VARIANT = 0.9


def _not_found(what_to_do: str) -> str:
    return f"not found: {what_to_do}"


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"  # CUDA encodes 13.2 as 13020


def _dist_of(module: str) -> str:
    """The installed distribution providing ``module`` (cupy-cuda13x vs cupy-cuda12x matters)."""
    return ", ".join(importlib.metadata.packages_distributions().get(module, [module]))


def gpu_line() -> tuple[str, str | None]:
    """(text, arch): the GPU and its arch, or why there is none (arch None)."""
    try:
        info = require_gpu()
    except UnsupportedGPUError as err:
        return f"unsupported: {err}", None
    except CupyflashError as err:
        return _not_found(str(err)), None
    return f"{info.name} ({info.arch})", info.arch


def driver_line() -> str:
    try:
        import cupy
    except ImportError:
        return _not_found("install CuPy to query the driver; " + INSTALL_CUPY)
    supported = cupy.cuda.runtime.driverGetVersion()
    if supported == 0:
        return _not_found("install the NVIDIA driver for your GPU; `nvidia-smi` should then list it")
    text = f"supports CUDA {_cuda_version(supported)}"
    return text + (f", driver {module}" if (module := _kernel_module_version()) else "")


def _kernel_module_version() -> str | None:
    """The driver's own version (e.g. 550.54.15), from the Linux kernel module; None elsewhere."""
    try:
        # "NVRM version: NVIDIA UNIX [Open ]Kernel Module [for x86_64]  550.54.15  Release Build ..."
        first_line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    match = re.search(r"\s(\d+\.\d+(?:\.\d+)?)\s", first_line)
    return match.group(1) if match else None


def cuda_runtime_line() -> str:
    try:
        import cupy
    except ImportError:
        return _not_found(INSTALL_CUPY)
    return f"{_cuda_version(cupy.cuda.runtime.runtimeGetVersion())} (the runtime CuPy uses)"


def cupy_line() -> str:
    try:
        import cupy
    except ImportError:
        return _not_found(INSTALL_CUPY)
    return f"{cupy.__version__} ({_dist_of('cupy')})"


def torch_line() -> str:
    try:
        import torch
    except ImportError:
        return _not_found("pip install torch (needed for the torch op and torch.compile, not for the CuPy API)")
    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    return f"{torch.__version__} ({cuda})"


def nvrtc_line() -> str:
    try:
        major, minor = require_nvrtc()
    except CupyflashError as err:
        return _not_found(str(err))
    return f"{major}.{minor}"


def cache_lines() -> list[str]:
    path, from_env = cupy_cache_dir()
    path = Path(path)
    source = "CUPY_CACHE_DIR" if from_env else "default; set CUPY_CACHE_DIR to move it"
    if not path.is_dir():
        return [f"{path} ({source})", "empty (created on the first compile)"]
    files = [f for f in path.rglob("*") if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    return [f"{path} ({source})", f"{len(files)} files, {size / 2**20:.1f} MiB"]


@dataclass(frozen=True)
class CompileResult:
    """One arch's compile of one module (the variants NVRTC builds together): its reports, or why it failed."""

    arch: str
    variants: list  # names
    reports: list  # jit.CompileReport per variant, empty on failure
    error: str | None = None

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"  FAILED {self.arch}  {', '.join(self.variants)}: {self.error}"]
        return [f"  ok     {self.arch}  {r.variant.name:<28} {r.registers:>3} regs  spill {r.spill_stores}/"
                f"{r.spill_loads} B st/ld  smem {r.shared_bytes / 1024:.1f} KiB"
                + ("  wgmma serialized (ptxas C7514/C7515)" if r.serialized_wgmma else "") for r in self.reports]


@dataclass(frozen=True)
class _Job:
    key: tuple  # jit module key
    arch: str
    names: tuple  # the variants asked for (by --only)


def _plan(arches: list[str], only: str | None) -> list[_Job]:
    jobs = []
    for arch in arches:
        for key in jit.module_keys(arch):
            names = tuple(v.name for v in jit.module_variants(key) if only is None or only in v.name)
            if names:
                jobs.append(_Job(key, arch, names))
    return jobs


def _estimate_seconds(jobs: list[_Job], workers: int) -> float:
    """Wall time to compile `jobs` on `workers` threads: each module's last compile time here, or a per-variant
    guess; no less than the slowest module."""
    costs = [report_cache.last_seconds(j.key, j.arch) or SECONDS_PER_VARIANT * len(jit.module_variants(j.key))
             for j in jobs]
    return max(sum(costs) / workers, max(costs))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def compile_variants(arches: list[str], only: str | None = None) -> list[CompileResult]:
    """Every kernel variant (whose name contains ``only``) for each arch.

    NVRTC builds a module (one pass, dtype and head dim) at a time, so work is per module; a module's reports come
    from ``report_cache`` when it holds them, else NVRTC compiles it (releasing the GIL, so modules compile in
    parallel threads) and the reports are stored. Prints what is cached and how long the rest should take.
    """
    jobs = _plan(arches, only)
    cached = {j: report_cache.load(j.key, j.arch) for j in jobs}
    misses = [j for j in jobs if cached[j] is None]
    workers = os.cpu_count() or 1
    where = f"compile reports: {len(jobs) - len(misses)} of {len(jobs)} modules cached ({report_cache.cache_dir()})"
    if misses:
        where += (f"; compiling {len(misses)}, about {_duration(_estimate_seconds(misses, workers))} on "
                  f"{workers} cores")
    print("  " + where, flush=True)

    def result(job: _Job, reports: list) -> CompileResult:
        return CompileResult(job.arch, job.names, [r for r in reports if r.variant.name in job.names])

    def compile_one(job: _Job) -> CompileResult:
        t0 = time.perf_counter()
        try:
            reports = jit.compile_module_reports(job.key, job.arch)
        except CupyflashError as err:  # jit.KernelCompileError, or NVRTC missing
            log.debug("compile of %s for %s failed", job.key, job.arch, exc_info=True)
            return CompileResult(job.arch, job.names, [], str(err))
        report_cache.store(job.key, job.arch, reports, time.perf_counter() - t0)
        return result(job, reports)

    compiled = {}
    if misses:
        with Progress(sum(len(j.names) for j in misses), "compiling kernels") as bar, \
                ThreadPoolExecutor(max_workers=workers) as pool:
            for job, r in zip(misses, pool.map(compile_one, misses)):
                compiled[job] = r
                bar.advance(len(r.variants), note=f"{r.arch} {r.variants[0]}")
    return [compiled[j] if cached[j] is None else result(j, cached[j]) for j in jobs]


def _no_match(only: str, arches: list[str]) -> CupyflashError:
    elsewhere = sorted({a for a in NO_GPU_ARCHES if a not in arches
                        for v in jit.all_variants() if only in v.name and v.compiles_for(a)})
    hint = (f"those variants are built for {', '.join(elsewhere)} only (--arch {elsewhere[0]})" if elsewhere else
            "names read kernel_dtype_dHEADDIM[_causal][_mods][_dropout], e.g. fwd_bf16_d64_causal, with kernels "
            f"{', '.join(jit.KERNELS)} and dtypes f16, bf16, tf32: try --only _d64 or --only bwd_f16")
    return CupyflashError(f"no kernel variant for {', '.join(arches)} has {only!r} in its name; {hint}.")


def _checked_arches(arches: list[str]) -> list[str]:
    """--arch values, each once and each one the kernels compile for (UnsupportedArchError otherwise)."""
    supported = nvrtc_archs()
    return [check_arch(a, supported) for a in dict.fromkeys(arches)]


def run(*, arches: list[str] | None = None, only: str | None = None) -> int:
    """Prints the report; returns 0 when every kernel variant compiled, 1 otherwise."""
    try:
        require_cupy()  # CuPy failing to start (CupyCacheDirError) is the user's to fix: exit 2
    except CupyNotFoundError:
        pass  # reported on its lines below
    if arches:
        arches = _checked_arches(arches)
    gpu, gpu_arch = gpu_line()
    rows = [("GPU", gpu), ("driver", driver_line()), ("CUDA runtime", cuda_runtime_line()),
            ("CuPy", cupy_line()), ("torch", torch_line()), ("NVRTC", nvrtc_line())]
    cache_dir, cache_size = cache_lines()
    rows += [("kernel cache", cache_dir), ("cache size", cache_size)]
    for label, value in rows:
        print(f"{label + ':':<14}{value}")

    why = "--arch" if arches else "this GPU" if gpu_arch else "no usable GPU"
    arches = arches or ([gpu_arch] if gpu_arch else list(NO_GPU_ARCHES))
    if only is not None and not _plan(arches, only):
        raise _no_match(only, arches)
    print(f"\nkernel variants for {', '.join(arches)} ({why}):", flush=True)
    try:
        require_nvrtc()
        results = compile_variants(arches, only)
    except CupyflashError as err:
        print(f"  not checked: {err}")
        return 1
    for r in results:
        print("\n".join(r.lines()))
    total = sum(len(r.variants) for r in results)
    failed = sum(len(r.variants) for r in results if r.error is not None)
    print(f"kernels: {total - failed} of {total} compiled" + (f", {failed} FAILED (see above)" if failed else ""))
    return 1 if failed else 0
