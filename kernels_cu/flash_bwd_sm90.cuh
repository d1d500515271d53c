// Backward on Hopper (sm_90a), after FlashAttention-3's (https://arxiv.org/abs/2407.08608): one thread block per
// Bc = 128 keys of one K/V head holds K_j and V_j in shared memory and dK_j, dV_j in registers, while a producer
// warpgroup streams the (query head, Q block) pairs that see those keys (Q_i and dO_i, Br = 64 rows, two slots)
// with TMA. Each of two consumer warpgroups owns 64 of the keys and per Q block runs on wgmma:
//   Sᵀ = K Q_iᵀ and dPᵀ = V dO_iᵀ (64 keys x Br), Pᵀ = exp2(Sᵀ·scale·log2 e − LSE·log2 e), dSᵀ = Pᵀ ∘ (dPᵀ − D_i),
//   dV += Pᵀ dO_i and dK += dSᵀ Q_i with Pᵀ, dSᵀ as register A operands,
//   dQ_i += dS K_j: both halves of dSᵀ go through shared memory, and each warpgroup adds D/2 of dQ_i's columns into
//   the fp32 accumulator (red.global.add.v4), or, where the tensors' columns fit in D/2, the sum over its 64 keys of
//   all of them.
// A second producer warp stages LSE_i · log2 e and D_i in shared memory beside each Q/dO slot.
// The plain path only: 16-bit types, at most a causal mask (cupyflash/launch.py sends everything else to
// flash_bwd.cuh). flash_bwd.cuh's flash_bwd_preprocess (D) and flash_bwd_convert_dq run before and after.
#pragma once
#include "common.cuh"
#include "wgmma.cuh"

