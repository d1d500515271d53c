"""The one table of tile sizes: per head dim, the forward and backward block shapes (for every element type:
fp32 tiles take twice the shared memory, still within an sm_80/sm_90 block's opt-in limit).

Forward: Br query rows per thread block, Bc keys per K/V block, Br = 16 · m_tiles · warps (each warp owns
m_tiles 16-row tiles; two halve the shared-memory reads of K and V per MMA, at the cost of registers).
Backward: Bc keys per thread block, Br queries per streamed Q block, Bc = 16 · warps (each warp owns 16 keys);
(Br / 16) must divide the warp count (the dQ GEMM splits its row tiles evenly over warps).
Registers bound the backward: dK and dV accumulators take D floats per thread (out_cols with a column split), Sᵀ
and dSᵀ Br/2 each.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    Br: int
    Bc: int
    warps: int
    m_tiles: int = 1  # forward: 16-row tiles per warp (Br = 16 · m_tiles · warps)
    # backward, plain path: Sᵀ and dPᵀ in one k loop, twice the MMAs in flight, with dPᵀ's Br/2 registers per
    # thread live through the softmax and dV (kernels_cu/flash_bwd.cuh)
    fuse_sdp: bool = False
    # forward: each tile load recomputes its per-thread cp.async offsets, fewer registers for more instructions
    # (load_tile_async in kernels_cu/common.cuh)
    fresh_offsets: bool = False
    # backward: the columns of dK, dV and dQ per launch, one launch per range, each recomputing S and dP over the whole
    # head (kernels_cu/flash_bwd.cuh DOut); 0: all of them in one launch
    out_cols: int = 0

    def launch_cols(self, head_dim: int) -> int:
        """The backward's columns per launch for `head_dim`."""
        return self.out_cols or head_dim

    @property
    def threads(self) -> int:
        return 32 * self.warps


FORWARD = {  # measured on an H200 beside the 8-warp, 1-tile layout: 2 tiles per warp gave 1.1-1.2x (d64, d128)
    32: Tiles(Br=128, Bc=64, warps=4, m_tiles=2),
    64: Tiles(Br=128, Bc=64, warps=4, m_tiles=2),
    96: Tiles(Br=128, Bc=32, warps=4, m_tiles=2),
    128: Tiles(Br=64, Bc=64, warps=4, m_tiles=1),  # causal or modified; plain: FORWARD_PLAIN
    256: Tiles(Br=64, Bc=16, warps=4, m_tiles=1),
}

# The plain forward (no causal mask, bias, window, dropout or soft-cap) where a shape beats FORWARD[d] only there.
# d128: FA2's 2-tile shape, which fits in registers only with fresh_offsets; same-run A/B on an H100 against
# FORWARD[128] (benchmarks/results/opaque-offsets-ab-NVIDIA_H100_80GB_HBM3.log): plain +12-15 %; causal -4-13 % and
# with a bias -6 %, within that A/B's noise (up to 14 % at N <= 4096) but no gain.
FORWARD_PLAIN = {
    128: Tiles(Br=128, Bc=32, warps=4, m_tiles=2, fresh_offsets=True),
}

@dataclass(frozen=True)
class Sm90Tiles:
    """The warp-specialized Hopper kernels: one producer warpgroup and `consumers` consumer warpgroups. Forward
    (kernels_cu/flash_fwd_sm90.cuh): 64 query rows per consumer, so Br = 64 · consumers (128 or 192); K/V stream
    through `stages` slots. Backward (flash_bwd_sm90.cuh): two consumers of 64 keys each, Q/dO blocks of Br rows."""

    Bc: int
    stages: int
    Br: int = 128
    # The tiles' head dim where it exceeds the tensors' (a multiple of 64, the 128-byte swizzle's panel): TMA fills
    # the extra columns with zeros, the GEMMs skip what they can of them and the kernels store only the tensors'
    # (0: the tensors' own).
    pad_to: int = 0
    # Whether the dropout variants run here; False where they spilled registers, so such calls run on mma.sync
    # (launch.sm90_unsupported says so) and CI does not compile them.
    dropout: bool = True
    consumers: int = 2
    # The backward above head dim 128 (flash_bwd_sm90_wide.cuh): each consumer warpgroup forms Sᵀ and dPᵀ for half
    # the queries and dK, dV, dQ for half the columns, P and dS through shared memory.
    wide: bool = False

    def tile_head_dim(self, d: int) -> int:
        return self.pad_to or d

    @property
    def threads(self) -> int:
        return 128 * (self.consumers + 1)  # the producer and the consumer warpgroups (the kernels' __launch_bounds__)


