"""Bias tile classes for block skipping (kernels_cu/scores.cuh, TileClass): their definition, and the reference
the GPU classification (kernels_cu/tile_classes.cuh, launch.classify_tiles, which both faces use) is tested against.

For each tile of a pass's Br x Bc grid, in the bias's own broadcast shape (a (B, 1, 1, Nk) padding mask
gives one row of tiles per batch):
- SKIP (0): every element masks its key (<= -1e30) and the tile cannot matter: all of it is -inf, or every
  query row of the tile keeps some unmasked key (otherwise a row masked only by finfo.min attends uniformly,
  and its masked keys count);
- ZERO (1): every element is 0, so the kernel adds nothing and reads nothing;
- READ (2): anything else, read per element.

Not cached: the faces recompute the classes on the GPU at every call, on the stream of the attention. A cache
keyed on the tensor (pointer, version counter) would go stale under CUDA-graph replay, where no Python runs,
and the pass costs a few reads of the bias, small beside the attention over B·H heads that reads it.

Written once over cupyflash/array_ops.py, so it takes torch tensors, CuPy arrays and NumPy arrays alike (and
imports neither torch nor CuPy unless given one of theirs).
"""
from __future__ import annotations

import math

from .array_ops import ops_for

SKIP, ZERO, READ = 0, 1, 2
MASKED_BIAS = -1e30  # kernels_cu/scores.cuh kMaskedBias


def tile_classes(bias, br: int, bc: int, *, window: bool):
    """int8 (Bb, Hb, QB, KB) classes of `bias` (a torch tensor, CuPy or NumPy array, 4-D, size-1 dims broadcast)
    for Br x Bc tiles, in the same library. With a causal mask or window a row's unmasked keys may all lie outside
    it, so only all -inf tiles are skipped then.

    One read of the bias (min and max over each row's stretch of a key block; two with CuPy and NumPy, which
    have no fused min-max); everything after is per tile."""
    xp = ops_for(bias)
    bb, hb, nq, nk = bias.shape
    tq, tk = (br if nq > 1 else 1), (bc if nk > 1 else 1)
    n_qb, n_kb = math.ceil(nq / tq), math.ceil(nk / tk)
    if nq % tq or nk % tk:  # ragged edges: padding keys/rows are -inf, i.e. masked (never "all zero")
        bias = xp.pad_end(bias, n_qb * tq - nq, n_kb * tk - nk, float("-inf"))
    lo, hi = xp.minmax(bias.reshape(bb, hb, n_qb * tq, n_kb, tk), axis=4)  # (Bb, Hb, rows, KB)
    # Compared in fp32 (exact for fp16/bf16 values, and the same classes): -1e30 is no fp16 number, which NumPy
    # warns about as it rounds it to -inf to compare.
    lo, hi = xp.float32(lo), xp.float32(hi)
    tile_hi = xp.amax(hi.reshape(bb, hb, n_qb, tq, n_kb), axis=3)  # (Bb, Hb, QB, KB)
    tile_lo = xp.amin(lo.reshape(bb, hb, n_qb, tq, n_kb), axis=3)
    skip = tile_hi == float("-inf")
    if not window:
        row_keeps_a_key = xp.amax(hi, axis=3) > MASKED_BIAS  # (Bb, Hb, rows)
        row_keeps_a_key[..., nq:] = True  # padding rows do not count
        block_rows_keep = xp.all(row_keeps_a_key.reshape(bb, hb, n_qb, tq), axis=3)[..., None]  # (Bb, Hb, QB, 1)
        skip |= (tile_hi <= MASKED_BIAS) & block_rows_keep
    zero = (tile_hi == 0) & (tile_lo == 0)
    return xp.int8(xp.where(skip, SKIP, xp.where(zero, ZERO, READ)))
