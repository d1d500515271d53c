"""Host time of one short attention call, profiled: cupyflash's eager function, its op as Inductor calls it, SDPA.

torch.profiler traces (CPU ops, CUDA runtime and driver calls, allocations, synchronisations, Python frames) of
cupyflash.flash_attention, of torch.ops.cupyflash.flash_attn_fwd/bwd called as Inductor's generated code calls them,
and of torch SDPA, forward and forward + backward, in one process.

B = 1, N = 128, d64, causal, bf16 by default; features: plain, bias (an additive (1, 1, N, N) bias; SDPA gets it
with the causal mask folded in and runs its efficient kernel, flash takes no bias) and gqa (2 query heads, 1 key/value
head). For each (piece, feature, pass) it measures the host µs per call without the profiler (median of single
calls, the GPU idle), then profiles ``--calls`` calls and writes under ``--out``:

    <piece>-<feature>-<pass>.txt          torch.profiler's table, by self CPU time
    <piece>-<feature>-<pass>.trace.json   the Chrome trace (open in Perfetto)
    summary.md, summary.json              per call: host µs, kernel launches, kernels run, allocations, syncs,
                                          and the top CPU ops by self time

    python benchmarks/host_profile.py                       # benchmarks/results/host-profile-<GPU>/
    python benchmarks/host_profile.py --features plain gqa --pieces op sdpa --calls 20 --no-stack
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
PIECES = ("cupyflash", "op", "sdpa")
PIECE_TITLES = {"cupyflash": "cupyflash.flash_attention (eager)",
                "op": "torch.ops.cupyflash.flash_attn_fwd/bwd (Inductor's calls)",
                "sdpa": "torch SDPA"}
FEATURES = ("plain", "bias", "gqa")
PASSES = ("fwd", "fwd+bwd")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
RUNTIME_CALL = re.compile(r"cu(da)?[A-Z]")  # cudaMemsetAsync, cuLaunchKernel; not cupyflash::, cutlass
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cuCtxSynchronize",
              "cuStreamSynchronize", "cuEventSynchronize", "cudaMemcpy", "cuMemcpyDtoH", "cuMemcpyHtoD")


@dataclass
class Inputs:
    q: torch.Tensor  # (B, Hq, N, D)
    k: torch.Tensor  # (B, Hkv, N, D)
    v: torch.Tensor  # (B, Hkv, N, D)
    bias: Optional[torch.Tensor]  # (1, 1, N, N) or None
    dout: torch.Tensor  # (B, Hq, N, D)
    scale: float


def make_inputs(feature: str, n: int, head_dim: int, dtype: torch.dtype) -> Inputs:
    gen = torch.Generator(device="cuda").manual_seed(0)
    hq, hkv = (2, 1) if feature == "gqa" else (1, 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    bias = randn(1, 1, n, n) if feature == "bias" else None
    return Inputs(randn(1, hq, n, head_dim), randn(1, hkv, n, head_dim), randn(1, hkv, n, head_dim), bias,
                  randn(1, hq, n, head_dim), 1.0 / math.sqrt(head_dim))


def backend_context(piece: str, x: Inputs):
    """Entered around a piece's measurements: SDPA's flash kernel, or its efficient one for a bias (flash takes no
    mask); once, as a user picks a backend once, not around every call."""
    if piece != "sdpa":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION if x.bias is None else SDPBackend.EFFICIENT_ATTENTION)


def _sdpa_call(x: Inputs):
    """SDPA as a user writes it for this feature: is_causal, or the bias with the causal mask folded in (SDPA takes
    no mask with is_causal), with enable_gqa for fewer key/value heads."""
    mask, causal = None, True
    if x.bias is not None:
        n_q, n_k = x.q.shape[-2], x.k.shape[-2]
        above = torch.ones(n_q, n_k, dtype=torch.bool, device="cuda").triu(n_k - n_q + 1)  # (Nq, Nk)
        mask, causal = x.bias.masked_fill(above, float("-inf")), False
    gqa = {"enable_gqa": True} if x.q.shape[1] != x.k.shape[1] else {}

    def call(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=x.scale, **gqa)

    return call


def calls(piece: str, x: Inputs) -> dict[str, Callable[[], object]]:
    """{pass: one call}: the forward without grad, and the forward with its backward."""
    if piece == "op":
        # Inductor's forward graph calls the fwd op, its backward graph the bwd op on the saved out and LSE;
        # AOTAutograd's runtime wrapper, not the op's autograd, links the two.
        fwd_op, bwd_op = torch.ops.cupyflash.flash_attn_fwd.default, torch.ops.cupyflash.flash_attn_bwd.default

        def fwd_bwd():
            out, lse = fwd_op(x.q, x.k, x.v, x.bias, x.scale, True)
            return bwd_op(x.dout, x.q, x.k, x.v, x.bias, out, lse, x.scale, True)

        return {"fwd": lambda: fwd_op(x.q, x.k, x.v, x.bias, x.scale, True), "fwd+bwd": fwd_bwd}
    if piece == "cupyflash":
        import cupyflash

        def attend(q, k, v):
            return cupyflash.flash_attention(q, k, v, x.bias, scale=x.scale, causal=True)
    else:
        attend = _sdpa_call(x)
    leaves = [t.clone().requires_grad_() for t in (x.q, x.k, x.v)]

    def fwd():
        with torch.no_grad():
            return attend(x.q, x.k, x.v)

    return {"fwd": fwd, "fwd+bwd": lambda: torch.autograd.grad(attend(*leaves), leaves, x.dout)}


def host_us(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median host µs of single calls with the GPU idle between them (one small call's kernels finish long before
    the next is issued; waiting for them after each call keeps a queue from building up)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def _memory_bytes(evt) -> int:
    return getattr(evt, "device_memory_usage", None) or getattr(evt, "cuda_memory_usage", 0)


def profile(fn: Callable[[], object], n_calls: int, stack: bool, trace: Path) -> tuple[dict, str]:
    """(per-call counts and top ops, the profiler's table) over ``n_calls`` calls of ``fn``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], profile_memory=True,
                                with_stack=stack) as prof:
        for _ in range(n_calls):
            fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(trace))
    events = prof.events()
    runtime = {}
    for evt in events:
        if evt.device_type == DeviceType.CPU and RUNTIME_CALL.match(evt.name):
            runtime[evt.name] = runtime.get(evt.name, 0) + 1
    # The synchronize closing the profiled block is ours, not the calls'.
    runtime["cudaDeviceSynchronize"] = max(runtime.get("cudaDeviceSynchronize", 0) - 1, 0)
    kernels = {}  # GPU activities: kernels, memsets, copies
    for evt in events:
        if evt.device_type == DeviceType.CUDA:
            kernels[evt.name] = kernels.get(evt.name, 0) + 1
    allocations = sum(1 for evt in events if evt.name == "[memory]" and _memory_bytes(evt) > 0)
    averages = [a for a in prof.key_averages() if a.key != "[memory]" and a.device_type == DeviceType.CPU]
    averages.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    per_call = {
        "launches": sum(runtime.get(name, 0) for name in LAUNCH_CALLS) / n_calls,
        "gpu_ops": sum(kernels.values()) / n_calls,
        "allocations": allocations / n_calls,
        "syncs": sum(runtime.get(name, 0) for name in SYNC_CALLS) / n_calls,
        "runtime_calls": {name: count / n_calls for name, count in sorted(runtime.items()) if count},
        "gpu_op_names": {name: count / n_calls for name, count in sorted(kernels.items())},
        "top_self_cpu_us": [(a.key, a.self_cpu_time_total / n_calls) for a in averages[:8]],
    }
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    return per_call, table


