"""The user-facing command end to end (``cupyflash demo`` / ``doctor`` as subprocesses, on the CPU in CI), and
the parts it is made of: one-sentence errors, the progress bar, the logging switch."""
from __future__ import annotations

import io
import logging
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cupyflash import demo, errors, log
from cupyflash.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


def _run(args: list[str], env: dict | None = None, timeout: int = 300,
         unset: tuple = ()) -> subprocess.CompletedProcess:
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _variant_names(containing: str, arch: str) -> list[str]:
    """The variants doctor compiles for `arch` whose names contain `containing`."""
    from cupyflash import jit

    return [v.name for v in jit.all_variants() if containing in v.name and v.compiles_for(arch)]


def _demo_commands() -> list:
    script = shutil.which("cupyflash")
    return [pytest.param([sys.executable, "-m", "cupyflash"], id="python -m cupyflash"),
            pytest.param([script or "cupyflash"], id="console script", marks=pytest.mark.skipif(
                script is None, reason="no `cupyflash` on PATH: the package is not pip-installed here"))]


# ---- end to end -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", _demo_commands())
def test_demo_fuses_and_passes(command):
    # On a GPU machine the default run times full-size models for minutes; --cpu keeps this a CI-sized check.
    proc = _run(command + ["demo"] + (["--cpu"] if HAS_GPU else []))
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    first = out.splitlines()[0]
    if HAS_GPU:
        assert first.startswith("--cpu: running the CPU path")
    else:
        assert re.fullmatch(r"No GPU: .+\. Running the CPU path \(.+\)\.", first), first
    report = out.split("rewrite report:\n", 1)[1].split("\ncheck against", 1)[0]
    assert re.search(r"\b2 fused\b", report) and report.count(": FUSED") == 2, report
    assert "fused attention sites: 2 (the model has 2 attention layers)  ok" in out
    assert "FAIL" not in out
    assert out.rstrip().endswith("PASS")


@pytest.mark.gpu
def test_demo_on_gpu_times_three_variants_side_by_side():
    proc = _run([sys.executable, "-m", "cupyflash", "demo", "--steps", "3"], timeout=1200)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert not out.startswith("No GPU")
    assert "fused attention sites: 6 (the model has 6 attention layers)  ok" in out
    table = out.split("training step on ", 1)[1].splitlines()[2:5]
    assert [row.split()[0] for row in table] == ["eager", "torch.compile", "cupyflash"], out
    assert "\nPASS\n" in out


def test_doctor_reports_versions_and_compiles_every_variant(tmp_path):
    # Every bf16 variant of one head dim (all kernels, causal or not, both families: 5 modules) keeps this quick on 2
    # cores; test_kernel_compile.py compiles the full set. An empty cache: the reports come from NVRTC.
    proc = _run([sys.executable, "-m", "cupyflash", "doctor", "--only", "bf16_d64"],
                env={"CUPY_CACHE_DIR": str(tmp_path)})
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    for label in ("GPU", "driver", "CUDA runtime", "CuPy", "torch", "NVRTC", "kernel cache", "cache size"):
        assert re.search(rf"^{label}: +\S", out, re.M), f"no {label} line in:\n{out}"
    assert re.search(rf"^torch: +{re.escape(torch.__version__)} ", out, re.M)
    assert re.search(r"^NVRTC: +\d+\.\d+$", out, re.M)
    if not HAS_GPU:
        assert re.search(r"^GPU: +not found: .+; run on a machine with an NVIDIA GPU", out, re.M)
    arches = re.search(r"^kernel variants for (.+) \(", out, re.M).group(1).split(", ")
    if not HAS_GPU:
        assert arches == ["sm_80", "sm_90"]
    expected = {(arch, name) for arch in arches for name in _variant_names("bf16_d64", arch)}
    assert expected, "no head_dim 64 variant to check"
    compiled = set(re.findall(r"^  ok +(sm_\d+)  (\S+) +\d+ regs", out, re.M))
    assert compiled == expected
    assert re.search(r"^  compile reports: 0 of (\d+) modules cached \(.+\); compiling \1, about \d+ (s|min) on "
                     r"\d+ cores$", out, re.M), out
    assert f"kernels: {len(expected)} of {len(expected)} compiled" in out


