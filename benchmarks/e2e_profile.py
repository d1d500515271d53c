"""Where an end-to-end GPT step's time goes: e2e_step.py's variants under torch.profiler, side by side.

For one (T, batch, layers) shape and two or more variants of e2e_step.py (same weights and batch), after warm-up:
the step's wall time (CUDA events, median), the GPU's busy time per step (the union of kernel intervals in the
trace), kernel launches per step, the host time the step's Python call takes, and every kernel name with its count
and total µs per step, variant by variant, sorted by the largest difference. Answers "is the step host-bound, and
which kernels differ" before anyone guesses.

    python benchmarks/e2e_profile.py --shape 512x8x12                      # inductor-sdpa against cupyflash
    python benchmarks/e2e_profile.py --shape 1024x16x4 --variants inductor-sdpa cupyflash inductor-naive
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cupyflash.errors import gpu_missing
from e2e_step import RESULTS, VARIANTS, _shape, build_models, make_batch, train_step
from gpt_train_step import step_timer


# The attention ops as the compiled step calls them: ours, and SDPA's backends' (aten ops, outer calls only).
ATTENTION_OPS = ("cupyflash::flash_attn_fwd", "cupyflash::flash_attn_bwd",
                 *(f"aten::_scaled_dot_product_{b}_attention{p}" for b in ("cudnn", "flash", "efficient")
                   for p in ("", "_backward")))


def kernel_stats(trace_path: Path, steps: int) -> dict:
    """Per step: GPU busy µs (union of kernel intervals), kernels, {kernel name: [count, µs]}, and the attention
    ops' host time in the step ({op: [calls a step, µs a call]}: their CPU time in place, between the other layers'
    work, which a loop of calls alone does not show)."""
    events = json.loads(trace_path.read_text())["traceEvents"]
    host: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in events:
        if e.get("cat") == "cpu_op" and e.get("name") in ATTENTION_OPS and "dur" in e:
            host[e["name"]][0] += 1
            host[e["name"]][1] += float(e["dur"])
    attention_host = {name: [n / steps, us / n] for name, (n, us) in host.items()}
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kernels)
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:  # union of [lo, hi)
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for e in kernels:
        by_name[e["name"]][0] += 1 / steps
        by_name[e["name"]][1] += float(e["dur"]) / steps
    return {"busy_us": busy / steps, "kernels": len(kernels) / steps, "by_name": dict(by_name),
            "attention_host": attention_host}


def profile_variant(name: str, base, batch, device, warmup: int, steps: int, out: Path) -> dict:
    torch._dynamo.reset()
    _, step = train_step(VARIANTS[name], base, batch, device)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    timed = step_timer(device)
    wall = statistics.median(timed(step) for _ in range(steps))
    host = []
    for _ in range(steps):  # the Python call alone: launches queue, the GPU catches up after
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    trace = out / f"{name}.trace.json"
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    (out / f"{name}.cpu.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60, max_name_column_width=90))
    stats = kernel_stats(trace, steps)
    stats.update(variant=name, wall_ms=wall, host_ms=statistics.median(host))
    return stats


def report(rows: list[dict], shape: tuple, top: int, model: str = "e2e") -> str:
    names = [r["variant"] for r in rows]
    lines = [f"# {model} step profile, {torch.cuda.get_device_name()}, T x batch x layers = {'x'.join(map(str, shape))}",
             "", "| variant | wall ms | GPU busy ms | busy / wall | host call ms | kernels / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['wall_ms']:.2f} | {r['busy_us'] / 1e3:.2f} | "
                     f"{r['busy_us'] / 1e3 / r['wall_ms']:.2f} | {r['host_ms']:.2f} | {r['kernels']:.0f} |")
    lines += ["", "## Attention ops on the host, in the step (under the profiler)", "",
              "| variant | op | calls a step | µs a call |", "|---|---|---|---|"]
    for r in rows:
        for op, (calls, us) in sorted(r.get("attention_host", {}).items()):
            lines.append(f"| {r['variant']} | `{op}` | {calls:.0f} | {us:.1f} |")
    every = set().union(*(r["by_name"] for r in rows))

    def cell(r, k):
        count, us = r["by_name"].get(k, (0, 0.0))
        return count, us
    spread = {k: max(cell(r, k)[1] for r in rows) - min(cell(r, k)[1] for r in rows) for k in every}
    lines += ["", f"## Kernels by the spread of their µs per step (top {top})", "",
              "| kernel | " + " | ".join(f"{n} n, µs" for n in names) + " |", "|---|" + "---|" * len(names)]
    for k in sorted(every, key=spread.get, reverse=True)[:top]:
        lines.append(f"| `{k[:110]}` | " + " | ".join("{:.0f}, {:.0f}".format(*cell(r, k)) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=_shape, default=(512, 8, 12), help="T x batch x layers")
    p.add_argument("--variants", nargs="+", default=["inductor-sdpa", "cupyflash"], choices=sorted(VARIANTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="traces and report (default results/e2e-profile-<GPU>)")
    args = p.parse_args(argv)
    if gpu_missing("e2e_profile.py"):
        return 2
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = args.out or RESULTS / f"e2e-profile-{gpu}"
    out.mkdir(parents=True, exist_ok=True)
    T, batch_size, layers = args.shape
    models = build_models(50304, T, layers, 768, 12, torch.bfloat16)
    batch = make_batch(50304, T, batch_size, device)
    rows = []
    for name in args.variants:
        rows.append(profile_variant(name, models[VARIANTS[name].attention], batch, device, args.warmup,
                                    args.steps, out))
        gc.collect()
    text = report(rows, args.shape, args.top)
    (out / f"report-{'x'.join(map(str, args.shape))}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
