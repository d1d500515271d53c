"""The wheel: it ships the CUDA sources, installs (not editable) and works from another directory, with its
console script, its torch.compile entry point, and an import that needs neither torch nor a GPU."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cupyflash", "compile_backend", "kernels_cu")


def _setuptools_missing() -> str | None:
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed, so `pip wheel --no-build-isolation` cannot build here"
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 64:
        return f"setuptools {setuptools.__version__} is older than the >=64 pyproject.toml requires"
    return None


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    reason = _setuptools_missing()
    if reason:
        pytest.skip(reason)
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources, and others may be
    # building in the shared tree at the same time.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", str(src),
                           "-w", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, f"pip wheel failed:\n{proc.stdout}\n{proc.stderr}"
    (whl,) = out.glob("cupyflash-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel pip-installed (a real install, not editable) into a fresh target directory."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True)
    assert proc.returncode == 0, f"pip install failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def _run_elsewhere(args: list[str], pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    """Runs with only the installed copy importable: not the source tree, whatever the cwd."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath))}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_wheel_ships_every_cuda_source(wheel):
    sources = sorted(p for p in (ROOT / "kernels_cu").iterdir() if p.suffix in (".cu", ".cuh"))
    assert any(p.suffix == ".cu" for p in sources), "kernels_cu/ has no .cu file to ship"
    with zipfile.ZipFile(wheel) as zf:
        for path in sources:
            assert zf.read(f"kernels_cu/{path.name}") == path.read_bytes(), f"{path.name} differs in the wheel"


def test_installed_package_finds_its_kernels_from_another_directory(installed, tmp_path):
    code = ("import kernels_cu, cupyflash; from cupyflash import jit; "
            "print(kernels_cu.SOURCE_DIR); print(len(jit.source_for()))")
    proc = _run_elsewhere([sys.executable, "-c", code], [installed], tmp_path)
    assert proc.returncode == 0, proc.stderr
    source_dir, n_chars = proc.stdout.split()
    assert Path(source_dir).is_relative_to(installed)
    assert int(n_chars) > 1000  # flash_attn.cu with every shipped header inlined


def test_console_script_and_dynamo_entry_point(installed, tmp_path):
    script = installed / "bin" / "cupyflash"
    proc = _run_elsewhere([str(script), "--version"], [installed], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "cupyflash 0.1.0"
    code = ("from importlib.metadata import entry_points; "
            "print(entry_points(group='torch_dynamo_backends')['cupyflash'].value)")
    proc = _run_elsewhere([sys.executable, "-c", code], [installed], tmp_path)
    assert proc.stdout.strip() == "compile_backend:cupyflash_backend", proc.stderr


def test_imports_and_doctor_run_without_torch(installed, tmp_path):
    # A `torch` that fails to import stands in for a machine without torch.
    blocker = tmp_path / "no_torch"
    (blocker / "torch").mkdir(parents=True)
    (blocker / "torch" / "__init__.py").write_text("raise ImportError('torch is blocked for this test')\n")
    proc = _run_elsewhere([sys.executable, "-m", "cupyflash", "doctor", "--arch", "sm_80", "--only", "fwd_f16_d32"],
                          [blocker, installed], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "torch:        not found: pip install torch" in proc.stdout
    from cupyflash import jit

    n = sum("fwd_f16_d32" in v.name for v in jit.all_variants())
    assert f"kernels: {n} of {n} compiled" in proc.stdout
