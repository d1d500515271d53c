"""kernels_cu/wgmma.cuh's CF_WGMMA_* macros are scripts/wgmma_macros.py's output (up to whitespace), one SS and one RS
macro per N that Wgmma dispatches to: their operand numbering is generated, not typed."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADER = (ROOT / "kernels_cu" / "wgmma.cuh").read_text()
_spec = importlib.util.spec_from_file_location("wgmma_macros", ROOT / "scripts" / "wgmma_macros.py")
wgmma_macros = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wgmma_macros)

DEFINED = sorted({int(n) for n in re.findall(r"#define CF_WGMMA_SS_(\d+)\(", HEADER)})


def _macro(kind: str, n: int) -> str:
    """The macro's text in the header: from its #define to the line that does not continue."""
    start = HEADER.index(f"#define CF_WGMMA_{kind}_{n}(")
    lines = []
    for line in HEADER[start:].splitlines():
        lines.append(line)
        if not line.rstrip().endswith("\\"):
            return "\n".join(lines)
    raise AssertionError(f"CF_WGMMA_{kind}_{n} never ends")


def _squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text.replace("\\\n", "\n"))


@pytest.mark.parametrize("n", DEFINED)
def test_macros_match_the_generator(n):
    generated = wgmma_macros.macros(n)
    for kind in ("SS", "RS"):
        ours = _squeeze(_macro(kind, n))
        assert ours in _squeeze(generated), f"CF_WGMMA_{kind}_{n} differs from scripts/wgmma_macros.py's"


def test_wgmma_dispatches_to_every_macro():
    listed = re.search(r"has_wgmma_n\(int n\) \{\s*return (n == \d+(?:\s*\|\|\s*n == \d+)*);", HEADER).group(1)
    assert sorted(int(n) for n in re.findall(r"n == (\d+)", listed)) == DEFINED
    for kind in ("SS", "RS"):
        assert sorted(int(n) for n in re.findall(rf"CF_{kind}\((\d+)\)", HEADER)) == DEFINED
