// Forward: O = dropout(softmax(cap(scale · Q Kᵀ) + bias, visibility window)) V, one thread block per (Q block of Br
// rows, head, batch). Logits, windows and dropout are defined in scores.cuh.
//
// Algorithm 1 of FlashAttention-2 (https://arxiv.org/abs/2307.08691): K/V blocks of Bc rows stream through
// shared memory; each warp owns MTiles·16 query rows and keeps S (rows x Bc) and O (rows x D) in registers (each K/V
// fragment read from shared memory feeds MTiles MMAs, which eases the shared-memory bandwidth bound); the online
// softmax keeps the running max m_i and sum l_i per row; the log-sum-exp is written for the backward.
//
// Stats mode (Mods, row_stats non-null): the backward's pass for the rebuild rule (scores.cuh kLseRebuild). `lse` is
// then the forward's saved LSE, read; a block whose rows are all at or above kLseRebuild returns after reading them,
// the others run as usual and write (m_i, log2 l_i) of those rows below it to row_stats (log2 units), neither O nor
// LSE. Dropout plays no part (it acts after the softmax): the plan runs it on the variant without.
#pragma once
#include "scores.cuh"

namespace cupyflash {

template <typename T, int D, int Br, int Bc, int NWarps, int MTiles, bool FreshOffsets, bool Causal, bool Mods,
          bool Dropout>
__global__ void __launch_bounds__(NWarps * 32, 1)
flash_fwd_kernel(const FwdParams<typename T::elem> params) {
    static_assert(Br == 16 * MTiles * NWarps, "each warp owns MTiles 16-row tiles");
    static_assert(D % 16 == 0 && Bc % 16 == 0, "MMA k-steps are 16 wide");
    constexpr int kThreads = NWarps * 32;
    using TileD = Tile<T, D>;
    // Each field of `params` is read where it is used (params.cuh says why); the tensors' pointers move to this
    // block's rows below.
    const typename T::elem* __restrict__ q = params.q;
    const typename T::elem* __restrict__ k = params.k;
    const typename T::elem* __restrict__ v = params.v;
    typename T::elem* __restrict__ o = params.o;

    extern __shared__ __align__(16) unsigned char smem[];
    const u32 sQ = smem_addr(smem);
    const u32 sK = sQ + TileD::template bytes<Br>();
    const u32 sV = sK + TileD::template bytes<Bc>();

    // Heaviest Q blocks first: under the causal mask the last blocks see the most keys.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * Br;
    const int h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    q += b * params.q_s.b + h * params.q_s.h + q0 * params.q_s.n;
    // grouped-query: `group` query heads share one K/V head
    k += b * params.k_s.b + (h / params.attn.group) * params.k_s.h;
    v += b * params.v_s.b + (h / params.attn.group) * params.v_s.h;
    o += b * params.o_s.b + h * params.o_s.h + q0 * params.o_s.n;

    const auto mods = make_score_mods<T, Causal, Mods, Dropout>(params.mods, params.attn.Nq, params.attn.Nk);
    const i64 bh = (i64)b * H + h;
    const bool stats_mode = Mods && params.row_stats != nullptr;
    if (stats_mode) {
        bool rebuild = false;
        for (int r = tid; r < Br && q0 + r < params.attn.Nq; r += kThreads)
            rebuild |= params.lse[bh * params.attn.Nq + q0 + r] < kLseRebuild;
        if (!__syncthreads_or(rebuild)) return;
    }
    // K/V blocks that hold a key visible to some row of this Q block (rows q0 .. q_last).
    const int q_last = min(q0 + Br, params.attn.Nq) - 1;
    int j_begin = max(0, q0 + mods.diag - mods.left) / Bc;
    int j_end = min(ceil_div(params.attn.Nk, Bc), max(0, ceil_div(q_last + mods.diag + mods.right + 1, Bc)));

    // Blocks whose bias tile is kTileSkip contribute nothing: the range is trimmed to the first and last that
    // count, and the loop and the prefetch pass over any skipped ones between.
    const int q_block = q0 / Br;
    if (Mods && params.mods.tile_cls != nullptr)
        trim_skipped<kThreads>(j_begin, j_end, [&](int j) { return mods.tile_class(b, h, q_block, j) == kTileSkip; },
                               tid);
    auto next_block = [&](int j) {
        while (j < j_end && mods.tile_class(b, h, q_block, j) == kTileSkip) ++j;
        return j;
    };
    int j = next_block(j_begin);

    load_tile_async<T, Br, D, kThreads, FreshOffsets>(sQ, q, params.q_s.n, params.attn.Nq - q0, tid);
    if (j < j_end)
        load_tile_async<T, Bc, D, kThreads, FreshOffsets>(sK, k + j * Bc * params.k_s.n, params.k_s.n,
                                                          params.attn.Nk - j * Bc, tid);
    cp_async_commit();

    float acc_o[MTiles][D / 8][4];
    float m_i[MTiles][2];  // running max of the log2-scaled scores, rows lane/4 and lane/4 + 8 of each tile
    float l_i[MTiles][2];  // running sum of exp2(s - m_i), this lane's columns only
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) acc_o[mt][i][0] = acc_o[mt][i][1] = acc_o[mt][i][2] = acc_o[mt][i][3] = 0.f;
        m_i[mt][0] = m_i[mt][1] = -inf_f();
        l_i[mt][0] = l_i[mt][1] = 0.f;
    }
    const int warp_row0 = warp * 16 * MTiles;

    while (j < j_end) {
        const int k0 = j * Bc;
        const int j_next = next_block(j + 1);
        // K_j (and Q) have landed for every thread, and every warp has finished P·V_{j-1}: sV may be refilled.
        cp_async_wait_all();
        __syncthreads();
        load_tile_async<T, Bc, D, kThreads, FreshOffsets>(sV, v + k0 * params.v_s.n, params.v_s.n, params.attn.Nk - k0,
                                                          tid);
        cp_async_commit();

        float s[MTiles][Bc / 8][4];  // S = Q K_jᵀ, (16·MTiles x Bc) per warp
        mma_abt<T, D, Bc, MTiles, D, D>(s, sQ, warp_row0, sK, lane);

        // V_j has landed, and every warp is done reading sK: prefetch K_{j+1} under the softmax and P·V.
        cp_async_wait_all();
        __syncthreads();
        if (j_next < j_end) {
            load_tile_async<T, Bc, D, kThreads, FreshOffsets>(sK, k + j_next * Bc * params.k_s.n, params.k_s.n,
                                                              params.attn.Nk - j_next * Bc, tid);
            cp_async_commit();
        }

        // Only blocks that cross the sequence end or a window edge need per-element visibility checks.
        const bool need_mask = k0 + Bc > params.attn.Nk || k0 + Bc - 1 > q0 + mods.diag + mods.right ||
                               k0 < q_last + mods.diag - mods.left;
        const bool read_bias = mods.has_bias() && mods.tile_class(b, h, q_block, j) == kTileRead;
        // One uniform branch around each whole loop: a branch per score gets if-converted, and the predicated
        // bias loads and index math then cost every score of every block (2-3x on an H200).
#pragma unroll
        for (int mt = 0; mt < MTiles; ++mt) mods.template scale_scores<T, Bc / 8>(s[mt], params.attn.scale_log2);
        auto row_of = [&](int mt, int e) { return q0 + warp_row0 + mt * 16 + lane / 4 + (e >> 1) * 8; };
        auto col_of = [&](int nt, int e) { return k0 + nt * 8 + 2 * (lane % 4) + (e & 1); };
        if (read_bias) {
#pragma unroll
            for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r)  // rows past Nq read row Nq - 1's bias: they are never stored
                    mods.template add_bias_row<T, Bc / 8>(
                        s[mt], r, mods.bias_row(b, h, min(row_of(mt, 2 * r), params.attn.Nq - 1)), col_of(0, 0));
        }
        if (need_mask) {
#pragma unroll
            for (int mt = 0; mt < MTiles; ++mt)
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (!mods.visible(row_of(mt, e), col_of(nt, e))) s[mt][nt][e] = -inf_f();
        }
