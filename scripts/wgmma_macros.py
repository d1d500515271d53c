"""The CF_WGMMA_SS_<N> / CF_WGMMA_RS_<N> macros of kernels_cu/wgmma.cuh: wgmma.mma_async m64nNk16 with its N/2 fp32
accumulator operands spelled out, which inline PTX needs. A new N (a multiple of 8 up to 256) is one call:

    python scripts/wgmma_macros.py 176     # prints both macros, to paste beside the others in wgmma.cuh

tests/test_wgmma_macros.py checks every macro in wgmma.cuh against this generator.
"""
from __future__ import annotations

import sys


def macros(n: int) -> str:
    """The SS (A and B through shared-memory descriptors) and RS (A from registers) macros for N = n."""
    if n % 8 or not 8 <= n <= 256:
        raise ValueError(f"wgmma m64nNk16 takes N a multiple of 8 up to 256, not {n}")
    regs = n // 2  # accumulator registers per thread: d[N/8][4]
    outs = ", ".join(f'"+f"(d[{i}][{e}])' for i in range(n // 8) for e in range(4))
    acc = ", ".join(f"%{i}" for i in range(regs))
    op = f'"wgmma.mma_async.sync.aligned.m64n{n}k16.f32." TY "." TY " "'
    ss = [f"#define CF_WGMMA_SS_{n}(TY, TRANS_A, TRANS_B)",
          f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"',
          f"                 {op}",
          f'                 "{{{acc}}}, "',
          f'                 "%{regs}, %{regs + 1}, p, 1, 1, %{regs + 3}, %{regs + 4};\\n}}\\n"',
          f"                 : {outs}",
          '                 : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B))']
    rs = [f"#define CF_WGMMA_RS_{n}(TY, TRANS_B)",
          f'    asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"',
          f"                 {op}",
          f'                 "{{{acc}}}, "',
          f'                 "{{%{regs}, %{regs + 1}, %{regs + 2}, %{regs + 3}}}, %{regs + 4}, p, 1, 1, %{regs + 6};\\n}}\\n"',
          f"                 : {outs}",
          '                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(TRANS_B))']
    return "\n".join(_continued(ss) + _continued(rs)) + "\n"


def _continued(lines: list[str]) -> list[str]:
    """A macro's lines, each but the last ending in a line continuation at column 100 (or one space past the text)."""
    return [f"{ln:<99} \\" if i < len(lines) - 1 else ln for i, ln in enumerate(lines)]


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(macros(int(arg)))
