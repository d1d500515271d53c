// Backward on Hopper (sm_90a), after FlashAttention-3's (https://arxiv.org/abs/2407.08608): one thread block per
// Bc = 128 keys of one K/V head holds K_j and V_j in shared memory and dK_j, dV_j in registers, while a producer
// warpgroup streams the (query head, Q block) pairs that see those keys (Q_i and dO_i, Br = 64 rows, or 128 on d64's
// plain path as FlashAttention-4's, in two or three slots) with TMA. Each of two consumer warpgroups owns 64 of the
// keys and per Q block runs on wgmma:
//   Sᵀ = K Q_iᵀ and dPᵀ = V dO_iᵀ (64 keys x Br), Pᵀ = exp2(Sᵀ·scale·log2 e − LSE·log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − D_i),
//   dV += Pᵀ dO_i and dK += dSᵀ Q_i with Pᵀ, dSᵀ as register A operands,
//   dQ_i += dS K_j: both halves of dSᵀ go through shared memory, and each warpgroup forms D/2 of dQ_i's columns, or,
//   where the tensors' columns fit in D/2, the sum over its 64 keys of all of them, or, with Br = 128, all columns of
//   its 64 of the block's rows; each warp stores its 16 rows of
//   them to shared memory in the accumulator's fragment order and adds them, contiguous, into the fp32 accumulator
//   with one bulk reduce-add (the TMA engine, as FlashAttention-3's dQ_accum; flash_bwd_convert_dq_sm90 below reads
//   that layout back).
// A second producer warp stages LSE_i · log2 e and D_i in shared memory beside each Q/dO slot; with Mods also lo_i,
// P = exp2((s - hi) - lo) with hi = LSE_i · log2 e and lo = 0, or with row_lse (a bias: flash_bwd.cuh's preprocess and
// the forward's stats mode) the rows' (hi, lo) pairs, (m, log2 l) under the rebuild rule (scores.cuh kLseRebuild).
// 16-bit types. Mods compiles in the score mods of scores.cuh (bias with its tile classes and gradient, window,
// soft-cap; Dropout the dropout) as flash_bwd.cuh applies them, so it takes either forward's LSE and dropout mask;
// Mods = false is the plain path (at most a causal mask); KeyMask adds key padding to it (key_mask.cuh).
// flash_bwd.cuh's flash_bwd_preprocess (D) and flash_bwd_convert_dq_sm90 (below) run before and after.
#pragma once
#include "key_mask.cuh"
#include "scores.cuh"
#include "wgmma.cuh"

namespace cupyflash {

// dQ_accum's layout on Hopper: per (batch, head) Nq rows rounded up to kHeadRows (the largest Br, so that any Q block
// of any variant lies inside), in sub-blocks of 64 rows (one warpgroup's wgmma rows); each sub-block split into the
// column shares of a 64-row block (by columns: D/2, then DHead - D/2; by keys: all DHead, both warpgroups adding),
// each share into the consumer warps' 16-row tiles, and each tile in wgmma's accumulator order: per 8 columns (a
// chunk), lane l's (row l/4, cols 2(l%4), +1) then (row l/4 + 8, same cols). A warp's tile is one contiguous run of
// 16 · share floats. cupyflash/plan.py dq_accum_rows sizes it.
struct DqFrag {
    static constexpr int kRows = 64;
    static constexpr int kHeadRows = 128;
    static constexpr int kChunkFloats = 32 * 4;  // 8 columns x 16 rows
    CF_DEVICE static int offset(int chunk, int lane) { return (chunk * 32 + lane) * 4; }
    // The sub-block's first float: (b·H + h) heads of Nq rounded up to kHeadRows, then q0 rows, before it.
    CF_DEVICE static i64 block(i64 bh, int q0, int Nq) {
        return bh * ((Nq + kHeadRows - 1) & -kHeadRows) + q0;
    }
    template <int D, int DHead>
    CF_DEVICE static int warp_tile(int share, int warp) {
        constexpr bool by_keys = DHead <= D / 2;
        const int cols = by_keys ? DHead : share == 0 ? D / 2 : DHead - D / 2;
        return (by_keys || share == 0 ? 0 : kRows * (D / 2)) + warp * 16 * cols;
    }
    // Consumer warp `warp` of warpgroup `wg`: its tile's first float from the Q block's. By rows (Br = 128: each
    // warpgroup forms all columns of its 64 rows) in its warpgroup's sub-block, else in its warpgroup's share.
    template <int D, int DHead, bool ByRows>
    CF_DEVICE static int warp_at(int wg, int warp) {
        return ByRows ? wg * kRows * DHead + warp_tile<D, DHead>(0, warp) : warp_tile<D, DHead>(wg, warp);
    }
};

// Grouped-query attention's backward split over `split` thread blocks per K/V head (cupyflash/plan.py
// backward_kv_split): the attention kernel runs on H · split K/V heads of G / split query heads each, over K and V
// repeated `split` times (flash_bwd_expand_kv_sm90), and writes partial dK and dV that flash_bwd_sum_kv_sm90 adds up.
// One thread per 8 columns (16 bytes) of a key row of the (B, H, Nk, DHead) tensors; grid.y 0: K (dK), 1: V (dV).
template <typename E>
CF_DEVICE bool split_kv_item(const SplitKvParams<E>& params, int& b, int& h, int& j, int& col) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= params.n_items) return false;
    constexpr int kVecs = 8;  // columns per thread
    const int row_vecs = params.DHead / kVecs;
    col = (int)(idx % row_vecs) * kVecs;
    const i64 row = idx / row_vecs;  // (b, h, j), j fastest
    j = (int)(row % params.Nk);
    h = (int)((row / params.Nk) % params.H);
    b = (int)(row / ((i64)params.Nk * params.H));
    return true;
}

