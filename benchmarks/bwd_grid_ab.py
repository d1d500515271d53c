"""The causal backward's two grid orders (cupyflash/plan.py backward_grid) in one run: GPU time of the backward's
attention kernel with K/V blocks innermost (heads outer) and outermost (k_outer) at every shape, whatever the plan's
rule (K_OUTER_MAX_BYTES of Q and dO), which these numbers set.

    python benchmarks/bwd_grid_ab.py                  # the GPT step's shapes (d64) and two d128 ones, bf16, causal

Each line: µs per call of the attention kernel alone and of the preprocess and dQ conversion, each launched 20 times
back to back between two CUDA events (GPU-bound: a launch costs the host a few µs), median of 15 rounds, the two
orders in turns; then the gradients of both orders against each other (the same sums in another order: equal to
rounding) and the predicted change (plan.backward_grid's list-scheduling simulation).
"""
from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys

import torch

SHAPES = ((8, 12, 512, 64), (16, 12, 1024, 64), (8, 12, 2048, 64), (4, 12, 4096, 64), (1, 12, 16384, 64),
          (8, 16, 1024, 128), (4, 16, 2048, 128))  # (B, H, N, D)


def simulated_ratio(n_blocks: int, heads: int, sms: int) -> float:
    """Makespan with each head's first block first over makespan in head order: greedy list scheduling of causal
    K/V blocks of 128 keys (block x of n visits the 2 (n - x) Q blocks of 64 rows from its diagonal on, plus one
    unit for its K/V loads and dK/dV stores), one thread block per SM."""
    def makespan(order):
        free = [0.0] * sms
        for w in order:
            heapq.heappush(free, heapq.heappop(free) + w)
        return max(free)

    units = [2 * (n_blocks - x) + 1 for x in range(n_blocks)]
    return makespan([u for u in units for _ in range(heads)]) / makespan([u for _ in range(heads) for u in units])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU", file=sys.stderr)
        return 2
    from cupyflash import cuda_path, launch, plan
    from cupyflash.array_ops import ops_for

    xp = ops_for(torch.empty(0, device="cuda"))
    device = torch.cuda.current_device()
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"# {torch.cuda.get_device_name()}, bf16, causal; µs per call (kernel alone, {args.reps} launches between "
          f"events, median of {args.rounds} rounds, the orders in turns)")
    print("| B, H, N, D | K/V blocks a head (plan) | kernel, heads outer | kernel, K/V blocks outer | change | predicted | "
          "preprocess | dQ conversion | max abs diff of dq, dk, dv |")
    print("|---|---|---|---|---|---|---|---|---|")
    limit, always = plan.K_OUTER_MAX_BYTES, 1 << 62
    for shape in SHAPES:
        batch, heads, n, d = shape
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v, dout = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d ** -0.5, True)
        new_workspace, views, _ = cuda_path._backward_workspace(xp, q)
        dq_accum, d_vec = views(new_workspace())
        grads = {}
        runs = {}
        for outer_max in (0, always):
            plan.K_OUTER_MAX_BYTES = outer_max
            plan.plan_for.cache_clear()
            dq, dk, dv = (xp.grad_allocator(a)() for a in (q, k, v))
            bufs = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, d_vec=d_vec, dq_accum=dq_accum, dq=dq, dk=dk,
                        dv=dv)
            p = cuda_path._plan(xp, "bwd", q, k, None, bufs, d ** -0.5, True, (-1, -1), 0.0, 0.0, False)
            ptrs = {name: xp.address(a) for name, a in bufs.items()}
            stream = xp.stream_ptr(device)
            launch.execute(p, ptrs, stream, device)
            grads[outer_max] = (dq.clone(), dk.clone(), dv.clone())
            runs[outer_max] = (p, ptrs, stream, bufs)  # the buffers stay alive while the timed launches use them
        plan.K_OUTER_MAX_BYTES = limit
        plan.plan_for.cache_clear()
        cuda_path._KNOWN.clear()

        def timed(step, ptrs, stream) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                launch._run_step(step, ptrs, stream, device)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / args.reps

        times = {key: [] for key in (0, always, "pre", "convert")}
        for _ in range(3):  # warm-up
            for outer_max, (p, ptrs, stream, _) in runs.items():
                timed(p.steps[1], ptrs, stream)
        for r in range(args.rounds):
            order = (0, always) if r % 2 == 0 else (always, 0)
            for outer_max in order:
                p, ptrs, stream, _ = runs[outer_max]
                times[outer_max].append(timed(p.steps[1], ptrs, stream))
            p, ptrs, stream, _ = runs[always]
            times["pre"].append(timed(p.steps[0], ptrs, stream))
            times["convert"].append(timed(p.steps[-1], ptrs, stream))
        med = {key: statistics.median(v) for key, v in times.items()}
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads[0], grads[always]))
        n_blocks = math.ceil(n / runs[always][0].tiles.Bc)
        planned = "K/V blocks outer" if 4 * q.numel() <= limit else "heads outer"  # Q and dO, bf16
        print(f"| {batch}, {heads}, {n}, {d} | {n_blocks} ({planned}) | {med[0]:.1f} | {med[always]:.1f} | "
              f"{(med[always] / med[0] - 1) * 100:+.1f} % | {(simulated_ratio(n_blocks, batch * heads, sms) - 1) * 100:+.1f} % | "
              f"{med['pre']:.1f} | {med['convert']:.1f} | {diff:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
