"""The one table of tile sizes: per head dim, the forward and backward block shapes.

Forward: Br query rows per thread block, Bc keys per K/V block, Br = 16 · m_tiles · warps (each warp owns
m_tiles 16-row tiles; two halve the shared-memory reads of K and V per MMA, at the cost of registers).
Backward: Bc keys per thread block, Br queries per streamed Q block, Bc = 16 · warps (each warp owns 16 keys);
(Br / 16) must divide the warp count (the dQ GEMM splits its row tiles evenly over warps).
Registers bound the backward: dK and dV accumulators take D floats per thread, Sᵀ and dSᵀ Br/2 each.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    Br: int
    Bc: int
    warps: int
    m_tiles: int = 1  # forward: 16-row tiles per warp (Br = 16 · m_tiles · warps)

    @property
    def threads(self) -> int:
        return 32 * self.warps


FORWARD = {  # measured on an H200 beside the 8-warp, 1-tile layout: 2 tiles per warp gave 1.1-1.2x (d64, d128)
    32: Tiles(Br=128, Bc=64, warps=4, m_tiles=2),
    64: Tiles(Br=128, Bc=64, warps=4, m_tiles=2),
    96: Tiles(Br=128, Bc=32, warps=4, m_tiles=2),
    128: Tiles(Br=64, Bc=64, warps=4, m_tiles=1),  # (128, 32, 4 warps, 2 tiles) ran 0-8% faster but spills
    256: Tiles(Br=64, Bc=16, warps=4, m_tiles=1),
}

BACKWARD = {
    32: Tiles(Br=64, Bc=128, warps=8),
    64: Tiles(Br=64, Bc=128, warps=8),
    96: Tiles(Br=32, Bc=64, warps=4),
    128: Tiles(Br=32, Bc=128, warps=8),
}


def forward_smem_bytes(d: int, t: Tiles) -> int:
    row = 2 * d + 16  # padded row, see Tile<> in common.cuh
    return (t.Br + 2 * t.Bc) * row


def backward_smem_bytes(d: int, t: Tiles) -> int:
    row = 2 * d + 16
    return (2 * t.Bc + 2 * t.Br) * row + t.Bc * (2 * t.Br + 16) + 2 * 4 * t.Br