// k_split[b, h · split + s, j] = k[b, h, j] for every s (and v's).
template <typename T>
__global__ void flash_bwd_expand_kv_sm90(const SplitKvParams<typename T::elem> params) {
    int b, h, j, col;
    if (!split_kv_item(params, b, h, j, col)) return;
    const bool is_v = blockIdx.y == 1;
    const BhnStrides& in_s = is_v ? params.v_s : params.k_s;
    const uint4 x = *reinterpret_cast<const uint4*>((is_v ? params.v : params.k) + b * in_s.b + h * in_s.h +
                                                     j * in_s.n + col);
    typename T::elem* dst = (is_v ? params.v_split : params.k_split) + b * params.split_s.b +
                            (i64)h * params.split * params.split_s.h + j * params.split_s.n + col;
    for (int s = 0; s < params.split; ++s) *reinterpret_cast<uint4*>(dst + s * params.split_s.h) = x;
}

// dk[b, h, j] = Σ_s dk_part[b, h · split + s, j] in fp32, rounded once (and dv's).
template <typename T>
__global__ void flash_bwd_sum_kv_sm90(const SplitKvParams<typename T::elem> params) {
    using E = typename T::elem;
    int b, h, j, col;
    if (!split_kv_item(params, b, h, j, col)) return;
    const bool is_v = blockIdx.y == 1;
    const E* part = (is_v ? params.dv_part : params.dk_part) + b * params.split_s.b +
                    (i64)h * params.split * params.split_s.h + j * params.split_s.n + col;
    float acc[8] = {};
    for (int s = 0; s < params.split; ++s) {
        const uint4 raw = *reinterpret_cast<const uint4*>(part + s * params.split_s.h);
        const E* e = reinterpret_cast<const E*>(&raw);
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[c] += T::to_float(e[c]);
    }
    const BhnStrides& out_s = is_v ? params.dv_s : params.dk_s;
    E* dst = (is_v ? params.dv : params.dk) + b * out_s.b + h * out_s.h + j * out_s.n + col;
#pragma unroll
    for (int c = 0; c < 8; c += 2) store2<T>(dst + c, acc[c], acc[c + 1]);
}

// dQ = scale · dQ_accum in the input dtype, with the caller's strides, from the layout above: one thread per 4 floats
// of it (two rows by two columns), so the reads are whole 16-byte runs; rows past Nq skipped. n_rows counts float4s.
template <typename T, int D, int DHead>
__global__ void flash_bwd_convert_dq_sm90(const ConvertDqParams<typename T::elem> params) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= params.n_rows) return;
    constexpr bool by_keys = DHead <= D / 2;
    constexpr int kRows = DqFrag::kRows;
    constexpr int kBlock4 = kRows * DHead / 4;  // float4s per sub-block
    const i64 block = idx / kBlock4;
    int u = (int)(idx % kBlock4);
    const int n_blocks = (params.Nq + DqFrag::kHeadRows - 1) / DqFrag::kHeadRows * (DqFrag::kHeadRows / kRows);
    const int qb = (int)(block % n_blocks), h = (int)((block / n_blocks) % params.H);
    const int b = (int)(block / ((i64)n_blocks * params.H));
    int share = by_keys ? DHead : D / 2, col0 = 0;
    if (!by_keys && u >= kRows * (D / 2) / 4) {
        u -= kRows * (D / 2) / 4;
        share = DHead - D / 2;
        col0 = D / 2;
    }
    const int warp = u / (4 * share), in_tile = u % (4 * share);
    const int chunk = in_tile / 32, lane = in_tile % 32;
    const int row = qb * kRows + warp * 16 + lane / 4, col = col0 + chunk * 8 + 2 * (lane % 4);
    const float4 a = reinterpret_cast<const float4*>(params.dq_accum)[idx];
    typename T::elem* dst = params.dq + b * params.dq_s.b + h * params.dq_s.h + col;
    // dq is contiguous (the op allocates it), so a column pair is one aligned 32-bit word.
    if (row < params.Nq) store2<T>(dst + row * params.dq_s.n, a.x * params.scale, a.y * params.scale);
    if (row + 8 < params.Nq) store2<T>(dst + (row + 8) * params.dq_s.n, a.z * params.scale, a.w * params.scale);
}

// Tile sizes: cupyflash/tiles.py BACKWARD_SM90. D and DHead as in flash_fwd_sm90.cuh: tiles of D columns, tensors of
// DHead (dQ_accum too), the columns past DHead zero, skipped by Sᵀ and dPᵀ (head_k_steps) and never stored.
// Parameters: the one kernel still taking them one by one (cupyflash/params.py BWD_SM90_ARGS lists them): read from
// a __grid_constant__ struct as the others are (params.cuh), this kernel spills, LLVM holding fields that were scalar
// parameters re-read from the constant bank: 8 bytes at d96 with dropout at first; after the tile-contiguous dQ,
// 8 at d128 with mods (the pair counter and the lane, live across the softmax) and 24 at d96 with mods and dropout,
// and 48-116 with the fields bound to locals at the top. The score mods' are ScoreModParams's fields, in its order.
template <typename T, int D, int DHead, bool Causal, int Br, int Bc, int kStages, bool Mods, bool Dropout,
          bool KeyMask>
