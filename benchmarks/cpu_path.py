"""The op's CPU path against torch's CPU SDPA, timed in one process: forward and forward+backward, median of
alternating rounds (the machine's cores may be shared: the spread is reported), plus each one's peak extra
memory in a fresh child process (resident memory sampled every millisecond, above what it was before the call).

    python benchmarks/cpu_path.py                                  # B=1, H=4, N=8192, d64, causal, fp32
    python benchmarks/cpu_path.py --n 2048 --repeats 3 --out benchmarks/results/cpu-path.md
    python benchmarks/cpu_path.py --mask right-padding   # causal + right padding as one finfo.min (B, 1, N, N) bias
    python benchmarks/cpu_path.py --mask left-padding    # the same with left padding: rows that see only finfo.min

Implementations: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention, is_causal), ``cupyflash``
(cupyflash.flash_attention, causal: cpu_attention.route sends it to torch's CPU flash kernels) and ``chunked``
(the same call with route forced to the exact chunked path, as for dropout, soft cap or bias gradients). The
peak memory includes the mask's own copies when there is one (an N x N tensor is 2^28 bytes at N = 8192).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cupyflash
from cupyflash import cpu_attention

IMPLS = ("sdpa", "cupyflash", "chunked")


@contextlib.contextmanager
def _chunked_only():
    saved = cpu_attention.route
    cpu_attention.route = lambda *args, **kwargs: None
    try:
        yield
    finally:
        cpu_attention.route = saved


def _call(impl: str, q, k, v, mask):
    """Causal attention: by the flag, or through ``mask`` (an additive bias) when given."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    with _chunked_only() if impl == "chunked" else contextlib.nullcontext():
        return cupyflash.flash_attention(q, k, v, mask, causal=mask is None)


def _inputs(args):
    """q, k, v, dout and the mask (None unless --mask)."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.heads, args.n, args.head_dim)
    mask = None
    if args.mask:  # transformers' eager mask: causal, a tenth of the keys padding, on the right or the left
        keep = torch.ones(args.n, args.n, dtype=torch.bool).tril()  # (N, N)
        if args.mask == "right-padding":
            keep[:, args.n - args.n // 10:] = False
        else:
            keep[:, :args.n // 10] = False
        mask = torch.zeros(args.batch, 1, args.n, args.n, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(4)] + [mask]


def _time(impl: str, q, k, v, dout, mask, backward: bool) -> float:
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    start = time.perf_counter()
    with _chunked_only() if impl == "chunked" else contextlib.nullcontext():
        out = _call(impl, *leaves, mask)
        if backward:
            out.backward(dout)
    return time.perf_counter() - start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sampled_peak(fn) -> int:
    """Bytes of resident memory fn() adds at its peak. (ru_maxrss would be hidden by the peak of importing torch.)"""
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(0, peak[0] - before)


def _peak_mib(impl: str, argv) -> float:
    """Peak memory of one forward+backward above the inputs', in MiB, measured in a fresh process."""
    child = subprocess.run([sys.executable, __file__, *argv, "--peak-of", impl], capture_output=True, text=True,
                           check=True)
    return float(child.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mask", choices=("right-padding", "left-padding"),
                        help="causal through an additive finfo.min mask instead")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of sdpa and cupyflash (after a warm-up)")
    parser.add_argument("--chunked-repeats", type=int, default=2, help="rounds of the (slow) chunked path")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--peak-of", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    q, k, v, dout, mask = _inputs(args)
    if args.peak_of:
        print(_sampled_peak(lambda: _time(args.peak_of, q, k, v, dout, mask, backward=True)) / 2 ** 20)
        return 0

    times = {(impl, bwd): [] for impl in IMPLS for bwd in (False, True)}
    for impl in IMPLS:  # warm-up (thread pools, first allocations)
        _time(impl, q[..., :256, :], k[..., :256, :], v[..., :256, :], dout[..., :256, :],
              None if mask is None else mask[..., :256, :256], backward=True)
    for r in range(args.repeats):
        for impl in IMPLS:
            if impl == "chunked" and r >= args.chunked_repeats:
                continue
            for bwd in (False, True):
                times[impl, bwd].append(_time(impl, q, k, v, dout, mask, bwd))
    cli_args = [a for a in (argv if argv is not None else sys.argv[1:])]
    peaks = {impl: _peak_mib(impl, cli_args) for impl in IMPLS}

    med = {key: statistics.median(ts) for key, ts in times.items()}
    causal = "causal" if mask is None else f"causal + {args.mask} as a finfo.min mask"
    title = (f"B={args.batch}, H={args.heads}, N={args.n}, d={args.head_dim}, {causal}, {args.dtype}, "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = [f"### CPU path: {title}", "",
             "| impl | fwd s (median) | fwd spread | fwd vs sdpa | fwd+bwd s (median) | fwd+bwd spread "
             "| fwd+bwd vs sdpa | peak extra MiB (fwd+bwd) | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for impl in IMPLS:
        cells = [impl]
        for bwd in (False, True):
            ts = times[impl, bwd]
            cells += [f"{med[impl, bwd]:.3f}", f"{min(ts):.3f}-{max(ts):.3f}",
                      f"{med[impl, bwd] / med['sdpa', bwd]:.2f}x"]
        cells += [f"{peaks[impl]:.0f}", str(len(times[impl, False]))]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