# H100, same run (benchmarks/results/sm90-tma-forward-NVIDIA_H100_80GB_HBM3.log): bf16 d128 439-559 TFLOP/s plain and
# 267-508 causal (N 1024-16384) against SDPA flash's 325-352 / 243-323. With the cp.async producer, 3 or 4 stages
# changed nothing (benchmarks/results/sm90-ws-forward-NVIDIA_H100_80GB_HBM3.log).
FORWARD_SM90 = {
    # d32 on 64-column tiles, whose zero half S = Q Kᵀ skips and O = P V does not compute (wgmma.cuh head_k_steps,
    # head_cols). H100, same run (benchmarks/results/sm90-ab-NVIDIA_H100_80GB_HBM3.log, session 7): fwd 180-291 TFLOP/s,
    # causal 112-282, bwd 120-207, causal 79-201, against mma.sync's 159-208 / 105-200 / 113-179 / 79-175 and SDPA
    # flash's 183-228 / 107-219 / 134-223 / 83-204 (N 512-16384). With dropout it spilled 4 B once its thread blocks
    # took Q blocks in pairs and its Philox words served four scores (session 16): dropout at d32 runs on mma.sync.
    32: Sm90Tiles(Bc=128, stages=2, pad_to=64, dropout=False),
    64: Sm90Tiles(Bc=128, stages=2),
    # Head dims with no mma.sync kernel (Phi-2's 80; 160, and 192 of MLA-style models): the Hopper kernels run them
    # on 128- and 256-column tiles (the plain forward at 160 and 192: 192, FORWARD_SM90_PLAIN) with no copies and no
    # zero columns in O = P V (wgmma.cuh head_cols); elsewhere (mma.sync) they run zero-padded by copies to the next
    # of tiles.FORWARD's (plan.PADDED). Before, as padded copies on 128 and 256 columns (H100, N 4096,
    # benchmarks/results/session27-NVIDIA_H100_80GB_HBM3.md): 0.43-0.56x
    # of FlashAttention-4's forward; as they are (session28-NVIDIA_H100_80GB_HBM3.md): d80 0.89-0.92x, d192 0.85-0.88x,
    # d160 0.84x causal and 0.60x without a causal mask (0.76x on session 30's machine; FORWARD_SM90_PLAIN below).
    80: Sm90Tiles(Bc=128, stages=2, pad_to=128),
    # d96 on 128-column tiles, S = Q Kᵀ on 6 of their 8 k steps (H100, benchmarks/results/sm90-ab-NVIDIA_H100_80GB_HBM3.log,
    # N 1024-16384): fwd 310-495 TFLOP/s and bwd 196-366 against mma.sync's 197-286 / 146-243 and SDPA flash's 252-339 /
    # 145-301 in the same run
    96: Sm90Tiles(Bc=128, stages=2, pad_to=128),
    128: Sm90Tiles(Bc=128, stages=2),
    **{d: Sm90Tiles(Bc=64, stages=2, dropout=False, pad_to=256) for d in (160, 192)},
    # d256 (Gemma 1/2/3): 64 keys per block, so Q (64 KiB) and two stages of K and V (128 KiB) fit; O takes 128 of a
    # consumer thread's 232 registers. With dropout it spilled 8 B: dropout at d256 runs on mma.sync. H100, same run
    # (benchmarks/results/fwd-d256-sm90-NVIDIA_H100_80GB_HBM3.log): 531-629 TFLOP/s, causal 371-628, 3.2-3.4x the
    # mma.sync forward, 0.83-0.90x of FlashAttention-4 at N >= 4096
    256: Sm90Tiles(Bc=64, stages=2, dropout=False),
}

