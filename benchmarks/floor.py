"""The performance floor: cupyflash against torch SDPA's flash and cuDNN backends, in one process on one GPU.

    python benchmarks/floor.py --out benchmarks/results/floor-h100.md --json benchmarks/results/floor-h100.json
    python benchmarks/floor.py --quick          # N = 1024, 4096, 16384 only
    python benchmarks/floor.py --fp16           # fp16 rows as well as bf16

Shapes: batch x N = 16k tokens, heads x head_dim = 2048, head dims 64 and 128, causal and not, N = 1024 ..
16384. Forward and backward are timed separately (the backward's forward runs once, untimed): median GPU time
by CUDA events after warm-up, through triton.testing.do_bench when triton is importable, else the same
method in attention_impls.median_ms_events. TFLOP/s = 4·B·H·N²·D (half if causal), backward 2.5x.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_impls import (attention_flops, bench_shape, make_inputs, median_ms_events, pass_fn,  # noqa: E402
                             unavailable_reason)

IMPLS = ("cupyflash", "sdpa-flash", "sdpa-cudnn")
PASSES = ("fwd", "bwd")
HEAD_DIMS = (64, 128)
SEQLENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQLENS = (1024, 4096, 16384)


def _timer(warmup_ms: float, rep_ms: float):
    """(name, fn -> median ms)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return "CUDA events (own loop, L2 flushed)", lambda fn: median_ms_events(fn, warmup_ms, rep_ms)

    def bench(fn):
        try:
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        except (TypeError, AssertionError):  # older triton: no return_mode="median"
            result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
            return float(result[0] if isinstance(result, (list, tuple)) else result)

    return "triton.testing.do_bench median (L2 flushed)", bench


def _fmt(x, digits=1):
    return "—" if x is None else f"{x:.{digits}f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N in {QUICK_SEQLENS} only")
    parser.add_argument("--fp16", action="store_true", help="add fp16 rows (bf16 always runs)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("floor.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2

    timer_name, bench = _timer(args.warmup_ms, args.rep_ms)
    dtypes = (torch.bfloat16, torch.float16) if args.fp16 else (torch.bfloat16,)
    seqlens = QUICK_SEQLENS if args.quick else SEQLENS
    rows, notes, errors = [], {}, []
    t0 = time.time()
    for dtype in dtypes:
        for head_dim in HEAD_DIMS:
            for causal in (False, True):
                for n in seqlens:
                    shape = bench_shape(n, head_dim)  # (B, H, N, D)
                    q, k, v, dout = make_inputs(shape, dtype)
                    ms = {}
                    for impl in IMPLS:
                        try:
                            reason = unavailable_reason(impl, q, k, v, dout, causal)  # also JIT-compiles ours
                            if reason:
                                notes[reason] = notes.get(reason, 0) + 1
                                continue
                            for p in PASSES:
                                ms[impl, p] = bench(pass_fn(impl, p, q, k, v, dout, causal))
                        except Exception as err:  # keep measuring the rest; reported and exit status 1
                            errors.append(f"{impl} {dtype} d{head_dim} causal={causal} N={n}: "
                                          f"{type(err).__name__}: {err}")
                    for p in PASSES:
                        flops = attention_flops(shape[0], shape[1], n, n, head_dim, causal, p)
                        tf = {impl: (flops / (ms[impl, p] * 1e-3) / 1e12 if (impl, p) in ms else None)
                              for impl in IMPLS}
                        rows.append(dict(dtype=str(dtype).removeprefix("torch."), head_dim=head_dim, causal=causal,
                                         n=n, batch=shape[0], heads=shape[1], pass_=p, flops=flops,
                                         ms={impl: ms.get((impl, p)) for impl in IMPLS}, tflops=tf))
                    del q, k, v, dout
                    torch.cuda.empty_cache()
                    print(f"[{time.time() - t0:6.1f} s] {dtype} d{head_dim} causal={causal} N={n} done",
                          file=sys.stderr, flush=True)

    props = torch.cuda.get_device_properties(0)
    try:
        import cupy

        cupy_version = cupy.__version__
    except ImportError:
        cupy_version = "not importable"
    meta = dict(gpu=torch.cuda.get_device_name(0), sm=f"sm_{props.major}{props.minor}", torch=torch.__version__,
                cuda=torch.version.cuda, cupy=cupy_version, timer=timer_name,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                tokens=16384, hidden=2048, seconds=round(time.time() - t0, 1))
    lines = [
        "# Attention floor: cupyflash vs torch SDPA (flash, cuDNN)",
        "",
        f"GPU: **{meta['gpu']}** ({meta['sm']}) · torch {meta['torch']} (CUDA {meta['cuda']}) · cupy {meta['cupy']}"
        f" · {meta['date']}",
        f"Timing: {timer_name}, warm-up {args.warmup_ms:g} ms, rep {args.rep_ms:g} ms. Shapes: batch·N = 16384 "
        "tokens, heads·head_dim = 2048. TFLOP/s = 4·B·H·N²·D (÷2 causal), backward ×2.5.",
        "",
        "| dtype | D | causal | N | pass | cupyflash TFLOP/s | SDPA flash TFLOP/s | SDPA cuDNN TFLOP/s "
        "| ours / flash | ours / cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tf = r["tflops"]
        ours = tf["cupyflash"]
        vs = [None if ours is None or tf[peer] is None else ours / tf[peer] for peer in ("sdpa-flash", "sdpa-cudnn")]
        lines.append(f"| {r['dtype']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['n']} | {r['pass_']} "
                     f"| {_fmt(ours)} | {_fmt(tf['sdpa-flash'])} | {_fmt(tf['sdpa-cudnn'])} "
                     f"| {_fmt(vs[0], 2)} | {_fmt(vs[1], 2)} |")
    if notes:
        lines += ["", "Not measured:"] + [f"- {reason} ({count} configs)" for reason, count in notes.items()]
    if errors:
        lines += ["", "Errors:"] + [f"- {e}" for e in errors]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(meta=meta, rows=rows, not_measured=notes, errors=errors), indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
