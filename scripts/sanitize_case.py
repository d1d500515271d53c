"""Small fwd+bwd launches for compute-sanitizer (memcheck, racecheck): every kernel variant family, ragged
lengths so the zero-filled tails and the causal diagonal are exercised.

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/sanitize_case.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python scripts/sanitize_case.py
"""
import os

import torch

import cupyflash  # noqa: F401  (registers torch.ops.cupyflash)
from cupyflash import launch


def main():
    torch.manual_seed(0)
    for d in (32, 64, 80, 96, 128, 160, 192, 256):  # 80, 160, 192: head dims only the Hopper kernels have
        for causal in (False, True):
            for n_q, n_k in ((77, 130), (130, 77), (390, 260)):  # 390: Q blocks in pairs and one alone (Hopper)
                q = torch.randn(1, 2, n_q, d, device="cuda", dtype=torch.float16)
                k, v = (torch.randn(1, 2, n_k, d, device="cuda", dtype=torch.float16) for _ in range(2))
                out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d ** -0.5, causal)
                torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, None, out, lse, d ** -0.5, causal)
    # Grouped-query heads and a transposed (B, N, H, D) view, bf16: on sm_90 the Hopper kernels' TMA maps.
    for d in (64, 128):
        q = torch.randn(2, 130, 4, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(2, 2, 77, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d ** -0.5, True)
        torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, None, out, lse, d ** -0.5, True)
    # The feature variants: bias (with its gradient and skipped tiles), grouped-query heads, window, dropout,
    # soft-capping; fp16/bf16 and fp32 on TF32 (tile shapes of their own).
    torch.backends.cuda.matmul.allow_tf32 = True
    for d, dtype in ((64, torch.bfloat16), (128, torch.bfloat16), (64, torch.float32), (128, torch.float32)):
        q = torch.randn(2, 4, 130, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(2, 2, 77, d, device="cuda", dtype=dtype) for _ in range(2))
        bias = torch.randn(2, 1, 130, 77, device="cuda", dtype=dtype)
        bias[..., 40:] = float("-inf")
        seed = torch.tensor(7, device="cuda")
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, d ** -0.5, False, 50, 10, 0.1, seed, 5.0)
        torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, bias, out, lse, d ** -0.5, False, 50, 10,
                                           0.1, seed, True, 5.0)
    # The wide Hopper backward's window and soft-capping (flash_bwd_sm90_wide.cuh with Mods).
    for d in (160, 256):
        q = torch.randn(2, 4, 130, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 2, 77, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d ** -0.5, False, 50, 10, 0.0, None, 5.0)
        torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, None, out, lse, d ** -0.5, False, 50, 10,
                                           0.0, None, False, 5.0)
    # The rebuild rule (launch.LSE_REBUILD_ENV): rows whose every key has a -1e9 bias run the forward's stats pass
    # and the backward reads their (hi, lo) pairs; on Hopper both backward families.
    for sm90 in ("1", "0"):
        os.environ[launch.SM90_ENV] = sm90
        q = torch.randn(2, 4, 130, 64, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bias = torch.zeros(2, 1, 130, 77, device="cuda", dtype=torch.float32)
        bias[1, :, :50] = -1e9
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, bias, 0.125, True)
        torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, bias, out, lse, 0.125, True, bias_grad=True)
    del os.environ[launch.SM90_ENV]
    # Boolean key masks (on sm_90 the plain kernels' key mask, kernels_cu/key_mask.cuh): right padding, holes and a
    # batch row with no key kept, per batch row and one row for all; the d128 forward's 176-key blocks too.
    for d in (64, 128):
        for causal in (False, True):
            q = torch.randn(3, 4, 130, d, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(3, 2, 390, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            keep = torch.rand(3, 390, device="cuda") > 0.3
            keep[0] = torch.arange(390, device="cuda") < 200
            keep[2] = False
            for mask in (keep[:, None, None, :], keep[:1, None, None, :]):
                out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, d ** -0.5, causal)
                torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, mask, out, lse, d ** -0.5, causal)
    # Head dims between the kernels' (zero-padded copies) and v with its own head dim.
    for d_q, d_v in ((80, 80), (40, 72)):
        q, k, v = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.float16)
                   for n, d in ((130, d_q), (77, d_q), (77, d_v)))
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d_q ** -0.5, True)
        torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, None, out, lse, d_q ** -0.5, True)
    # Rows that see no key given eager's uniform rows (cupyflash/unseen_rows.py, kernels_cu/unseen_rows.cuh): left
    # padding under a causal mask, grouped-query heads, both modes, v with its own head dim.
    for mode in (1, 2):
        for d_q, d_v in ((64, 64), (40, 72)):
            q = torch.randn(3, 4, 130, d_q, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(3, 2, 300, d, device="cuda", dtype=torch.bfloat16) for d in (d_q, d_v))
            keep = torch.arange(300, device="cuda") >= torch.tensor([0, 200, 299], device="cuda")[:, None]
            mask = keep[:, None, None, :]
            out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, 0.125, True, unseen_rows=mode)
            torch.ops.cupyflash.flash_attn_bwd(torch.randn_like(out), q, k, v, mask, out, lse, 0.125, True,
                                               unseen_rows=mode)
    torch.cuda.synchronize()
    print("sanitize cases done")


if __name__ == "__main__":
    main()