# The plain and causal forward's tiles where they differ from FORWARD_SM90's (which the score mods' variants keep), by
# (head dim, causal), from FlashAttention-3's tile_size_fwd_sm90: d64 without a causal mask on 192 x 128, three
# consumer warpgroups at 160 registers each (each K/V tile read from shared memory feeds 192 query rows instead of 128);
# d128 without a causal mask on 128 x 176 and d256 on 128 x 80 (wgmma m64n176k16, m64n80k16: fewer blocks, each
# softmax and rescale of O over more keys; d256's two stages of K and V then take 160 KiB, 230472 B of sm_90's 232448).
# Measured against FORWARD_SM90's tiles, new / old / new in one run (H100, bf16, N 1024 / 4096 / 16384,
# benchmarks/results/fwd-tiles-ab-NVIDIA_H100_80GB_HBM3.log): d64 -1 / +6 / +9 %; d256 +4 / +8 / +6 %, causal +2 / +5
# / +10 %; d128 non-causal -2 / +2 / 0 % (and 1.81 -> 1.60 ms at N 8192 in mask_bench's no-mask row, same GPU).
# d64 causal stays on 128 rows: 192 lost 10 % at N 1024 (a 192-row Q block crosses the diagonal in two K blocks), won
# 3 / 7 % at 4096 / 16384.
FORWARD_SM90_PLAIN = {
    (64, False): Sm90Tiles(Bc=128, stages=2, Br=192, consumers=3),
    (128, False): Sm90Tiles(Bc=176, stages=2),
    (256, False): Sm90Tiles(Bc=80, stages=2, dropout=False),
    (256, True): Sm90Tiles(Bc=80, stages=2, dropout=False),
    # d160 and d192 on 192-column tiles (d160's last 32 zero-filled by TMA): Q (48 KiB) and two stages of 112 keys
    # (168 KiB) fit, where d256's tiles held 80 keys. H100, in turns with the 256 x 80 tiles and 192 x 96 (session 31,
    # benchmarks/results/session31-NVIDIA_H100_80GB_HBM3.md, N 1024 / 4096 / 16384): d160 +10 / +16 / +13 %, causal
    # +8 / +12 / +12 %; d192 -1 / ±3 / +5 %, causal +2 / +6 / +7 %. 96 keys: 0-4 % under 112, but +6 % at d192 N 1024.
    **{(d, causal): Sm90Tiles(Bc=112, stages=2, dropout=False, pad_to=192 if d == 160 else 0)
       for d in (160, 192) for causal in (False, True)},
}


# The causal forward's tall variant (jit.Variant.tall, for long queries: plan.TALL_MIN_ROWS): d64 on the non-causal
# variant's 192 x 128 tile. The 192-row causal tile won 3 / 7 % at N 4096 / 16384 and lost 10 % at 1024, where a Q
# block crosses the diagonal in two K blocks (H100, session 16, benchmarks/results/fwd-tiles-ab-NVIDIA_H100_80GB_HBM3.log).
FORWARD_SM90_TALL = {64: FORWARD_SM90_PLAIN[(64, False)]}


def sm90_forward_tiles(d: int, mods: bool, causal: bool, tall: bool = False) -> Sm90Tiles:
    """The Hopper forward's tiles at head dim `d`: the plain or causal variant's (tall: FORWARD_SM90_TALL's), or
    those with score mods."""
    if tall:
        return FORWARD_SM90_TALL[d]
    return FORWARD_SM90[d] if mods else FORWARD_SM90_PLAIN.get((d, causal), FORWARD_SM90[d])


# The Hopper backward (kernels_cu/flash_bwd_sm90.cuh): Bc = 128 keys (two consumer warpgroups of 64), Q/dO blocks of
# Br = 64 rows through `stages` slots; its dSᵀ tile (Bc x Br) is double-buffered. H100, same run
# (benchmarks/results/dq-frag-ab-NVIDIA_H100_80GB_HBM3.log): bf16 d128 326-497 TFLOP/s, causal 222-487, d64 286-389 /
# 197-385, at 0.65-0.86x of FlashAttention-4's backward.
BACKWARD_SM90 = {
    32: Sm90Tiles(Bc=128, stages=2, Br=64, pad_to=64),
    64: Sm90Tiles(Bc=128, stages=3, Br=64),  # 3 Q/dO slots: +1-4 % over 2, +12 % causal at N 1024 (H100, NOTES)
    80: Sm90Tiles(Bc=128, stages=2, Br=64, pad_to=128),  # no mma.sync kernel: FORWARD_SM90's note
    96: Sm90Tiles(Bc=128, stages=2, Br=64, pad_to=128),
    128: Sm90Tiles(Bc=128, stages=2, Br=64),
    # Above 128 (Gemma's 256; 160, 192) FlashAttention-4's d256 tile, 64 x 64 (flash_bwd_sm90_wide.cuh), plain and
    # causal, with a key mask, a bias, a window and soft-capping (Gemma 2 and 3); dropout on mma.sync. Before it
    # the backward at these head dims ran on mma.sync at 0.14-0.33x of FA4 (H100, N 4096,
    # benchmarks/results/session27-NVIDIA_H100_80GB_HBM3.md); on it (session28-NVIDIA_H100_80GB_HBM3.md, same N):
    # d256 1.18-1.27x of FA4, d160 0.83-0.87x, d192 0.77-0.79x.
    **{d: Sm90Tiles(Bc=64, stages=2, Br=64, pad_to=256 if d < 256 else 0, dropout=False, wide=True)
       for d in (160, 192, 256)},
}