namespace cupyflash {

// Tile sizes: cupyflash/tiles.py BACKWARD_SM90. D and DHead as in flash_fwd_sm90.cuh: tiles of D columns, tensors of
// DHead (dQ_accum too), the columns past DHead zero, skipped by Sᵀ and dPᵀ (head_k_steps) and never stored.
template <typename T, int D, int DHead, bool Causal, int Br, int Bc, int kStages>
__global__ void __launch_bounds__(384, 1)
flash_bwd_sm90_kernel(const __grid_constant__ TmaDesc tm_q, const __grid_constant__ TmaDesc tm_k,
                      const __grid_constant__ TmaDesc tm_v, const __grid_constant__ TmaDesc tm_do,
                      const float* __restrict__ lse, const float* __restrict__ d_vec, float* __restrict__ dq_accum,
                      typename T::elem* __restrict__ dk, typename T::elem* __restrict__ dv, i64 dk_sb, i64 dk_sh,
                      i64 dk_sn, i64 dv_sb, i64 dv_sh, i64 dv_sn, int Nq, int Nk, int group, float scale_log2,
                      float scale) {
    static_assert(DHead <= D && DHead % 8 == 0, "16-byte rows within the tiles");
    constexpr int DKV = head_cols(D, DHead);  // dK's and dV's columns
    // dQ_i's split between the warpgroups: by columns (D/2 each, over all Bc keys), or where DHead fits in D/2 (d32 on
    // 64-column tiles, whose second half is zeros) by keys (64 each, over all DHead columns, both adding into them).
    constexpr bool kDqByKeys = DHead <= D / 2;
    static_assert(Bc == 128 && Br == 64, "two consumer warpgroups of 64 keys; the LSE / D warp's two rows per lane");
    using TileKV = SwTile<Bc, D>;
    using TileQ = SwTile<Br, D>;
    using TileDS = SwTile<Bc, Br>;  // dSᵀ: rows = keys, columns = queries

    extern __shared__ __align__(128) unsigned char smem[];
    const u32 sK = (smem_addr(smem) + 1023) & ~1023u;  // swizzle atoms are 1024-byte aligned (launch: +1 KiB)
    const u32 sV = sK + TileKV::bytes();
    const u32 sQ0 = sV + TileKV::bytes();
    const u32 sdO0 = sQ0 + kStages * TileQ::bytes();
    const u32 sdS0 = sdO0 + kStages * TileQ::bytes();
    const u32 sRow0 = sdS0 + 2 * TileDS::bytes();  // per stage: LSE_i · log2 e, then D_i (Br floats each)
    const u32 bars = sRow0 + kStages * 2 * Br * 4;  // kv_full, qdo_full[S], q_empty[S]
    auto sQ = [&](int it) { return sQ0 + (it % kStages) * TileQ::bytes(); };
    auto sdO = [&](int it) { return sdO0 + (it % kStages) * TileQ::bytes(); };
    auto sdS = [&](int it) { return sdS0 + (it % 2) * TileDS::bytes(); };
    auto sLse = [&](int it) { return sRow0 + (it % kStages) * 2 * Br * 4; };
    const u32 kv_full = bars;
    auto qdo_full = [&](int it) { return bars + 8 * (1 + it % kStages); };
    auto q_empty = [&](int it) { return bars + 8 * (1 + kStages + it % kStages); };
    auto phase = [](int it) { return (it / kStages) & 1; };

    const int k0 = blockIdx.x * Bc;
    const int h_kv = blockIdx.y, b = blockIdx.z, H = gridDim.y * group;  // H: query heads
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wg = warp / 4;
    const int diag = Nk - Nq;
    // Query blocks that see a key of this block: causal, i + diag >= k0 for some row i of the block.
    const int i_begin = Causal ? max(0, k0 - diag) / Br : 0;
    const int i_end = ceil_div(Nq, Br);
    const int n_blocks = max(0, i_end - i_begin);
    const int n_pairs = group * n_blocks;  // (query head in the group, Q block) pairs
    auto head_of = [&](int it) { return h_kv * group + it / n_blocks; };
    auto block_of = [&](int it) { return i_begin + it % n_blocks; };

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
        if (warp == 9) {  // LSE_i · log2 e and D_i into shared memory; rows past Nq: P = exp2(s - inf) = 0, D = 0
            static_assert(Br == 64, "two rows per lane");
            for (int it = 0; it < n_pairs; ++it) {
                const int q0 = block_of(it) * Br;
                const i64 row0 = ((i64)b * H + head_of(it)) * Nq + q0;
                mbar_wait(q_empty(it), phase(it) ^ 1);
                const u32 dst = sLse(it) + 4 * lane;
#pragma unroll
                for (int r = 0; r < Br; r += 32) {
                    const bool ok = q0 + r + lane < Nq;
                    st_shared_f32(dst + 4 * r, ok ? lse[row0 + r + lane] * kLog2e : inf_f());
                    st_shared_f32(dst + 4 * (Br + r), ok ? d_vec[row0 + r + lane] : 0.f);
                }
                mbar_arrive(qdo_full(it));  // release: the stores are seen by the consumers' wait
            }
        }
        if (tid == 256) {  // one thread issues every copy
            mbar_arrive_expect_tx(kv_full, 2 * TileKV::bytes());
            tma_tile<Bc, D>(sK, tm_k, k0, h_kv, b, kv_full);
            tma_tile<Bc, D>(sV, tm_v, k0, h_kv, b, kv_full);
            for (int it = 0; it < n_pairs; ++it) {
                mbar_wait(q_empty(it), phase(it) ^ 1);
                mbar_arrive_expect_tx(qdo_full(it), 2 * TileQ::bytes());
                tma_tile<Br, D>(sQ(it), tm_q, block_of(it) * Br, head_of(it), b, qdo_full(it));
                tma_tile<Br, D>(sdO(it), tm_do, block_of(it) * Br, head_of(it), b, qdo_full(it));
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

    mbar_wait(kv_full, 0);
    for (int it = 0; it < n_pairs; ++it) {
        const int hq = head_of(it), q0 = block_of(it) * Br;
        const i64 bh = (i64)b * H + hq;
        mbar_wait(qdo_full(it), phase(it));
        // K's and V's descriptors recomputed per block from opaque bases: hoisted out of the loop, the 40 of them
        // spilled (184 bytes on d128).
        u32 k_base = sK, v_base = sV;
        asm volatile("" : "+r"(k_base), "+r"(v_base));

        float st[Br / 8][4], dpt[Br / 8][4];  // Sᵀ and dPᵀ: rows = this warpgroup's keys, columns = queries
        fence_operands(st);
        fence_operands(dpt);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < head_k_steps(DHead); ++kk)
            Wgmma<T, Br>::template ss<0, 0>(st, TileKV::desc_k(k_base, key_row0, kk), TileQ::desc_k(sQ(it), 0, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < head_k_steps(DHead); ++kk)
            Wgmma<T, Br>::template ss<0, 0>(dpt, TileKV::desc_k(v_base, key_row0, kk), TileQ::desc_k(sdO(it), 0, kk), kk > 0);
        wgmma_commit();

        // Masked scores, as one compare per score: those of columns below a per-row limit (keys past Nk: the whole
        // row; causal: the queries before key - diag).
        int lim[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) lim[r] = key0 + 8 * r >= Nk ? Br : Causal ? key0 + 8 * r - diag - q0 : 0;
        wgmma_wait<1>();  // Sᵀ; dPᵀ still running
        fence_operands(st);
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
            float lse2[2];
            lds_f32x2(lse2[0], lse2[1], sLse(it) + 4 * (nt * 8 + 2 * (lane % 4)));
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    float& x = st[nt][2 * r + c];
                    x = nt * 8 + 2 * (lane % 4) + c < lim[r] ? 0.f : fast_exp2(x * scale_log2 - lse2[c]);
                }
        }
        wgmma_wait<0>();  // dPᵀ
        fence_operands(dpt);
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt) {
            float d_i[2];
            lds_f32x2(d_i[0], d_i[1], sLse(it) + 4 * (Br + nt * 8 + 2 * (lane % 4)));
#pragma unroll
            for (int c = 0; c < 2; ++c)
#pragma unroll
                for (int r = 0; r < 2; ++r) dpt[nt][2 * r + c] = st[nt][2 * r + c] * (dpt[nt][2 * r + c] - d_i[c]);
        }
        // dSᵀ (in dpt) to shared memory for dQ; Pᵀ and dSᵀ as A fragments for dV and dK. The row is opaque so that
        // the 16 store addresses are recomputed per block, not hoisted and spilled.
        u32 ds_row = key0 - k0;
        asm volatile("" : "+r"(ds_row));
#pragma unroll
        for (int nt = 0; nt < Br / 8; ++nt)  // columns nt·8 + 2·(lane % 4) and the next: in chunk nt
#pragma unroll
            for (int r = 0; r < 2; ++r)
                store2_shared<T>(TileDS::chunk_at(sdS(it), ds_row + 8 * r, nt) + 4 * (lane % 4), dpt[nt][2 * r],
                                 dpt[nt][2 * r + 1]);
        u32 pa[Br / 16][4], dsa[Br / 16][4];
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) {
            acc_to_a<T>(pa[kk], st, kk);
            acc_to_a<T>(dsa[kk], dpt, kk);
        }
        fence_operands(acc_dv);
        fence_operands(acc_dk);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) Wgmma<T, DKV>::template rs<1>(acc_dv, pa[kk], TileQ::desc_mn(sdO(it), kk), 1);
