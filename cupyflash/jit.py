"""Kernel variants, their source, and their compilation (NVRTC through CuPy).

The kernels live in two translation units: ``kernels_cu/flash_attn.cu`` (sm_80 and later) and
``kernels_cu/flash_attn_sm90.cu`` (Hopper only: compiled with -arch=sm_90a). Their local ``#include "..."``
lines are inlined here, so the source handed to CuPy contains every header's text and CuPy's disk cache key
(source + options + NVRTC version + arch) changes whenever any header does. Templates are instantiated
through ``name_expressions``; one ``cupy.RawModule`` is built per (pass, dtype, head dim) on first use.

``compile_variant`` compiles without a GPU (NVRTC targets a named arch), which CI uses to check every
shipped variant and to report registers and spills.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from . import tiles
from .errors import KernelCompileError, NVRTCNotFoundError

log = logging.getLogger(__name__)

ENTRY_FILE = "flash_attn.cu"
SM90_ENTRY_FILE = "flash_attn_sm90.cu"
NVRTC_OPTIONS = ("-std=c++17",)
# CuPy's element-type name → the tag struct in common.cuh (fp32 runs on TF32 tensor cores).
DTYPE_TAGS = {"float16": "cupyflash::f16", "bfloat16": "cupyflash::bf16", "float32": "cupyflash::tf32"}
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
KERNELS = ("fwd", "fwd_sm90", "bwd", "bwd_sm90", "bwd_preprocess", "bwd_convert_dq", "bwd_convert_dq_sm90",
           "bwd_expand_kv_sm90", "bwd_sum_kv_sm90", "tile_minmax", "tile_classify", "key_mask_prep",
           "unseen_flags", "unseen_key_sums", "unseen_fill", "unseen_sums", "unseen_kv", "unseen_dq")
# The rows without keys (kernels_cu/unseen_rows.cuh, cupyflash/unseen_rows.py): any head dim up to 256
UNSEEN_KERNELS = KERNELS[-6:]
# Per dtype, no head dim, one module: the masks' preparation (kernels_cu/tile_classes.cuh, key_mask.cuh) and the
# rows without keys
PER_DTYPE_KERNELS = ("tile_minmax", "tile_classify", "key_mask_prep", *UNSEEN_KERNELS)
# (mods, dropout) compiled into the fwd/bwd kernels: plain, bias/window, bias/window + dropout.
FEATURE_SETS = ((False, False), (True, False), (True, True))
# wgmma / TMA: sm_90a only (with the Hopper backward's own helpers, in its module)
SM90_KERNELS = ("fwd_sm90", "bwd_sm90", "bwd_convert_dq_sm90", "bwd_expand_kv_sm90", "bwd_sum_kv_sm90")
SPLIT_KV_KERNELS = ("bwd_expand_kv_sm90", "bwd_sum_kv_sm90")  # grouped-query backward's split (plan.py)
SM90_DTYPES = ("float16", "bfloat16")


def kernel_dir() -> Path:
    """Where the CUDA sources are: ``CUPYFLASH_KERNEL_DIR`` if set (for kernel development), else the package."""
    override = os.environ.get("CUPYFLASH_KERNEL_DIR")
    if override:
        return Path(override)
    import kernels_cu

    return kernels_cu.SOURCE_DIR


@dataclass(frozen=True)
class Variant:
    kernel: str  # one of KERNELS
    dtype: str  # a key of DTYPE_TAGS
    head_dim: int
    causal: bool = False
    mods: bool = False  # bias / window compiled in (kernels_cu/scores.cuh); False: the lean plain path
    dropout: bool = False  # dropout compiled in (only with mods)
    key_mask: bool = False  # the plain Hopper kernels' key padding (kernels_cu/key_mask.cuh)
    tall: bool = False  # the causal Hopper forward on tiles.FORWARD_SM90_TALL's tile (plan._build says when)

    @property
    def tiles(self) -> tiles.Tiles | tiles.Sm90Tiles | None:
        if self.kernel == "fwd_sm90":
            return tiles.sm90_forward_tiles(self.head_dim, self.mods, self.causal, self.tall)
        if self.kernel == "bwd_sm90":
            return tiles.sm90_backward_tiles(self.head_dim, self.mods)
        if self.kernel == "bwd_convert_dq_sm90":
            return tiles.BACKWARD_SM90[self.head_dim]
        if self.kernel not in ("fwd", "bwd"):
            return None
        return tiles.for_pass(self.kernel, self.dtype, self.head_dim, plain=not (self.causal or self.mods))

    def compiles_for(self, arch: str) -> bool:
        """Whether this variant is built for `arch` (the Hopper kernels for sm_90 only, the others for any)."""
        return arch == "sm_90" or self.kernel not in SM90_KERNELS

    @property
    def name(self) -> str:
        short = {"float16": "f16", "bfloat16": "bf16", "float32": "tf32"}[self.dtype]
        if self.kernel in PER_DTYPE_KERNELS:
            return f"{self.kernel}_{short}"
        return (f"{self.kernel}_{short}_d{self.head_dim}" + ("_causal" if self.causal else "")
                + ("_mods" if self.mods else "") + ("_dropout" if self.dropout else "")
                + ("_keys" if self.key_mask else "") + ("_tall" if self.tall else ""))

    @property
    def expression(self) -> str:
        """The C++ name expression that instantiates this variant."""
        tag, d, t = DTYPE_TAGS[self.dtype], self.head_dim, self.tiles
        flags = ", ".join(str(f).lower() for f in (self.causal, self.mods, self.dropout))
        if self.kernel == "fwd":
            fresh = str(t.fresh_offsets).lower()
            return f"cupyflash::flash_fwd_kernel<{tag}, {d}, {t.Br}, {t.Bc}, {t.warps}, {t.m_tiles}, {fresh}, {flags}>"
        if self.kernel == "fwd_sm90":
            return (f"cupyflash::flash_fwd_sm90_kernel<{tag}, {t.tile_head_dim(d)}, {d}, {t.Br}, {t.Bc}, "
                    f"{str(self.causal).lower()}, {t.stages}, {str(self.mods).lower()}, {str(self.dropout).lower()}, "
                    f"{str(self.key_mask).lower()}>")
        if self.kernel == "bwd_sm90":
            kernel = "flash_bwd_sm90_wide_kernel" if t.wide else "flash_bwd_sm90_kernel"
            return (f"cupyflash::{kernel}<{tag}, {t.tile_head_dim(d)}, {d}, {str(self.causal).lower()}, "
                    f"{t.Br}, {t.Bc}, {t.stages}, {str(self.mods).lower()}, {str(self.dropout).lower()}, "
                    f"{str(self.key_mask).lower()}>")
        if self.kernel == "bwd":
            return (f"cupyflash::flash_bwd_kernel<{tag}, {d}, {t.launch_cols(d)}, {t.Br}, {t.Bc}, {t.warps}, "
                    f"{str(t.fuse_sdp).lower()}, {flags}>")
        if self.kernel == "bwd_convert_dq_sm90":
            return f"cupyflash::flash_bwd_convert_dq_sm90<{tag}, {t.tile_head_dim(d)}, {d}>"
        if self.kernel in SPLIT_KV_KERNELS:  # any head dim: one in each Hopper module
            return f"cupyflash::flash_{self.kernel}<{tag}>"
        if self.kernel == "bwd_preprocess":
            return f"cupyflash::flash_bwd_preprocess<{tag}, {d}>"
        if self.kernel == "tile_minmax":
            return f"cupyflash::tile_minmax<{tag}>"
        if self.kernel in UNSEEN_KERNELS:
            return f"cupyflash::{self.kernel}<{tag}>"
        if self.kernel in ("tile_classify", "key_mask_prep"):
            return f"cupyflash::{self.kernel}"
        return f"cupyflash::flash_bwd_convert_dq<{tag}, {d}>"

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory per thread block."""
        if self.kernel == "fwd":
            return tiles.forward_smem_bytes(self.head_dim, self.tiles, ELEM_BYTES[self.dtype])
        if self.kernel == "fwd_sm90":
            return tiles.sm90_forward_smem_bytes(self.head_dim, self.tiles)
        if self.kernel == "bwd_sm90":
            return tiles.sm90_backward_smem_bytes(self.head_dim, self.tiles, self.mods)
        if self.kernel == "bwd":
            return tiles.backward_smem_bytes(self.head_dim, self.tiles, ELEM_BYTES[self.dtype], self.mods)
        return 0

    @property
    def module_key(self) -> tuple:
        """Variants compiled together into one RawModule: one pass (forward / backward) of one dtype and head dim,
        the Hopper kernels (both passes, flash_attn_sm90.cu) of one dtype and head dim, or the per-dtype kernels
        (PER_DTYPE_KERNELS) of one dtype."""
        if self.kernel in PER_DTYPE_KERNELS:
            return ("tiles", self.dtype, 0)
        if self.kernel in SM90_KERNELS:
            return ("sm90", self.dtype, self.head_dim)
        return ("fwd" if self.kernel == "fwd" else "bwd", self.dtype, self.head_dim)


