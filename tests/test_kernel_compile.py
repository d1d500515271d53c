"""Every shipped kernel variant compiles with NVRTC for sm_80 and sm_90 (the Hopper kernels for sm_90a only; no GPU
needed), without register spills or serialized wgmma and within what one SM can hold; and the source handed to CuPy
carries every header's text, so CuPy's disk-cache key changes when a header does."""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import shutil

import pytest

try:
    from cupyflash import jit

    VARIANTS = jit.all_variants()
    UNAVAILABLE = None
except Exception as err:  # jit.py missing or failing at import: collection must still succeed
    jit, VARIANTS = None, []
    UNAVAILABLE = f"cupyflash.jit is not usable: {type(err).__name__}: {err}"

ARCHS = ("sm_80", "sm_90")
# Opt-in dynamic shared memory per block (CUDA C Programming Guide, compute capabilities table).
MAX_SHARED_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
REGISTERS_PER_SM = 64 * 1024


def _variant_arch_params():
    """Each variant with each arch it is built for (the Hopper kernels: sm_90 only)."""
    if UNAVAILABLE:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=UNAVAILABLE), id="no-jit")]
    return [pytest.param(v, arch, id=f"{v.name}-{arch}") for v in VARIANTS for arch in ARCHS
            if v.compiles_for(arch)]


@functools.lru_cache(maxsize=None)
def _reports(module_key, arch):
    """One NVRTC compile per (module, arch) serves every variant in that module."""
    return {r.variant: r for r in jit.compile_module_reports(module_key, arch)}


def _compile(pair):
    """_reports' dict of one (module, arch) in a worker process, or the compile's error to raise in its tests."""
    try:
        return pair, _reports(*pair)
    except Exception as err:  # noqa: BLE001 - each test of the module reports it
        return pair, err


@pytest.fixture(scope="module")
def _precompiled(request) -> dict:
    """The (module, arch) pairs the selected variant tests need, compiled on every core at once: NVRTC runs on one,
    and one after another these compiles were about half of CI's time on its 2 cores."""
    if UNAVAILABLE:
        return {}
    pairs = {(item.callspec.params["variant"].module_key, item.callspec.params["arch"])
             for item in request.session.items
             if getattr(item, "originalname", "") == "test_variant_compiles_without_spills"
             and item.callspec.params.get("variant") is not None}
    workers = min(len(pairs), os.cpu_count() or 1)
    if workers < 2:
        return {}
    # The Hopper modules first: the largest compiles, so that none is left running alone at the end.
    order = sorted(pairs, key=lambda pair: (pair[0][0] != "sm90", repr(pair)))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(pool.map(_compile, order))


def _report(variant, arch, precompiled=None):
    if hasattr(jit, "compile_module_reports") and hasattr(variant, "module_key"):
        reports = (precompiled or {}).get((variant.module_key, arch))
        if isinstance(reports, Exception):
            raise reports
        return (reports if reports is not None else _reports(variant.module_key, arch))[variant]
    return jit.compile_variant(variant, arch)


@pytest.fixture(scope="module", autouse=True)
def _nvrtc_available():
    if UNAVAILABLE:
        return
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as err:
        pytest.skip(f"NVRTC cannot be loaded ({type(err).__name__}: {err}); pip install 'cuda-toolkit[nvrtc]==13.*'")


def test_variants_are_listed():
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    names = [v.name for v in VARIANTS]
    assert names and len(names) == len(set(names)), "variant names must be unique and non-empty"


@pytest.mark.parametrize("variant,arch", _variant_arch_params())
def test_variant_compiles_without_spills(variant, arch, _precompiled):
    report = _report(variant, arch, _precompiled)
    assert 0 < report.registers <= 255, f"{variant.name} {arch}: {report.registers} registers (ptxas -v parsed?)"
    assert report.spill_stores == 0 and report.spill_loads == 0, (
        f"{variant.name} {arch}: {report.spill_stores} B spill stores, {report.spill_loads} B spill loads "
        f"with {report.registers} registers")
    assert not report.serialized_wgmma, (
        f"{variant.name} {arch}: ptxas serialized its wgmma instructions (C7512/C7514/C7515 in the NVRTC log): too few "
        "registers for the accumulators in flight, a non-wgmma instruction touching an accumulator, or data-dependent "
        "control flow between a GEMM's issue and its wait")
    assert report.shared_bytes <= MAX_SHARED_BYTES[arch], (
        f"{variant.name} {arch}: {report.shared_bytes} B shared > {MAX_SHARED_BYTES[arch]} B per block")
    tiles = getattr(variant, "tiles", None)
    if tiles is not None:  # a block must fit one SM's register file, else the launch fails
        assert report.registers * tiles.threads <= REGISTERS_PER_SM, (
            f"{variant.name} {arch}: {report.registers} registers x {tiles.threads} threads > {REGISTERS_PER_SM}")


@pytest.mark.parametrize("remark", [
    # the forms ptxas printed for our kernels: too few registers (the d128 80-row backward at 232 a consumer thread,
    # session 25), and an accumulator touched inside a pipeline stage
    "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
    "insufficient register resources for the function '_Z6kernelPf'",
    "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non "
    "wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in "
    "the function '_Z6kernelPf'",
])
def test_serialized_wgmma_remarks_are_recognized(remark):
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    assert [m.group(2) for m in jit._PTXAS_SERIALIZED.finditer(f"ptxas info : ok\n{remark}\n")] == ["_Z6kernelPf"]


def test_header_edit_changes_compiled_source(tmp_path, monkeypatch):
    """Copy the kernels to a tmp dir (CUPYFLASH_KERNEL_DIR), edit one header at a time: the source of some
    variant must change (it is CuPy's cache key), with the header's text inlined, no local #include left."""
    if UNAVAILABLE:
        pytest.skip(UNAVAILABLE)
    kernel_dir = tmp_path / "kernels_cu"
    shutil.copytree(jit.kernel_dir(), kernel_dir)
    monkeypatch.setenv("CUPYFLASH_KERNEL_DIR", str(kernel_dir))
    headers = sorted(p for p in kernel_dir.iterdir() if p.suffix in (".cuh", ".h", ".hpp"))
    assert headers, f"no headers under {kernel_dir}"
    before = {v: jit.source_for(v) for v in VARIANTS}
    for header in headers:
        assert f'#include "{header.name}"' not in "".join(before.values()), f"{header.name} is not inlined"
    for i, header in enumerate(headers):
        marker = f"#define CUPYFLASH_TEST_EDIT_{i} 1"
        header.write_text(header.read_text() + f"\n{marker}\n")
        after = {v: jit.source_for(v) for v in VARIANTS}
        changed = [v.name for v in VARIANTS if after[v] != before[v]]
        assert changed, f"editing {header.name} changed no variant's source: CuPy's cache would serve stale code"
        assert all(marker in after[v] for v in VARIANTS if v.name in changed)
        before = after
