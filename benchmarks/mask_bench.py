"""Masks handed over as tensors against the built-in paths, beside SDPA with the same mask (issue 5's targets:
a dense causal mask within 1.3x of our causal flag, a padding mask within 1.2x of no mask).

    python benchmarks/mask_bench.py --out benchmarks/results/masks-<GPU>.md

Shapes: bf16, batch x N = 16k tokens, heads x head_dim = 2048; forward and backward timed separately (median,
L2 flushed, benchmarks' usual timer). The padding mask drops the last 25% of the keys of every other sequence.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cupyflash
from cupyflash.gpu_timing import median_timer


def masks(batch: int, n: int, device) -> dict:
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    dense_causal = torch.zeros(1, 1, n, n, dtype=torch.bfloat16, device=device).masked_fill(~causal, float("-inf"))
    keep = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)
    keep[::2, ..., 3 * n // 4:] = False
    padding = torch.zeros(batch, 1, 1, n, dtype=torch.bfloat16, device=device).masked_fill(~keep, float("-inf"))
    return {"dense causal": dense_causal, "padding": padding}


def cases(batch: int, n: int, device):
    """(name, cupyflash kwargs, SDPA kwargs) per configuration."""
    m = masks(batch, n, device)
    return [
        ("no mask", {}, {}),
        ("causal flag", {"causal": True}, {"is_causal": True}),
        ("dense causal mask", {"attn_bias": m["dense causal"]}, {"attn_mask": m["dense causal"]}),
        ("padding mask", {"attn_bias": m["padding"]}, {"attn_mask": m["padding"]}),
    ]


def time_fwd_bwd(bench, fn, inputs):
    out = fn()
    dout = torch.randn_like(out)
    fwd = bench(fn)
    bwd = bench(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
    return fwd, bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args()
    method, bench = median_timer()
    rows = [f"GPU: **{torch.cuda.get_device_name()}** · torch {torch.__version__} · {method}", "",
            "| D | N | mask | cupyflash fwd ms | cupyflash bwd ms | ratio to its flag/no-mask path (fwd, bwd) | "
            "SDPA efficient fwd/bwd ms | SDPA cuDNN fwd/bwd ms |", "|---|---|---|---|---|---|---|---|"]
    for d in (int(x) for x in args.head_dims.split(",")):
        for n in (int(x) for x in args.seqlens.split(",")):
            heads, batch = 2048 // d, max(1, 16384 // n)
            q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            ours = {}
            for name, kw, sdpa_kw in cases(batch, n, q.device):
                ours[name] = time_fwd_bwd(bench, lambda: cupyflash.flash_attention(q, k, v, **kw), (q, k, v))
                base = ours["causal flag" if "causal" in name else "no mask"]
                peers = []
                for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
                    try:
                        with sdpa_kernel(backend), contextlib.redirect_stderr(None):
                            t = time_fwd_bwd(bench, lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kw),
                                             (q, k, v))
                        peers.append(f"{t[0]:.3f} / {t[1]:.3f}")
                    except RuntimeError as err:
                        peers.append(f"— ({str(err).splitlines()[0][:60]})")
                f, b = ours[name]
                rows.append(f"| {d} | {n} | {name} | {f:.3f} | {b:.3f} | {f / base[0]:.2f}, {b / base[1]:.2f} | "
                            f"{peers[0]} | {peers[1]} |")
                print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("# Masks as tensors vs the built-in paths\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
