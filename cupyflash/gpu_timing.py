"""GPU time and memory of a callable: CUDA events with an L2 flush (triton.testing.do_bench's method, or
do_bench itself when triton is importable), a pytest-benchmark timer built the same way, and peak memory."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


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


def median_timer(warmup_ms: float = 25.0, rep_ms: float = 100.0) -> tuple[str, Callable[[Callable], float]]:
    """(name of the method, fn -> median ms): triton.testing.do_bench when importable, else median_ms_events."""
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