#pragma unroll
        for (int mt = 0; mt < MTiles; ++mt) {
            float alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = m_i[mt][r];
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
                mx = warp_max4(mx);
                // A row with every key masked so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
                const float m_use = mx == -inf_f() ? 0.f : mx;
                alpha[r] = fast_exp2(m_i[mt][r] - m_use);
                m_i[mt][r] = mx;
                float row_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt) {
                    s[mt][nt][2 * r] = fast_exp2(s[mt][nt][2 * r] - m_use);
                    s[mt][nt][2 * r + 1] = fast_exp2(s[mt][nt][2 * r + 1] - m_use);
                    row_sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
                }
                l_i[mt][r] = l_i[mt][r] * alpha[r] + row_sum;  // l counts every key: dropout acts after softmax
            }
            // After both row halves: each of dropout's Philox calls serves rows r = 0 and 1 (scores.cuh random_group)
            if (mods.dropout())
                mods.template drop<Bc / 8>(s[mt], bh, q0 + warp_row0 + mt * 16 + lane / 4, k0 + 2 * (lane % 4),
                                           params.mods.keep_threshold);
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] *= alpha[e >> 1];
            }
        }

        // O += P V_j: P goes from accumulators straight to A fragments.
        auto p_frag = [&](u32 (&a)[MTiles][T::kARegs], int kk) {
#pragma unroll
            for (int mt = 0; mt < MTiles; ++mt) acc_to_a<T>(a[mt], s[mt], kk);
        };
        mma_ab<T, Bc, D, MTiles, D>(acc_o, p_frag, sV, 0, lane);
        j = j_next;
    }

    // Epilogue: O = acc / (l · keep probability), LSE = ln(Σ exp(logit)) = (m + log2 l) · ln 2. Rows with no visible key
    // write O = 0 and LSE = +inf, so the backward recomputes P = exp(s - inf) = 0 for them.
#pragma unroll
    for (int mt = 0; mt < MTiles; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = warp_sum4(l_i[mt][r]);
            const float inv_l = l > 0.f ? (Mods ? params.mods.inv_keep : 1.f) / l : 0.f;
            const int row = warp_row0 + mt * 16 + lane / 4 + r * 8;
            if (stats_mode) {  // l > 0: a row without keys has LSE +inf
                if (q0 + row < params.attn.Nq && lane % 4 == 0 &&
                    params.lse[bh * params.attn.Nq + q0 + row] < kLseRebuild)
                    params.row_stats[bh * params.attn.Nq + q0 + row] = make_float2(m_i[mt][r], log2f(l));
            } else if (q0 + row < params.attn.Nq) {
                typename T::elem* o_row = o + row * params.o_s.n;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt)
                    store2<T>(o_row + dt * 8 + 2 * (lane % 4), acc_o[mt][dt][2 * r] * inv_l,
                              acc_o[mt][dt][2 * r + 1] * inv_l);
                if (lane % 4 == 0)
                    params.lse[bh * params.attn.Nq + q0 + row] = l > 0.f ? (m_i[mt][r] + log2f(l)) * kLn2 : inf_f();
            }
        }
    }
}

}  // namespace cupyflash