__global__ void __launch_bounds__(384, 1)
flash_bwd_sm90_kernel(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
                      const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_do,
                      const float* __restrict__ lse, const float* __restrict__ d_vec, float* __restrict__ dq_accum,
                      typename T::elem* __restrict__ dk, typename T::elem* __restrict__ dv, i64 dk_sb, i64 dk_sh,
                      i64 dk_sn, i64 dv_sb, i64 dv_sh, i64 dv_sn, int Nq, int Nk, int group, float scale_log2,
                      float scale, const void* bias, i64 bias_sb, i64 bias_sh, i64 bias_sm, i64 bias_sn, int bias_f32,
                      const signed char* tile_cls, i64 cls_sb, i64 cls_sh, i64 cls_sm, i64 cls_sn, int cls_tq,
                      int cls_tk, float* __restrict__ dbias, i64 dbias_sb, i64 dbias_sh, i64 dbias_sm, i64 dbias_sn,
                      int win_left, int win_right, u32 keep_threshold, float inv_keep,
                      const unsigned long long* __restrict__ seed, float cap_in, float cap_out,
                      const float2* __restrict__ row_lse, int outer_kv_heads, const int* key_meta, i64 key_meta_sb) {
    static_assert(DHead <= D && DHead % 8 == 0, "16-byte rows within the tiles");
    static_assert(!(KeyMask && Mods), "beside a score mod the key mask is a bias (cupyflash/plan.py)");
    constexpr int DKV = head_cols(D, DHead);  // dK's and dV's columns
    // dQ_i's split between the warpgroups: by columns (D/2 each, over all Bc keys), or where DHead fits in D/2 (d32 on
    // 64-column tiles, whose second half is zeros) by keys (64 each, over all DHead columns, both adding into them).
    constexpr bool kDqByKeys = DHead <= D / 2;
    // With Br = 128 each warpgroup forms all columns of its 64 rows (the wgmma's M), over all Bc keys, and adds them to
    // its sub-block as two column shares.
    constexpr bool kDqByRows = Br == 128;
    static_assert(!kDqByRows || (DHead == D && !kDqByKeys), "by rows: two column shares of whole tiles");
    // Br = 128 only on the plain path: the score mods hold a bit or a value per score of a thread's Br / 2 (keep bits,
    // soft-cap derivatives), sized for 64.
    static_assert(Bc == 128 && (Br == 64 || (Br == 128 && !Mods)), "two consumer warpgroups of 64 keys");
    using TileKV = SwTile<Bc, D>;
    using TileQ = SwTile<Br, D>;
    using TileDS = SwTile<Bc, Br>;  // dSᵀ: rows = keys, columns = queries

    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sK = (smem_addr(smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned (launch: +1 KiB)
    const u32 sV = sK + TileKV::bytes();
    const u32 sQ0 = sV + TileKV::bytes();
    const u32 sdO0 = sQ0 + kStages * TileQ::bytes();
    const u32 sdS0 = sdO0 + kStages * TileQ::bytes();
    constexpr int kRowArrays = Mods ? 3 : 2;
    const u32 sRow0 = sdS0 + 2 * TileDS::bytes();  // per stage: LSE_i · log2 e (hi), D_i, with Mods lo (Br floats each)
    const u32 bars = sRow0 + kStages * kRowArrays * Br * 4;  // kv_full, qdo_full[S], q_empty[S]
    // Mods: each consumer thread's soft-cap derivatives (Br / 4 u32, element i of thread t at [i][t], conflict-free)
    const u32 sCapGrad = bars + 8 * (1 + 2 * kStages);
    // Per consumer warp, its 16 rows of the warpgroup's dQ_i share (kDqCols fp32 each) in fragment order (DqFrag): a
    // lane's 4 values of each 8 columns together, so the stores are conflict-free and the warp's add is one bulk copy
    // (one per row lost to red.global at d64: 16 issues per warp serialized over the lanes, benchmarks/NOTES.md);
    // then the destinations in dQ_accum (8 bytes each): with the score mods each warp's, on the plain path each Q/dO
    // slot's first row, which the LSE / D warp writes beside the slot's rows. Its offset from sK, a constant (a base
    // held across the loop spilled at d128 with dropout), 16-byte aligned for the bulk copies.
    constexpr int kDqCols = kDqByKeys || kDqByRows ? DHead : D / 2;
    constexpr int kDqStaging = 8 * 16 * kDqCols;  // floats: the 8 consumer warps' tiles
    constexpr u32 kDqOffset = (2 * TileKV::bytes() + 2 * kStages * TileQ::bytes() + 2 * TileDS::bytes() +
                               kStages * kRowArrays * Br * 4 + 8 * (1 + 2 * kStages) + (Mods ? Br * 256 : 0) + 15) &
                              ~15u;
    auto sQ = [&](int it) { return sQ0 + (it % kStages) * TileQ::bytes(); };
    auto sdO = [&](int it) { return sdO0 + (it % kStages) * TileQ::bytes(); };
    auto sdS = [&](int it) { return sdS0 + (it % 2) * TileDS::bytes(); };
    auto sLse = [&](int it) { return sRow0 + (it % kStages) * kRowArrays * Br * 4; };
    const u32 kv_full = bars;
    auto qdo_full = [&](int it) { return bars + 8 * (1 + it % kStages); };
    auto q_empty = [&](int it) { return bars + 8 * (1 + kStages + it % kStages); };
    auto phase = [](int it) { return (it / kStages) & 1; };
    auto s_dq_slot = [&](u32 base, int i) { return base + kDqOffset + (kDqStaging + 2 * i) * 4; };

    // The thread block's K/V block, K/V head and batch, from the grid's order. outer_kv_heads 0: (K/V blocks, K/V heads,
    // batch); else the number of K/V heads, and the grid is (pairs of a group, K/V blocks, groups) over the B·H_kv
    // (batch, K/V head) pairs in groups of gridDim.x (plan.py backward_grid). The score mods' variants take only the
    // first order: the choice spilled d96's with dropout.
    const int kv = Mods ? 0 : outer_kv_heads;
    const int bh_kv = blockIdx.z * gridDim.x + blockIdx.x;  // with kv: its (batch, K/V head) pair
    const int k0 = (kv ? blockIdx.y : blockIdx.x) * Bc;
    const int h_kv = kv ? bh_kv % kv : blockIdx.y, b = kv ? bh_kv / kv : blockIdx.z;
    const int H = (kv ? kv : gridDim.y) * group;  // H: query heads
    // The warpgroup index warp-uniform (its descriptors in uniform registers) but where the score mods' variants then
    // spilled: d96's (8 B in the loop) and dropout's (4-8 B) keep a per-thread one.
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wg = Mods && (DHead != D || Dropout) ? warp / 4 : warpgroup_uniform(tid);
    const int diag = Nk - Nq;
    const auto mods = make_score_mods<T, Causal, Mods, Dropout>(
        ScoreModParams{bias, {bias_sb, bias_sh, bias_sm, bias_sn}, bias_f32, tile_cls, {cls_sb, cls_sh, cls_sm, cls_sn},
                       cls_tq, cls_tk, dbias, {dbias_sb, dbias_sh, dbias_sm, dbias_sn}, win_left, win_right,
                       keep_threshold, inv_keep, seed, cap_in, cap_out},
        Nq, Nk);
    const int2 seen = mods.template q_blocks_seeing<Causal, Br, Bc>(k0);  // the Q blocks that see this block's keys
    const int i_begin = seen.x, i_end = seen.y;
    // A key mask: a block outside its [lo, hi) sees no query: nothing is loaded and its dK, dV are zero (the loop
    // bounds stay the shapes': taken from the mask, the pair count was a value spilled, d64 on 128 rows); inside,
    // each of this thread's two keys (below) is kept or not for every query.
    const KeyRow keys{KeyMask ? key_meta + b * key_meta_sb : nullptr};
    const bool dead = KeyMask && (k0 + Bc <= keys.lo() || k0 >= keys.hi());
    const int n_blocks = max(0, i_end - i_begin);
    const int n_pairs = group * n_blocks;  // (query head in the group, Q block) pairs
    auto head_of = [&](int it) { return h_kv * group + it / n_blocks; };
    auto block_of = [&](int it) { return i_begin + it % n_blocks; };
    // The pairs this block visits, in the one order the producer's two loops and the consumers walk: less those
    // whose bias tile is kTileSkip (Mods).
    auto pair_class = [&](int it) {
        return mods.template tile_class_span<Br, Bc>(b, head_of(it), block_of(it) * Br, k0, cls_tq, cls_tk);
    };
    int it_begin = 0, it_end = n_pairs;
    if constexpr (Mods) {
        if (tile_cls != nullptr)  // the whole block, before the warpgroups part
            trim_skipped<384>(it_begin, it_end, [&](int it) { return pair_class(it) == kTileSkip; }, tid);
    }
    auto next_pair = [&](int it) {
        if constexpr (Mods)
            while (it < it_end && tile_cls != nullptr && pair_class(it) == kTileSkip) ++it;
        return it;
    };

    if (tid == 0) {
        mbar_init(kv_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(qdo_full(s), 1 + 32);  // the TMA thread's arrival (with the bytes) and the LSE / D warp's
            mbar_init(q_empty(s), 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();  // the barriers are initialised before anyone arrives or waits

    if (wg == 2) {  // producer
        // 168 - 40 = 2 · (232 - 168): what the consumers take (launch: 65536 / 384 = 168 each); the LSE / D warp
        // spilled on 24.
        regs_dealloc<40>();
        if (dead) return;
        if (warp == 9) {  // LSE_i · log2 e and D_i into shared memory; rows past Nq: P = exp2(s - inf) = 0, D = 0
            for (int n_done = 0, it = next_pair(it_begin); it < it_end; ++n_done, it = next_pair(it + 1)) {
                const int n = Mods ? n_done : it;  // pairs before this one: its slot and phase (plain: it, see below)
                const int q0 = block_of(it) * Br;
                const i64 bh = (i64)b * H + head_of(it), row0 = bh * Nq + q0;
                mbar_wait(q_empty(n), phase(n) ^ 1);
                if (!Mods && lane == 0)  // the plain path's Q block in dQ_accum (its warps add their tiles' offsets)
                    st_shared_u64(s_dq_slot(sK, n % kStages),
                                  reinterpret_cast<unsigned long long>(dq_accum + DqFrag::block(bh, q0, Nq) * DHead));
                const u32 dst = sLse(n) + 4 * lane;
#pragma unroll
                for (int r = 0; r < Br; r += 32) {
                    const bool ok = q0 + r + lane < Nq;
                    if (Mods && row_lse != nullptr) {
                        const float2 hi_lo = ok ? row_lse[row0 + r + lane] : make_float2(inf_f(), 0.f);
                        st_shared_f32(dst + 4 * r, hi_lo.x);
                        st_shared_f32(dst + 4 * (2 * Br + r), hi_lo.y);
                    } else {
                        st_shared_f32(dst + 4 * r, ok ? lse[row0 + r + lane] * kLog2e : inf_f());
                        if (Mods) st_shared_f32(dst + 4 * (2 * Br + r), 0.f);
                    }
                    st_shared_f32(dst + 4 * (Br + r), ok ? d_vec[row0 + r + lane] : 0.f);
                }
                mbar_arrive(qdo_full(n));  // release: the stores are seen by the consumers' wait
            }
        }
        if (tid == 256) {  // one thread issues every copy
            mbar_arrive_expect_tx(kv_full, 2 * TileKV::bytes());
            tma_tile<Bc, D>(sK, tm_k, k0, h_kv, b, kv_full);
            tma_tile<Bc, D>(sV, tm_v, k0, h_kv, b, kv_full);
            for (int n_done = 0, it = next_pair(it_begin); it < it_end; ++n_done, it = next_pair(it + 1)) {
                const int n = Mods ? n_done : it;
                mbar_wait(q_empty(n), phase(n) ^ 1);
                mbar_arrive_expect_tx(qdo_full(n), 2 * TileQ::bytes());
                tma_tile<Br, D>(sQ(n), tm_q, block_of(it) * Br, head_of(it), b, qdo_full(n));
                tma_tile<Br, D>(sdO(n), tm_do, block_of(it) * Br, head_of(it), b, qdo_full(n));
            }
        }
        return;
    }

    regs_alloc<232>();
    const int key_row0 = wg * 64;  // this warpgroup's keys in the block
    const int key0 = k0 + key_row0 + (warp % 4) * 16 + lane / 4;  // this lane's keys: key0 and key0 + 8
    float acc_dk[DKV / 8][4], acc_dv[DKV / 8][4];
#pragma unroll
    for (int i = 0; i < DKV / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

    u32 key_dead = 0;  // bit r: this thread's key key0 + 8·r is past Nk or masked by the key mask
    if constexpr (KeyMask) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int key = key0 + 8 * r;
            const bool kept = key < Nk && key >= keys.lo() && key < keys.hi() && (!keys.holes() || keys.kept(key));
            key_dead |= static_cast<u32>(!kept) << r;
        }
    }

    // On the plain path this thread's lane and keys are read afresh from %tid per block: held across the loop they
    // were among the values spilled (d64 on 128 rows); the score mods' variants hold them (read afresh, d96 spilled),
    // but for dropout's (held, d96 and d128 spilled 12 B once the descriptors were formed by addition).
    auto thread_lane_key0 = [&] {
        if constexpr (Mods && !Dropout) return make_int2(lane, key0);
        const int t = fresh_tid();
        return make_int2(t % 32, k0 + t / 32 * 16 + t % 32 / 4);
    };
    if (!dead) mbar_wait(kv_full, 0);
    for (int n_done = 0, it = dead ? it_end : next_pair(it_begin); it < it_end; ++n_done, it = next_pair(it + 1)) {
        // Pairs done before this one: its slots and phases, as the producer's. The plain path, which visits every
        // pair from 0, uses it: two counters in step moved the forward's plain loop out of uniform registers.
        const int n = Mods ? n_done : it;
        const int hq = head_of(it), q0 = block_of(it) * Br;
        const int2 lane_key0 = thread_lane_key0();
        const int lane = lane_key0.x, key0 = lane_key0.y;
        const i64 bh = (i64)b * H + hq;
        mbar_wait(qdo_full(n), phase(n));
        // K's and V's descriptors recomputed per block from opaque bases: hoisted out of the loop, the 40 of them
        // spilled (184 bytes on d128).
        u32 k_base = sK, v_base = sV;
        asm volatile("" : "+r"(k_base), "+r"(v_base));
        // With the score mods, where this warp adds its dQ_i tile, parked in shared memory until then: held in
        // registers (or formed there from the block's head and row) it spilled at d128 with dropout, where the scores'
        // Philox needs them most. (The plain path's comes from the LSE / D warp: formed here, lane 0's division of the
        // pair into head and block and its 64-bit products were ~60 instructions of each warp's loop; the mods
        // variants spilled 8 B at d96 without it.)
        if (Mods && lane == 0)
            st_shared_u64(s_dq_slot(k_base, wg * 4 + warp % 4),
                          reinterpret_cast<unsigned long long>(dq_accum + DqFrag::block(bh, q0, Nq) * DHead +
                                                               DqFrag::warp_at<D, DHead, kDqByRows>(wg, warp % 4)));

        float st[Br / 8][4], dpt[Br / 8][4];  // Sᵀ and dPᵀ: rows = this warpgroup's keys, columns = queries
        fence_operands(st);
        fence_operands(dpt);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < head_k_steps(DHead); ++kk)
            Wgmma<T, Br>::template ss<0, 0>(st, TileKV::desc_k(k_base, key_row0, kk), TileQ::desc_k(sQ(n), 0, kk), kk > 0);
        wgmma_commit();
        auto issue_dpt = [&] {
#pragma unroll
            for (int kk = 0; kk < head_k_steps(DHead); ++kk)
                Wgmma<T, Br>::template ss<0, 0>(dpt, TileKV::desc_k(v_base, key_row0, kk), TileQ::desc_k(sdO(n), 0, kk),
                                                kk > 0);
            wgmma_commit();
        };
        // Element (nt, e) of Sᵀ, dPᵀ: key key0 + 8·(e/2), query q0 + query_of(nt, e)
        auto query_of = [&](int nt, int e) { return nt * 8 + 2 * (lane % 4) + (e & 1); };
        auto key_of = [&](int e) { return key0 + (e >> 1) * 8; };
        // The softmax runs under dPᵀ's GEMM, but with mods on 128-column dK/dV (d96, d128) their code (tanh, bias
        // loads) went past the register budget beside dPᵀ's accumulators, as did Sᵀ and dPᵀ of 128 queries (Br 128):
        // there dPᵀ starts after Pᵀ, and the dropout mask is drawn under Sᵀ's GEMM (beside Sᵀ and dPᵀ both, its
        // Philox rounds spilled too).
        constexpr bool kDptUnderSoftmax = (!Mods || DKV <= 64) && Br == 64;
        if constexpr (kDptUnderSoftmax) issue_dpt();
        u32 keep_bits = 0xffffffffu;  // dropout: bit nt·4 + e set where the forward kept that score
        if constexpr (Mods) {  // the forward's Philox words (scores.cuh), one bit per score: Br = 64
            if (mods.dropout())
                keep_bits = mods.template keep_bits_t<Br / 8>(bh, key_of(0), q0 + query_of(0, 0), keep_threshold);
        }

        // The plain path's masked scores, as one compare per score: those of columns below a per-row limit (keys
        // past Nk or masked by the key mask: the whole row; causal: the queries before key - diag), taken relative to
        // this lane's first column so that each compare is against a constant. Only blocks that can hold a masked
        // score compare at all: the others (no key mask, keys below Nk, causal: the block's last key seen by its first
        // query) are most blocks, and their compares and selects were a third of the softmax's instructions.
        int lim[2];
        bool masked = false;
        if constexpr (!Mods) {
            masked = KeyMask || k0 + Bc > Nk || (Causal && k0 + Bc - 1 > q0 + diag);
#pragma unroll
            for (int r = 0; r < 2; ++r)
                lim[r] = ((KeyMask ? (key_dead >> r) & 1u : key0 + 8 * r >= Nk) ? Br
                          : Causal                                                ? key0 + 8 * r - diag - q0
                                                                                  : 0) -
                         2 * (lane % 4);
        }
        if constexpr (kDptUnderSoftmax)
            wgmma_wait<1>();  // Sᵀ; dPᵀ still running
        else
            wgmma_wait<0>();  // Sᵀ
        fence_operands(st);
        u32 cap_grad[Br / 8][2];  // soft-capping: 1 - tanh² of each score (scores.cuh scale_scores)
        // ... parked in shared memory from the scores to dS: held in registers across the dPᵀ wait, they spilled d128
        auto cap_grad_at = [&](int nt, int r) { return sCapGrad + 4 * ((nt * 2 + r) * 256 + tid); };
        if constexpr (Mods) {
            // Pᵀ = exp2(logit - LSE) with the logits as flash_bwd.cuh's: cap, bias (per element, on the tiles that
            // read it; rows past Nq need no mask: their LSE is +inf, so P = 0), then the visibility mask on the
            // blocks that cross the sequence end or a window edge.
            mods.template scale_scores<T, Br / 8>(st, scale_log2, cap_grad);
            if (mods.softcap()) {
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) st_shared_f32(cap_grad_at(nt, r), __uint_as_float(cap_grad[nt][r]));
            }
            if (mods.has_bias() && pair_class(it) == kTileRead) {
                const i64 block_off = mods.bias_row(b, hq, q0);  // element (q0, 0) of this head's bias
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (q0 + query_of(nt, e) < Nq && key_of(e) < Nk)
                            st[nt][e] = mods.template add_bias<T>(
                                st[nt][e], block_off + query_of(nt, e) * mods.bias_sm + key_of(e) * mods.bias_sn);
            }
            if (k0 + Bc > Nk || k0 + Bc - 1 > q0 + mods.diag + mods.right || k0 < q0 + Br - 1 + mods.diag - mods.left) {
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (!mods.visible(q0 + query_of(nt, e), key_of(e))) st[nt][e] = -inf_f();
            }
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt) {
                float lse2[2], lo[2];
                lds_f32x2(lse2[0], lse2[1], sLse(n) + 4 * query_of(nt, 0));
                lds_f32x2(lo[0], lo[1], sLse(n) + 4 * (2 * Br + query_of(nt, 0)));
#pragma unroll
                for (int e = 0; e < 4; ++e) st[nt][e] = fast_exp2((st[nt][e] - lse2[e & 1]) - lo[e & 1]);
            }
        } else {
            auto exp_scores = [&](auto with_mask) {
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt) {
                    float lse2[2];
                    lds_f32x2(lse2[0], lse2[1], sLse(n) + 4 * (nt * 8 + 2 * (lane % 4)));
#pragma unroll
                    for (int c = 0; c < 2; ++c)
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            float& x = st[nt][2 * r + c];
                            x = fast_exp2(x * scale_log2 - lse2[c]);
                            if constexpr (decltype(with_mask)::value) x = nt * 8 + c < lim[r] ? 0.f : x;
                        }
                }
            };
            if (masked)
                exp_scores(Flag<true>{});
            else
                exp_scores(Flag<false>{});
        }
        if constexpr (!kDptUnderSoftmax) {
            fence_operands(st);
            fence_operands(dpt);
            wgmma_fence();
            issue_dpt();
        }
        auto kept = [&](int nt, int e) { return (keep_bits >> (nt * 4 + e)) & 1u; };
        wgmma_wait<0>();  // dPᵀ
        fence_operands(dpt);
        // dSᵀ = Pᵀ ∘ (dPᵀ - D_i), with dropout dP of the kept elements scaled by 1 / keep probability (flash_bwd.cuh)
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
            float d_i[2];
            lds_f32x2(d_i[0], d_i[1], sLse(n) + 4 * (Br + nt * 8 + 2 * (lane % 4)));
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float dp = dpt[nt][2 * r + c];
                    if (Mods && mods.dropout()) dp = kept(nt, 2 * r + c) ? dp * inv_keep : 0.f;
                    dpt[nt][2 * r + c] = st[nt][2 * r + c] * (dp - d_i[c]);
                }
        }
        if constexpr (Mods) {
            // dBias = dS (the bias adds to the logit), summed over the bias's broadcast dims by atomics; before the
            // soft-cap's factor, as the bias adds after the cap.
            if (dbias != nullptr) {
                // This lane's first element's address, opaque so that it is computed here, per block: hoisted to the
                // prologue, its 64-bit parts were the values spilled (d96)
                float* dbias_lane = dbias + b * dbias_sb + hq * dbias_sh + (i64)(q0 + query_of(0, 0)) * dbias_sm +
                                    (i64)key0 * dbias_sn;
                asm volatile("" : "+l"(dbias_lane));
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (q0 + query_of(nt, e) < Nq && key_of(e) < Nk)
                            atomicAdd(dbias_lane + (nt * 8 + (e & 1)) * dbias_sm + (e >> 1) * 8 * dbias_sn, dpt[nt][e]);
            }
            // dV takes P with dropout applied: zeroed, the kept ones scaled by 1 / keep probability
            if (mods.dropout()) {
#pragma unroll
                for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) st[nt][e] = kept(nt, e) ? st[nt][e] * inv_keep : 0.f;
            }
        }
        // Soft-capping: dS w.r.t. scale · q·k is dS · (1 - tanh²) of the capped score. Its flag is read afresh from
        // the parameter: held from the first test, it was the one value spilled (d96 with dropout).
        float cap_now = cap_out;
        asm volatile("" : "+f"(cap_now));
        if (Mods && cap_now != 0.f) {
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int r = 0; r < 2; ++r) cap_grad[nt][r] = __float_as_uint(lds_f32(cap_grad_at(nt, r)));
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) dpt[nt][e] *= mods.cap_grad_at(cap_grad, nt, e);
        }
        // dSᵀ to shared memory for dQ, each of a thread's two rows' two 16-bit values a word: on the plain path from
        // dSᵀ's A fragment (dsa[kk]'s words are (chunk 2·kk + h, row r) at 2·h + r, acc_to_a) under dV's GEMM, the fp32
        // registers free by then (stored from them before it, d64 on 128 rows spilled); with the score mods from the
        // fp32 registers before the fragments are formed (the other way, d96 spilled). The row is opaque so that the
        // store addresses are recomputed per block, not hoisted and spilled; each is one OR (TileDS::chunk_or: by
        // chunk_at per store they took three instructions each), and row + 8 is the next swizzle atom, 1024 bytes on.
        auto store_ds = [&](auto word) {
            u32 ds_row = key0 - k0;
            asm volatile("" : "+r"(ds_row));
            const u32 row_lane = (sdS(n) + ds_row * 128) | (4 * (lane % 4)), swz = (ds_row % 8) << 4;
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt) {  // columns nt·8 + 2·(lane % 4) and the next: in chunk nt
                const u32 at = TileDS::chunk_or(row_lane, swz, nt);
#pragma unroll
                for (int r = 0; r < 2; ++r) st_shared_u32(at + 1024 * r, word(nt, r));
            }
        };
        if constexpr (Mods) store_ds([&](int nt, int r) { return T::pack(dpt[nt][2 * r], dpt[nt][2 * r + 1]); });
        // Pᵀ and dSᵀ as A fragments for dV and dK.
        u32 pa[Br / 16][4], dsa[Br / 16][4];
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
            acc_to_a<T>(pa[kk], st, kk);
            acc_to_a<T>(dsa[kk], dpt, kk);
        }
        // The GEMMs' order, after FlashAttention-3/-4's backward: dV; the barrier (dS of both warpgroups in shared
        // memory); dQ, then dK, whose GEMM runs under dQ's trip through shared memory to the bulk add below. The causal
        // and score mods' variants issue dK beside dV: their code beside dQ's accumulators and dSᵀ's fragments spilled
        // (d128: 4-72 bytes), and causal calls gained nothing from the order (-2 to +1 %, benchmarks/NOTES.md).
        constexpr bool kDkUnderDq = !Mods && !Causal;
        auto issue_dk = [&] {
#pragma unroll
            for (int kk = 0; kk < Br / 16; ++kk)
                Wgmma<T, DKV>::template rs<1>(acc_dk, dsa[kk], TileQ::desc_mn(sQ(n), kk), 1);
        };
        fence_operands(acc_dv);
        fence_operands(acc_dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) Wgmma<T, DKV>::template rs<1>(acc_dv, pa[kk], TileQ::desc_mn(sdO(n), kk), 1);
        if constexpr (Mods) issue_dk();
        wgmma_commit();
        if constexpr (!Mods) {
            store_ds([&](int nt, int r) { return dsa[nt / 2][2 * (nt % 2) + r]; });
            if constexpr (!kDkUnderDq) {  // after the stores: a wgmma's A registers are not read until it is done
                issue_dk();
                wgmma_commit();
            }
        }

        // dS's stores reach wgmma (the async proxy) after this fence and the barrier that both warpgroups pass.
        fence_proxy_async();
        named_sync(1, 256);
        // On the plain path dQ is issued before dV's (and the causal variants' dK's) wait, so that the tensor pipe
        // does not drain between them (FlashAttention-4's order: its dQ GEMM waits with wg_wait = 1 after this
        // barrier), Pᵀ's fragments live beside dQ's accumulators (compiled spill-free in session 25; before the
        // descriptors left the per-thread path, the d128 causal variant spilled so). With the score mods dV and dK are
        // done under the barrier, before dQ's accumulators are needed.
        constexpr bool kDqBeforeDvWait = !Mods;
        if constexpr (!kDqBeforeDvWait) {
            wgmma_wait<0>();
            fence_operands(acc_dv);
            fence_operands(acc_dk);
        }
        // dQ_i[:, cols] = dS[:, keys] K_j[keys, cols], this warpgroup's share (kDqByKeys): A = dS (queries x keys) is
        // dSᵀ in shared memory read MN-major; B = K_j, MN-major.
        // With Mods the warpgroup is read afresh from %tid: held from the prologue it was the one value spilled (d128)
        int wg_dq = wg;
        if constexpr (Mods) wg_dq = fresh_tid() / 128;
        // By rows, A is this warpgroup's 64 queries: the dSᵀ tile's columns from 64 · wg.
        constexpr int kDqN = kDqByRows ? D : D / 2;  // this warpgroup's dQ columns
        constexpr int kk_per_wg = kDqByKeys ? Bc / 32 : Bc / 16;
        const int kk0 = kDqByKeys ? wg_dq * kk_per_wg : 0;
        const u32 k_cols = kDqByKeys || kDqByRows ? k_base : k_base + wg_dq * TileKV::col_offset(D / 2);
        const u32 ds_queries = sdS(n) + (kDqByRows ? wg_dq * TileDS::col_offset(64) : 0);
        float dq[kDqN / 8][4];
        fence_operands(dq);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kk_per_wg; ++kk)
            Wgmma<T, kDqN>::template ss<1, 1>(dq, TileDS::desc_mn(ds_queries, kk0 + kk), TileKV::desc_mn(k_cols, kk0 + kk),
                                              kk > 0);
        wgmma_commit();
        if constexpr (kDqBeforeDvWait) {
            wgmma_wait<1>();  // dV (and, causal, dK); dQ still running
            fence_operands(acc_dv);
            fence_operands(acc_dk);
        }
        if constexpr (kDkUnderDq) {
            issue_dk();
            wgmma_commit();
        }
        wgmma_wait<kDkUnderDq ? 1 : 0>();  // dQ; dK still running (it reads Q_i: the slot is released after it)
        fence_operands(dq);
        // By columns, the second warpgroup's share is its columns below DHead.
        const int dq_chunks = kDqByKeys || kDqByRows ? DHead / 8 : wg_dq == 0 ? D / 16 : (DHead - D / 2) / 8;
        // Lane 0's last copy has read the warp's staging (issued an iteration ago: the wait costs nothing), the
        // lanes store, the stores reach the copy (the async proxy) after the fence and the warp's sync. Rows past Nq
        // are added too: the accumulator holds whole Q blocks, and the conversion skips them.
        const u32 sdq = k_base + kDqOffset + (wg_dq * 4 + warp % 4) * 16 * kDqCols * 4;  // this warp's 16 rows
        if (lane == 0) bulk_wait_read<0>();
        __syncwarp();
        const u32 at0 = sdq + DqFrag::offset(0, lane) * 4;
