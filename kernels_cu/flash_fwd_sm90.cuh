// Forward on Hopper (sm_90a), warp-specialized as FlashAttention-3 (https://arxiv.org/abs/2407.08608). One producer
// warpgroup streams Q, then K_j and V_j through a ring of kStages shared-memory slots: one thread issues TMA copies
// that complete on mbarriers. Br / 64 consumer warpgroups of 64 query rows each run S = Q K_jᵀ and O += P V_j on wgmma
// (wgmma.cuh); two of them take turns at the tensor cores (ping-pong: one warpgroup's softmax runs under the other's
// GEMMs), three (Br = 192, FlashAttention-3's d64 tile: each K/V tile read from shared memory feeds three) issue as
// they come; inside each, the softmax of S_j runs under P_{j-1} V_{j-1}. 16-bit types. Mods compiles in the score mods
// of scores.cuh (bias with its tile classes, window, soft-cap; Dropout the dropout) as flash_fwd.cuh applies them, on
// the same elements with the same Philox numbering, so either backward takes this forward's LSE and dropout mask;
// Mods = false is the plain path (at most a causal mask), with none of their code; KeyMask adds key padding to it
// (key_mask.cuh).
#pragma once
#include "key_mask.cuh"
#include "scores.cuh"
#include "wgmma.cuh"

