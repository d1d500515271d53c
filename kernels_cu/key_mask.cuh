// Key padding on the plain Hopper kernels: a boolean keep-mask over the keys, one row per batch ((Bb, 1, 1, Nk),
// broadcast over heads and queries: transformers' attention_mask[:, None, None, :]), which the attention kernels read
// as one meta row per batch that key_mask_prep writes before them:
//   ints [lo, hi, contiguous, 0]: the first kept key and one past the last (0, 0 where none is kept), and whether
//   every key in [lo, hi) is kept (right or left padding); then the keep bits, key 32·w + i in bit i of word w.
// The forward visits only the K/V blocks over [lo, hi) and masks the first and last of them (or, where the kept keys
// have holes, every block by its bits); the backward's thread blocks past [lo, hi) write zero dK, dV at once. A score
// mod beside the mask (window, soft-cap, dropout) takes it as an additive bias instead (cupyflash/plan.py).
#pragma once
#include "params.cuh"

namespace cupyflash {

constexpr int kKeyMetaHead = 4;  // the meta row's ints before its words
constexpr int kKeyMaskThreads = 256;

// The meta row of batch row `b`: KeyMaskArgs.meta + b · sb (sb = 0 for a mask broadcast over the batch).
struct KeyRow {
    const int* row;
    CF_DEVICE int lo() const { return row[0]; }
    CF_DEVICE int hi() const { return row[1]; }
    CF_DEVICE bool holes() const { return row[2] == 0; }
    // The keep bits of keys k0 .. k0 + 32·N - 1, key k0 + 32·i + j in bit j of bits[i]: N + 1 loads and funnel
    // shifts (k0 need not be a multiple of 32), where a load per score pair (22 on a 176-key block) spilled the
    // forward's d128 tile beside S, O and P.
    template <int N>
    CF_DEVICE void bits_from(int k0, u32 (&bits)[N]) const {
        const int* w = row + kKeyMetaHead + (k0 >> 5);
        u32 next = static_cast<u32>(w[0]);
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const u32 cur = next;
            next = static_cast<u32>(w[i + 1]);
            bits[i] = __funnelshift_r(cur, next, k0 & 31);
        }
    }
    CF_DEVICE bool kept(int c) const { return (static_cast<u32>(row[kKeyMetaHead + (c >> 5)]) >> (c & 31)) & 1u; }
};

// One thread block per batch row of the mask: each warp forms words from 32 keys' bytes at a time (a ballot), and the
// block's lanes 0 reduce lo, hi and the kept count in shared memory. Words past Nk (up to `words`: the kernels read
// whole tiles past the last key, and one word more) are zero.
__global__ void __launch_bounds__(kKeyMaskThreads) key_mask_prep(const KeyMaskPrepParams params) {
    const unsigned char* __restrict__ mask = params.mask + blockIdx.x * params.mask_sb;
    int* __restrict__ row = params.meta + blockIdx.x * params.meta_sb;
    const int Nk = params.Nk;
    const i64 sn = params.mask_sn;
    __shared__ int s_lo, s_hi, s_count;
    if (threadIdx.x == 0) {
        s_lo = Nk;
        s_hi = 0;
        s_count = 0;
    }
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int lo = Nk, hi = 0, count = 0;
    for (int w = warp; w < params.words; w += kKeyMaskThreads / 32) {
        const int key = w * 32 + lane;
        const u32 bits = __ballot_sync(0xffffffffu, key < Nk && mask[key * sn] != 0);
        if (lane == 0) row[kKeyMetaHead + w] = static_cast<int>(bits);
        if (bits != 0u) {  // the same in every lane
            lo = min(lo, w * 32 + __ffs(bits) - 1);
            hi = max(hi, w * 32 + 32 - __clz(bits));
            count += __popc(bits);
        }
    }
    if (lane == 0) {
        atomicMin(&s_lo, lo);
        atomicMax(&s_hi, hi);
        atomicAdd(&s_count, count);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool any = s_hi > s_lo;
        row[0] = any ? s_lo : 0;
        row[1] = any ? s_hi : 0;
        row[2] = s_count == (any ? s_hi - s_lo : 0);
        row[3] = 0;
    }
}

}  // namespace cupyflash
