// What turns raw Q·Kᵀ into the logits the softmax sees, and the dropout mask applied to its output; shared by
// the forward and the backward so both see exactly the same function.
//
//   logit(i, j) = scale · q_i·k_j + bias[b, h, i, j]      (log2 units inside the kernels: × log2 e)
//   key j is visible to query i iff  i + diag - left <= j <= i + diag + right  and  j < Nk,
//   with diag = Nk - Nq (masks aligned to the bottom-right corner, as FlashAttention 2.1+); causal is right = 0.
#pragma once
#include "common.cuh"

namespace cupyflash {

// A bias at or below kMaskedBias (finfo.min of fp32 or bf16, or -inf) masks its key. Eager PyTorch absorbs the
// score there (finfo.min + s == finfo.min), so the logit carries no score: it becomes the constant
// kMaskedLogit2 (-inf stays -inf). Beside any key whose logit exceeds about -3900 (log2 units) such a key gets
// weight exp2(-4096 - m) = 0 in fp32; a row with only such keys attends uniformly, as eager softmax does; and
// the LSE of that row, (kMaskedLogit2 + log2 l) · ln 2 ≈ -2839, holds log(l) to about 2^-12, so the backward
// recomputes P = 1/l for it (a larger magnitude would round log(l) away).
constexpr float kMaskedBias = -1e30f;
constexpr float kMaskedLogit2 = -4096.f;

struct U4 {
    u32 x, y, z, w;
};

// Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11), the counter-based
// generator behind torch's and cuRAND's GPU dropout: the backward regenerates the forward's mask from
// (seed, element) alone.
CF_DEVICE U4 philox(U4 c, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const u32 lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const u32 lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
        k0 += 0x9E3779B9u;  // golden-ratio key schedule
        k1 += 0xBB67AE85u;
    }
    return c;
}

constexpr int kNoWindow = 1 << 30;  // a window edge farther than any sequence (launch.py's NO_WINDOW)

// Bias tile classes (cupyflash/tile_classes.py computes them on the GPU at every call, one per tile of the
// pass's Br x Bc): skip = contributes nothing, zero = adds nothing (no bias read), read = read per element.
enum TileClass : int { kTileSkip = 0, kTileZero = 1, kTileRead = 2 };

// Enabled = false is the plain path (at most causal): the compiler drops the bias, window and dropout code, whose
// registers and instructions otherwise cost the plain kernels about a third of their speed. Dropout has a flag
// of its own: its unrolled Philox rounds alone made a kernel without dropout 3x slower (H200, d64).
template <bool Enabled, bool Dropout>
struct ScoreMods {
    const void* bias;  // nullptr: no bias
    i64 bias_sb, bias_sh, bias_sm, bias_sn;  // strides in elements, 0 along broadcast dims
    int bias_f32;                            // 1: fp32 bias, 0: bias in the element type of q
    const signed char* tile_cls;             // TileClass per (b, h, Q block, K block); nullptr: all kTileRead
    i64 cls_sb, cls_sh, cls_sm, cls_sn;      // strides, 0 along the bias's broadcast dims
    int Nq, Nk, diag, left, right;           // visibility window, see the top of this file
    u32 keep_threshold;                      // dropout keeps an element iff its random word < this
    u32 seed_lo, seed_hi;

    CF_DEVICE bool visible(int row, int col) const {
        return col < Nk && col <= row + diag + right && col >= row + diag - left;
    }

    CF_DEVICE bool has_bias() const { return Enabled && bias != nullptr; }

    CF_DEVICE int tile_class(int b, int h, int q_block, int k_block) const {
        if (!Enabled || tile_cls == nullptr) return kTileRead;
        return tile_cls[b * cls_sb + h * cls_sh + q_block * cls_sm + k_block * cls_sn];
    }
    CF_DEVICE bool dropout() const { return Dropout && keep_threshold != 0xffffffffu; }

    // The random words of elements (row, col) and (row, col + 1), col even, of head `bh` = b·H + h.
    CF_DEVICE U4 random_pair(i64 bh, int row, int col) const {
        return philox(U4{(u32)col >> 1, (u32)row, (u32)bh, (u32)(bh >> 32)}, seed_lo, seed_hi);
    }

    // x = scale · log2 e · q·k for (row, col) of head (b, h); returns the logit in log2 units. row < Nq and
    // col < Nk are the caller's to check.
    template <typename T>
    CF_DEVICE float add_bias(float x, int b, int h, int row, int col) const {
        const i64 off = b * bias_sb + h * bias_sh + row * bias_sm + col * bias_sn;
        const float bv = bias_f32 ? static_cast<const float*>(bias)[off]
                                  : T::to_float(static_cast<const u16*>(bias)[off]);
        if (bv <= kMaskedBias) return bv == -inf_f() ? -inf_f() : kMaskedLogit2;
        return fmaf(bv, kLog2e, x);
    }
};

}  // namespace cupyflash
