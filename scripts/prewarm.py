"""Compiles every kernel module this GPU's arch uses into CuPy's disk cache, in parallel: NVRTC takes ~10 s per
(pass, dtype, head dim) module, which tests and benchmarks would otherwise pay one by one at first use. The processes
fork before the parent touches CUDA (the GPU's arch is read from nvidia-smi). Used by benchmarks/gpu_check.sh,
benchmarks/e2e_check.sh and benchmarks/revisions_ab.py.

    python scripts/prewarm.py                   # every module
    python scripts/prewarm.py sm90 bfloat16     # those whose key's repr holds every argument
"""
import multiprocessing
import os
import subprocess
import sys
import time

from cupyflash import jit


def build(key) -> str:
    t = time.time()
    jit._raw_module(key, 0)
    return f"{key}: {time.time() - t:.1f} s"


def main() -> None:
    # The modules built for this GPU's arch (the sm_90a ones only on Hopper), read without touching CUDA before fork.
    cap = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.split()
    keys = [key for key in jit.module_keys(f"sm_{cap[0].replace('.', '')}" if cap else None)
            if all(f in repr(key) for f in sys.argv[1:])]
    if not keys:
        return
    with multiprocessing.get_context("fork").Pool(min(len(keys), os.cpu_count() or 1)) as pool:
        print("\n".join(pool.map(build, keys)))


if __name__ == "__main__":
    main()
