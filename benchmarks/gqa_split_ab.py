"""The grouped-query backward's split (plan.backward_kv_split) against none, on the Llama step's layouts: the op's
backward alone, one process, the settings in turns (each split threshold, unsplit, the first again).

bf16, q/k/v token-major as transformers' rotary output gives them, a boolean key mask (every other batch row half
padded where the row says "padded"); CUDA events, median of 30 calls after 5; the largest difference of dq, dk, dv
between the settings (the split sums its partial dK, dV in fp32 and rounds once).

    python benchmarks/gqa_split_ab.py
    python benchmarks/gqa_split_ab.py --min-blocks 264 528   # two thresholds against each other (and none)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import cupyflash.torch_op  # noqa: F401  (registers torch.ops.cupyflash.*)
from cupyflash import cuda_path, plan, torch_op
from cupyflash.errors import gpu_missing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_train_step import step_timer  # noqa: E402

SHAPES = (  # (B, H, H_kv, N, D, causal, padded)
    (4, 16, 4, 2048, 128, True, True), (4, 16, 4, 2048, 128, True, False), (1, 16, 4, 8192, 128, True, True),
    (2, 32, 8, 4096, 128, True, False), (8, 32, 8, 2048, 64, True, False), (4, 16, 4, 2048, 128, False, True))

def reset(min_blocks: int) -> None:
    """plan.KV_SPLIT_MIN_BLOCKS set, every cached plan and runner dropped."""
    plan.KV_SPLIT_MIN_BLOCKS = min_blocks
    plan.plan_for.cache_clear()
    cuda_path._KNOWN.clear()
    torch_op._PLAIN_BACKWARDS.clear()
    torch_op._PLAIN_FORWARDS.clear()

def bench(b: int, h: int, hkv: int, n: int, d: int, causal: bool, pad: bool, thresholds: list) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
    k, v = (torch.randn(b, n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
            for _ in range(2))
    keep = torch.ones(b, n, dtype=torch.bool, device="cuda")
    if pad:
        keep[1::2, n // 2:] = False
    mask = keep[:, None, None, :]
    out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, mask, d ** -0.5, causal)
    timed = step_timer(torch.device("cuda"))  # CUDA events around one call, ms
    dout = torch.randn_like(out)
    res = {}
    split_min = plan.KV_SPLIT_MIN_BLOCKS
    settings = [(f"split at {mb}", mb) for mb in thresholds] + [("unsplit", 0)]
    settings.append((settings[0][0] + " again", thresholds[0]))
    for name, mb in settings:
        reset(mb)
        def call():
            return torch.ops.cupyflash.flash_attn_bwd(dout, q, k, v, mask, out, lse, d ** -0.5, causal)

        grads = call()
        for _ in range(5):
            call()
        res[name] = (statistics.median(timed(call) for _ in range(30)), grads)
    reset(split_min)
    first = res[settings[0][0]]
    diff = max((a.float() - c.float()).abs().max().item() for a, c in zip(first[1][:3], res["unsplit"][1][:3]))
    flops = 4 * b * h * n * n * d * (0.5 if causal else 1) * 2.5
    print(f"| {b}x{h}/{hkv} N{n} d{d} {'causal' if causal else 'full'} {'padded' if pad else 'all keys'} | "
          + " | ".join(f"{k_} {t:.3f} ms ({flops / t / 1e9:.0f} TF/s)" for k_, (t, _) in res.items())
          + f" | first/unsplit {first[0] / res['unsplit'][0]:.3f} | max |d grads| {diff:.3g} |", flush=True)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--min-blocks", type=int, nargs="+", default=[plan.KV_SPLIT_MIN_BLOCKS],
                   help="plan.KV_SPLIT_MIN_BLOCKS settings to time (beside 0: never split)")
    args = p.parse_args(argv)
    if gpu_missing("gqa_split_ab.py"):
        return 2
    print(f"# {torch.cuda.get_device_name()}: op backward, bf16, token-major q/k/v as the Llama step's, key mask")
    for shape in SHAPES:
        bench(*shape, args.min_blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
