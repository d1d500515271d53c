"""Host time per call of the forward (and fwd+bwd) with the GPU idle (B = H = 1, N = 128), through the public API
and the launch layer, beside torch SDPA's: what a short sequence pays on top of its kernels.

    python benchmarks/host_overhead.py
"""
from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

import cupyflash
from cupyflash import cuda_attention, launch
from cupyflash.errors import gpu_unavailable_reason


def per_call_us(fn, n: int = 400) -> float:
    """Best of 3 batches of `n` calls: host wall time per call (the GPU work is tiny and asynchronous)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    torch.cuda.synchronize()
    return best


def main() -> int:
    reason = gpu_unavailable_reason()
    if reason:
        print(f"no GPU: {reason}", file=sys.stderr)
        return 2
    q, k, v, g = (torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = cuda_attention.forward(q, k, v, None, 0.088, False)
    buf, ctx = cuda_attention._buf, cuda_attention._launch_context(q, k)

    def fwd_bwd():
        torch.autograd.grad(cupyflash.flash_attention(*leaves), leaves, g)

    rows = {
        "flash_attention fwd (requires_grad)": lambda: cupyflash.flash_attention(*leaves),
        "flash_attention fwd (no grad)": lambda: cupyflash.flash_attention(q, k, v),
        "flash_attention fwd + bwd": fwd_bwd,
        "launch.forward (Bufs made)": lambda: launch.forward(
            causal=False, shape=(1, 1, 128, 128), n_k=128, q=buf(q), k=buf(k), v=buf(v), out=buf(out), lse=buf(lse),
            scale=0.088, mods=launch.ScoreMods(), **ctx),
        "SDPA flash fwd (no grad)": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA flash fwd (requires_grad)": lambda: F.scaled_dot_product_attention(*leaves),
    }
    print(f"# {torch.cuda.get_device_name()}: host time per call, B = H = 1, N = 128, D = 128, bf16")
    for name, fn in rows.items():
        print(f"{name:40s} {per_call_us(fn):7.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
