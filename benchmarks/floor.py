"""The performance floor: cupyflash against torch SDPA's flash and cuDNN backends and FlashAttention-4, fwd and
bwd, as a fixed preset of ``cupyflash bench`` (which does the measuring) that also writes the markdown table to a
file. The peers are ``cupyflash bench``'s defaults; FA4 runs where ``flash_attn.cute`` is importable
(``pip install flash-attn-4``, never a dependency of ours), elsewhere one line says it is skipped.

    python benchmarks/floor.py --out benchmarks/results/floor-h100.md --json benchmarks/results/floor-h100.json
    python benchmarks/floor.py --quick          # N = 1024, 4096, 16384 only
    python benchmarks/floor.py --fp16           # fp16 rows as well as bf16
    python benchmarks/floor.py --quick --head-dims 128   # half the JIT compiles (FA4's and ours)

Shapes: batch x N = 16k tokens, heads x head_dim = 2048, head dims 64 and 128, causal and not, N = 1024 ..
16384. On an H200 it took 41 s without FA4; FA4 adds its own timings (about a third more) and its JIT
compiles, once per process for each pass, head dim and mask (8; not yet timed). ``--quick`` runs 3 of the 5 N.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

from cupyflash import cli

SEQLENS = "1024,2048,4096,8192,16384"
QUICK_SEQLENS = "1024,4096,16384"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_SEQLENS} only")
    parser.add_argument("--fp16", action="store_true", help="add fp16 rows (bf16 always runs)")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated (default 64,128)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--warmup-ms", default="25")
    parser.add_argument("--rep-ms", default="100")
    args = parser.parse_args(argv)
    bench_argv = ["bench", "--head-dims", args.head_dims, "--dtypes", "bf16,fp16" if args.fp16 else "bf16",
                  "--causal", "no,yes", "--seqlens", QUICK_SEQLENS if args.quick else SEQLENS,
                  "--passes", "fwd,bwd",
                  "--warmup-ms", args.warmup_ms, "--rep-ms", args.rep_ms]
    if args.json:
        bench_argv += ["--json", str(args.json)]
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        rc = cli.main(bench_argv)
    print(table.getvalue(), end="")
    if args.out and rc != 2:  # 2: no GPU (the one-sentence reason is on stderr), nothing measured
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table.getvalue())
    return rc


if __name__ == "__main__":
    sys.exit(main())
