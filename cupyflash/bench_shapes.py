"""Shapes and FLOP counts of the attention benchmarks (stdlib only, so the CLI parses and tables format
without torch)."""
from __future__ import annotations

TOKENS = 16 * 1024  # batch × N
HIDDEN = 2048  # heads × head_dim
MODES = ("fwd", "bwd", "fwd+bwd")
# FLOPs of a pass relative to the forward: backward = 2.5x (FlashAttention-2 paper's convention).
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def bench_shape(n: int, head_dim: int, tokens: int = TOKENS, hidden: int = HIDDEN) -> tuple:
    """(B, H, N, D) with B·N = `tokens` (B at least 1) and H·D = `hidden`."""
    return (max(tokens // n, 1), hidden // head_dim, n, head_dim)


def attention_flops(batch, heads, n_q, n_k, head_dim, causal: bool, mode: str) -> float:
    """4·B·H·Nq·Nk·D for the forward (two GEMMs), half if causal; backward 2.5x, fwd+bwd 3.5x."""
    flops = 4.0 * batch * heads * n_q * n_k * head_dim
    return flops / (2 if causal else 1) * MODE_FLOP_FACTOR[mode]
