"""The op's rows-without-keys work (``unseen_rows``, kernels_cu/unseen_rows.cuh) at the Llama layer's shape: B 4,
H 16, H_kv 4, N 2048, d128, bf16, causal, the keys of rows 1 and 3 half padded on the left (their first 1024
queries see no key). Op calls with ``unseen_rows`` 2 against 0 (the benchmarks' timer: gpu_timing.median_timer),
then the kernels' times under torch.profiler:

    python benchmarks/unseen_rows_bench.py
"""
from __future__ import annotations

import sys

import torch

from cupyflash.errors import gpu_missing
from cupyflash.gpu_timing import median_timer

B, H, HKV, N, D = 4, 16, 4, 2048, 128


def main() -> int:
    if gpu_missing("unseen_rows_bench.py"):
        return 2
    import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash.*)

    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, HKV, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool, device="cuda")
    keep[1::2, ..., : N // 2] = False
    dout = torch.randn_like(q)
    fwd, bwd, scale = torch.ops.cupyflash.flash_attn_fwd, torch.ops.cupyflash.flash_attn_bwd, D ** -0.5

    method, median_ms = median_timer()
    print(f"{torch.cuda.get_device_name()}: B {B}, H {H}/{HKV}, N {N}, d{D}, bf16, causal, left-padded rows 1 and 3")
    for mode in (0, 2):
        out, lse = fwd(q, k, v, keep, scale, True, unseen_rows=mode)
        t_fwd = median_ms(lambda: fwd(q, k, v, keep, scale, True, unseen_rows=mode)) * 1e3
        t_bwd = median_ms(lambda: bwd(dout, q, k, v, keep, out, lse, scale, True, unseen_rows=mode)) * 1e3
        print(f"unseen_rows {mode}: fwd {t_fwd:.0f} us, bwd {t_bwd:.0f} us ({method})")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            out, lse = fwd(q, k, v, keep, scale, True, unseen_rows=2)
            bwd(dout, q, k, v, keep, out, lse, scale, True, unseen_rows=2)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
