// Backward: dQ, dK, dV recomputing S and P from Q, K and the saved LSE (Algorithm 2 of FlashAttention-2,
// https://arxiv.org/abs/2307.08691). Three launches:
//   1. flash_bwd_preprocess: D_i = rowsum(dO ∘ O) (less dLSE_i where the LSE has a gradient), fp32, and dQ_accum
//      zeroed. With a bias the rows' (hi, lo) pairs too, P = exp2((s - hi) - lo): (LSE · log2 e, 0), until the
//      forward kernel's stats mode (flash_fwd.cuh) replaces those of the rows under the rebuild rule (scores.cuh
//      kLseRebuild) with (m, log2 l).
//   2. flash_bwd_kernel: one thread block per (K/V block of Bc rows, K/V head, batch). dK_j, dV_j stay in
//      registers while the Q/dO blocks of every query head that shares the K/V head (grouped-query attention)
//      stream through shared memory, so dK/dV are summed over the group without atomics; each warp owns 16 keys
//      and works on transposed
//      scores (Sᵀ = K Qᵀ), so Pᵀ and dSᵀ feed the dV and dK MMAs straight from registers. dQ_i += dS K_j needs
//      all keys of the block, so dSᵀ goes through shared memory and partial dQ is added atomically to an fp32
//      buffer.
//   3. flash_bwd_convert_dq: dQ = scale · dQ_accum in the input dtype, with the caller's strides.
#pragma once
#include "scores.cuh"

