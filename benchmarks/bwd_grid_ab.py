"""The causal backward's grid orders (cupyflash/plan.py backward_grid) in one run: GPU time of the backward's
attention kernel with K/V blocks innermost (heads outer), outermost over groups of (batch, K/V head) pairs whose Q
and dO fit in plan.K_OUTER_MAX_BYTES (the plan's order), and outermost over all pairs at once.

    python benchmarks/bwd_grid_ab.py                  # the GPT step's shapes (d64), two d128 ones and the Llama's, bf16

Each line: µs per call of the attention kernel alone, launched 20 times back to back between two CUDA events
(GPU-bound: a launch costs the host a few µs), median of 15 rounds, the orders in turns; the preprocess and dQ
conversion alike; the largest difference between the orders' gradients (the same sums in another order: equal to
rounding); the predicted change of K/V blocks outermost over all pairs (list scheduling of the blocks' work).
"""
from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys

import torch

from cupyflash.errors import gpu_missing

SHAPES = ((8, 12, 12, 512, 64), (16, 12, 12, 1024, 64), (8, 12, 12, 2048, 64), (4, 12, 12, 4096, 64),
          (1, 12, 12, 16384, 64), (8, 16, 16, 1024, 128), (4, 16, 16, 2048, 128),
          (4, 16, 4, 2048, 128))  # (B, H, H_kv, N, D); the last: the Llama step's grouped-query attention
ORDERS = {"heads outer": 0, "groups (plan)": None, "all pairs": 1 << 62}  # plan.K_OUTER_MAX_BYTES of each


def simulated_ratio(n_blocks: int, pairs: int, sms: int) -> float:
    """Makespan with every pair's first block first over makespan in pair order: greedy list scheduling of causal
    K/V blocks of 128 keys (block x of n visits the 2 (n - x) Q blocks of 64 rows from its diagonal on, plus one
    unit for its K/V loads and dK/dV stores), one thread block per SM."""
    def makespan(order):
        free = [0.0] * sms
        for w in order:
            heapq.heappush(free, heapq.heappop(free) + w)
        return max(free)

    units = [2 * (n_blocks - x) + 1 for x in range(n_blocks)]
    return makespan([u for u in units for _ in range(pairs)]) / makespan([u for _ in range(pairs) for u in units])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    if gpu_missing("bwd_grid_ab.py"):
        return 2
    from cupyflash import cuda_path, launch, plan
    from cupyflash.array_ops import ops_for

    xp = ops_for(torch.empty(0, device="cuda"))
    device = torch.cuda.current_device()
    stream = xp.stream_ptr(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    limit = plan.K_OUTER_MAX_BYTES
    orders = {name: limit if v is None else v for name, v in ORDERS.items()}
    print(f"# {torch.cuda.get_device_name()}, bf16, causal; µs per call (kernel alone, {args.reps} launches between "
          f"events, median of {args.rounds} rounds, the orders in turns); plan.K_OUTER_MAX_BYTES = {limit}")
    print(f"| B, H, H_kv, N, D | K/V blocks a pair | {' | '.join(f'kernel, {name}' for name in orders)} | "
          "change: groups, all pairs | predicted, all pairs | plan's grid | preprocess | dQ conversion | "
          "max abs diff of dq, dk, dv |")
    print("|---" * (len(orders) + 8) + "|")
    for batch, heads, kv_heads, n, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, dout = (torch.randn((batch, heads, n, d), generator=gen, device="cuda", dtype=torch.bfloat16)
                   for _ in range(2))
        k, v = (torch.randn((batch, kv_heads, n, d), generator=gen, device="cuda", dtype=torch.bfloat16)
                for _ in range(2))
        out, lse = torch.ops.cupyflash.flash_attn_fwd(q, k, v, None, d ** -0.5, True)
        new_workspace, views, _ = cuda_path._backward_workspace(xp, q)
        dq_accum, d_vec = views(new_workspace())
        runs = {}  # order → (plan, its addresses, its buffers: alive while the timed launches write them), gradients
        for name, max_bytes in orders.items():
            plan.K_OUTER_MAX_BYTES = max_bytes
            plan.plan_for.cache_clear()
            dq, dk, dv = (xp.grad_allocator(a)() for a in (q, k, v))
            bufs = dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, d_vec=d_vec, dq_accum=dq_accum, dq=dq, dk=dk,
                        dv=dv)
            p = cuda_path._plan(xp, "bwd", q, k, None, bufs, d ** -0.5, True, (-1, -1), 0.0, 0.0, False)
            ptrs = {key: xp.address(a) for key, a in bufs.items()}
            add_parts = cuda_path._kv_part_ptrs(xp, p, q)  # a grouped-query split's partial dK, dV
            if add_parts is not None:
                bufs["kv_part"] = add_parts(ptrs)
            launch.execute(p, ptrs, stream, device)
            runs[name] = (p, ptrs, bufs, (dq.clone(), dk.clone(), dv.clone()))
        plan.K_OUTER_MAX_BYTES = limit
        plan.plan_for.cache_clear()
        cuda_path._KNOWN.clear()

        def timed(step, ptrs) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.reps):
                launch._run_step(step, ptrs, stream, device)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e3 / args.reps

        times = {key: [] for key in (*orders, "pre", "convert")}
        for name, (p, ptrs, _, _) in runs.items():  # warm-up
            timed(p.steps[1], ptrs)
        for r in range(args.rounds):
            names = list(orders)[r % len(orders):] + list(orders)[:r % len(orders)]
            for name in names:
                p, ptrs, _, _ = runs[name]
                times[name].append(timed(p.steps[1], ptrs))
            p, ptrs, _, _ = runs["groups (plan)"]
            times["pre"].append(timed(p.steps[0], ptrs))
            times["convert"].append(timed(p.steps[-1], ptrs))
        med = {key: statistics.median(v) for key, v in times.items()}
        base = runs["heads outer"][3]
        diff = max((a.float() - b.float()).abs().max().item() for name in orders for a, b in zip(base, runs[name][3]))
        planned = runs["groups (plan)"][0]
        n_blocks = math.ceil(n / planned.tiles.Bc)
        change = ", ".join(f"{(med[name] / med['heads outer'] - 1) * 100:+.1f} %" for name in list(orders)[1:])
        predicted = (simulated_ratio(n_blocks, batch * kv_heads, sms) - 1) * 100
        print(f"| {batch}, {heads}, {kv_heads}, {n}, {d} | {n_blocks} | "
              f"{' | '.join(f'{med[name]:.1f}' for name in orders)} | {change} | {predicted:+.1f} % | "
              f"{planned.steps[1].grid} | {med['pre']:.1f} | {med['convert']:.1f} | {diff:.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
