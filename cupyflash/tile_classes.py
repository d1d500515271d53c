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


def _tiles_all(x: torch.Tensor, tq: int, tk: int, pad: bool) -> torch.Tensor:
    """all() over each tq x tk tile of the last two dims, padding ragged edges with `pad`."""
    bb, hb, nq, nk = x.shape
    n_qb, n_kb = math.ceil(nq / tq), math.ceil(nk / tk)
    x = F.pad(x, (0, n_kb * tk - nk, 0, n_qb * tq - nq), value=pad)
    return x.view(bb, hb, n_qb, tq, n_kb, tk).all(dim=5).all(dim=3)  # (Bb, Hb, QB, KB)


def tile_classes(bias: torch.Tensor, br: int, bc: int, *, window: bool) -> torch.Tensor:
    """int8 (Bb, Hb, QB, KB) classes of `bias` (4-D, size-1 dims broadcast) for Br x Bc tiles. With a causal
    mask or window a row's unmasked keys may all lie outside it, so only all -inf tiles are skipped then."""
    tq = br if bias.shape[2] > 1 else 1
    tk = bc if bias.shape[3] > 1 else 1
    masked = bias <= MASKED_BIAS
    all_masked = _tiles_all(masked, tq, tk, pad=True)
    skip = _tiles_all(bias == float("-inf"), tq, tk, pad=True)
    if not window:
        rows_keep_a_key = (~masked).any(dim=3)  # (Bb, Hb, Nq)
        n_qb = all_masked.shape[2]
        rows_keep_a_key = F.pad(rows_keep_a_key, (0, n_qb * tq - bias.shape[2]), value=True)
        rows_keep_a_key = rows_keep_a_key.view(*rows_keep_a_key.shape[:2], n_qb, tq).all(dim=3)  # (Bb, Hb, QB)
        skip = skip | (all_masked & rows_keep_a_key.unsqueeze(3))
    zero = _tiles_all(bias == 0, tq, tk, pad=False)
    return torch.where(skip, SKIP, torch.where(zero, ZERO, READ)).to(torch.int8)
