"""One backward pass of cupyflash and of FlashAttention-4 (where importable) per case, each alone inside the CUDA
profiler's range, for Nsight Compute to read their hardware counters side by side:

    ncu --profile-from-start off -k regex:'flash_bwd_sm90_kernel|BackwardSm90' --set full \\
        -o bwd python benchmarks/bwd_ncu.py --cases d128,d128c
    ncu --import bwd.ncu-rep --page details

A case is d<head dim>, with a trailing c for a causal mask; shapes as the floor's (batch·N = 16k tokens,
heads·head_dim = 2048) at --seqlen. Each implementation runs forward and backward twice first (compiles, caches),
then its timed-by-ncu backward from one forward.
"""
from __future__ import annotations

import argparse
import sys

import torch

from cupyflash import bench_impls
from cupyflash.bench import DTYPES
from cupyflash.bench_shapes import bench_shape
from cupyflash.errors import gpu_missing


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="d128,d128c")
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--impls", default="cupyflash,fa4")
    args = parser.parse_args(argv)
    if gpu_missing("bwd_ncu.py"):
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    cudart = torch.cuda.cudart()
    for case in args.cases.split(","):
        causal = case.endswith("c")
        d = int(case.rstrip("c")[1:])
        q, k, v, dout = bench_impls.make_inputs(bench_shape(args.seqlen, d), dtype)  # (B, H, N, D)
        for impl in args.impls.split(","):
            why = bench_impls.unavailable_reason(impl, q, k, v, dout, causal)
            if why:
                print(f"{case} {impl}: skipped: {why}")
                continue
            run_bwd = bench_impls.pass_fn(impl, "bwd", q, k, v, dout, causal)
            for _ in range(2):
                run_bwd()
            torch.cuda.synchronize()
            cudart.cudaProfilerStart()
            run_bwd()
            torch.cuda.synchronize()
            cudart.cudaProfilerStop()
            print(f"{case} {impl}: profiled one backward of {tuple(q.shape)} {args.dtype}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