def all_variants() -> list[Variant]:
    out = []
    for dtype in DTYPE_TAGS:
        out += [Variant(k, dtype, 0) for k in PER_DTYPE_KERNELS]
        for d in tiles.FORWARD:
            out += [Variant("fwd", dtype, d, c, m, p) for c in (False, True) for m, p in FEATURE_SETS]
        if dtype in SM90_DTYPES:
            # with score mods a causal call runs as a window (launch.sm90_variant): no causal mods variants
            out += [Variant(k, dtype, d, c, m, p) for k, table in (("fwd_sm90", tiles.FORWARD_SM90),
                                                                    ("bwd_sm90", tiles.BACKWARD_SM90))
                    for d in table for c in (False, True) for m, p in FEATURE_SETS
                    if not (c and m) and (table[d].dropout or not p)]
            # the key mask goes with the plain path only (plan.py)
            out += [Variant(k, dtype, d, c, key_mask=True) for k, table in (("fwd_sm90", tiles.FORWARD_SM90),
                                                                             ("bwd_sm90", tiles.BACKWARD_SM90))
                    for d in table for c in (False, True)]
            out += [Variant("fwd_sm90", dtype, d, True, tall=True) for d in tiles.FORWARD_SM90_TALL]
            out += [Variant(k, dtype, d) for k in ("bwd_convert_dq_sm90", *SPLIT_KV_KERNELS)
                    for d in tiles.BACKWARD_SM90]
            # the Hopper backward's preprocess at head dims mma.sync has no kernel for (in flash_attn.cu's module)
            out += [Variant("bwd_preprocess", dtype, d) for d in tiles.BACKWARD_SM90 if d not in tiles.BACKWARD]
        for d in (d for d in tiles.BACKWARD if tiles.has_backward(dtype, d)):
            out += [Variant("bwd", dtype, d, c, m, p) for c in (False, True) for m, p in FEATURE_SETS]
            out += [Variant("bwd_preprocess", dtype, d), Variant("bwd_convert_dq", dtype, d)]
    return out


