"""Ring attention across GPUs against the single-GPU kernel at the same per-GPU length (issue 18).

    torchrun --nproc-per-node 8 benchmarks/ring_bench.py                      # 128K .. 1M tokens, causal
    torchrun --nproc-per-node 2 benchmarks/ring_bench.py --tokens 131072 262144 --no-causal
    torchrun --nproc-per-node 2 benchmarks/ring_bench.py --device cpu --tokens 64 --heads 2 --head-dim 16 \\
        --iters 1 --no-write                                                  # smoke test of the script, gloo

B = 1, head dim 128, bf16, zigzag sharding, NCCL. For each total length N, every GPU times forward and backward
(CUDA events, warm-up, median; the slowest rank counts) of

- context_parallel_attention (``--method``, ring by default) on its N / P tokens: per-GPU TFLOP/s =
  FLOPs(N) / P / time, and
- the single-GPU kernel (cupyflash.flash_attention) on N / P tokens alone: FLOPs(N / P) / time,

with FLOPs(n) = 4 · B · H · n² · D (half if causal) forward, 2.5 × that backward. Efficiency = ring / single.
Peak memory per GPU is torch.cuda.max_memory_allocated (max over ranks); it should grow linearly with N / P.
Before timing, the ring's output at a small N is checked against the single-GPU op on the whole sequence.
Rank 0 writes benchmarks/results/<method>[-full]-<GPU>-x<P>.md (e.g. ring-NVIDIA_H200-x8.md).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import cupyflash
from cupyflash import cpu_attention
from cupyflash.bench_shapes import attention_flops
from cupyflash.distributed import context_parallel_attention, gather_sequence, shard_sequence

from gpt_train_step import step_timer  # noqa: E402 (benchmarks/ is the script's folder)

RESULTS = Path(__file__).resolve().parent / "results"
CHECK_TOKENS = 16384


def _timed_ms(fn, device: str, warmup: int, iters: int) -> float:
    """Median time of fn() in ms (gpt_train_step's timer: CUDA events on the GPU)."""
    for _ in range(warmup):
        fn()
    timed = step_timer(torch.device(device))
    return statistics.median(timed(fn) for _ in range(iters))


def _slowest(value: float, device: str) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _flops(n: int, args) -> float:
    """Forward and backward FLOPs of attention over n tokens (B = 1)."""
    return attention_flops(1, args.heads, n, n, args.head_dim, args.causal, "fwd+bwd")


def _passes(attend, q, k, v, device, warmup, iters):
    """(forward ms, backward ms, peak bytes) of attend(q, k, v) on this rank."""
    dout = torch.randn_like(q)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd = _timed_ms(lambda: attend(q, k, v), device, warmup, iters)
    out = attend(q, k, v)
    bwd = _timed_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), device, warmup, iters)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    return fwd, bwd, peak


def _inputs(n: int, args, device, dtype, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(1, args.heads, n, args.head_dim, device=device, dtype=dtype, generator=gen)
            for _ in range(3)]


def _check(args, rank, world, device, dtype) -> str:
    """The context-parallel output against the single-GPU op on the whole sequence, both against fp32 exact
    attention."""
    n = min(CHECK_TOKENS, max(args.tokens)) // (2 * world) * (2 * world)
    q, k, v = _inputs(n, args, device, dtype, seed=1)  # the same on every rank
    local = [shard_sequence(t, rank, world) for t in (q, k, v)]
    ring_out = gather_sequence(context_parallel_attention(*local, causal=args.causal, method=args.method))
    plain_out = cupyflash.flash_attention(q, k, v, causal=args.causal)
    ref, _ = cpu_attention.forward(q.float(), k.float(), v.float(), None, args.head_dim ** -0.5, args.causal)
    ring_err, plain_err = ((t.float() - ref).abs().max().item() for t in (ring_out, plain_out))
    bound = 2 * plain_err + torch.finfo(dtype).eps * ref.abs().max().item() + 1e-5  # tests/reference.py's rule
    verdict = "ok" if ring_err <= bound else "FAILED"
    return (f"check at N = {n}: max |context parallel - fp32| = {ring_err:.2e}, max |single GPU - fp32| = {plain_err:.2e} "
            f"(bound {bound:.2e}): {verdict}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576],
                        help="total sequence lengths N (multiples of 2 x ranks)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--no-causal", dest="causal", action="store_false")
    parser.add_argument("--method", choices=("ring", "all_to_all"), default="ring")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print the table only")
    args = parser.parse_args(argv)

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # NCCL's point-to-point ops need it set
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"

    lines = [f"# Context-parallel attention ({args.method}): {world} x {gpu}", "",
             f"torch {torch.__version__}" + (f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
                                             if device == "cuda" else "")
             + f", {datetime.date.today()}; `torchrun --nproc-per-node {world} benchmarks/ring_bench.py "
             + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             f"{args.method}, B = 1, H = {args.heads}, D = {args.head_dim}, {str(dtype)[6:]}, "
             f"{'causal' if args.causal else 'full'}, zigzag sharding; median of {args.iters} after {args.warmup} "
             f"warm-up, slowest rank.", "",
             _check(args, rank, world, device, dtype), "",
             "| N total | N per GPU | context parallel fwd / bwd (ms) | its TFLOP/s per GPU fwd+bwd | single GPU at "
             "N/P fwd / bwd (ms) | single GPU TFLOP/s fwd+bwd | efficiency | peak GiB per GPU context parallel / "
             "single |",
             "|---|---|---|---|---|---|---|---|"]
    def context_parallel(q, k, v):
        return context_parallel_attention(q, k, v, causal=args.causal, method=args.method)

    def single_gpu(q, k, v):
        return cupyflash.flash_attention(q, k, v, causal=args.causal)

    for n in args.tokens:
        if n % (2 * world):
            lines.append(f"| {n} | – | skipped: not a multiple of 2 x {world} ranks | | | | | |")
            continue
        n_local = n // world
        q, k, v = (t.requires_grad_() for t in _inputs(n_local, args, device, dtype, seed=rank))  # this rank's shards
        ring = _passes(context_parallel, q, k, v, device, args.warmup, args.iters)
        single = _passes(single_gpu, q, k, v, device, args.warmup, args.iters)
        del q, k, v
        (r_fwd, r_bwd, r_peak), (s_fwd, s_bwd, s_peak) = ([_slowest(x, device) for x in m] for m in (ring, single))
        ring_tflops = _flops(n, args) / world / (r_fwd + r_bwd) / 1e9
        single_tflops = _flops(n_local, args) / (s_fwd + s_bwd) / 1e9
        lines.append(f"| {n} | {n_local} | {r_fwd:.1f} / {r_bwd:.1f} | {ring_tflops:.0f} | {s_fwd:.1f} / {s_bwd:.1f} "
                     f"| {single_tflops:.0f} | {ring_tflops / single_tflops:.0%} | {r_peak / 2**30:.2f} / "
                     f"{s_peak / 2**30:.2f} |")
        if rank == 0:
            print(lines[-1], flush=True)
    if rank == 0:
        table = "\n".join(lines) + "\n"
        print(table)
        if args.write:
            RESULTS.mkdir(exist_ok=True)
            name = f"{args.method}{'' if args.causal else '-full'}-{gpu.replace(' ', '_')}-x{world}.md"
            (RESULTS / name).write_text(table)
            print(f"wrote {RESULTS / name}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
