// Backward on Hopper (sm_90a) at head dims above 128: DHead 160, 192 or 256 on tiles of D = 256 columns, after
// FlashAttention-3/-4's d256 backward tile (FA4's interface.py _tile_size_bwd_sm90: 64 x 64, P and dS through shared
// memory, dK, dV and dQ split along the head dim). flash_bwd_sm90.cuh's kernel cannot grow to it: there a warpgroup
// owns 64 keys and all of dK's and dV's columns, 256 fp32 registers a thread at d256.
//
// One thread block per Bc = 64 keys of one K/V head holds K_j and V_j in shared memory; a producer warpgroup streams
// the (query head, Q block of Br = 64 rows) pairs that see them (Q_i, dO_i in two slots, LSE_i · log2 e and D_i beside
// them) as flash_bwd_sm90.cuh's does. Per Q block each of the two consumer warpgroups w
//   1. forms Sᵀ = K Q_iᵀ and dPᵀ = V dO_iᵀ for all 64 keys and its 32 queries (32w ..): m64n32 over DHead's k steps,
//      Pᵀ = exp2(Sᵀ·scale·log2 e − LSE·log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − D_i), and stores both (16-bit) into the block's
//      64 x 64 Pᵀ and dSᵀ tiles in shared memory (double-buffered: a tile is rewritten two blocks later, after the
//      barrier of the block between, which each warpgroup passes only once its GEMMs of the tile are done);
//   2. after the barrier, over all 64 keys and 64 queries, for its column share (DqFrag's by columns: 0 .. 127, then
//      128 .. DHead − 1): dV += Pᵀ dO_i, dK += dSᵀ Q_i, dQ_i = dS K_j, with A and B from shared memory, and adds dQ_i
//      into dQ_accum (DqFrag's layout, as the narrow kernel's; flash_bwd_convert_dq_sm90 reads it back) with vector
//      reductions from registers (a staging tile for a bulk add would take 64 KiB of shared memory, which the two
//      Q/dO slots hold here).
// dK and dV, 64 keys by the share's columns in fp32 registers (128 + 128 a thread at d256), are stored at the end.
// The plain path (a causal mask, the key mask of key_mask.cuh) and, with Mods, the score mods of scores.cuh as
// flash_bwd_sm90.cuh takes them: a bias with its tile classes (pairs whose tile is kTileSkip are not visited), the
// rebuild rule's rows (P = exp2((s - hi) - lo), lo staged beside LSE and D) and dBias by atomics, a window and
// soft-capping (Gemma 2 at d256 with padding takes all three). Dropout runs on mma.sync (cupyflash/tiles.py
// BACKWARD_SM90 `dropout`). Parameters: flash_bwd_sm90_kernel's, in its order (cupyflash/params.py BWD_SM90_ARGS;
// checked below), dropout's unread.
#pragma once
#include "flash_bwd_sm90.cuh"

