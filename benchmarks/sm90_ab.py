"""The Hopper kernels against the mma.sync kernels they replace (CUPYFLASH_SM90=0) and torch SDPA, in one run.

    python benchmarks/sm90_ab.py                      # bf16, head dims 64 and 128, causal or not, N 1024/4096/16384
    python benchmarks/sm90_ab.py --dtype fp16 --head-dims 128 --seqlens 2048,8192

Prints one line per (head dim, mask, N, pass): TFLOP/s of each implementation. Same shapes, FLOP counts and timer
as `cupyflash bench` (cupyflash/bench_shapes.py, gpu_timing.median_timer); the environment switch is read per
launch (cupyflash/launch.py sm90_unsupported), so both cupyflash rows time the same process and inputs.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from cupyflash import bench_impls, launch
from cupyflash.bench import DTYPES
from cupyflash.bench_shapes import attention_flops, bench_shape
from cupyflash.errors import gpu_missing
from cupyflash.gpu_timing import median_timer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--seqlens", default="1024,4096,16384")
    parser.add_argument("--passes", default="fwd,bwd")
    args = parser.parse_args(argv)
    if gpu_missing("sm90_ab.py"):
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    method, bench = median_timer()
    print(f"# {torch.cuda.get_device_name()}, {args.dtype}, {method}; TFLOP/s")
    for d in (int(x) for x in args.head_dims.split(",")):
        for causal in (False, True):
            for n in (int(x) for x in args.seqlens.split(",")):
                shape = bench_shape(n, d)  # (B, H, N, D)
                batch, heads = shape[:2]
                q, k, v, dout = bench_impls.make_inputs(shape, dtype)
                for mode in args.passes.split(","):
                    flops = attention_flops(batch, heads, n, n, d, causal, mode)
                    res = {}
                    for tag, env in (("hopper", "1"), ("mma.sync", "0")):
                        os.environ[launch.SM90_ENV] = env
                        res[tag] = bench(bench_impls.pass_fn("cupyflash", mode, q, k, v, dout, causal))
                    os.environ.pop(launch.SM90_ENV)
                    for peer in ("sdpa-flash", "sdpa-cudnn"):
                        res[peer] = bench(bench_impls.pass_fn(peer, mode, q, k, v, dout, causal))
                    print(f"{mode:3s} d{d} {'causal' if causal else 'full  '} N={n:5d}: "
                          + "  ".join(f"{name}={flops / ms / 1e9:.0f}" for name, ms in res.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
