"""Compiles every kernel module this GPU's arch uses into CuPy's disk cache, in parallel: NVRTC takes ~10 s per
(pass, dtype, head dim) module, which tests and benchmarks would otherwise pay one by one at first use. The processes
fork before the parent touches CUDA (the GPU's arch is read from nvidia-smi). Used by benchmarks/gpu_check.sh and
benchmarks/e2e_check.sh."""
import multiprocessing
import os
import subprocess
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
    keys = jit.module_keys(f"sm_{cap[0].replace('.', '')}" if cap else None)
    with multiprocessing.get_context("fork").Pool(min(len(keys), os.cpu_count() or 1)) as pool:
        print("\n".join(pool.map(build, keys)))


if __name__ == "__main__":
    main()