#pragma unroll
        for (int kk = 0; kk < Br / 16; ++kk) Wgmma<T, DKV>::template rs<1>(acc_dk, dsa[kk], TileQ::desc_mn(sQ(it), kk), 1);
        wgmma_commit();

        // dS's stores reach wgmma (the async proxy) after this fence and the barrier that both warpgroups pass.
        fence_proxy_async();
        named_sync(1, 256);
        // dV and dK done (they ran under the barrier): Pᵀ's and dSᵀ's fragments are free before dQ's accumulators
        // are needed; holding both spilled (d128).
        wgmma_wait<0>();
        fence_operands(acc_dv);
        fence_operands(acc_dk);
        // dQ_i[:, cols] = dS[:, keys] K_j[keys, cols], this warpgroup's share (kDqByKeys): A = dS (queries x keys) is
        // dSᵀ in shared memory read MN-major; B = K_j, MN-major.
        constexpr int kk_per_wg = kDqByKeys ? Bc / 32 : Bc / 16;
        const int kk0 = kDqByKeys ? wg * kk_per_wg : 0;
        const u32 k_cols = kDqByKeys ? k_base : k_base + wg * TileKV::col_offset(D / 2);
        float dq[D / 16][4];
        fence_operands(dq);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kk_per_wg; ++kk)
            Wgmma<T, D / 2>::template ss<1, 1>(dq, TileDS::desc_mn(sdS(it), kk0 + kk), TileKV::desc_mn(k_cols, kk0 + kk),
                                               kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dq);
        mbar_arrive(q_empty(it));  // Q_i and dO_i are read
        const int q_row = q0 + (warp % 4) * 16 + lane / 4;
        float* dq_rows = dq_accum + (bh * Nq + q0 + (warp % 4) * 16) * DHead + (kDqByKeys ? 0 : wg * (D / 2));
        // by columns, the second half adds its columns below DHead
        red_add_tile<D / 16>(dq_rows, DHead, dq, q_row < Nq, q_row + 8 < Nq, lane,
                             kDqByKeys ? DHead / 8 : wg == 0 ? D / 16 : (DHead - D / 2) / 8);
    }

    // Epilogue: dK = scale · Σ dSᵀ Q, dV = Σ Pᵀ dO, rows past Nk not written.
    store_dk_dv<T, DHead>(dk + b * dk_sb + h_kv * dk_sh, dv + b * dv_sb + h_kv * dv_sh, dk_sn, dv_sn, key0, Nk, acc_dk,
                      acc_dv, scale, lane);
}

}  // namespace cupyflash