def module_variants(key: tuple) -> list[Variant]:
    return [v for v in all_variants() if v.module_key == key]


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def _inline(path: Path, seen: set) -> str:
    """The file's text with each local #include replaced by the header's text (once per header: #pragma once)."""
    if path in seen:
        return ""
    seen.add(path)

    def include(match):
        return _inline(path.parent / match.group(1), seen)

    return _INCLUDE.sub(include, path.read_text())


def entry_file(key: tuple) -> str:
    """The translation unit of module `key`."""
    return SM90_ENTRY_FILE if key[0] == "sm90" else ENTRY_FILE


def source_for(variant: Variant | None = None) -> str:
    """The full source compiled for `variant` (None: the main translation unit, flash_attn.cu)."""
    return _inline(kernel_dir() / (ENTRY_FILE if variant is None else entry_file(variant.module_key)), set())


def arch_options(key: tuple, arch: str | None) -> tuple:
    """NVRTC's -arch for module `key`: the Hopper module needs sm_90a (the "a" features: wgmma, setmaxnreg), on
    sm_90 only; `arch` None (run time, the others): CuPy picks the device's own."""
    if key[0] == "sm90":
        if arch not in (None, "sm_90"):
            raise ValueError(f"module {key} is for sm_90 only, not {arch}")
        return ("-arch=sm_90a",)
    return () if arch is None else (f"-arch={arch}",)


# ---------------------------------------------------------------- compile without a GPU (CI, doctor)

@dataclass(frozen=True)
class CompileReport:
    variant: Variant
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    symbol: str = ""  # the mangled kernel name in the cubin
    # ptxas made every wgmma of the kernel wait for the previous one (its C7512 / C7514 / C7515 "Potential Performance
    # Loss" remarks): the Hopper kernels' GEMMs then no longer overlap each other or the softmax
    serialized_wgmma: bool = False

    def __str__(self) -> str:
        return (f"{self.variant.name:<28} {self.arch}: {self.registers:3d} registers, {self.stack_bytes} B stack, "
                f"{self.spill_stores} B spill stores, {self.spill_loads} B spill loads, "
                f"{self.shared_bytes} B shared" + (", wgmma serialized" if self.serialized_wgmma else ""))


_PTXAS_FUNC = re.compile(r"Function properties for (\S+)\s*\n.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads.*?Used (\d+) registers", re.S)
_PTXAS_SERIALIZED = re.compile(r"\((C751\d)\) Potential Performance Loss: wgmma\.mma_async instructions are "
                               r"serialized.*? (?:in|for) the function '(\S+)'")


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as err:  # ImportError, or CuPy failing to load libnvrtc
        raise NVRTCNotFoundError(f"NVRTC could not be loaded ({err}); install it with "
                                 "pip install 'cuda-toolkit[nvrtc]==13.*'.") from None
    return nvrtc


def _whole_elf(cubin: bytes) -> bytes:
    """CuPy's getCUBIN (14.2) drops the cubin's last byte, as for NUL-terminated PTX, cutting off the end of the
    ELF's program-header table; cuobjdump then rejects it. Pads back to the end the ELF header declares."""
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return cubin + bytes(max(0, end - len(cubin)))