def test_doctor_reports_a_failed_compile_plainly(tmp_path):
    broken = tmp_path / "kernels"
    shutil.copytree(ROOT / "kernels_cu", broken)
    with open(broken / "flash_fwd.cuh", "a") as f:
        f.write("\nthis_is_not_cuda;\n")
    proc = _run([sys.executable, "-m", "cupyflash", "doctor", "--arch", "sm_80", "--only", "fwd_f16_d32"],
                env={"CUPYFLASH_KERNEL_DIR": str(broken)})
    n = len(_variant_names("fwd_f16_d32", "sm_80"))
    assert proc.returncode == 1
    assert re.search(r"^  FAILED sm_80  fwd_f16_d32\b.*: .*error", proc.stdout, re.M), proc.stdout
    assert f"kernels: 0 of {n} compiled, {n} FAILED" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_user_error_is_one_sentence_with_exit_code_2(tmp_path):
    # A `matplotlib` that fails to import stands in for a machine without it.
    (tmp_path / "matplotlib").mkdir()
    (tmp_path / "matplotlib" / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    proc = _run([sys.executable, "-m", "cupyflash", "demo", "--plot", str(tmp_path / "t.png")],
                env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["cupyflash: --plot needs matplotlib, which is not installed; "
                                        "pip install 'cupyflash[plot]' or drop --plot."]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The message of a user error: exit code 2, one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cupyflash: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("where", ["CUPY_CACHE_DIR", "default"])
def test_a_cupy_cache_dir_that_cannot_be_made_is_one_sentence(tmp_path, where):
    # CuPy makes its kernel cache directory when imported; a file in the way fails `import cupy` itself.
    if where == "CUPY_CACHE_DIR":
        (tmp_path / "a_file").write_text("")
        env, unset, words = {"CUPY_CACHE_DIR": str(tmp_path / "a_file")}, (), (
            f"CuPy cannot start: CUPY_CACHE_DIR={tmp_path / 'a_file'} is a file, not a directory; point "
            "CUPY_CACHE_DIR at a directory you can write, or unset it.")
    else:  # the default, ~/.cupy/kernel_cache, under a ~/.cupy that is a file
        (tmp_path / ".cupy").write_text("")
        env, unset, words = {"HOME": str(tmp_path)}, ("CUPY_CACHE_DIR",), (
            f"CuPy cannot start: CuPy's default kernel cache {tmp_path / '.cupy' / 'kernel_cache'} cannot be "
            f"created (Not a directory: {tmp_path / '.cupy' / 'kernel_cache'}); set CUPY_CACHE_DIR to a directory "
            "you can write.")
    proc = _run([sys.executable, "-m", "cupyflash", "doctor"], env=env, unset=unset)
    assert _one_line_error(proc) == f"cupyflash: {words}"


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_demo_and_bench_without_torch_say_to_install_it(command):
    # `None` in sys.modules makes `import torch` raise ImportError, as on a machine without torch.
    shim = "import sys; sys.modules['torch'] = None; from cupyflash.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = _run([sys.executable, "-c", shim, command], env={"PYTHONPATH": str(ROOT)})
    message = _one_line_error(proc)
    assert message.startswith(f"cupyflash: cupyflash {command} needs torch, which is not installed (")
    assert message.endswith("; pip install torch (the CuPy API and `cupyflash doctor` work without it).")


def _supported_arches() -> list[str]:
    return [f"sm_{n}" for n in errors.nvrtc_archs() if n >= 80]


@pytest.mark.parametrize("arch,why", [
    ("sm_70", "is older than sm_80 (Ampere), the oldest the cupyflash kernels support"),
    ("foo", "is not an architecture name of the form sm_XX"),
    ("sm_90a", "is not an architecture name of the form sm_XX"),
    ("sm_85", "is not one this NVRTC can compile for"),
])
def test_doctor_refuses_an_arch_it_cannot_build_and_lists_those_it_can(capsys, arch, why):
    from cupyflash import cli

    if errors.nvrtc_archs() is None:
        pytest.skip("NVRTC cannot be loaded")
    assert cli.main(["doctor", "--arch", "sm_80", "--arch", arch]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before anything is printed or compiled
    assert err == f"cupyflash: --arch {arch} {why}; pass one of {', '.join(_supported_arches())}.\n"
    assert "sm_80, sm_86" in err and "sm_90" in err


@pytest.mark.parametrize("only,arch,hint", [
    ("nothing", "sm_80", "names read kernel_dtype_dHEADDIM[_causal][_mods][_dropout], e.g. fwd_bf16_d64_causal"),
    ("fwd_sm90", "sm_80", "those variants are built for sm_90 only (--arch sm_90)"),
])
def test_doctor_only_that_matches_nothing_says_what_names_look_like(capsys, tmp_path, monkeypatch, only, arch, hint):
    from cupyflash import cli

    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    assert cli.main(["doctor", "--arch", arch, "--only", only]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cupyflash: no kernel variant for {arch} has {only!r} in its name; ")
    assert hint in err and err.count("\n") == 1


def test_a_file_the_system_refuses_is_one_sentence(monkeypatch, capsys):
    from cupyflash import cli

    def cannot_write(**kwargs):
        raise PermissionError(13, "Permission denied", "/read-only/timings.png")

    monkeypatch.setattr(demo, "run", cannot_write)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == "cupyflash: /read-only/timings.png: Permission denied.\n"


# ---- the parts --------------------------------------------------------------------------------------

def test_cli_unwraps_a_user_error_raised_inside_torch_compile(monkeypatch, capsys):
    from torch._dynamo.exc import BackendCompilerFailed

    from cupyflash import cli

    message = "kernel fwd_bf16_d64 failed to compile for sm_90: error: x; report it."

    def compile_fails(**kwargs):
        cause = errors.KernelCompileError(message)
        raise BackendCompilerFailed(lambda gm, inputs: None, cause, None)

    monkeypatch.setattr(demo, "run", compile_fails)
    assert cli.main(["demo"]) == 2
    assert capsys.readouterr().err == f"cupyflash: {message}\n"
    monkeypatch.setattr(demo, "run", lambda **kwargs: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        cli.main(["demo"])


def _fake_cupy(*, count=1, major=9, minor=0, runtime_error=None, nvrtc_error=None):
    class CUDARuntimeError(RuntimeError):
        pass

    def call(value):
        def f(*args):
            if runtime_error:
                raise CUDARuntimeError(runtime_error)
            return value
        return f

    def nvrtc_version():
        if nvrtc_error:
            raise nvrtc_error
        return (13, 0)

    runtime = types.SimpleNamespace(
        CUDARuntimeError=CUDARuntimeError, getDevice=call(0), getDeviceCount=call(count),
        getDeviceProperties=call({"name": b"Fake GPU", "major": major, "minor": minor}),
        driverGetVersion=lambda: 13000)
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=runtime,
                                                            nvrtc=types.SimpleNamespace(getVersion=nvrtc_version)))


@pytest.fixture
def fake_cupy(monkeypatch):
    def install(**kwargs):
        errors._checked_device.cache_clear()
        monkeypatch.setattr(errors, "require_cupy", lambda: _fake_cupy(**kwargs))
    yield install
    errors._checked_device.cache_clear()


def test_require_gpu_accepts_sm80_and_newer(fake_cupy):
    fake_cupy(major=8, minor=0)
    assert errors.require_gpu() == errors.GPUInfo(0, "Fake GPU", 80)


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(major=7, minor=5), errors.UnsupportedGPUError, "GPU 0 (Fake GPU) is sm_75, and the cupyflash kernels "
                                                         "need sm_80 (Ampere) or newer"),
    (dict(count=0), errors.NoGPUError, "No CUDA GPU is visible"),
    (dict(runtime_error="cudaErrorNoDevice: no CUDA-capable device is detected"), errors.NoGPUError,
     "No usable CUDA GPU (no CUDA-capable device is detected); run on a machine with an NVIDIA GPU"),
])
def test_require_gpu_says_what_happened_and_what_to_do(fake_cupy, kwargs, error, words):
    fake_cupy(**kwargs)
    with pytest.raises(error) as info:
        errors.require_gpu()
    message = str(info.value)
    assert words in message
    assert message.count(". ") == 0 and message.endswith(".")  # one sentence


