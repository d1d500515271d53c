"""``cupyflash doctor``: what this machine has, where compiled kernels are cached, and whether every kernel
variant compiles for its GPU (for sm_80 and sm_90 when there is none, so CPU-only CI still checks them)."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import INSTALL_CUPY, CupyflashError, UnsupportedGPUError, require_gpu, require_nvrtc
from .progress import Progress

log = logging.getLogger(__name__)

# Without a GPU, check the two architectures the kernels target: Ampere (mma.sync) and Hopper.
NO_GPU_ARCHES = ("sm_80", "sm_90")
DEFAULT_CACHE_DIR = "~/.cupy/kernel_cache"  # CuPy's default when CUPY_CACHE_DIR is unset


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
    path = Path(os.path.expanduser(os.environ.get("CUPY_CACHE_DIR", DEFAULT_CACHE_DIR)))
    source = "CUPY_CACHE_DIR" if "CUPY_CACHE_DIR" in os.environ else "default; set CUPY_CACHE_DIR to move it"
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
                f"{r.spill_loads} B st/ld  smem {r.shared_bytes / 1024:.1f} KiB" for r in self.reports]


def compile_variants(arches: list[str], only: str | None = None) -> list[CompileResult]:
    """Compiles every kernel variant (whose name contains ``only``) for each arch, with a progress bar.

    NVRTC builds a module (one pass, dtype and head dim) at a time, so work is per module; NVRTC releases
    the GIL, so modules compile in parallel threads.
    """
    from . import jit

    jobs = []
    for arch in arches:
        for key in jit.module_keys(arch):
            names = [v.name for v in jit.module_variants(key) if only is None or only in v.name]
            if names:
                jobs.append((key, arch, names))

    def compile_one(job) -> CompileResult:
        key, arch, names = job
        try:
            reports = [r for r in jit.compile_module_reports(key, arch) if r.variant.name in names]
        except CupyflashError as err:  # jit.KernelCompileError, or NVRTC missing
            log.debug("compile of %s for %s failed", key, arch, exc_info=True)
            return CompileResult(arch, names, [], str(err))
        return CompileResult(arch, names, reports)

    if not jobs:
        return []
    results = []
    with Progress(sum(len(j[2]) for j in jobs), "compiling kernels") as bar, \
            ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for result in pool.map(compile_one, jobs):
            results.append(result)
            bar.advance(len(result.variants), note=f"{result.arch} {result.variants[0]}")
    return results


def run(*, arches: list[str] | None = None, only: str | None = None) -> int:
    """Prints the report; returns 0 when every kernel variant compiled, 1 otherwise."""
    gpu, gpu_arch = gpu_line()
    rows = [("GPU", gpu), ("driver", driver_line()), ("CUDA runtime", cuda_runtime_line()),
            ("CuPy", cupy_line()), ("torch", torch_line()), ("NVRTC", nvrtc_line())]
    cache_dir, cache_size = cache_lines()
    rows += [("kernel cache", cache_dir), ("cache size", cache_size)]
    for label, value in rows:
        print(f"{label + ':':<14}{value}")

    arches = arches or ([gpu_arch] if gpu_arch else list(NO_GPU_ARCHES))
    why = "this GPU" if gpu_arch and arches == [gpu_arch] else "no usable GPU" if not gpu_arch else "--arch"
    print(f"\nkernel variants for {', '.join(arches)} ({why}):")
    try:
        require_nvrtc()
        results = compile_variants(arches, only)
    except CupyflashError as err:
        print(f"  not checked: {err}")
        return 1
    if not results:
        print(f"  no kernel variant matches --only {only!r}")
        return 1
    for r in results:
        print("\n".join(r.lines()))
    total = sum(len(r.variants) for r in results)
    failed = sum(len(r.variants) for r in results if r.error is not None)
    print(f"kernels: {total - failed} of {total} compiled" + (f", {failed} FAILED (see above)" if failed else ""))
    return 1 if failed else 0