def _report_build(key: tuple, arch: str) -> tuple[str, list[str], list[Variant]]:
    """(source, NVRTC options, variants): everything compile_module_reports hands NVRTC for module `key`."""
    variants = module_variants(key)
    return source_for(variants[0]), [*NVRTC_OPTIONS, *arch_options(key, arch), "-Xptxas=-v"], variants


def report_fingerprint(key: tuple, arch: str) -> str:
    """A hash of what decides module `key`'s compile reports for `arch`, as CuPy keys its kernel cache: the source
    (headers inlined), the options with the arch, the name expressions (template arguments, tiles) and NVRTC's
    version. Loads NVRTC (NVRTCNotFoundError without it)."""
    source, options, variants = _report_build(key, arch)
    text = "\0".join([source, entry_file(key), *options, *(v.expression for v in variants),
                      ".".join(map(str, _nvrtc().getVersion()))])
    return hashlib.sha256(text.encode()).hexdigest()


def compile_module_reports(key: tuple, arch: str, cubin_path: Path | None = None) -> list[CompileReport]:
    """Compiles one module's variants for `arch` ("sm_80", "sm_90") with NVRTC; no GPU needed. With
    `cubin_path`, the module's cubin is written there too (for cuobjdump -sass: benchmarks/sass_report.py)."""
    nvrtc = _nvrtc()
    source, options, variants = _report_build(key, arch)
    prog = nvrtc.createProgram(source, entry_file(key), [], [])
    try:
        for v in variants:
            nvrtc.addNameExpression(prog, v.expression)
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as err:
            log_text = nvrtc.getProgramLog(prog)
            first = next((ln for ln in log_text.splitlines() if "error" in ln), str(err))
            raise KernelCompileError(f"kernels {[v.name for v in variants]} failed to compile for {arch}: "
                                     f"{first.strip()}; this is a bug in cupyflash, please report it.") from None
        if cubin_path is not None:
            Path(cubin_path).write_bytes(_whole_elf(nvrtc.getCUBIN(prog)))
        log_text = nvrtc.getProgramLog(prog)
        ptxas = {m.group(1): m for m in _PTXAS_FUNC.finditer(log_text)}
        serialized = {m.group(2) for m in _PTXAS_SERIALIZED.finditer(log_text)}
        reports = []
        for v in variants:
            symbol = nvrtc.getLoweredName(prog, v.expression)
            m = ptxas[symbol]
            reports.append(CompileReport(v, arch, registers=int(m.group(5)), spill_stores=int(m.group(3)),
                                         spill_loads=int(m.group(4)), stack_bytes=int(m.group(2)),
                                         shared_bytes=v.shared_bytes, symbol=symbol,
                                         serialized_wgmma=symbol in serialized))
        return reports
    finally:
        nvrtc.destroyProgram(prog)


def compile_variant(variant: Variant, arch: str) -> CompileReport:
    """One variant's report (compiles its whole module; use compile_module_reports for many)."""
    return next(r for r in compile_module_reports(variant.module_key, arch) if r.variant == variant)


def module_keys(arch: str | None = None) -> list[tuple]:
    """Every module's key (with `arch`: those compiled for it)."""
    return sorted({v.module_key for v in all_variants() if arch is None or v.compiles_for(arch)})


# ---------------------------------------------------------------- run-time loading (GPU)

@functools.lru_cache(maxsize=None)
def _raw_module(key: tuple, device_id: int):
    import cupy

    variants = module_variants(key)
    log.info("compiling %s kernels for %s head_dim=%d (first use; cached on disk by CuPy)", key[0], key[1], key[2])
    try:
        module = cupy.RawModule(code=source_for(variants[0]), options=(*NVRTC_OPTIONS, *arch_options(key, None)),
                                name_expressions=[v.expression for v in variants])
        module.compile()
    except cupy.cuda.compiler.CompileException as err:
        first = next((ln for ln in str(err).splitlines() if "error" in ln), str(err).splitlines()[0])
        raise KernelCompileError(f"kernels for {key} failed to compile on this GPU: {first.strip()}; "
                                 "run `cupyflash doctor` and report the output.") from None
    return module


@functools.lru_cache(maxsize=None)
def get_kernel(variant: Variant, device_id: int):
    """The cupy.RawKernel of `variant` on `device_id`, with its dynamic shared memory limit raised (once: the
    launches reuse it)."""
    kernel = _raw_module(variant.module_key, device_id).get_function(variant.expression)
    if variant.shared_bytes > 48 * 1024:
        # Blocks may use more than 48 KiB of dynamic shared memory only after opting in per kernel.
        kernel.max_dynamic_shared_size_bytes = variant.shared_bytes
    return kernel