def test_missing_cupy_and_nvrtc(fake_cupy, monkeypatch):
    fake_cupy(nvrtc_error=RuntimeError("libnvrtc.so.13: cannot open shared object file"))
    with pytest.raises(errors.NVRTCNotFoundError, match=r"could not be loaded \(RuntimeError\); pip install"):
        errors.require_nvrtc()
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(errors.CupyNotFoundError, match=r"CuPy is not installed .*pip install 'cupyflash\[cuda13\]'"):
        errors.require_gpu()


def test_demo_without_a_gpu_says_why():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    assert demo.gpu_unavailable_reason()


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("tty", [True, False])
def test_progress_redraws_on_a_tty_and_prints_only_a_summary_elsewhere(tty):
    stream = _Stream(tty)
    with Progress(4, "compiling", stream=stream) as bar:
        for i in range(4):
            bar.advance(note=f"k{i}")
    text = stream.getvalue()
    assert re.search(r"compiling: 4/4 in \d+\.\ds\n$", text)
    if tty:
        assert "\rcompiling [##############..............] 2/4 k1" in text
    else:
        assert text.count("\n") == 1 and "\r" not in text


def test_log_env_var_turns_on_debug(monkeypatch):
    monkeypatch.setattr(log.logger, "handlers", [])
    monkeypatch.setattr(log.logger, "level", logging.NOTSET)
    monkeypatch.setattr(log.logger, "propagate", True)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("CUPYFLASH_LOG", "debug")
    log.setup()
    log.setup()  # idempotent: one handler, one line per record
    logging.getLogger("cupyflash.jit").debug("compiling %s", "fwd_bf16_d64")
    assert stream.getvalue() == "cupyflash DEBUG cupyflash.jit: compiling fwd_bf16_d64\n"