# The plain and causal backward's tiles where they differ from BACKWARD_SM90's (which the score mods' variants keep):
# d64 on 128 x 128, FlashAttention-4's (flash_attn/cute/interface.py _tile_size_bwd_sm90): each consumer warpgroup's Sᵀ
# and dPᵀ GEMMs are m64n128 instead of m64n64, so every K/V tile in shared memory and every per-block step (the
# barrier, the waits, the LSE / D rows) serves twice the queries, and dQ splits by rows (flash_bwd_sm90.cuh
# kDqByRows). Two Q/dO slots: three of 128 rows pass sm_90's 227 KiB. H100 (benchmarks/results/
# bwd-d64-128x128-NVIDIA_H100_80GB_HBM3.log): +2-4 % over 64 x 128 without a causal mask, +2-10 % causal.
BACKWARD_SM90_PLAIN = {
    64: Sm90Tiles(Bc=128, stages=2, Br=128),
}
# dQ_accum's rows per (batch, head) are Nq rounded up to this, the largest Br of the Hopper backward
# (flash_bwd_sm90.cuh DqFrag::kHeadRows), so a caller sizes it before the plan is known.
DQ_ACCUM_HEAD_ROWS = 128


def sm90_backward_tiles(d: int, mods: bool) -> Sm90Tiles:
    """The Hopper backward's tiles at head dim `d`: the plain (and causal, and key mask) variant's, or those with score
    mods."""
    return BACKWARD_SM90[d] if mods else BACKWARD_SM90_PLAIN.get(d, BACKWARD_SM90[d])


BACKWARD = {  # fuse_sdp, A/B on an H100: d64 +4-9%, d128 +9-17%; d96 -2-4% (it spills there: 32 B on sm_90)
    # d32, H100 sweep (benchmarks/results/tile-sweep-NVIDIA_H100_80GB_HBM3.log, session 6): 0.80-0.93x of SDPA flash,
    # (64, 128, 8) 0.77-0.86x
    32: Tiles(Br=64, Bc=64, warps=4, fuse_sdp=True),
    64: Tiles(Br=64, Bc=128, warps=8, fuse_sdp=True),
    96: Tiles(Br=64, Bc=128, warps=8),  # H200, beside (32, 64, 4): 0.54x -> 0.77x of SDPA flash (geomean, bf16)
    128: Tiles(Br=32, Bc=128, warps=8, fuse_sdp=True),
    # d256: dK and dV of all 256 columns would take 256 registers per thread; two launches of 128 columns each hold
    # d128's accumulators and recompute S and dP (a third more MMA work than one pass). Bc = 64 keeps K, V, Q and dO
    # (528-byte rows) within sm_80's 163 KiB of shared memory.
    256: Tiles(Br=16, Bc=64, warps=4, out_cols=128),
}


# fp32 on TF32 tensor cores holds twice the fragment registers and twice the shared memory per tile; where the
# 16-bit shape would spill registers or pass sm_80's 163 KiB of shared memory, it takes this one (NVRTC -Xptxas=-v,
# tests/test_kernel_compile.py).
TF32 = {
    ("fwd", 64): Tiles(Br=64, Bc=64, warps=4, m_tiles=1),
    ("fwd", 128): Tiles(Br=64, Bc=32, warps=4, m_tiles=1),
    ("bwd", 96): Tiles(Br=16, Bc=32, warps=2),
    ("bwd", 128): Tiles(Br=16, Bc=128, warps=8),
}
# Head dims with no fp32 (TF32) backward: d256's spilled 24-236 bytes in every shape tried within sm_80's shared memory
# (Bc 32, 2 warps, 64 or 128 columns per launch), its S = K Qᵀ loop of 32 k8 steps beside the accumulators.
NO_TF32_BACKWARD = frozenset({256})


def has_backward(dtype: str, head_dim: int) -> bool:
    """Whether a backward kernel takes `dtype` at kernel head dim `head_dim`."""
    return head_dim in BACKWARD and not (dtype == "float32" and head_dim in NO_TF32_BACKWARD)