namespace cupyflash {

template <int N>
struct IntC {
    static constexpr int value = N;
};

template <typename T, int D, int DHead, bool Causal, int Br, int Bc, int kStages, bool Mods, bool Dropout,
          bool KeyMask>
__global__ void __launch_bounds__(384, 1)
flash_bwd_sm90_wide_kernel(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
                           const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_do,
                           const float* __restrict__ lse, const float* __restrict__ d_vec, float* __restrict__ dq_accum,
                           typename T::elem* __restrict__ dk, typename T::elem* __restrict__ dv, i64 dk_sb, i64 dk_sh,
                           i64 dk_sn, i64 dv_sb, i64 dv_sh, i64 dv_sn, int Nq, int Nk, int group, float scale_log2,
                           float scale, const void* bias, i64 bias_sb, i64 bias_sh, i64 bias_sm, i64 bias_sn,
                           int bias_f32, const signed char* tile_cls, i64 cls_sb, i64 cls_sh, i64 cls_sm, i64 cls_sn,
                           int cls_tq, int cls_tk, float* __restrict__ dbias, i64 dbias_sb, i64 dbias_sh,
                           i64 dbias_sm, i64 dbias_sn, int win_left, int win_right, u32 keep_threshold,
                           float inv_keep, const unsigned long long* __restrict__ seed, float cap_in, float cap_out,
                           const float2* __restrict__ row_lse, int outer_kv_heads, const int* key_meta,
                           i64 key_meta_sb) {
    static_assert(D == 256 && DHead > D / 2 && DHead <= D && DHead % 8 == 0, "head dims 136 .. 256 on 256 columns");
    static_assert(!Dropout && !(Mods && KeyMask), "no dropout; beside a score mod the key mask is a bias (plan.py)");
    static_assert(Br == 64 && Bc == 64 && kStages == 2, "64 x 64 blocks, two Q/dO slots: 231976 B of shared memory");
    constexpr int kQueries = Br / 2;                 // Sᵀ's and dPᵀ's queries per warpgroup
    constexpr int kCols0 = D / 2;                    // the first warpgroup's column share (DqFrag: by columns)
    constexpr int kCols1 = head_cols(D / 2, DHead - D / 2);  // the second's: DHead - 128, as a wgmma N
    using TileKV = SwTile<Bc, D>;
    using TileQ = SwTile<Br, D>;
    using TilePS = SwTile<Bc, Br>;  // Pᵀ and dSᵀ: rows = keys, columns = queries

    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sK = (smem_addr(smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned (launch: +1 KiB)
    const u32 sV = sK + TileKV::bytes();
    const u32 sQ0 = sV + TileKV::bytes();
    const u32 sdO0 = sQ0 + kStages * TileQ::bytes();
    const u32 sP0 = sdO0 + kStages * TileQ::bytes();
    const u32 sdS0 = sP0 + 2 * TilePS::bytes();
    constexpr int kRowArrays = Mods ? 3 : 2;
    const u32 sRow0 = sdS0 + 2 * TilePS::bytes();  // per stage: LSE_i · log2 e (hi), D_i, with Mods lo (Br floats each)
    const u32 bars = sRow0 + kStages * kRowArrays * Br * 4;  // kv_full, qdo_full[S], q_empty[S]
    auto sQ = [&](int it) { return sQ0 + (it % kStages) * TileQ::bytes(); };
    auto sdO = [&](int it) { return sdO0 + (it % kStages) * TileQ::bytes(); };
    auto sP = [&](int it) { return sP0 + (it % 2) * TilePS::bytes(); };
    auto sdS = [&](int it) { return sdS0 + (it % 2) * TilePS::bytes(); };
    auto sLse = [&](int it) { return sRow0 + (it % kStages) * kRowArrays * Br * 4; };
    const u32 kv_full = bars;
    auto qdo_full = [&](int it) { return bars + 8 * (1 + it % kStages); };
    auto q_empty = [&](int it) { return bars + 8 * (1 + kStages + it % kStages); };
    auto phase = [](int it) { return (it / kStages) & 1; };

    // The block's K/V block, K/V head and batch, from the grid's order (flash_bwd_sm90.cuh, plan.py backward_grid:
    // the score mods' variants take the first).
    const int kv = Mods ? 0 : outer_kv_heads;
    const int bh_kv = blockIdx.z * gridDim.x + blockIdx.x;
    const int k0 = (kv ? blockIdx.y : blockIdx.x) * Bc;
    const int h_kv = kv ? bh_kv % kv : blockIdx.y, b = kv ? bh_kv / kv : blockIdx.z;
    const int H = (kv ? kv : gridDim.y) * group;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int wg = warpgroup_uniform(tid);
    const int diag = Nk - Nq;
    const auto mods = make_score_mods<T, Causal, Mods, false>(
        ScoreModParams{bias, {bias_sb, bias_sh, bias_sm, bias_sn}, bias_f32, tile_cls, {cls_sb, cls_sh, cls_sm, cls_sn},
                       cls_tq, cls_tk, dbias, {dbias_sb, dbias_sh, dbias_sm, dbias_sn}, win_left, win_right,
                       keep_threshold, inv_keep, seed, cap_in, cap_out},
        Nq, Nk);
    const int2 seen = mods.template q_blocks_seeing<Causal, Br, Bc>(k0);  // the Q blocks that see this block's keys
    const int i_begin = seen.x, i_end = seen.y;
    const int n_blocks = max(0, i_end - i_begin);
    const int n_pairs = group * n_blocks;  // (query head in the group, Q block) pairs
    auto head_of = [&](int it) { return h_kv * group + it / n_blocks; };
    auto block_of = [&](int it) { return i_begin + it % n_blocks; };
    const KeyRow keys{KeyMask ? key_meta + b * key_meta_sb : nullptr};
    const bool dead = KeyMask && (k0 + Bc <= keys.lo() || k0 >= keys.hi());
    // The pairs this block visits, in the one order the producer's loops and the consumers walk: less those whose
    // bias tile is kTileSkip (Mods). A pair's slot and phase count the pairs visited before it (n).
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
            mbar_init(qdo_full(s), 2 + 32);  // the two TMA threads' arrivals (with the bytes), the LSE / D warp's
            mbar_init(q_empty(s), 256);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();  // the barriers are initialised before anyone arrives or waits

    if (wg == 2) {  // producer, as flash_bwd_sm90.cuh's plain path
        regs_dealloc<40>();
        if (dead) return;
        if (warp == 9) {  // LSE_i · log2 e and D_i; rows past Nq: P = exp2(s - inf) = 0, D = 0
            for (int n_done = 0, it = next_pair(it_begin); it < it_end; ++n_done, it = next_pair(it + 1)) {
                const int n = Mods ? n_done : it;  // pairs before this one: its slot and phase (plain: it)
                const int q0 = block_of(it) * Br;
                const i64 row0 = ((i64)b * H + head_of(it)) * Nq + q0;
                mbar_wait(q_empty(n), phase(n) ^ 1);
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
                mbar_arrive(qdo_full(n));
            }
        }
        // Q_i's and dO_i's copies from two threads (warps 8 and 10): one thread issuing both, four boxes each, held
        // more than the producer's 40 registers (8 bytes spilled).
        if (tid == 256 || tid == 320) {
            const bool is_q = tid == 256;
            if (is_q) {
                mbar_arrive_expect_tx(kv_full, 2 * TileKV::bytes());
                tma_tile<Bc, D>(sK, tm_k, k0, h_kv, b, kv_full);
                tma_tile<Bc, D>(sV, tm_v, k0, h_kv, b, kv_full);
            }
            const TmaDesc& tm = is_q ? tm_q : tm_do;
            for (int n_done = 0, it = next_pair(it_begin); it < it_end; ++n_done, it = next_pair(it + 1)) {
                const int n = Mods ? n_done : it;  // pairs before this one: its slot and phase (plain: it)
                mbar_wait(q_empty(n), phase(n) ^ 1);
                mbar_arrive_expect_tx(qdo_full(n), TileQ::bytes());
                tma_tile<Br, D>(is_q ? sQ(n) : sdO(n), tm, block_of(it) * Br, head_of(it), b, qdo_full(n));
            }
        }
        return;
    }

    regs_alloc<232>();
    const int key_row = (warp % 4) * 16 + lane / 4;  // this lane's keys in the block: key_row and key_row + 8
    const int key0 = k0 + key_row;
    u32 key_dead = 0;  // bit r: key key0 + 8·r is past Nk or masked by the key mask
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + 8 * r;
        const bool kept = key < Nk && (!KeyMask || (key >= keys.lo() && key < keys.hi() &&
                                                     (!keys.holes() || keys.kept(key))));
        key_dead |= static_cast<u32>(!kept) << r;
    }
    if (!dead) mbar_wait(kv_full, 0);

    // The mainloop and epilogue of warpgroup wg, whose column share is NC columns from c0: one body, instantiated
    // for each share's width (a wgmma's N is a constant).
    auto consume = [&](auto nc) {
        constexpr int NC = decltype(nc)::value;
        const int c0 = wg * kCols0;
        float acc_dk[NC / 8][4], acc_dv[NC / 8][4];
#pragma unroll
        for (int i = 0; i < NC / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;

        for (int n_done = 0, it = dead ? it_end : next_pair(it_begin); it < it_end;
             ++n_done, it = next_pair(it + 1)) {
            const int n = Mods ? n_done : it;  // as the producer's
            const int hq = head_of(it), q0 = block_of(it) * Br;
            const i64 bh = (i64)b * H + hq;
            mbar_wait(qdo_full(n), phase(n));
            // K's and V's descriptors formed per block from opaque bases (as flash_bwd_sm90.cuh's): hoisted out of the
            // loop they were held in registers and spilled.
            u32 k_base = sK, v_base = sV;
            asm volatile("" : "+r"(k_base), "+r"(v_base));
            // Sᵀ and dPᵀ: rows = the block's 64 keys, columns = this warpgroup's queries 32·wg ..
            float st[kQueries / 8][4], dpt[kQueries / 8][4];
            fence_operands(st);
            fence_operands(dpt);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < head_k_steps(DHead); ++kk)
                Wgmma<T, kQueries>::template ss<0, 0>(st, TileKV::desc_k(k_base, 0, kk),
                                                      TileQ::desc_k(sQ(n), kQueries * wg, kk), kk > 0);
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < head_k_steps(DHead); ++kk)
                Wgmma<T, kQueries>::template ss<0, 0>(dpt, TileKV::desc_k(v_base, 0, kk),
                                                      TileQ::desc_k(sdO(n), kQueries * wg, kk), kk > 0);
            wgmma_commit();
            // Element (nt, 2r + c): key key0 + 8r, query q0 + query_of(nt, c), its row in the stage's arrays
            auto query_of = [&](int nt, int c) { return kQueries * wg + nt * 8 + 2 * (lane % 4) + c; };
            u32 cap_grad[kQueries / 8][2];  // soft-capping: 1 - tanh² of each score (scores.cuh scale_scores)
            wgmma_wait<1>();  // Sᵀ; dPᵀ still running
            fence_operands(st);
            if constexpr (Mods) {
                // Pᵀ = exp2(logit - LSE) with the logits as flash_bwd_sm90.cuh's: cap, bias (per element, on the
                // tiles that read it), then the visibility mask on the blocks that cross the sequence end or a
                // window edge (rows past Nq have LSE +inf, so P = 0).
                mods.template scale_scores<T, kQueries / 8>(st, scale_log2, cap_grad);
                if (mods.has_bias() && pair_class(it) == kTileRead) {
                    const i64 block_off = mods.bias_row(b, hq, q0);  // element (q0, 0) of this head's bias
#pragma unroll
                    for (int nt = 0; nt < kQueries / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int query = query_of(nt, e & 1), key = key0 + 8 * (e >> 1);
                            if (q0 + query < Nq && key < Nk)
                                st[nt][e] = mods.template add_bias<T>(
                                    st[nt][e], block_off + query * mods.bias_sm + key * mods.bias_sn);
                        }
                }
                const int qw0 = q0 + kQueries * wg;  // this warpgroup's first query
                if (k0 + Bc > Nk || k0 + Bc - 1 > qw0 + mods.diag + mods.right ||
                    k0 < qw0 + kQueries - 1 + mods.diag - mods.left) {
#pragma unroll
                    for (int nt = 0; nt < kQueries / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!mods.visible(q0 + query_of(nt, e & 1), key0 + 8 * (e >> 1))) st[nt][e] = -inf_f();
                }
#pragma unroll
                for (int nt = 0; nt < kQueries / 8; ++nt) {
                    float lse2[2], lo[2];
                    lds_f32x2(lse2[0], lse2[1], sLse(n) + 4 * query_of(nt, 0));
                    lds_f32x2(lo[0], lo[1], sLse(n) + 4 * (2 * Br + query_of(nt, 0)));
#pragma unroll
                    for (int e = 0; e < 4; ++e) st[nt][e] = fast_exp2((st[nt][e] - lse2[e & 1]) - lo[e & 1]);
                }
            } else {
                const bool masked = KeyMask || k0 + Bc > Nk || (Causal && k0 + Bc - 1 > q0 + kQueries * wg + diag);
#pragma unroll
                for (int nt = 0; nt < kQueries / 8; ++nt) {
                    float lse2[2];
                    lds_f32x2(lse2[0], lse2[1], sLse(n) + 4 * query_of(nt, 0));
#pragma unroll
                    for (int c = 0; c < 2; ++c)
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            float& x = st[nt][2 * r + c];
                            x = fast_exp2(x * scale_log2 - lse2[c]);
                            if (masked && (((key_dead >> r) & 1u) ||
                                           (Causal && q0 + query_of(nt, c) + diag < key0 + 8 * r)))
                                x = 0.f;
                        }
                }
            }
            wgmma_wait<0>();  // dPᵀ
            fence_operands(dpt);
#pragma unroll
            for (int nt = 0; nt < kQueries / 8; ++nt) {
                float d_i[2];
                lds_f32x2(d_i[0], d_i[1], sLse(n) + 4 * (Br + query_of(nt, 0)));
#pragma unroll
                for (int c = 0; c < 2; ++c)
#pragma unroll
                    for (int r = 0; r < 2; ++r) dpt[nt][2 * r + c] = st[nt][2 * r + c] * (dpt[nt][2 * r + c] - d_i[c]);
            }
            if constexpr (Mods) {
                // dBias = dS (the bias adds to the logit), summed over the bias's broadcast dims by atomics; before
                // the soft-cap's factor, as the bias adds after the cap.
                if (dbias != nullptr) {
                    float* dbias_lane = dbias + b * dbias_sb + hq * dbias_sh + (i64)(q0 + query_of(0, 0)) * dbias_sm +
                                        (i64)key0 * dbias_sn;
#pragma unroll
                    for (int nt = 0; nt < kQueries / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (q0 + query_of(nt, e & 1) < Nq && key0 + 8 * (e >> 1) < Nk)
                                atomicAdd(dbias_lane + (nt * 8 + (e & 1)) * dbias_sm + (e >> 1) * 8 * dbias_sn,
                                          dpt[nt][e]);
                }
                if (mods.softcap()) {
#pragma unroll
                    for (int nt = 0; nt < kQueries / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) dpt[nt][e] *= decltype(mods)::cap_grad_at(cap_grad, nt, e);
                }
            }
            // Pᵀ and dSᵀ into the block's tiles: this lane's two keys (rows), columns query_of(nt, 0) and the next
            // (one 32-bit word in chunk 4·wg + nt); row + 8 is the next swizzle atom, 1024 bytes on.
            const u32 swz = (key_row % 8) << 4;
#pragma unroll
            for (int nt = 0; nt < kQueries / 8; ++nt) {
                const int chunk = (kQueries / 8) * wg + nt;
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    st_shared_u32(TilePS::chunk_or((sP(n) + key_row * 128) | (4 * (lane % 4)), swz, chunk) + 1024 * r,
                                  T::pack(st[nt][2 * r], st[nt][2 * r + 1]));
                    st_shared_u32(TilePS::chunk_or((sdS(n) + key_row * 128) | (4 * (lane % 4)), swz, chunk) + 1024 * r,
                                  T::pack(dpt[nt][2 * r], dpt[nt][2 * r + 1]));
                }
            }
            // The tiles' stores reach wgmma (the async proxy) after this fence and the barrier both warpgroups pass.
            fence_proxy_async();
            named_sync(1, 256);
            // dV[:, c0..] += Pᵀ dO_i[:, c0..] and dK[:, c0..] += dSᵀ Q_i[:, c0..]: A (keys x queries) K-major, B
            // (queries x columns) MN-major; dQ_i[:, c0..] = dS K_j[:, c0..]: A = dS, the dSᵀ tile read MN-major. A
            // 128-column share forms dQ_i in two parts of 64 (the first under dV's and dK's GEMMs, the second after):
            // all 128 columns beside dK's and dV's accumulators spilled.
            constexpr int kDqParts = NC == 128 ? 2 : 1;
            constexpr int NQ = NC / kDqParts;
            float dq[NQ / 8][4];
            float* dq_dst = dq_accum + DqFrag::block(bh, q0, Nq) * DHead + DqFrag::warp_at<D, DHead, false>(wg, warp % 4);
            auto issue_dq = [&](int part) {
#pragma unroll
                for (int kk = 0; kk < Bc / 16; ++kk)
                    Wgmma<T, NQ>::template ss<1, 1>(dq, TilePS::desc_mn(sdS(n), kk),
                                                    TileKV::desc_mn(k_base + TileKV::col_offset(c0 + part * NQ), kk), kk > 0);
                wgmma_commit();
            };
            // This warp's 16 rows of the part in dQ_accum, a lane's four values of each 8 columns together (DqFrag):
            // one 16-byte reduction each. Rows past Nq are added too (whole Q blocks; the conversion skips them).
            auto add_dq = [&](int part) {
                fence_operands(dq);
#pragma unroll
                for (int nt = 0; nt < NQ / 8; ++nt)
                    red_add_v4(dq_dst + DqFrag::offset(part * (NQ / 8) + nt, lane), dq[nt][0], dq[nt][1], dq[nt][2],
                               dq[nt][3]);
            };
            fence_operands(acc_dv);
            fence_operands(acc_dk);
            fence_operands(dq);
            wgmma_fence();
            issue_dq(0);
#pragma unroll
            for (int kk = 0; kk < Br / 16; ++kk)
                Wgmma<T, NC>::template ss<0, 1>(acc_dv, TilePS::desc_k(sP(n), 0, kk),
                                                TileQ::desc_mn(sdO(n) + TileQ::col_offset(c0), kk), 1);
#pragma unroll
            for (int kk = 0; kk < Br / 16; ++kk)
                Wgmma<T, NC>::template ss<0, 1>(acc_dk, TilePS::desc_k(sdS(n), 0, kk),
                                                TileQ::desc_mn(sQ(n) + TileQ::col_offset(c0), kk), 1);
            wgmma_commit();
            wgmma_wait<1>();  // dQ's first part; dV and dK still running
            add_dq(0);
            wgmma_wait<0>();
            fence_operands(acc_dv);
            fence_operands(acc_dk);
            mbar_arrive(q_empty(n));  // Q_i and dO_i are read
            if constexpr (kDqParts == 2) {
                fence_operands(dq);
                wgmma_fence();
                issue_dq(1);
                wgmma_wait<0>();
                add_dq(1);
            }
        }
        // dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO, this share's columns; rows past Nk not written.
        store_dk_dv<T, NC>(dk + b * dk_sb + h_kv * dk_sh + c0, dv + b * dv_sb + h_kv * dv_sh + c0, dk_sn, dv_sn, key0,
                           Nk, acc_dk, acc_dv, scale, lane);
    };
    if (wg == 0)
        consume(IntC<kCols0>{});
    else
        consume(IntC<kCols1>{});
}

template <typename A, typename B>
struct SameType {
    static constexpr bool value = false;
};
template <typename A>
struct SameType<A, A> {
    static constexpr bool value = true;
};
// One parameter list for both Hopper backward kernels: the plan packs BWD_SM90_ARGS for either (decltype names the
// specialisations' types without instantiating their bodies).
static_assert(SameType<decltype(flash_bwd_sm90_kernel<bf16, 128, 128, false, 64, 128, 2, false, false, false>),
                       decltype(flash_bwd_sm90_wide_kernel<bf16, 256, 256, false, 64, 64, 2, false, false, false>)>::value,
              "flash_bwd_sm90_wide_kernel takes flash_bwd_sm90_kernel's parameters");

}  // namespace cupyflash