#pragma unroll
        for (int nt = 0; nt < kDqN / 8; ++nt) {
            if (nt < dq_chunks)
                st_shared_f32x4(at0 + DqFrag::offset(nt, 0) * 4, dq[nt][0], dq[nt][1], dq[nt][2], dq[nt][3]);
        }
        fence_proxy_async();
        __syncwarp();
        if (lane == 0) {
            float* dst;
            if constexpr (Mods) {
                dst = reinterpret_cast<float*>(lds_u64(s_dq_slot(k_base, wg_dq * 4 + warp % 4)));
            } else {  // the Q block's place, this warp's tile in it from its warpgroup and warp, read afresh (DqFrag)
                const int t = fresh_tid();
                dst = reinterpret_cast<float*>(lds_u64(s_dq_slot(k_base, n % kStages))) +
                      DqFrag::warp_at<D, DHead, kDqByRows>(t / 128, t / 32 % 4);
            }
            if constexpr (kDqByRows) {  // the sub-block's two column shares (DqFrag), D/2 columns each
                constexpr u32 kShareBytes = D / 16 * DqFrag::kChunkFloats * 4;
                bulk_reduce_add_f32(dst, sdq, kShareBytes);
                bulk_reduce_add_f32(dst + DqFrag::kRows * (D / 2), sdq + kShareBytes, kShareBytes);
            } else {
                bulk_reduce_add_f32(dst, sdq, dq_chunks * DqFrag::kChunkFloats * 4);
            }
            bulk_commit();
        }
        wgmma_wait<0>();  // dK
        fence_operands(acc_dv);
        fence_operands(acc_dk);
        mbar_arrive(q_empty(n));  // Q_i and dO_i are read
    }
    if (lane == 0) bulk_wait<0>();  // the staging stays read until the sums are out

    // Epilogue: dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO, rows past Nk not written. On the plain path the lane and its keys
    // are read afresh from %tid (as above).
    const int2 lane_key0 = thread_lane_key0();
    store_dk_dv<T, DHead>(dk + b * dk_sb + h_kv * dk_sh, dv + b * dv_sb + h_kv * dv_sh, dk_sn, dv_sn, lane_key0.y, Nk,
                          acc_dk, acc_dv, scale, lane_key0.x);
}

}  // namespace cupyflash
