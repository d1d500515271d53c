"""What the benchmarks time: our kernel and its peers behind one signature, the benchmark shapes, FLOP counts,
and CUDA-event timing. Shared by the pytest-benchmark suite and ``floor.py``."""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

TOKENS = 16 * 1024  # batch × N
HIDDEN = 2048  # heads × head_dim
MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of a pass relative to the forward: backward = 2.5x (FlashAttention-2 paper's convention).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
# Peers that materialise the (N, N) scores: their memory grows as B·H·N², so they stop at this N.
MAX_SEQLEN = {"sdpa-math": 4096, "naive": 4096}


def bench_shape(n: int, head_dim: int) -> tuple:
    """(B, H, N, D) with B·N = 16k tokens and H·D = 2048 hidden."""
    return (max(TOKENS // n, 1), HIDDEN // head_dim, n, head_dim)


def attention_flops(batch, heads, n_q, n_k, head_dim, causal: bool, mode: str) -> float:
    """4·B·H·Nq·Nk·D for the forward (two GEMMs), half if causal; backward 2.5x, fwd+bwd 3.5x."""
    flops = 4.0 * batch * heads * n_q * n_k * head_dim
    return flops / (2 if causal else 1) * MODE_FLOP_FACTOR[mode]


def _cupyflash(q, k, v, causal):
    import cupyflash

    return cupyflash.flash_attention(q, k, v, causal=causal)


def _sdpa(backend_name: str):
    def run(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # The backend is chosen at the forward; autograd records that backend's own backward.
        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # square: top-left = bottom-right

    return run


def _naive(q, k, v, causal):
    """Eager softmax(Q Kᵀ / sqrt(D)) V in the inputs' dtype, as unfused model code writes it."""
    s = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, N, N)
    if causal:
        n_q, n_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)  # (Nq, Nk)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)  # (B, H, N, D)


IMPLS: dict[str, Callable] = {
    "cupyflash": _cupyflash,
    "sdpa-flash": _sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"),
    "sdpa-math": _sdpa("MATH"),
    "naive": _naive,
}


def make_inputs(shape, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, dout = (torch.randn(shape, generator=gen, device="cuda", dtype=dtype) for _ in range(4))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout


def unavailable_reason(impl: str, q, k, v, dout, causal: bool) -> str | None:
    """None if `impl` runs forward and backward on these inputs; else why not (SDPA's own warnings included).

    Only "this backend cannot take these inputs" counts (RuntimeError from SDPA's dispatcher,
    NotImplementedError from ours); anything else propagates as a real failure.
    """
    if q.shape[-2] > MAX_SEQLEN.get(impl, q.shape[-2]):
        return f"{impl} materialises N x N scores; benchmarked only up to N = {MAX_SEQLEN[impl]}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = IMPLS[impl](q, k, v, causal)
            torch.autograd.grad(out, (q, k, v), dout)
            torch.cuda.synchronize()
        except NotImplementedError as err:
            return f"{impl}: {err}"
        except RuntimeError as err:
            if impl == "cupyflash":
                raise
            why = " | ".join(str(w.message).splitlines()[0] for w in caught)
            return f"{impl} unavailable: {str(err).splitlines()[0]}" + (f" ({why})" if why else "")
    return None


def pass_fn(impl: str, mode: str, q, k, v, dout, causal: bool) -> Callable[[], object]:
    """A no-argument callable running one pass; for "bwd", the forward runs once here, outside the timing."""
    fwd = IMPLS[impl]
    if mode == "fwd":
        return lambda: fwd(q, k, v, causal)
    if mode == "bwd":
        out = fwd(q, k, v, causal)
        return lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    assert mode == "fwd+bwd", mode
    return lambda: torch.autograd.grad(fwd(q, k, v, causal), (q, k, v), dout)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak torch allocation above the live tensors during one call of `fn`."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base


L2_FLUSH_BYTES = 256 * 1024 * 1024  # > L2 of H100/H200 (50/60 MB), as triton.testing.do_bench


class _GpuReading:
    """One reading of `CudaEventClock`: events just before and just after an L2 flush kernel."""

    def __init__(self, before_flush, after_flush):
        self.before_flush, self.after_flush = before_flush, after_flush

    def __sub__(self, start: "_GpuReading") -> float:
        """GPU seconds from the end of `start`'s flush to the beginning of this reading's flush."""
        self.before_flush.synchronize()
        return start.after_flush.elapsed_time(self.before_flush) / 1e3  # ms -> s


class CudaEventClock:
    """A ``timer=`` for pytest-benchmark that measures GPU time with CUDA events (use with ``pedantic``).

    pytest-benchmark's pedantic runner does ``start = timer(); target() x iterations; end = timer()`` and
    records ``end - start``. Each reading enqueues [event, L2 flush, event] on the current stream without
    waiting; ``end - start`` waits for the end reading's first event and returns the GPU time from the end of
    the start flush to the end of the timed work. So a duration is kernel time on the GPU, as in
    triton.testing.do_bench: the flush (~0.1 ms of memset) empties L2 and keeps the GPU busy while the host
    launches the first timed kernel, so host launch latency and Python overhead are not counted unless the GPU
    actually waits for them (then they are real cost and are counted).
    """

    __name__ = "CudaEventClock"  # pytest-benchmark prints the timer by name

    def __init__(self):
        self._flush = None

    def __call__(self) -> _GpuReading:
        if self._flush is None:
            self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record()
        self._flush.zero_()
        after.record()
        return _GpuReading(before, after)


def median_ms_events(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median per-call GPU time (ms) by CUDA events, the method of triton.testing.do_bench: an L2 flush before
    every call (which also hides the host's launch latency), events around each call, one synchronisation
    at the end, after about `warmup_ms` of warm-up."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    end.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)  # ms per call, flush included
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    n_rep = max(5, int(rep_ms / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