namespace cupyflash {

// Tile sizes: cupyflash/tiles.py FORWARD_SM90. D: the tiles' head dim, a multiple of 64 (the swizzle's panels);
// DHead <= D: the tensors' own, whose columns DHead .. D - 1 TMA fills with zeros (S = Q Kᵀ skips them, O computes
// head_cols(D, DHead) columns and stores DHead). Parameters: params.cuh FwdSm90Params, the score mods' as
// flash_fwd_kernel's, with cls_tq x cls_tk, the tiles tile_cls classifies (ScoreMods::tile_class_span).
template <typename T, int D, int DHead, int Br, int Bc, bool Causal, int kStages, bool Mods, bool Dropout,
          bool KeyMask>
__global__ void __launch_bounds__(128 * (Br / 64 + 1), 1)
flash_fwd_sm90_kernel(const __grid_constant__ FwdSm90Params<typename T::elem> params) {
    static_assert(Br == 128 || Br == 192, "two or three consumer warpgroups of 64 rows");
    static_assert(!(KeyMask && Mods), "beside a score mod the key mask is a bias (cupyflash/plan.py)");
    constexpr int kConsumers = Br / 64;             // the producer is warpgroup kConsumers
    constexpr int kConsumerThreads = 128 * kConsumers;
    constexpr bool kPingPong = kConsumers == 2;
    constexpr int DO = head_cols(D, DHead);  // O's columns
    // Lazy rescaling (the softmax below) where O's rescale costs a thread at least as many FMULs (DO / 2 a block) as it
    // has scores (Bc / 2): d128 with 128 keys, d160-d256; there it took 1-5 % off the forward, where the vote and the
    // branch cost 1-5 % at d64 and d128 on 176 keys (H100, benchmarks/NOTES.md).
    constexpr bool kLazyRescale = DO >= Bc;
    constexpr float kRescaleSlack = 8.f;  // log2 units: P <= 256
    using TileQ = SwTile<Br, D>;
    using TileKV = SwTile<Bc, D>;
    // Each field of `params` is read where it is used (params.cuh says why).
    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sQ = (smem_addr(smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned (launch: +1 KiB)
    const u32 sK0 = sQ + TileQ::bytes();
    const u32 sV0 = sK0 + kStages * TileKV::bytes();
    // q_full, k_full[S], v_full[S], k_empty[S], v_empty[S], q_empty
    const u32 bars = sV0 + kStages * TileKV::bytes();
    // With Mods, the index of the K/V block in each ring slot and whether its scores add the bias (2j + read), from
    // the producer: the consumers take them from there rather than walk the tile classes past
    // skipped blocks in their loop, which made ptxas serialize every wgmma of the kernel (C7514: a data-dependent
    // inner loop between the GEMMs' issue and wait), or load a block's classes from global memory between its S GEMM
    // and its softmax.
    auto sJ = [&](int j) { return bars + 8 * (2 + 4 * kStages) + 4 * (j % kStages); };
    auto sK = [&](int j) { return sK0 + (j % kStages) * TileKV::bytes(); };
    auto sV = [&](int j) { return sV0 + (j % kStages) * TileKV::bytes(); };
    const u32 q_full = bars;
    auto k_full = [&](int j) { return bars + 8 * (1 + j % kStages); };
    auto v_full = [&](int j) { return bars + 8 * (1 + kStages + j % kStages); };
    auto k_empty = [&](int j) { return bars + 8 * (1 + 2 * kStages + j % kStages); };
    auto v_empty = [&](int j) { return bars + 8 * (1 + 3 * kStages + j % kStages); };
    const u32 q_empty = bars + 8 * (1 + 4 * kStages);
    auto phase = [](int j) { return (j / kStages) & 1; };

    // This thread block's Q blocks, the heaviest first (causal: the last ones see the most keys). A grid of
    // ceil(n_qb / 2) pairs Q block n_qb - 1 - x with x: under a causal mask each thread block then does the same
    // work, and the second block's Q and K/V load under the first one's last GEMMs and epilogue, where a new thread
    // block (one per SM) would start from its launch. The score mods' variants take one Q block each (grid n_qb):
    // their skipped tiles are counted by the whole thread block (__syncthreads) before the warpgroups part.
    const int n_qb = ceil_div(params.attn.Nq, Br), x = blockIdx.x;
    const int n_tiles = !Mods && gridDim.x < n_qb && x < n_qb - 1 - x ? 2 : 1;
    auto q0_of = [&](int tile) { return (tile == 0 ? n_qb - 1 - x : x) * Br; };
    const int h = blockIdx.y, b = blockIdx.z, H = gridDim.y;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warpgroup_uniform(tid);
    const int diag = params.attn.Nk - params.attn.Nq;
    const auto mods = make_score_mods<T, Causal, Mods, Dropout>(params.mods, params.attn.Nq, params.attn.Nk);
    // The K/V blocks a Q block visits, in the one order the producer loads them and the consumers use them:
    // those holding a key visible to some row q0 .. q_last (window edges), less those whose bias tile is kTileSkip;
    // n_visits of them (the plain path: blocks j_begin .. j_end - 1, from 0 but with a key mask from its first kept
    // key's block, up to the block of its last).
    const KeyRow keys{KeyMask ? params.keys.meta + b * params.keys.sb : nullptr};
    auto q_last_of = [&](int q0) { return min(q0 + Br, params.attn.Nq) - 1; };
    auto plain_end = [&](int q0) {
        int end = Causal ? min(ceil_div(params.attn.Nk, Bc), max(0, ceil_div(q_last_of(q0) + diag + 1, Bc)))
                         : ceil_div(params.attn.Nk, Bc);
        if constexpr (KeyMask) end = min(end, ceil_div(keys.hi(), Bc));
        return end;
    };
    int j_begin = KeyMask ? keys.lo() / Bc : 0;
    int j_end = plain_end(q0_of(0)), n_visits = max(0, j_end - j_begin);  // with Mods: of the one Q block
    auto tile_class = [&](int j) {
        return mods.template tile_class_span<Br, Bc>(b, h, q0_of(0), j * Bc, params.mods.cls_tq, params.mods.cls_tk);
    };
    if constexpr (Mods) {
        const int q0 = q0_of(0);
        j_begin = max(0, q0 + mods.diag - mods.left) / Bc;
        j_end = min(ceil_div(params.attn.Nk, Bc), max(0, ceil_div(q_last_of(q0) + mods.diag + mods.right + 1, Bc)));
        n_visits = max(0, j_end - j_begin);
        if (params.mods.tile_cls != nullptr) {  // the whole block, before the warpgroups part
            auto skipped = [&](int j) { return tile_class(j) == kTileSkip; };
            n_visits = trim_skipped<kConsumerThreads + 128, true>(j_begin, j_end, skipped, tid);
        }
    }
    auto next_block = [&](int j) {
        if constexpr (Mods)
            while (j < j_end && params.mods.tile_cls != nullptr && tile_class(j) == kTileSkip) ++j;
        return j;
    };

    if (tid == 0) {
        mbar_init(q_full, 1);
        mbar_init(q_empty, kConsumerThreads);
        for (int s = 0; s < kStages; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), kConsumerThreads);
            mbar_init(v_empty(s), kConsumerThreads);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();  // the barriers are initialised before anyone arrives or waits

    // Registers: 65536 per SM at launch, 65536 / threads each; the producer gives back all but 24, which the
    // consumers take (two: 168 - 24 = 2 · (240 - 168); three: 128 - 24 >= 3 · (160 - 128)).
    constexpr int kConsumerRegs = kConsumers == 2 ? 240 : 160;
    if (wg == kConsumers) {  // producer
        regs_dealloc<24>();
        if (tid == kConsumerThreads) {  // one thread issues every copy
            for (int tile = 0, g = 0; tile < n_tiles; ++tile) {  // g: blocks loaded before, their ring slot and phase
                const int q0 = q0_of(tile);
                if (tile > 0) {
                    j_end = plain_end(q0);
                    mbar_wait(q_empty, (tile - 1) & 1);  // the consumers' last S GEMM of the previous Q block
                }
                mbar_arrive_expect_tx(q_full, TileQ::bytes());
                tma_tile<Br, D>(sQ, params.tm_q, q0, h, b, q_full);
                for (int j = next_block(j_begin); j < j_end; ++g, j = next_block(j + 1)) {
                    mbar_wait(k_empty(g), phase(g) ^ 1);
                    if constexpr (Mods) {  // seen by the consumers' wait on k_full (release)
                        const bool read = mods.has_bias() && tile_class(j) == kTileRead;
                        st_shared_s32(sJ(g), 2 * j + read);
                    }
                    mbar_arrive_expect_tx(k_full(g), TileKV::bytes());
                    tma_tile<Bc, D>(sK(g), params.tm_k, j * Bc, h / params.attn.group, b, k_full(g));
                    mbar_wait(v_empty(g), phase(g) ^ 1);
                    mbar_arrive_expect_tx(v_full(g), TileKV::bytes());
                    tma_tile<Bc, D>(sV(g), params.tm_v, j * Bc, h / params.attn.group, b, v_full(g));
                }
            }
        }
        return;
    }

    regs_alloc<kConsumerRegs>();
    const int wg_row0 = wg * 64, warp_row0 = wg_row0 + (warp % 4) * 16;
    auto desc_q = [&](int kk) { return TileQ::desc_k(sQ, wg_row0, kk); };
    float acc_o[DO / 8][4];
    u32 p[Bc / 16][4];  // P_{j-1} as A fragments
    auto issue_pv = [&](int it) {
#pragma unroll
        for (int kk = 0; kk < Bc / 16; ++kk)
            Wgmma<T, DO>::template rs<1>(acc_o, p[kk], TileKV::desc_mn(sV(it), kk), 1);
        wgmma_commit();
    };

    // Ping-pong (two consumers): warpgroup w issues its GEMMs after barrier 1 + w, which the other warpgroup arrives
    // at once it has issued its own. Warpgroup 1 lets warpgroup 0 go first; the turns run on across Q blocks (taken
    // anew in each, the arrival and wait sat in a warpgroup-divergent branch between wgmma and ptxas serialized them:
    // C7519).
    if (kPingPong && wg == 1) named_arrive(1, 256);
    const bool scale_first = Mods && !mods.softcap() && !(params.attn.scale_log2 > 0.f);  // the softmax's note
    for (int tile = 0, g0 = 0; tile < n_tiles; ++tile, g0 += n_visits) {  // g0: blocks before this Q block's
        const int q0 = q0_of(tile), q_last = q_last_of(q0);
        if (tile > 0) n_visits = max(0, plain_end(q0) - j_begin);
        // A key mask with holes masks every block by its bits; without, only the blocks of its first and last key.
        const bool key_holes = KeyMask && keys.holes();
        float m_i[2] = {-inf_f(), -inf_f()};
        float l_i[2] = {0.f, 0.f};
#pragma unroll
        for (int i = 0; i < DO / 8; ++i) acc_o[i][0] = acc_o[i][1] = acc_o[i][2] = acc_o[i][3] = 0.f;
        mbar_wait(q_full, tile & 1);
        for (int n = 0; n < n_visits; ++n) {  // n: this Q block's blocks done before this one
            const int g = g0 + n;  // the ring slot and phase
            mbar_wait(k_full(g), phase(g));
            const int j_how = Mods ? lds_s32(sJ(g)) : 0;
            const int j = Mods ? j_how >> 1 : j_begin + n;
            const int k0 = j * Bc;
            if (n > 0) mbar_wait(v_full(g - 1), phase(g - 1));
            // Dropout's Philox words, drawn before this warpgroup's turn at the GEMMs (under the other's); after the
            // exponentials they sat on the softmax's critical path, and between the GEMMs' issue and wait ptxas
            // serialized the wgmma (C7514).
            U4 rnd[Dropout ? Bc / 32 : 1];
            if constexpr (Dropout) {
                if (mods.dropout())
                    mods.template draw<Bc / 8>(rnd, (i64)b * H + h, q0 + warp_row0 + lane / 4, k0 + 2 * (lane % 4));
            }
            float s[Bc / 8][4];
#pragma unroll
            for (int nt = 0; nt < Bc / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            if constexpr (kPingPong) named_sync(1 + wg, 256);
            fence_operands(s);
            fence_operands(acc_o);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < head_k_steps(DHead); ++kk)
                Wgmma<T, Bc>::template ss<0, 0>(s, desc_q(kk), TileKV::desc_k(sK(g), 0, kk), kk > 0);
            wgmma_commit();
            if (n > 0) issue_pv(g - 1);
            if (n > 0)
                wgmma_wait<1>();
            else
                wgmma_wait<0>();
            fence_operands(s);
            // Arriving between the commit and the wait made ptxas serialize every wgmma (C7514).
            if constexpr (kPingPong) named_arrive(2 - wg, 256);
            mbar_arrive(k_empty(g));

            // Accumulator element (nt, e) of this lane: row lane/4 + 8·(e/2), key nt·8 + 2·(lane%4) + e%2 of the
            // tile.
            auto row_of = [&](int e) { return q0 + warp_row0 + lane / 4 + (e >> 1) * 8; };
            auto col_of = [&](int nt, int e) { return k0 + nt * 8 + 2 * (lane % 4) + (e & 1); };
            // The logits in log2 units are s · s_scale, s_scale > 0: the softmax takes the row max on s and folds the
            // factor into its exp2's FFMA.
            float s_scale = params.attn.scale_log2;
            auto scale_in_place = [&] {  // s · s_scale in place, the logits in log2 units: s_scale becomes 1
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) s[nt][e] *= s_scale;
                s_scale = 1.f;
            };
            if constexpr (Mods) {
                // As flash_fwd.cuh's logits: cap, bias on the blocks whose tile reads it, then the visibility mask on
                // the blocks that cross the sequence end or a window edge. One uniform branch around each loop (a
                // branch per score would be if-converted into every block). s is scaled first for a scale <= 0
                // (launch.ScoreMods.scale_not_positive: a row max on s would be its min, or 0 · -inf; with dropout
                // that multiply, beside its Philox words held from before the GEMMs, spilled 20 B at d128); the bias
                // is added in s's units (scores.cuh biased), so a block that reads it takes no multiply a score.
                s_scale = mods.template cap_scores<T, Bc / 8>(s, s_scale);
                if (scale_first) scale_in_place();
                if (j_how & 1) {
#pragma unroll
                    for (int r = 0; r < 2; ++r)  // rows past Nq read row Nq - 1's bias: they are never stored
                        mods.template add_bias_row<T, Bc / 8>(
                            s, r, mods.bias_row(b, h, min(row_of(2 * r), params.attn.Nq - 1)), col_of(0, 0), s_scale);
                }
                if (k0 + Bc > params.attn.Nk || k0 + Bc - 1 > q0 + mods.diag + mods.right ||
                    k0 < q_last + mods.diag - mods.left) {
#pragma unroll
                    for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!mods.visible(row_of(e), col_of(nt, e))) s[nt][e] = -inf_f();
                }
            } else if (k0 + Bc > params.attn.Nk || (Causal && k0 + Bc - 1 > q0 + diag) ||
                       (KeyMask && (n == 0 || n == n_visits - 1 || key_holes))) {
                // Masked scores (keys past Nk; causal: keys after row + diag; keys outside the key mask's [lo, hi))
                // on the blocks that have any: the columns kept are first .. lim - 1 of each row, one unsigned
                // compare of c - first per score; then a key mask's holes by its bits.
                const int first = KeyMask ? max(0, keys.lo() - k0) : 0;
                u32 span[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    int lim = (Causal ? min(params.attn.Nk, q0 + warp_row0 + lane / 4 + 8 * r + diag + 1)
                                      : params.attn.Nk) - k0;
                    if constexpr (KeyMask) lim = min(lim, keys.hi() - k0);
                    span[r] = static_cast<u32>(max(0, lim - first));
                }
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int c = nt * 8 + 2 * (lane % 4) + (e & 1);
                        if (static_cast<u32>(c - first) >= span[e >> 1]) s[nt][e] = -inf_f();
                    }
                if (key_holes) {
                    u32 bits[(Bc + 31) / 32];
                    keys.bits_from(k0, bits);
#pragma unroll
                    for (int nt = 0; nt < Bc / 8; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            if (!((bits[nt / 4] >> ((nt % 4) * 8 + 2 * (lane % 4) + (e & 1))) & 1u))
                                s[nt][e] = -inf_f();
                }
            }
            // m_i is in log2 units; exp2(s · s_scale - m) is one FFMA per score. Lazy rescaling (FlashAttention-4's:
            // flash_attn/cute/softmax.py SoftmaxSm100, rescale_threshold 8 for 16-bit inputs): m_i, and with it O and
            // l, move only where some row of the warp would otherwise see a P above 2^kRescaleSlack; P stays in fp16's
            // range, O and l carry the same factor, and most blocks after a row's first skip the multiply of O.
            float mx[2], alpha[2] = {1.f, 1.f};
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                mx[r] = -inf_f();
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt) mx[r] = fmaxf(mx[r], fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
                mx[r] = warp_max4(mx[r]) * s_scale;
            }
            if constexpr (Mods) {
                // A block that added its bias in s's units can hold logits of any size (a bias of -1e9 on every key
                // of a row): there exp2's FFMA, s · s_scale - m unrounded, exceeds the rounded row max m by up to half
                // its ulp (2^6 at 2^30), and P overflowed fp16. Past 2^20 the block's scores take the multiply,
                // rounded as m was.
                if (j_how & 1) {
                    const bool huge = (fabsf(mx[0]) >= 0x1p20f && mx[0] != -inf_f()) ||
                                      (fabsf(mx[1]) >= 0x1p20f && mx[1] != -inf_f());
                    if (__any_sync(0xffffffffu, huge)) scale_in_place();
                }
            }
            const bool rescale = !kLazyRescale || __any_sync(0xffffffffu, mx[0] > m_i[0] + kRescaleSlack ||
                                                                              mx[1] > m_i[1] + kRescaleSlack);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (rescale) {
                    const float m_new = fmaxf(m_i[r], mx[r]);
                    alpha[r] = fast_exp2(m_i[r] - (m_new == -inf_f() ? 0.f : m_new));
                    m_i[r] = m_new;
                }
                const float m_use = m_i[r] == -inf_f() ? 0.f : m_i[r];
                float row_sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < Bc / 8; ++nt) {
                    s[nt][2 * r] = fast_exp2(fmaf(s[nt][2 * r], s_scale, -m_use));
                    s[nt][2 * r + 1] = fast_exp2(fmaf(s[nt][2 * r + 1], s_scale, -m_use));
                    row_sum += s[nt][2 * r] + s[nt][2 * r + 1];
                }
                l_i[r] = l_i[r] * alpha[r] + row_sum;  // l counts every key: dropout acts after the softmax
            }
            wgmma_wait<0>();  // P_{j-1} V_{j-1} is in acc_o; p and V_{j-1}'s slot are free
            fence_operands(acc_o);
            if (n > 0) mbar_arrive(v_empty(g - 1));
            if (rescale) {
#pragma unroll
                for (int dt = 0; dt < DO / 8; ++dt) {
                    acc_o[dt][0] *= alpha[0];
                    acc_o[dt][1] *= alpha[0];
                    acc_o[dt][2] *= alpha[1];
                    acc_o[dt][3] *= alpha[1];
                }
            }
#pragma unroll
            for (int kk = 0; kk < Bc / 16; ++kk) acc_to_a<T>(p[kk], s, kk);
            if constexpr (Dropout) {
                if (mods.dropout()) mods.template drop_packed<Bc / 8>(p, rnd, params.mods.keep_threshold);
            }
        }
        mbar_arrive(q_empty);  // every S GEMM of this Q block is done: the producer may load the next one
        if (n_visits > 0) {
            const int g = g0 + n_visits - 1;
            mbar_wait(v_full(g), phase(g));
            fence_operands(acc_o);
            wgmma_fence();
            issue_pv(g);
            wgmma_wait<0>();
            fence_operands(acc_o);
            mbar_arrive(v_empty(g));  // for the next Q block's loads
        }

        typename T::elem* __restrict__ o = params.o + b * params.o_s.b + h * params.o_s.h + q0 * params.o_s.n;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float l = warp_sum4(l_i[r]);
            // dropout: O / keep probability
            const float inv_l = l > 0.f ? (Mods ? params.mods.inv_keep : 1.f) / l : 0.f;
            const int row = warp_row0 + lane / 4 + r * 8;
            if (q0 + row < params.attn.Nq) {
                typename T::elem* o_row = o + row * params.o_s.n;
#pragma unroll
                for (int dt = 0; dt < DHead / 8; ++dt)
                    store2<T>(o_row + dt * 8 + 2 * (lane % 4), acc_o[dt][2 * r] * inv_l, acc_o[dt][2 * r + 1] * inv_l);
                if (lane % 4 == 0)
                    params.lse[((i64)b * H + h) * params.attn.Nq + q0 + row] =
                        l > 0.f ? (m_i[r] + log2f(l)) * kLn2 : inf_f();
            }
        }
    }
    if (kPingPong && wg == 0) named_sync(1, 256);  // matches warpgroup 1's last arrival
}

}  // namespace cupyflash