namespace cupyflash {

// Lanes per row of flash_bwd_preprocess: one 16-byte chunk of dO and O each (8 bf16/fp16, 4 fp32), the row's chunks
// rounded up to a power of two, at most a warp (cupyflash/plan.py preprocess_lanes computes the same for the grid).
__host__ __device__ constexpr int preprocess_lanes(int d, int elem_bytes) {
    int lanes = 1;
    while (lanes < d * elem_bytes / 16 && lanes < 32) lanes *= 2;
    return lanes;
}

// kLanes lanes per row of the dQ accumulator (B·H·Nq_accum rows of D floats; Nq_accum ≥ Nq: the Hopper backward's
// whole Q blocks, flash_bwd_sm90.cuh DqFrag), each zeroed for the main kernel's atomic adds: a memset launch fewer, as
// FlashAttention-2's Clear_dQaccum (https://github.com/Dao-AILab/flash-attention/blob/main/csrc/flash_attn/src/flash_bwd_preprocess_kernel.h).
// The mma.sync kernels use the first B·H·Nq rows, (B, H, Nq, D) contiguous. For rows i < Nq also D_i = Σ_d dO[i,d] ·
// O[i,d], and with row_lse non-null the row's (LSE · log2 e, 0) (LSE contiguous (B, H, Nq), as row_lse).
// 16-byte loads and stores: dO's and O's rows start 16-byte aligned with unit column stride (the faces copy them
// otherwise, cuda_path._ready), dQ_accum's rows are D floats of one aligned allocation. One warp per row with 2-byte
// loads took 1.7x cuDNN's preprocess (H100, GPT 512 x 8 x 12: 166 against 99 µs a step).
template <typename T, int D>
__global__ void flash_bwd_preprocess(const BwdPreprocessParams<typename T::elem> params) {
    using E = typename T::elem;
    constexpr int kVec = 16 / sizeof(E);  // elements per 16-byte chunk
    constexpr int kLanes = preprocess_lanes(D, sizeof(E));
    static_assert(D % kVec == 0 && D % 4 == 0, "whole 16-byte chunks per row");
    const E* __restrict__ dout = params.dout;
    const E* __restrict__ out = params.out;
    float* __restrict__ d_vec = params.d_vec;
    const int H = params.H, Nq = params.Nq;

    const i64 row = (i64)blockIdx.x * (blockDim.x / kLanes) + threadIdx.x / kLanes;
    if (row >= params.n_rows) return;  // the row's lanes leave together
    const int g = threadIdx.x % kLanes;
    float4* acc_row = reinterpret_cast<float4*>(params.dq_accum + row * D);
#pragma unroll
    for (int c = g; c < D / 4; c += kLanes) acc_row[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    const int i = (int)(row % params.Nq_accum);
    const i64 bh = row / params.Nq_accum, q_row = bh * Nq + i;  // the row in (B, H, Nq)
    if (i >= Nq) return;
    const int h = (int)(bh % H), b = (int)(bh / H);
    const E* dor = dout + b * params.do_s.b + h * params.do_s.h + i * params.do_s.n;
    const E* orow = out + b * params.o_s.b + h * params.o_s.h + i * params.o_s.n;
    float acc = 0.f;
#pragma unroll
    for (int c = g; c < D / kVec; c += kLanes) {
        alignas(16) E a[kVec], o[kVec];
        *reinterpret_cast<uint4*>(a) = __ldg(reinterpret_cast<const uint4*>(dor) + c);
        *reinterpret_cast<uint4*>(o) = __ldg(reinterpret_cast<const uint4*>(orow) + c);
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc += T::to_float(a[e]) * T::to_float(o[e]);
    }
    // The row's lanes only: other rows' lanes of the warp may have left.
    const unsigned mask = kLanes == 32 ? 0xffffffffu : ((1u << kLanes) - 1) << (threadIdx.x % 32 / kLanes * kLanes);
#pragma unroll
    for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(mask, acc, off);
    if (g == 0) {
        // dLSE_i / dS_ij = P_ij, so a gradient reaching the LSE enters dS = P ∘ (dP - D) as D_i - dLSE_i.
        d_vec[q_row] = params.dlse == nullptr ? acc : acc - params.dlse[q_row];
        if (params.row_lse != nullptr) params.row_lse[q_row] = make_float2(params.lse[q_row] * kLog2e, 0.f);
    }
}

// One warp per row: dQ[b,h,i,:] = scale · dQ_accum[b,h,i,:] (accumulator contiguous (B, H, Nq, D)).
template <typename T, int D>
__global__ void flash_bwd_convert_dq(const ConvertDqParams<typename T::elem> params) {
    const float* __restrict__ dq_accum = params.dq_accum;
    typename T::elem* __restrict__ dq = params.dq;
    const i64 dq_sb = params.dq_s.b, dq_sh = params.dq_s.h, dq_sn = params.dq_s.n;
    const int H = params.H, Nq = params.Nq;
    const i64 n_rows = params.n_rows;
    const float scale = params.scale;

    const i64 row = (i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= n_rows) return;
    const int lane = threadIdx.x % 32;
    const int i = (int)(row % Nq), h = (int)((row / Nq) % H), b = (int)(row / ((i64)Nq * H));
    typename T::elem* dst = dq + b * dq_sb + h * dq_sh + i * dq_sn;
    const float* src = dq_accum + row * D;
    for (int d = lane; d < D; d += 32) dst[d] = T::from_float(src[d] * scale);
}

// DOut: the columns of dK, dV and dQ one launch forms, from params.col0 (D: all of them). A head wider than the
// registers hold for dK and dV (d256) runs one launch per column range, each recomputing S and dP over all D columns
// (tiles.py Tiles.out_cols).
template <typename T, int D, int DOut, int Br, int Bc, int NWarps, bool FuseSdP, bool Causal, bool Mods, bool Dropout>
__global__ void __launch_bounds__(NWarps * 32, 1)
flash_bwd_kernel(const BwdParams<typename T::elem> params) {
    static_assert(Bc == 16 * NWarps, "each warp owns 16 keys");
    static_assert(Br % 16 == 0 && NWarps % (Br / 16) == 0, "dQ tiles: (Br/16) row tiles split evenly over warps");
    constexpr int kThreads = NWarps * 32;
    constexpr int kRowTiles = Br / 16;                   // dQ = dS K: 16-row tiles of the Q block ...
    constexpr int kDqCols = DOut / (NWarps / kRowTiles);  // ... each split into column ranges, one per warp
    static_assert(D % DOut == 0, "whole column ranges per launch");
    static_assert(kDqCols % 16 == 0, "dQ column range per warp is a multiple of 16");
    static_assert(Br / 8 * 4 <= 32, "one bit per score of a lane in the dropout keep mask");
    using TileD = Tile<T, D>;
    using TileS = Tile<T, Br>;
    // Each field of `params` is read where it is used (params.cuh says why).

    extern __shared__ __align__(16) unsigned char smem[];
    const u32 sK = smem_addr(smem);
    const u32 sV = sK + TileD::template bytes<Bc>();
    const u32 sQ = sV + TileD::template bytes<Bc>();
    const u32 sdO = sQ + TileD::template bytes<Br>();
    const u32 sdS = sdO + TileD::template bytes<Br>();  // dSᵀ, stored [key][query]
    // LSE_i (log2-scaled) and D_i of the Q block: read through 32-bit shared addresses, two per LDS.64 (64-bit
    // generic pointers held through the loop cost registers this kernel is short of).
    const u32 sLse = sdS + TileS::template bytes<Bc>();
    const u32 sDvec = sLse + 4 * Br;
    // Mods: with row_lse, the rows' (hi, lo) pairs (flash_bwd_preprocess) in place of LSE · log2 e: hi at sLse, lo
    // here (0 without row_lse).
    const u32 sLseLo = sDvec + 4 * Br;

    const int k0 = blockIdx.x * Bc;
    const int h_kv = blockIdx.y, b = blockIdx.z, H = gridDim.y * params.attn.group;  // H: query heads
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int col0 = DOut == D ? 0 : params.col0;  // a constant where one launch forms every column

    const auto mods = make_score_mods<T, Causal, Mods, Dropout>(params.mods, params.attn.Nq, params.attn.Nk);
    // Queries that see a key of this block: i + diag - left <= j <= i + diag + right for some j in the block.
    const int i_begin = max(0, k0 - mods.diag - mods.right) / Br;
    const int i_end = ceil_div(min(params.attn.Nq, max(0, k0 + Bc - mods.diag + mods.left)), Br);
    const int n_pairs = params.attn.group * max(0, i_end - i_begin);  // (query head in the group, Q block) pairs
    auto head_of = [&](int it) { return h_kv * params.attn.group + it / (i_end - i_begin); };
    auto block_of = [&](int it) { return i_begin + it % (i_end - i_begin); };

    auto load_q_block = [&](int it) {
        const int hq = head_of(it), q0 = block_of(it) * Br;
        const i64 bh = (i64)b * H + hq;
        load_tile_async<T, Br, D, kThreads>(sQ, params.q + b * params.q_s.b + hq * params.q_s.h + q0 * params.q_s.n,
                                            params.q_s.n, params.attn.Nq - q0, tid);
        load_tile_async<T, Br, D, kThreads>(sdO,
                                            params.dout + b * params.do_s.b + hq * params.do_s.h + q0 * params.do_s.n,
                                            params.do_s.n, params.attn.Nq - q0, tid);
        float* s_lse = reinterpret_cast<float*>(smem + (sLse - sK));
        float* s_dvec = reinterpret_cast<float*>(smem + (sDvec - sK));
        float* s_lse_lo = reinterpret_cast<float*>(smem + (sLseLo - sK));
        for (int r = tid; r < Br; r += kThreads) {  // rows past Nq: P = exp2(s - inf) = 0, D = 0
            if (Mods && params.row_lse != nullptr) {
                const float2 hi_lo =
                    q0 + r < params.attn.Nq ? params.row_lse[bh * params.attn.Nq + q0 + r] : make_float2(inf_f(), 0.f);
                s_lse[r] = hi_lo.x;
                s_lse_lo[r] = hi_lo.y;
            } else {
                s_lse[r] = q0 + r < params.attn.Nq ? params.lse[bh * params.attn.Nq + q0 + r] * kLog2e : inf_f();
                if (Mods) s_lse_lo[r] = 0.f;
            }
            s_dvec[r] = q0 + r < params.attn.Nq ? params.d_vec[bh * params.attn.Nq + q0 + r] : 0.f;
        }
    };

    load_tile_async<T, Bc, D, kThreads>(sK, params.k + b * params.k_s.b + h_kv * params.k_s.h + k0 * params.k_s.n,
                                        params.k_s.n, params.attn.Nk - k0, tid);
    load_tile_async<T, Bc, D, kThreads>(sV, params.v + b * params.v_s.b + h_kv * params.v_s.h + k0 * params.v_s.n,
                                        params.v_s.n, params.attn.Nk - k0, tid);
    // (head, Q block) pairs whose bias tile with this K/V block is kTileSkip contribute nothing: the range is
    // trimmed to the first and last that count, and the loop passes over any skipped ones between.
    auto skipped = [&](int it) { return mods.tile_class(b, head_of(it), block_of(it), blockIdx.x) == kTileSkip; };
    int it_begin = 0, n_iters = n_pairs;
    if (Mods && params.mods.tile_cls != nullptr) trim_skipped<kThreads>(it_begin, n_iters, skipped, tid);
    auto next_iter = [&](int it) {
        while (it < n_iters && skipped(it)) ++it;
        return it;
    };
    int it = next_iter(it_begin);
    if (it < n_iters) load_q_block(it);
    cp_async_commit();

    float acc_dk[DOut / 8][4], acc_dv[DOut / 8][4];
#pragma unroll
    for (int i = 0; i < DOut / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dk[i][e] = acc_dv[i][e] = 0.f;
    const int key_in_block = warp * 16 + lane / 4;  // this lane's keys: key_in_block and key_in_block + 8

    while (it < n_iters) {
        const int it_next = next_iter(it + 1);
        const int hq = head_of(it), q0 = block_of(it) * Br;
        const bool read_bias = mods.has_bias() && mods.tile_class(b, hq, block_of(it), blockIdx.x) == kTileRead;
        const i64 bh = (i64)b * H + hq;
        // Q_i, dO_i, LSE_i and D_i are in shared memory for every thread; the previous dQ reads of sdS are done.
        cp_async_wait_all();
        __syncthreads();

        // Sᵀ = K_j Q_iᵀ, (16 keys x Br) per warp; then Pᵀ = exp2(Sᵀ · scale · log2 e - LSE · log2 e).
        // With FuseSdP (tiles.py), the plain path computes dPᵀ = V_j dO_iᵀ here too, in the same k loop (twice the
        // MMAs in flight); otherwise, and always with score modifiers, whose bias and dropout code would spill beside
        // dPᵀ's registers, dPᵀ waits until after dV.
        constexpr bool kFused = FuseSdP && !Mods;
        float pt[Br / 8][4], ds[Br / 8][4];
        if constexpr (kFused)
            mma_abt_x2<T, D, Br, D>(&pt, sK, sQ, &ds, sV, sdO, warp * 16, lane);
        else
            mma_abt<T, D, Br, 1, D, D>(&pt, sK, warp * 16, sQ, lane);
        // Only blocks that cross the sequence end or a window edge need per-element visibility checks (rows past
        // Nq need none: their LSE is +inf, so P = 0).
        const bool need_mask = k0 + Bc > params.attn.Nk || k0 + Bc - 1 > q0 + mods.diag + mods.right ||
                               k0 < q0 + Br - 1 + mods.diag - mods.left;
        // Uniform branches around whole loops, not per score (see flash_fwd.cuh).
        auto col_of = [&](int nt, int e) { return nt * 8 + 2 * (lane % 4) + (e & 1); };  // query in the block
        auto key_of = [&](int e) { return k0 + key_in_block + (e >> 1) * 8; };
        mods.template scale_scores<T, Br / 8>(pt, params.attn.scale_log2);
        if (read_bias) {  // per element: the forward's branch-free loads (scores.cuh with_bias) spill here on sm_80
            const i64 block_off = mods.bias_row(b, hq, q0);  // element (q0, 0) of this head's bias
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = col_of(nt, e), key = key_of(e);
                    if (q0 + row < params.attn.Nq && key < params.attn.Nk)
                        pt[nt][e] = mods.template add_bias<T>(pt[nt][e], block_off + row * mods.bias_sm + key * mods.bias_sn);
                }
        }
        if (need_mask) {
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (!mods.visible(q0 + col_of(nt, e), key_of(e))) pt[nt][e] = -inf_f();
        }
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
            float lse2[2], lo[2] = {0.f, 0.f};
            lds_f32x2(lse2[0], lse2[1], sLse + 4 * col_of(nt, 0));
            if constexpr (Mods) lds_f32x2(lo[0], lo[1], sLseLo + 4 * col_of(nt, 0));
#pragma unroll
            for (int e = 0; e < 4; ++e)
                pt[nt][e] = fast_exp2(Mods ? (pt[nt][e] - lse2[e & 1]) - lo[e & 1] : pt[nt][e] - lse2[e & 1]);
        }
        // Dropout: bit nt·4 + e set where the forward kept that score (same Philox words, see scores.cuh).
        const u32 keep_bits = mods.dropout() ? mods.template keep_bits_t<Br / 8>(bh, k0 + key_in_block,
                                                                                 q0 + 2 * (lane % 4),
                                                                                 params.mods.keep_threshold)
                                             : 0xffffffffu;
        auto kept = [&](int nt, int e) { return (keep_bits >> (nt * 4 + e)) & 1u; };

        // dV_j += Pᵀ dO_i, P with dropout applied (zeroed and scaled by 1/keep probability)
        if (mods.dropout()) {
            auto dropped_p_frag = [&](u32 (&a)[1][T::kARegs], int kk) {
                float pd[2][4];
#pragma unroll
                for (int n = 0; n < 2; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        pd[n][e] = kept(2 * kk + n, e) ? pt[2 * kk + n][e] * params.mods.inv_keep : 0.f;
                acc_to_a<T>(a[0], pd, 0);
            };
            mma_ab<T, Br, DOut, 1, D>(&acc_dv, dropped_p_frag, sdO, col0, lane);
        } else {
            mma_ab<T, Br, DOut, 1, D>(&acc_dv, [&](u32 (&a)[1][T::kARegs], int kk) { acc_to_a<T>(a[0], pt, kk); },
                                      sdO, col0, lane);
        }

        // dPᵀ = V_j dO_iᵀ (unless fused above), then dSᵀ = Pᵀ ∘ (dPᵀ - D_i) in place.
        if constexpr (!kFused) mma_abt<T, D, Br, 1, D, D>(&ds, sV, warp * 16, sdO, lane);
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
            float dvec[2];
            lds_f32x2(dvec[0], dvec[1], sDvec + 4 * col_of(nt, 0));
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float dp = kept(nt, e) ? ds[nt][e] * (Mods ? params.mods.inv_keep : 1.f) : 0.f;
                ds[nt][e] = pt[nt][e] * (dp - dvec[e & 1]);
            }
        }
        // dBias = dS (the bias adds to the logit), summed over the bias's broadcast dims by atomics (by the launch of
        // the first column range only: the plan gives the others no dbias).
        if (Mods && params.mods.dbias != nullptr) {
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = q0 + nt * 8 + 2 * (lane % 4) + (e & 1), key = k0 + key_in_block + (e >> 1) * 8;
                    if (row < params.attn.Nq && key < params.attn.Nk)
                        atomicAdd(params.mods.dbias + b * params.mods.dbias_s.b + hq * params.mods.dbias_s.h +
                                      row * params.mods.dbias_s.m + key * params.mods.dbias_s.n,
                                  ds[nt][e]);
                }
        }

