"""Masks handed over as tensors against the built-in paths, beside SDPA with the same mask (issue 5's targets:
a dense causal mask within 1.3x of our causal flag, a padding mask within 1.2x of no mask).

    python benchmarks/mask_bench.py --out benchmarks/results/masks-<GPU>.md
    python benchmarks/mask_bench.py --hopper-mods --out benchmarks/results/hopper-mods-<GPU>.md

--hopper-mods (sm_90, issue 14's targets): each score mod on the Hopper kernels beside their plain (or causal) path
and beside the same call on the mma.sync kernels (CUPYFLASH_SM90=0), in one run.

Shapes: bf16, batch x N = 16k tokens, heads x head_dim = 2048; forward and backward timed separately (median,
L2 flushed, benchmarks' usual timer). The padding mask drops the last 25% of the keys of every other sequence: as an
added 0 / -inf bias ("padding mask", the score-mods kernels with the bias's tile classes) and as the boolean keep-mask
(B, 1, 1, N) the compile backend hands over ("key padding", the plain Hopper kernels' key mask on sm_90; its work is
7/8 of no mask's).
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cupyflash
from cupyflash.gpu_timing import median_timer
from cupyflash.launch import SM90_ENV


def masks(batch: int, n: int, device) -> dict:
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    dense_causal = torch.zeros(1, 1, n, n, dtype=torch.bfloat16, device=device).masked_fill(~causal, float("-inf"))
    keep = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=device)
    keep[::2, ..., 3 * n // 4:] = False
    padding = torch.zeros(batch, 1, 1, n, dtype=torch.bfloat16, device=device).masked_fill(~keep, float("-inf"))
    return {"dense causal": dense_causal, "padding": padding, "keys": keep}


def cases(batch: int, n: int, device):
    """(name, cupyflash kwargs, SDPA kwargs) per configuration."""
    m = masks(batch, n, device)
    return [
        ("no mask", {}, {}),
        ("causal flag", {"causal": True}, {"is_causal": True}),
        ("dense causal mask", {"attn_bias": m["dense causal"]}, {"attn_mask": m["dense causal"]}),
        ("padding mask", {"attn_bias": m["padding"]}, {"attn_mask": m["padding"]}),
        ("key padding", {"attn_bias": m["keys"]}, {"attn_mask": m["keys"]}),
    ]


def hopper_mod_cases(batch: int, heads: int, n: int, device):
    """(name, cupyflash kwargs, the name of the case it is measured against) per score mod."""
    m = masks(batch, n, device)
    # A float bias per head over every (query, key), as T5's relative positions or ALiBi: every tile is read
    relative = torch.randn(1, heads, n, n, dtype=torch.bfloat16, device=device)
    return [
        ("no mask", {}, "no mask"),
        ("causal flag", {"causal": True}, "causal flag"),
        ("dense causal mask", {"attn_bias": m["dense causal"]}, "causal flag"),
        ("padding mask", {"attn_bias": m["padding"]}, "no mask"),
        ("key padding", {"attn_bias": m["keys"]}, "no mask"),
        ("key padding + causal", {"attn_bias": m["keys"], "causal": True}, "causal flag"),
        ("sliding window N/8 + causal", {"causal": True, "window": (n // 8, 0)}, "causal flag"),
        ("soft-cap 30", {"softcap": 30.0}, "no mask"),
        ("soft-cap 30 + causal + window N/8", {"causal": True, "softcap": 30.0, "window": (n // 8, 0)},
         "causal flag"),
        # Gemma 2 with padding: its soft-cap keeps the padding an added mask (compile_backend/matcher.py _structured)
        ("padding mask + soft-cap 30 + causal", {"attn_bias": m["padding"], "causal": True, "softcap": 30.0},
         "causal flag"),
        ("dropout 0.1", {"dropout_p": 0.1}, "no mask"),
        ("float bias (1, H, N, N)", {"attn_bias": relative}, "no mask"),
    ]


def hopper_mod_rows(bench, d: int, n: int) -> list:
    """Table rows: each mod on the Hopper kernels, its ratio to the Hopper plain/causal path, and mma.sync's time."""
    heads, batch = 2048 // d, max(1, 16384 // n)
    q, k, v = (torch.randn(batch, heads, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    rows, hopper = [], {}
    for name, kw, base in hopper_mod_cases(batch, heads, n, q.device):
        times = {}
        for kernels, env in (("hopper", "1"), ("mma.sync", "0")):
            os.environ[SM90_ENV] = env
            times[kernels] = time_fwd_bwd(bench, lambda: cupyflash.flash_attention(q, k, v, **kw), (q, k, v))
        os.environ.pop(SM90_ENV)
        hopper[name] = times["hopper"]
        (f, b), (mf, mb), (bf, bb) = times["hopper"], times["mma.sync"], hopper[base]
        rows.append(f"| {d} | {n} | {name} | {f:.3f} / {b:.3f} | {f / bf:.2f}, {b / bb:.2f} ({base}) | "
                    f"{mf:.3f} / {mb:.3f} | {mf / f:.2f}, {mb / b:.2f} |")
        print(rows[-1], flush=True)
    return rows


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
    ap.add_argument("--hopper-mods", action="store_true", help="each score mod on the Hopper kernels vs mma.sync")
    args = ap.parse_args()
    method, bench = median_timer()
    if args.hopper_mods:
        rows = [f"GPU: **{torch.cuda.get_device_name()}** · torch {torch.__version__} · {method} · bf16", "",
                "| D | N | mod | Hopper fwd / bwd ms | ratio to Hopper's (fwd, bwd) | mma.sync fwd / bwd ms | "
                "mma.sync / Hopper (fwd, bwd) |", "|---|---|---|---|---|---|---|"]
        for d in (int(x) for x in args.head_dims.split(",")):
            for n in (int(x) for x in args.seqlens.split(",")):
                rows += hopper_mod_rows(bench, d, n)
        _write(args.out, "Score mods on the Hopper kernels", rows)
        return
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
    _write(args.out, "Masks as tensors vs the built-in paths", rows)


def _write(path, title: str, rows: list) -> None:
    table = "\n".join(rows)
    if path:
        with open(path, "w") as fh:
            fh.write(f"# {title}\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