def test_tolerance_rule_fails_what_it_should():
    torch.manual_seed(0)
    ref = {"logits": torch.randn(64, dtype=torch.float64), "grad w": torch.randn(64, dtype=torch.float64)}
    eager = {name: t.float() for name, t in ref.items()}  # fp32 rounding error only
    close = {name: t.float() for name, t in ref.items()}
    far = {name: t.float() + 1e-3 for name, t in ref.items()}
    assert all(c.ok for c in demo.compare(ref, eager, close))
    checks = demo.compare(ref, eager, far)
    assert not any(c.ok for c in checks)
    floors = [demo._rounding_floor(eager[c.name]) for c in checks]
    assert [c.bound for c in checks] == pytest.approx([2 * checks[0].eager_err + floors[0],  # outputs: 2x
                                                       3 * checks[1].eager_err + floors[1]])  # gradients: 3x


def test_timing_table():
    timings = [demo.Timing("eager", 100.0, 3000.0, 8192), demo.Timing("cupyflash", 50.0, 1000.0, 8192)]
    lines = demo.format_table(timings).splitlines()
    assert lines[1].split() == ["eager", "100.00", "81,920", "1.00x", "3,000"]
    assert lines[2].split() == ["cupyflash", "50.00", "163,840", "2.00x", "1,000"]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (the `plot` extra)")
    path = tmp_path / "t.png"
    demo.plot([demo.Timing("eager", 100.0, 3000.0, 8192)], str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
