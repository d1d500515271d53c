"""What the compiler made of the kernels: per variant, the SASS instruction mix that shows where the work goes
(tensor-core HMMA, ldmatrix LDSM, cp.async LDGSTS, 16-byte global loads, MUFU.EX2 for exp2, local-memory
spills) beside registers and spill bytes from ptxas.

    python benchmarks/sass_report.py --out benchmarks/results/sass-sm_90.md     # needs cuobjdump or nvdisasm

cuobjdump comes with the CUDA toolkit, or without one from PyPI: `pip install "nvidia-cuda-cuobjdump==13.*"` (or
nvdisasm, `nvidia-cuda-nvdisasm`), then put its `nvidia/cu13/bin` (under site-packages) on PATH.

NVRTC compiles each module for the arch without a GPU; cuobjdump disassembles the cubin.
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from cupyflash import jit, tiles

MODULES = [("fwd", "bfloat16", 64), ("fwd", "bfloat16", 128), ("bwd", "bfloat16", 64), ("bwd", "bfloat16", 128),
           ("fwd", "float32", 64), ("bwd", "float32", 64)]
# (column, SASS opcode prefix): what each shows
COLUMNS = [("HMMA", "HMMA"), ("LDSM", "LDSM"), ("LDGSTS (cp.async)", "LDGSTS"), ("of them 16-byte", "LDGSTS.E.BYPASS.128"), ("LDS", "LDS"),
           ("LDG.E.128", "LDG.E.128"), ("MUFU.EX2", "MUFU.EX2"), ("STL/LDL (spills)", "STL|LDL"),
           ("RED/ATOM (atomics)", "RED|ATOM"), ("all", "")]
# The Hopper kernels (sm_90a only): wgmma (HGMMA), the waits for them (WARPGROUP.DEPBAR: as many as HGMMAs when
# ptxas serialized them, a handful when they overlap), TMA copies (UTMALDG), mbarrier waits and arrivals (SYNCS), exp2,
# shared-memory traffic outside the GEMMs (LDS/STS: LSE/D, dSᵀ and dQ's staging in the backward), dQ's bulk reduce-adds.
SM90_MODULES = [("sm90", "bfloat16", d) for d in tiles.FORWARD_SM90]
SM90_COLUMNS = [("HGMMA", "HGMMA"), ("wgmma waits", "WARPGROUP.DEPBAR"), ("UTMALDG (TMA)", "UTMALDG"), ("SYNCS (mbarrier)", "SYNCS"), ("MUFU.EX2", "MUFU.EX2"),
                ("LDS", "LDS"), ("STS", "STS"), ("STL/LDL (spills)", "STL|LDL"), ("RED/ATOM (atomics)", "RED|ATOM"),
                ("UBLKRED (bulk reduce-add)", "UBLKRED"), ("all", "")]
_FUNC = re.compile(r"Function : (\S+)|^\s*\.text\.(\S+):")
_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_counts(cubin: Path) -> dict:
    """{mangled kernel name: Counter of full opcodes (with modifiers)}."""
    run = None
    if shutil.which("cuobjdump"):
        run = subprocess.run(["cuobjdump", "-sass", str(cubin)], capture_output=True, text=True)
    if run is None or run.returncode != 0:  # an older cuobjdump may not read a newer NVRTC's cubin; nvdisasm does
        run = subprocess.run(["nvdisasm", "-c", str(cubin)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"cannot disassemble {cubin.name}: {run.stderr.strip()[:300]}")
    text = run.stdout
    counts, current = {}, None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            current = counts.setdefault(m.group(1) or m.group(2), collections.Counter())
            continue
        m = _INSTR.search(line)
        if m and current is not None:
            current[m.group(1)] += 1
    return counts


def column(counter: collections.Counter, prefix: str) -> int:
    if not prefix:
        return sum(counter.values())
    return sum(n for op, n in counter.items() if any(op.startswith(p) for p in prefix.split("|")))


def table_rows(modules, kernels, columns, arch: str) -> list[str]:
    """The markdown rows (header first) of `columns` for the variants of `kernels` in `modules`, compiled for `arch`."""
    rows = ["| variant | registers | spill B | " + " | ".join(c for c, _ in columns) + " |",
            "|---|---|---|" + "---|" * len(columns)]
    with tempfile.TemporaryDirectory() as tmp:
        for key in modules:
            cubin = Path(tmp) / ("_".join(map(str, key)) + ".cubin")
            reports = jit.compile_module_reports(key, arch, cubin_path=cubin)
            counts = sass_counts(cubin)
            for r in reports:
                if r.variant.kernel not in kernels:
                    continue
                c = counts.get(r.symbol, collections.Counter())
                rows.append(f"| {r.variant.name} | {r.registers} | {r.spill_stores + r.spill_loads} | "
                            + " | ".join(str(column(c, p)) for _, p in columns) + " |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args()
    if not (shutil.which("cuobjdump") or shutil.which("nvdisasm")):
        raise SystemExit("neither cuobjdump nor nvdisasm found: they ship with the CUDA toolkit (nvcc)")
    rows = [f"SASS instruction counts per kernel ({args.arch}, NVRTC, `python benchmarks/sass_report.py`)", "",
            *table_rows(MODULES, ("fwd", "bwd"), COLUMNS, args.arch)]
    if args.arch == "sm_90":
        rows += ["", "The Hopper kernels (sm_90a). Registers: ptxas's count at the launch bound (384 threads: 168; the d64 "
                 "forward's 512: 128); setmaxnreg then gives the consumer warpgroups 240 (forward; 160 with three "
                 "consumers) or 232 (backward) and the producer 24 or 40.", "",
                 *table_rows(SM90_MODULES, ("fwd_sm90", "bwd_sm90"), SM90_COLUMNS, args.arch)]
    table = "\n".join(rows)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