        // Soft-capping: the logit is softcap · tanh(scale · q·k / softcap), so dS w.r.t. scale · q·k is dS · (1 - tanh²)
        // (the bias gradient above is taken before: the bias adds after the cap). tanh is recomputed from a second
        // Sᵀ GEMM into pt (P is no longer needed) rather than kept from the first, which would hold Br/2 more
        // registers per thread in every variant with score modifiers.
        if (mods.softcap()) {
            mma_abt<T, D, Br, 1, D, D>(&pt, sK, warp * 16, sQ, lane);
#pragma unroll
            for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float t = cap_tanh<T>(pt[nt][e] * mods.cap_in);
                    ds[nt][e] *= 1.f - t * t;
                }
        }

        // dK_j += dSᵀ Q_i (the softmax scale is applied once, at the end)
        mma_ab<T, Br, DOut, 1, D>(&acc_dk, [&](u32 (&a)[1][T::kARegs], int kk) { acc_to_a<T>(a[0], ds, kk); }, sQ,
                                  col0, lane);

        // dSᵀ → shared memory, [key][query], for the dQ GEMM that needs every key of the block.
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                store2_shared<T>(TileS::at(sdS, key_in_block + r * 8, nt * 8 + 2 * (lane % 4)), ds[nt][2 * r],
                                 ds[nt][2 * r + 1]);
            }
        // dSᵀ is complete, and every warp is done reading sQ/sdO/LSE/D: prefetch the next Q block under dQ.
        __syncthreads();
        if (it_next < n_iters) {
            load_q_block(it_next);
            cp_async_commit();
        }

        // dQ_i += dS K_j over this warp's (16 rows x kDqCols) tile, added atomically in fp32.
        const int m0 = (warp % kRowTiles) * 16, c0 = col0 + (warp / kRowTiles) * kDqCols;
        float acc_dq[kDqCols / 8][4] = {};
        mma_ab<T, Bc, kDqCols, 1, D>(
            &acc_dq, [&](u32 (&a)[1][T::kARegs], int kk) { load_a_km<T, Br>(a[0], sdS, kk * 16, m0, lane); }, sK, c0,
            lane);
        const int row = q0 + m0 + lane / 4;
        red_add_tile<kDqCols / 8>(params.dq_accum + (bh * params.attn.Nq + q0 + m0) * D + c0, D, acc_dq,
                                  row < params.attn.Nq, row + 8 < params.attn.Nq, lane);
        it = it_next;
    }

    // Epilogue: dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO, rows past Nk not written.
    store_dk_dv<T, DOut>(params.dk + b * params.dk_s.b + h_kv * params.dk_s.h + col0,
                         params.dv + b * params.dv_s.b + h_kv * params.dv_s.h + col0, params.dk_s.n,
                         params.dv_s.n, k0 + key_in_block, params.attn.Nk, acc_dk, acc_dv, params.scale, lane);
}

}  // namespace cupyflash
