"""Attention forward, backward and forward+backward: cupyflash against every implementation in
``bench_impls.IMPLS`` (torch SDPA's flash, cuDNN and math backends, FlashAttention-4 where ``flash_attn.cute`` is
importable, naive eager attention), in one session on one GPU; a peer that cannot run is skipped with the reason.

Shapes: batch x N = 16k tokens, heads x head_dim = 2048 hidden, N = 1024 .. 16384. Times are GPU time by CUDA
events (``CudaEventClock``, see cupyflash/gpu_timing.py), median over rounds; ``extra_info`` holds TFLOP/s
(4·B·H·N²·D, half if causal; backward 2.5x, fwd+bwd 3.5x) and the peak memory of one call.
"""
from __future__ import annotations

import itertools

import pytest

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed: pip install pytest-benchmark")
import torch  # noqa: E402

from cupyflash.bench_impls import IMPLS, make_inputs, pass_fn, unavailable_reason  # noqa: E402
from cupyflash.bench_shapes import MODES, attention_flops, bench_shape  # noqa: E402
from cupyflash.gpu_timing import CudaEventClock, peak_memory_bytes  # noqa: E402

ROUNDS, ITERATIONS, WARMUP_ROUNDS = 10, 3, 2
SEQLENS = (1024, 2048, 4096, 8192, 16384)

pytestmark = [pytest.mark.gpu, pytest.mark.benchmark(timer=CudaEventClock())]


def _configs():
    """bf16 and fp16 at head dims 64 and 128; head dims 32 and 96 in bf16 only."""
    main = itertools.product((torch.bfloat16, torch.float16), (64, 128), (False, True), SEQLENS)
    extra = itertools.product((torch.bfloat16,), (32, 96), (False, True), SEQLENS)
    return [pytest.param(dt, d, c, n, id=f"{str(dt).removeprefix('torch.')}-d{d}-{'causal' if c else 'full'}-N{n}")
            for dt, d, c, n in itertools.chain(main, extra)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,head_dim,causal,n", _configs())
def test_attention(benchmark, dtype, head_dim, causal, n, mode, impl):
    shape = bench_shape(n, head_dim)  # (B, H, N, D)
    q, k, v, dout = make_inputs(shape, dtype)
    reason = unavailable_reason(impl, q, k, v, dout, causal)  # also the first warm-up (JIT compile for ours)
    if reason:
        pytest.skip(reason)
    fn = pass_fn(impl, mode, q, k, v, dout, causal)
    flops = attention_flops(shape[0], shape[1], n, n, head_dim, causal, mode)
    benchmark.group = f"{mode} {str(dtype).removeprefix('torch.')} d{head_dim} {'causal' if causal else 'full'} N={n}"
    benchmark.extra_info.update(
        impl=impl, mode=mode, dtype=str(dtype).removeprefix("torch."), shape_bhnd=list(shape), causal=causal,
        flops=flops, gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        peak_mem_mib=round(peak_memory_bytes(fn) / 2**20, 1))
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=WARMUP_ROUNDS)
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = round(flops / benchmark.stats.stats.median / 1e12, 1)
