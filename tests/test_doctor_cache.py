"""``cupyflash doctor``'s compile reports are cached like CuPy's kernels: a second run reads them without compiling,
and a change to the source, the options, the arch or NVRTC compiles again. One small module (the fp16 tile
classification, about a second of NVRTC) keeps this quick."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from cupyflash import cli, doctor, errors, jit, report_cache

ONLY, ARCH = "tile_minmax_f16", "sm_80"
MODULE = ("tiles", "float16", 0)

pytestmark = pytest.mark.skipif(errors.nvrtc_archs() is None, reason="NVRTC cannot be loaded")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty report cache, and the list of (module, arch) NVRTC compiles, in order."""
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cupy"))
    compiles = []
    compile_module_reports = jit.compile_module_reports

    def counted(key, arch):
        compiles.append((key, arch))
        return compile_module_reports(key, arch)

    monkeypatch.setattr(jit, "compile_module_reports", counted)
    return compiles


def _doctor(capsys) -> tuple[list[str], str]:
    """One doctor compile of ONLY for ARCH: (its report lines, the cache line it printed)."""
    results = doctor.compile_variants([ARCH], ONLY)
    printed = capsys.readouterr().out
    assert all(r.error is None for r in results), results
    return [line for r in results for line in r.lines()], printed


def test_second_run_reads_the_cache(cache, capsys):
    first, printed = _doctor(capsys)
    assert cache == [(MODULE, ARCH)]
    assert re.fullmatch(r"  compile reports: 0 of 1 modules cached \(.+\); compiling 1, about \d+ s on \d+ cores\n",
                        printed), printed
    assert len(first) == 1 and re.match(rf"  ok     {ARCH}  {ONLY} +\d+ regs", first[0])

    second, printed = _doctor(capsys)
    assert cache == [(MODULE, ARCH)]  # no second compile
    assert second == first  # the same registers, spills and shared memory
    assert printed == f"  compile reports: 1 of 1 modules cached ({report_cache.cache_dir()})\n"


def test_a_source_edit_an_option_or_another_nvrtc_compiles_again(cache, capsys, tmp_path, monkeypatch):
    _doctor(capsys)
    kernels = tmp_path / "kernels"
    shutil.copytree(jit.kernel_dir(), kernels)
    with open(kernels / "tile_classes.cuh", "a") as f:
        f.write("\n// an edit: the compiled source is no longer the cached one\n")
    monkeypatch.setenv("CUPYFLASH_KERNEL_DIR", str(kernels))
    _, printed = _doctor(capsys)
    assert cache == [(MODULE, ARCH)] * 2 and "0 of 1 modules cached" in printed
    _doctor(capsys)
    assert len(cache) == 2  # the edited source is cached in turn

    monkeypatch.setattr(jit, "NVRTC_OPTIONS", (*jit.NVRTC_OPTIONS, "-DCUPYFLASH_TEST_OPTION=1"))
    _doctor(capsys)
    assert len(cache) == 3
    # One file per module and arch: storing the new reports removed the stale ones.
    assert [p.name.split("-")[:3] for p in report_cache.cache_dir().iterdir()] == [[ARCH, "tiles", "float16"]]


def test_the_fingerprint_covers_arch_and_nvrtc_version(cache, monkeypatch):
    base = jit.report_fingerprint(MODULE, ARCH)
    assert jit.report_fingerprint(MODULE, "sm_90") != base
    nvrtc = jit._nvrtc()

    class OtherNVRTC:
        def __getattr__(self, name):
            return getattr(nvrtc, name)

        @staticmethod
        def getVersion():
            return (99, 0)

    monkeypatch.setattr(jit, "_nvrtc", OtherNVRTC)
    assert jit.report_fingerprint(MODULE, ARCH) != base
    assert cache == []  # fingerprints compile nothing


def test_an_unreadable_entry_is_compiled_again(cache, capsys):
    first, _ = _doctor(capsys)
    (entry,) = report_cache.cache_dir().iterdir()
    entry.write_text('{"reports": {"tile_minmax_f16": {"registers": 40}}}')  # fields missing
    again, printed = _doctor(capsys)
    assert len(cache) == 2 and "0 of 1 modules cached" in printed and again == first
    assert json.loads(entry.read_text())["reports"][ONLY]["symbol"]  # rewritten whole


def test_the_estimate_uses_the_last_compile_time_of_the_module(cache, capsys):
    job = doctor._Job(MODULE, ARCH, (ONLY,))
    guess = doctor.SECONDS_PER_VARIANT * len(jit.module_variants(MODULE))
    assert doctor._estimate_seconds([job], workers=1) == pytest.approx(guess)
    report_cache.store(MODULE, ARCH, [], seconds=42.0)  # only its time is read
    assert doctor._estimate_seconds([job], workers=1) == 42.0
    two = [job, doctor._Job(MODULE, "sm_90", (ONLY,))]  # no time known for sm_90: the guess
    assert doctor._estimate_seconds(two, workers=1) == pytest.approx(42.0 + guess)
    assert doctor._estimate_seconds(two, workers=2) == 42.0  # no less than the slowest module


def test_doctor_twice_from_the_command_line(cache, capsys):
    def doctor_run() -> str:
        assert cli.main(["doctor", "--arch", ARCH, "--only", ONLY]) == 0
        return capsys.readouterr().out

    cold, warm = doctor_run(), doctor_run()
    assert len(cache) == 1
    assert "  compile reports: 0 of 1 modules cached" in cold and "  compile reports: 1 of 1 modules cached" in warm
    ok = [re.findall(r"^  ok .*$", out, re.M) for out in (cold, warm)]
    assert ok[0] == ok[1] and len(ok[0]) == 1
    assert "kernels: 1 of 1 compiled" in warm