def measure(piece: str, feature: str, pass_: str, fn: Callable[[], object], x: Inputs, args, out: Path) -> dict:
    """One row of the summary; its table and trace go to ``out``."""
    row = {"piece": piece, "feature": feature, "pass": pass_}
    name = f"{piece}-{feature}-{pass_.replace('+', '_')}"
    try:
        with backend_context(piece, x):
            row["host_us"] = host_us(fn, args.warmup, args.reps)
            row["profile"], table = profile(fn, args.calls, args.stack, out / f"{name}.trace.json")
        (out / f"{name}.txt").write_text(table)
        print(f"{name}: {row['host_us']:.1f} us", file=sys.stderr, flush=True)
    except RuntimeError as err:  # e.g. no SDPA kernel for this feature on this GPU
        row["error"] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}"
        print(f"{name}: {row['error']}", file=sys.stderr, flush=True)
    return row


def summary_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Host time per call on {meta['gpu']}", "",
             f"torch {meta['torch']}, CUDA {meta['cuda']}; B = 1, N = {meta['seq']}, d{meta['head_dim']}, causal, "
             f"{meta['dtype']}; host µs: median of {meta['reps']} single calls, no profiler; counts: per call over "
             f"{meta['calls']} profiled calls. `python benchmarks/host_profile.py`", "",
             "| piece | feature | pass | host µs | launches | GPU ops | allocations | syncs | top self CPU (µs/call) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['piece']} | {r['feature']} | {r['pass']} | – | – | – | – | – | {r['error']} |")
            continue
        p = r["profile"]
        top = "; ".join(f"{name} {us:.1f}" for name, us in p["top_self_cpu_us"][:4])
        lines.append(f"| {r['piece']} | {r['feature']} | {r['pass']} | {r['host_us']:.1f} | {p['launches']:g} | "
                     f"{p['gpu_ops']:g} | {p['allocations']:g} | {p['syncs']:g} | {top} |")
    lines += ["", "Pieces: " + "; ".join(f"{k}: {v}" for k, v in PIECE_TITLES.items()) + ".", ""]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the logs (default: benchmarks/results/host-profile-<GPU>)")
    p.add_argument("--pieces", nargs="+", choices=PIECES, default=PIECES)
    p.add_argument("--features", nargs="+", choices=FEATURES, default=FEATURES)
    p.add_argument("--passes", nargs="+", choices=PASSES, default=PASSES)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--calls", type=int, default=50, help="profiled calls per (piece, feature, pass)")
    p.add_argument("--reps", type=int, default=400, help="timed calls for the host µs median")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--no-stack", dest="stack", action="store_false",
                   help="leave Python frames out of the traces (the profiler's own overhead drops)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from cupyflash.errors import gpu_missing

    if gpu_missing("host_profile.py"):
        return 2
    import cupyflash.torch_op  # noqa: F401  registers torch.ops.cupyflash.*

    gpu = torch.cuda.get_device_name()
    out = args.out or RESULTS / f"host-profile-{gpu.replace(' ', '_')}"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "seq": args.seq,
            "head_dim": args.head_dim, "dtype": args.dtype, "calls": args.calls, "reps": args.reps}
    rows = []
    for feature in args.features:
        x = make_inputs(feature, args.seq, args.head_dim, getattr(torch, args.dtype))
        for piece in args.pieces:
            fns = calls(piece, x)
            for pass_ in args.passes:
                rows.append(measure(piece, feature, pass_, fns[pass_], x, args, out))
    text = summary_markdown(meta, rows)
    print(text)
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
