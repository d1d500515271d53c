"""Bias tile classes for block skipping (kernels_cu/scores.cuh, TileClass).

For each tile of a pass's Br x Bc grid, in the bias's own broadcast shape (a (B, 1, 1, Nk) padding mask
gives one row of tiles per batch):
- SKIP (0): every element masks its key (<= -1e30) and the tile cannot matter: all of it is -inf, or every
  query row of the tile keeps some unmasked key (otherwise a row masked only by finfo.min attends uniformly,
  and its masked keys count);
- ZERO (1): every element is 0, so the kernel adds nothing and reads nothing;
- READ (2): anything else, read per element.

Not cached: the classes are recomputed on the GPU at every call, on the stream of the attention. A cache
keyed on the tensor (pointer, version counter) would go stale under CUDA-graph replay, where no Python runs,
and the pass costs a few reads of the bias, small beside the attention over B·H heads that reads it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SKIP, ZERO, READ = 0, 1, 2
MASKED_BIAS = -1e30  # kernels_cu/scores.cuh kMaskedBias


def tile_classes(bias: torch.Tensor, br: int, bc: int, *, window: bool) -> torch.Tensor:
    """int8 (Bb, Hb, QB, KB) classes of `bias` (4-D, size-1 dims broadcast) for Br x Bc tiles. With a causal
    mask or window a row's unmasked keys may all lie outside it, so only all -inf tiles are skipped then.

    One read of the bias (aminmax over each row's stretch of a key block); everything after is per tile."""
    bb, hb, nq, nk = bias.shape
    tq, tk = (br if nq > 1 else 1), (bc if nk > 1 else 1)
    n_qb, n_kb = math.ceil(nq / tq), math.ceil(nk / tk)
    if nq % tq or nk % tk:  # ragged edges: padding keys/rows are -inf, i.e. masked (never "all zero")
        bias = F.pad(bias, (0, n_kb * tk - nk, 0, n_qb * tq - nq), value=float("-inf"))
    lo, hi = torch.aminmax(bias.reshape(bb, hb, n_qb * tq, n_kb, tk), dim=4)  # (Bb, Hb, rows, KB)
    tile_hi = hi.view(bb, hb, n_qb, tq, n_kb).amax(dim=3)  # (Bb, Hb, QB, KB)
    tile_lo = lo.view(bb, hb, n_qb, tq, n_kb).amin(dim=3)
    skip = tile_hi == float("-inf")
    if not window:
        row_keeps_a_key = hi.amax(dim=3) > MASKED_BIAS  # (Bb, Hb, rows)
        row_keeps_a_key[..., nq:] = True  # padding rows do not count
        block_rows_keep = row_keeps_a_key.view(bb, hb, n_qb, tq).all(dim=3).unsqueeze(3)  # (Bb, Hb, QB, 1)
        skip |= (tile_hi <= MASKED_BIAS) & block_rows_keep
    zero = (tile_hi == 0) & (tile_lo == 0)
    return torch.where(skip, SKIP, torch.where(zero, ZERO, READ)).to(torch.int8)
