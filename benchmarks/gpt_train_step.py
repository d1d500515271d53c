"""Training step of a GPT with naive causal attention (nanoGPT's manual path): eager vs plain
torch.compile vs backend="cupyflash", timed in one run.

Times forward + backward + optimizer step (CUDA events, warm-up, median) and peak memory
(torch.cuda.max_memory_allocated) for each variant, checks that the cupyflash backend fused every layer's
attention, and prints a table. Defaults: 4 layers, d_model 768, 12 heads, bf16, T = 4096, batch 4.

    python benchmarks/gpt_train_step.py                       # on the GPU
    python benchmarks/gpt_train_step.py --device cpu --layers 1 --d-model 32 --heads 2 --seq 16 --batch 2 \\
        --vocab 64 --dtype float32 --steps 1 --warmup 1 --inner aot_eager   # smoke test
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention without flash: tril buffer, masked_fill -inf, softmax, dropout, att @ v."""

    def __init__(self, d_model, n_head, block_size, dropout):
        super().__init__()
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.n_head, self.d_model = n_head, d_model
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.d_model, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = self.attend(q, k, v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def attend(self, q, k, v):
        T = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v  # (B, nh, T, hs)


class Block(nn.Module):
    def __init__(self, d_model, n_head, block_size, dropout, attention=CausalSelfAttention):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = attention(d_model, n_head, block_size, dropout)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block_size, layers, d_model, n_head, dropout=0.0, attention=CausalSelfAttention):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d_model), nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList([Block(d_model, n_head, block_size, dropout, attention) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def step_timer(device):
    """A function returning milliseconds spent in a callable: CUDA events on the GPU, perf_counter else."""
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return timed


def run_variant(name, base, args, batch, device):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(base)
    if name == "torch.compile":
        step_model = torch.compile(model)
    elif name == "cupyflash":
        options = None if args.inner == "inductor" else {"inner": args.inner}
        step_model = torch.compile(model, backend="cupyflash", options=options)
    else:
        step_model = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    idx, tgt = batch

    def step():
        opt.zero_grad(set_to_none=True)
        step_model(idx, tgt).backward()
        opt.step()

    timed = step_timer(device)
    try:
        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = [timed(step) for _ in range(args.steps)]
    except torch.OutOfMemoryError:
        return {"name": name, "ms": None, "peak_gib": None, "fused": None, "note": "out of memory"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    fused = counters["cupyflash"]["attention_fused"] if name == "cupyflash" else None
    return {"name": name, "ms": statistics.median(times), "peak_gib": peak, "fused": fused, "note": ""}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--variants", default="eager,torch.compile,cupyflash")
    p.add_argument("--inner", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="the cupyflash backend's inner compiler")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    base = GPT(args.vocab, args.seq, args.layers, args.d_model, args.heads).to(device=device, dtype=dtype)
    batch = (torch.randint(0, args.vocab, (args.batch, args.seq), device=device),
             torch.randint(0, args.vocab, (args.batch, args.seq), device=device))
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"GPT train step: {args.layers} layers, d_model {args.d_model}, {args.heads} heads, T={args.seq}, "
          f"batch {args.batch}, {args.dtype}, on {gpu} (torch {torch.__version__})")
    results = [run_variant(name, base, args, batch, device) for name in args.variants.split(",")]

    print(f"{'variant':<15}{'step ms (median)':>18}{'peak GiB':>10}{'fused':>7}  note")
    for r in results:
        ms = "-" if r["ms"] is None else f"{r['ms']:.2f}"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        fused = "-" if r["fused"] is None else str(r["fused"])
        print(f"{r['name']:<15}{ms:>18}{peak:>10}{fused:>7}  {r['note']}")
    for r in results:
        if r["name"] == "cupyflash" and r["fused"] is not None and r["fused"] != args.layers:
            raise SystemExit(f"cupyflash fused {r['fused']} attention sites, expected {args.layers} (one per layer)")
    return results


if __name__ == "__main__":
    main()