def no_backward_why(dtype: str, head_dim: int, kernel_d: int | None) -> str | None:
    """None if a backward kernel takes `dtype` at `head_dim` (run at kernel head dim `kernel_d`), else why not."""
    if kernel_d not in BACKWARD:
        return (f"head_dim {head_dim} has a forward kernel only; the backward supports head dims up to "
                f"{max(BACKWARD)} ({', '.join(map(str, BACKWARD))} natively, others zero-padded to the next)")
    if not has_backward(dtype, kernel_d):
        return (f"head_dim {head_dim} in float32 has a forward kernel only: the TF32 backward supports head dims up "
                f"to {max(set(BACKWARD) - NO_TF32_BACKWARD)}; float16 and bfloat16 up to {max(BACKWARD)}")
    return None


def table(kernel: str) -> dict:
    """The mma.sync kernels' tiles of pass `kernel` ("fwd" / "bwd") by head dim: the head dims they have."""
    return FORWARD if kernel == "fwd" else BACKWARD


def sm90_table(kernel: str) -> dict:
    """The Hopper kernels' tiles of pass `kernel` ("fwd" / "bwd") by head dim: the head dims they have."""
    return FORWARD_SM90 if kernel == "fwd" else BACKWARD_SM90


def for_pass(kernel: str, dtype: str, head_dim: int, plain: bool = False) -> Tiles:
    """The tiles of pass `kernel` ("fwd" / "bwd") for `dtype` and `head_dim`: the one lookup every launch uses.
    `plain`: the variant has no causal mask and no score modification (jit.Variant: not causal, not mods)."""
    if dtype == "float32" and (kernel, head_dim) in TF32:
        return TF32[(kernel, head_dim)]
    if kernel == "fwd" and plain and head_dim in FORWARD_PLAIN:
        return FORWARD_PLAIN[head_dim]
    return table(kernel)[head_dim]


def forward_smem_bytes(d: int, t: Tiles, elem_bytes: int = 2) -> int:
    row = elem_bytes * d + 16  # padded row, see Tile<> in common.cuh
    return (t.Br + 2 * t.Bc) * row


def sm90_forward_smem_bytes(d: int, t: Sm90Tiles) -> int:
    """Q, the K and V ring (16-bit, unpadded: the 128-byte swizzle), the mbarriers (q_full, full and empty of K and V
    per stage, q_empty; 8 bytes each), each slot's block index (4 bytes), and 1 KiB of slack to align the tiles to the
    swizzle's 1024-byte atoms."""
    d = t.tile_head_dim(d)
    return (t.Br + 2 * t.stages * t.Bc) * d * 2 + 8 * (2 + 4 * t.stages) + 4 * t.stages + 1024


def sm90_backward_smem_bytes(d: int, t: Sm90Tiles, mods: bool = False) -> int:
    """K and V, the Q and dO slots, two dSᵀ tiles (16-bit, swizzled), LSE and D per slot (fp32; with score mods the
    rows' lo too: P = exp2((s - hi) - lo)), the mbarriers (kv_full, then full and empty per stage), with score mods
    the soft-cap derivatives of each consumer thread's Br / 2 scores (fp16), each consumer warpgroup's dQ staging
    tile (its 16 rows of its columns, fp32, 16-byte aligned), and 1 KiB of alignment slack."""
    tile_d = t.tile_head_dim(d)
    row_arrays = 3 if mods else 2
    if t.wide:  # K and V, the Q and dO slots, two Pᵀ and two dSᵀ tiles, the row arrays per slot, the mbarriers
        return ((2 * t.Bc + 2 * t.stages * t.Br) * tile_d * 2 + 4 * t.Bc * t.Br * 2 + t.stages * row_arrays * t.Br * 4
                + 8 * (1 + 2 * t.stages) + 1024)
    cap_grad = 256 * t.Br // 2 * 2 if mods else 0
    dq_cols = d if d <= tile_d // 2 or t.Br == 128 else tile_d // 2  # flash_bwd_sm90.cuh kDqCols
    dq_staging = 8 * 16 * dq_cols * 4 + 8 * 8 + 16  # and each consumer warp's destination address
    return ((2 * t.Bc + 2 * t.stages * t.Br) * tile_d * 2 + 2 * t.Bc * t.Br * 2 + t.stages * row_arrays * t.Br * 4
            + 8 * (1 + 2 * t.stages) + cap_grad + dq_staging + 1024)


def backward_smem_bytes(d: int, t: Tiles, elem_bytes: int = 2, mods: bool = False) -> int:
    """K, V, Q, dO (padded rows), dSᵀ, and per query row LSE and D (fp32; with score mods the rows' lo too:
    P = exp2((s - hi) - lo), flash_bwd.cuh)."""
    row = elem_bytes * d + 16
    return (2 * t.Bc + 2 * t.Br) * row + t.Bc * (elem_bytes * t.Br + 16) + (3 if mods else 2) * 4 * t.Br
