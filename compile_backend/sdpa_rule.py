"""Which SDPA calls the backend routes by default (``options={"sdpa": "auto"}``): where a same-run benchmark found the
op faster than SDPA's own backend choice.

The table behind it is ``benchmarks/results/sdpa-routing-<GPU>.md`` (``python benchmarks/sdpa_routing.py``: bf16,
head dims 64 and 128, N 512-8192, forward and forward + backward, one process). On an H100 (session 21) the op took
0.55-0.83x SDPA's time with a boolean key-padding mask and 0.27-0.66x with causal + key padding (transformers'
decoder mask, which the proof turns into the causal flag and a key mask), at every N and in both passes: SDPA sends a
masked call to its mask-capable backends, while the plain Hopper kernels read the key mask (cupyflash/plan.py). With
no mask, the causal flag or grouped query SDPA's flash / cuDNN kernels were as fast or faster (ours 0.86-1.31x), and
with a dense additive mask much faster (ours 1.56-3.77x). So a call is routed when its boolean mask is proven to be
the causal flag and per-key terms (SDPA runs a mask-capable backend on it, the op its plain or key-mask kernels) on a
Hopper GPU, at a head dim and length the table covers; "route" takes every call the op computes exactly, "keep" none.
"""
from __future__ import annotations

from typing import Optional

import torch

HEAD_DIMS = (64, 128)  # measured
MIN_N = 512  # the shortest length measured; below it the host time per call weighs more, and nothing was measured
DTYPES = (torch.bfloat16, torch.float16)  # the same kernels; bf16 measured


def _capability(device: torch.device) -> Optional[tuple]:
    """The CUDA device's compute capability, or None off CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def why_keep(q: torch.Tensor, window: tuple, proven: bool) -> Optional[str]:
    """Why the default leaves a call the op could take to SDPA, or None to route it. `q`: the call's (fake) query;
    `window`: the op's window for the call; `proven`: the call's boolean mask was proven to be flags and per-key
    terms."""
    if not proven:
        return ("SDPA is as fast or faster for this call's features (no boolean mask proven to be causal and key "
                "padding: benchmarks/results/sdpa-routing-*.md); options={'sdpa': 'route'} routes it anyway")
    if window != (-1, -1):
        return "a key mask beside a sliding window runs on the score-mods kernels, not measured against SDPA"
    capability = _capability(q.device)
    if capability is None or capability[0] != 9:
        return (f"the key mask runs as such only on Hopper's kernels (device {q.device}"
                f"{'' if capability is None else f', sm_{capability[0]}{capability[1]}'}); SDPA stays")
    if q.dtype not in DTYPES or q.shape[-1] not in HEAD_DIMS:
        return f"{q.dtype} at head dim {q.shape[-1]} not measured against SDPA (bf16/fp16, head dims {HEAD_DIMS})"
    # A dynamic Nq is decided with a guard: the graph is compiled for lengths on this side of MIN_N, and a length on
    # the other side compiles again (as Inductor's own size specializations do).
    if not bool(q.shape[-2] >= MIN_N):
        return f"Nq={q.shape[-2]} below {MIN_N}, the shortest length measured against SDPA"
    return None
