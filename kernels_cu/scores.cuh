// What turns raw Q·Kᵀ into the logits the softmax sees, and the dropout mask applied to its output; shared by
// the forward and the backward so both see exactly the same function.
//
//   logit(i, j) = cap(scale · q_i·k_j) + bias[b, h, i, j]      (log2 units inside the kernels: × log2 e)
//   cap(x) = softcap · tanh(x / softcap) with soft-capping on (Gemma 2, FlashAttention 2.6's softcap), else x
//   key j is visible to query i iff  i + diag - left <= j <= i + diag + right  and  j < Nk,
//   with diag = Nk - Nq (masks aligned to the bottom-right corner, as FlashAttention 2.1+); causal is right = 0.
#pragma once
#include "params.cuh"

namespace cupyflash {

// A bias at or below kMaskedBias (finfo.min of fp32 or bf16, or -inf) masks its key. Eager PyTorch absorbs the
// score there (finfo.min + s == finfo.min), so the logit carries no score: it becomes the constant
// kMaskedLogit2 (-inf stays -inf). Beside any key whose logit exceeds about -3900 (log2 units) such a key gets
// weight exp2(-4096 - m) = 0 in fp32; a row with only such keys attends uniformly, as eager softmax does; and
// the LSE of that row, (kMaskedLogit2 + log2 l) · ln 2 ≈ -2839, holds log(l) only to about 2^-12 in fp32.
constexpr float kMaskedBias = -1e30f;
constexpr float kMaskedLogit2 = -4096.f;
// The rebuild rule (cupyflash/cpu_attention.py): in a backward with a bias, rows whose saved LSE (natural units) is
// below kLseRebuild take P = exp2((s - m) - log2 l) from their own max m and sum l (the forward's stats pass), not
// exp2(s - LSE): fp32 cannot hold such an LSE finely enough (a row of -1e9 fills even rounds log2 l away).
constexpr float kLseRebuild = kMaskedLogit2 / 2 * kLn2;

struct U4 {
    u32 x, y, z, w;
};

// Philox4x32-7 (Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC'11), the counter-based
// generator behind GPU dropout: the backward regenerates the forward's mask from (seed, element) alone. Seven rounds,
// as FlashAttention-2's dropout (csrc/flash_attn/src/philox.cuh): the paper finds Philox4x32 with 7 rounds passing
// TestU01's BigCrush (10, torch's and cuRAND's, adds a safety margin), and its multiplies were what made dropout the
// slowest score mod (H200, d128: 1.93x the plain forward with 10 rounds).
constexpr int kPhiloxRounds = 7;
CF_DEVICE U4 philox(U4 c, u32 k0, u32 k1) {
#pragma unroll
    for (int round = 0; round < kPhiloxRounds; ++round) {
        const u32 lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
        const u32 lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
        c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
        k0 += 0x9E3779B9u;  // golden-ratio key schedule
        k1 += 0xBB67AE85u;
    }
    return c;
}

// tanh for soft-capping. 16-bit inputs: tanh.approx.f32, one MUFU op (relative error at most 2^-10.99, PTX ISA), as
// FlashAttention-2/3's cutlass::fast_tanh: a capped score is then as exact as its own 16-bit rounding in eager
// PyTorch (2^-9 relative in bf16, 2^-11 in fp16). The accurate tanhf took two MUFU ops and a dozen FMAs per score
// beside the softmax's exp2, and the MUFU pipe (16 per clock per SM) outlasted the tensor cores: the soft-capped
// forward ran at 2.0x the plain one (H100, d128). fp32 inputs (TF32 kernels) keep tanhf.
template <typename T>
CF_DEVICE float cap_tanh(float x) {
    if constexpr (T::kTF32) {
        return tanhf(x);
    } else {
        float y;
        asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
        return y;
    }
}

constexpr int kNoWindow = 1 << 30;  // a window edge farther than any sequence (cupyflash/params.py NO_WINDOW)

// Bias tile classes (cupyflash/tile_classes.py computes them on the GPU at every call, one per tile of the
// pass's Br x Bc): skip = contributes nothing, zero = adds nothing (no bias read), read = read per element.
enum TileClass : int { kTileSkip = 0, kTileZero = 1, kTileRead = 2 };

// A bias element as float: fp32 as is, 16-bit biases in q's element type.
template <typename T>
CF_DEVICE float bias_float(float x) { return x; }
template <typename T>
CF_DEVICE float bias_float(u16 x) { return T::to_float(x); }

// Two adjacent bias elements at p (aligned to their pair) in one load.
template <typename T>
CF_DEVICE void load_pair(const float* p, float (&out)[2]) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = v.x;
    out[1] = v.y;
}
template <typename T>
CF_DEVICE void load_pair(const u16* p, float (&out)[2]) {
    const u32 w = __ldg(reinterpret_cast<const u32*>(p));
    out[0] = T::to_float((u16)(w & 0xffffu));
    out[1] = T::to_float((u16)(w >> 16));
}

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
    u32 keep_threshold;                      // dropout keeps an element iff its 8-bit number < this
    u32 seed_lo, seed_hi;
    float cap_in, cap_out;                   // soft-capping: scale / softcap and softcap · log2 e; cap_out = 0: off
    bool pairs;  // a lane's two adjacent keys are one aligned load: unit key stride, even Nk and row offsets

    CF_DEVICE bool visible(int row, int col) const {
        return col < Nk && col <= row + diag + right && col >= row + diag - left;
    }

    CF_DEVICE bool has_bias() const { return Enabled && bias != nullptr; }

    // The Q blocks [x, y) of Br rows that see a key of the Bc keys from k0 (the backward's loop over them): causal,
    // i + diag >= k0 for some row i of the block; with the mods on, i + diag - left <= j <= i + diag + right for some
    // key j of them.
    template <bool Causal, int Br, int Bc>
    CF_DEVICE int2 q_blocks_seeing(int k0) const {
        if constexpr (Enabled)
            return make_int2(max(0, k0 - diag - right) / Br, ceil_div(min(Nq, max(0, k0 + Bc - diag + left)), Br));
        return make_int2(Causal ? max(0, k0 - diag) / Br : 0, ceil_div(Nq, Br));
    }

    CF_DEVICE int tile_class(int b, int h, int q_block, int k_block) const {
        if (!Enabled || tile_cls == nullptr) return kTileRead;
        return tile_cls[b * cls_sb + h * cls_sh + q_block * cls_sm + k_block * cls_sn];
    }
    // The class of the calling kernel's tile of Rows x Cols (rows q0.., keys k0..), made of whole tiles of the
    // classes' own grid, tq x tk (the faces classify for the mma.sync pass's tiles, which divide the Hopper
    // kernels'): kTileSkip if every class tile in it is, kTileZero if every one is, else kTileRead. Class tiles
    // starting at or past Nq / Nk are not read (a broadcast dim has stride 0: any index reads its one tile).
    template <int Rows, int Cols>
    CF_DEVICE int tile_class_span(int b, int h, int q0, int k0, int tq, int tk) const {
        if (!Enabled || tile_cls == nullptr) return kTileRead;
        bool all_skip = true, all_zero = true;
        for (int r = q0; r < min(q0 + Rows, Nq); r += tq)
            for (int c = k0; c < min(k0 + Cols, Nk); c += tk) {
                const int cls = tile_class(b, h, r / tq, c / tk);
                all_skip &= cls == kTileSkip;
                all_zero &= cls == kTileZero;
            }
        return all_skip ? kTileSkip : all_zero ? kTileZero : kTileRead;
    }
    CF_DEVICE bool dropout() const { return Dropout && keep_threshold != 0xffffffffu; }
    CF_DEVICE bool softcap() const { return Enabled && cap_out != 0.f; }

    // Raw scores q·k of an accumulator tile (NT n8 tiles) → log2-scaled logits before the bias.
    template <typename T, int NT>
    CF_DEVICE void scale_scores(float (*s)[4], float scale_log2) const {
        if (softcap()) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = cap_out * cap_tanh<T>(s[nt][e] * cap_in);
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] *= scale_log2;
        }
    }

    // scale_scores less its last factor, which it returns (the Hopper forward folds it into its exp2's FFMA): with
    // soft-capping s becomes tanh(s · cap_in) and the factor cap_out, else s stays and the factor is scale_log2.
    template <typename T, int NT>
    CF_DEVICE float cap_scores(float (*s)[4], float scale_log2) const {
        if (!softcap()) return scale_log2;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = cap_tanh<T>(s[nt][e] * cap_in);
        return cap_out;
    }

    // scale_scores, keeping with soft-capping the derivative of each capped score, 1 - tanh², for the backward:
    // cap_grad[nt][r] holds those of s[nt][2r] and s[nt][2r + 1] as an fp16 pair (half the registers of floats; dS
    // is rounded to 16 bits after it anyway). The Hopper backward holds them instead of recomputing Sᵀ, which spilled.
    template <typename T, int NT>
    CF_DEVICE void scale_scores(float (*s)[4], float scale_log2, u32 (*cap_grad)[2]) const {
        if (!softcap()) return scale_scores<T, NT>(s, scale_log2);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float t[2];
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    t[c] = cap_tanh<T>(s[nt][2 * r + c] * cap_in);
                    s[nt][2 * r + c] = cap_out * t[c];
                }
                cap_grad[nt][r] = f16::pack(1.f - t[0] * t[0], 1.f - t[1] * t[1]);
            }
    }
    // The factor of element (nt, e) kept by scale_scores(s, scale_log2, cap_grad).
    static CF_DEVICE float cap_grad_at(const u32 (*cap_grad)[2], int nt, int e) {
        const u32 pair = cap_grad[nt][e >> 1];
        return f16::to_float((u16)(e & 1 ? pair >> 16 : pair & 0xffffu));
    }

    // Dropout's random numbers, 8 bits a score, as FlashAttention-2's: one Philox call per group of sixteen elements,
    // rows {row, row + 8} x keys col + {0, 1, 8, 9, 16, 17, 24, 25} (row below 8 mod 16; col even and below 8 mod
    // 32). Byte c of word i holds (row + 8·(i % 2), col + 8·(i / 2) + 16·(c / 2) + c % 2): words 0-3 in the order
    // of a 16-bit A fragment's registers (common.cuh acc_to_a), bytes 0 and 1 the pair of one k16 step and bytes 2
    // and 3 of the next, so the Hopper forward masks packed P with one compare per pair (drop_packed). S's layout
    // holds whole groups in one lane (rows lane/4 + {0, 8}; keys 2·(lane%4) + {0, 1} of n8 tiles nt .. nt + 3): a
    // call per sixteen scores. Sᵀ's in the backward holds a quarter (keys lane/4 + {0, 8}: one parity, one half of
    // the 32 keys), lane ^ 4 the other parity and another warp the other half: a call per eight scores
    // (keep_bits_t). Philox's integer multiplies and the compares set dropout's cost: with 16-bit numbers, a call
    // per eight scores, the forward took 1.42x the plain one at d128 (H100, session 31). 8 bits quantize the keep
    // probability to multiples of 1/256 (params.keep_threshold); the kept scores are scaled by its inverse.
    CF_DEVICE U4 random_group(i64 bh, int row, int col) const {
        const u32 group_row = (u32)((row >> 4) << 3 | (row & 7)), group_col = (u32)((col >> 5) << 2 | (col & 7) >> 1);
        return philox(U4{group_col, group_row, (u32)bh, (u32)(bh >> 32)}, seed_lo, seed_hi);
    }
    static CF_DEVICE bool kept8(u32 word, int byte, u32 threshold) { return ((word >> (8 * byte)) & 0xffu) < threshold; }

    // Dropout on the forward's S tile (NT n8 tiles, NT even): zeroes s[nt][e] (row row0 + 8·(e/2), key
    // col0 + 8·nt + e%2; row0 below 8 mod 16, col0 even and below 8 mod 16) where its number is at or above the keep
    // threshold. A group spans 32 keys: a tile of 16 keys (NT = 2) starting at 16 mod 32 takes its bytes 2 and 3.
    template <int NT>
    CF_DEVICE void drop(float (*s)[4], i64 bh, int row0, int col0, u32 threshold) const {
        static_assert(NT == 2 || NT % 4 == 0, "a group spans four n8 tiles; a tile of 16 keys takes half of one");
#pragma unroll
        for (int nt = 0; nt < NT; nt += 4) {
            const int half = NT % 4 ? (col0 >> 4) & 1 : 0;  // NT % 4 == 0: col0 is below 8 mod 32
            const U4 w = random_group(bh, row0, col0 + nt * 8 - 16 * half);
            const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int t = nt + (i >> 1) + 2 * (c >> 1);  // the n8 tile of word i's byte c (NT = 2: of half)
                    if (NT % 4 ? (c >> 1) == half : t < NT)
                        if (!kept8(words[i], c, threshold)) s[NT % 4 ? (i >> 1) : t][2 * (i & 1) + (c & 1)] = 0.f;
                }
        }
    }

    // The Hopper forward's dropout words for its S tile (NT n8 tiles, NT a multiple of 4; row0 below 8 mod 16, col0
    // even and below 8 mod 32), drawn before the tile's scores exist: under the other warpgroup's GEMMs, off the
    // softmax's critical path.
    template <int NT>
    CF_DEVICE void draw(U4 (&w)[NT / 4], i64 bh, int row0, int col0) const {
        static_assert(NT % 4 == 0, "a group spans four n8 tiles");
#pragma unroll
        for (int g = 0; g < NT / 4; ++g) w[g] = random_group(bh, row0, col0 + 32 * g);
    }
    // ... applied to P packed as A fragments (acc_to_a, 16-bit T): word i of group g masks p[2g][i] by bytes 0 and 1,
    // p[2g + 1][i] by bytes 2 and 3. FlashAttention-2's compare: each byte moved into a 16-bit half (prmt) and the
    // halves compared as f16x2 against the threshold's (numbers below 2^10 are f16 subnormals, ordered as integers;
    // without .ftz), the u32 result 0xffff per half kept.
    template <int NT>
    static CF_DEVICE void drop_packed(u32 (*p)[4], const U4 (&w)[NT / 4], u32 threshold) {
        const u32 t2 = threshold | threshold << 16;
#pragma unroll
        for (int g = 0; g < NT / 4; ++g) {
            const u32 words[4] = {w[g].x, w[g].y, w[g].z, w[g].w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    u32 r16, keep;
                    asm("prmt.b32 %0, %1, 0, %2;" : "=r"(r16) : "r"(words[i]), "r"(h ? 0x4342u : 0x4140u));
                    asm("set.lt.u32.f16x2 %0, %1, %2;" : "=r"(keep) : "r"(r16), "r"(t2));
                    p[2 * g + h][i] &= keep;
                }
        }
    }

    // The backward's keep bits on its Sᵀ tile (NT n8 tiles of queries, NT even): bit nt·4 + e set where the forward
    // kept element (nt, e), key key0 + 8·(e/2), query q_col0 + 8·nt + e%2 (key0 below 8 mod 16; q_col0 even and below
    // 8 mod 16). Every lane of the warp calls it (the shuffle): the lane's keys are byte b = 2·(key0 / 16 % 2) +
    // key0 % 2 of its groups' words (key0 in words 0, 1; key0 + 8 in 2, 3); it draws the groups of query parity
    // key0 % 2, lane ^ 4 (key key0 ^ 1, the same queries) those of the other parity, and each hands the other its
    // byte of the four words. The loop stays rolled, one Philox chain per iteration: unrolled, the scheduler
    // interleaved the chains beside the accumulators and spilled (tests/test_kernel_compile.py).
    template <int NT>
    CF_DEVICE u32 keep_bits_t(i64 bh, int key0, int q_col0, u32 threshold) const {
        static_assert(NT % 2 == 0 && NT * 4 <= 32, "a group's rows span two n8 tiles; one bit per element");
        const int odd = key0 & 1, b = 2 * ((key0 >> 4) & 1) + odd;
        u32 bits = 0;
#pragma unroll 1
        for (int nt = 0; nt < NT; nt += 2) {  // query rows of n8 tiles nt, nt + 1: the group's row and row + 8
            const U4 w = random_group(bh, q_col0 + nt * 8 + odd, key0 & ~0x19);  // rows are queries, columns keys
            // byte c of words 0-3 as the bytes of one word
            auto gather = [&](int c) {
                return __byte_perm(__byte_perm(w.x, w.y, c | (c + 4) << 4), __byte_perm(w.z, w.w, c | (c + 4) << 4),
                                   0x5410);
            };
            // Word i (byte i of v): query row + 8·(i % 2) (tile nt + i % 2), key + 8·(i / 2) (e / 2): element
            // (nt + i % 2, e = 2·(i / 2) + p) of the group of query parity p
            auto keep4 = [&](u32 v, int p) {
                return (u32)kept8(v, 0, threshold) << p | (u32)kept8(v, 1, threshold) << (4 + p) |
                       (u32)kept8(v, 2, threshold) << (2 + p) | (u32)kept8(v, 3, threshold) << (6 + p);
            };
            const u32 got = __shfl_xor_sync(0xffffffffu, gather(b ^ 1), 4);  // the partner's draw, this lane's byte
            bits |= (keep4(gather(b), odd) | keep4(got, 1 - odd)) << (nt * 4);
        }
        return bits;
    }

    // x = the (capped) score, whose logit in log2 units is x · unit, bv its bias; returns the biased score in the
    // same units (unit = 1: the logit in log2 units). Without a branch: -inf stays -inf through the FMA (x is finite
    // or -inf), other values <= kMaskedBias give kMaskedLogit2. Written as a branch, ptxas kept one per element with
    // its BSSY / BSYNC pair: ~10 instructions a biased score.
    CF_DEVICE float biased(float x, float bv) const { return biased(x, bv, kLog2e, kMaskedLogit2); }
    // ... with kLog2e / unit and kMaskedLogit2 / unit given.
    CF_DEVICE float biased(float x, float bv, float to_x, float masked) const {
        const float logit = fmaf(bv, to_x, x);
        return bv <= kMaskedBias && bv != -inf_f() ? masked : logit;
    }
    CF_DEVICE i64 bias_row(int b, int h, int row) const { return b * bias_sb + h * bias_sh + row * bias_sm; }

    // The logit of the score x whose bias element is at `off`, inside the bias (the caller checks row and key).
    template <typename T>
    CF_DEVICE float add_bias(float x, i64 off) const {
        float bv;
        with_bias<T>([&](auto p) { bv = bias_float<T>(p[off]); });
        return biased(x, bv);
    }

    // Reading the bias: body(p) with p the bias as a pointer to its element type (fp32, or q's element type),
    // chosen by one uniform branch outside the caller's loops.
    //
    // The forward (add_bias_row) loads a tile's biases with no branch around each load, clamping rows and keys
    // past Nq / Nk to the last ones (their scores are discarded or masked anyway), so the loads issue back to back;
    // the backward reads per element (add_bias), as the clamped loads spilled its registers. Behind a
    // per-element bounds or alignment branch each load waited out its own L2 round trip: a tile that read the
    // bias cost about 6 tiles that did not (H200, d64 forward), which put a dense causal mask at 1.54x of the
    // causal flag.
    template <typename T, typename Body>
    CF_DEVICE void with_bias(Body body) const {
        if (bias_f32)
            body(static_cast<const float*>(bias));
        else
            body(static_cast<const typename T::elem*>(bias));
    }

    // Adds the biases of this lane's keys col0 + nt·8 + {0, 1} (col0 even, nt < NT) in the row at row_off to
    // s[nt][2r] and s[nt][2r + 1] (an accumulator tile's rows lane/4 + 8r), scores in units of `unit` (biased).
    // With `pairs` each key pair is one 4-byte (16-bit) or 8-byte (fp32) load.
    template <typename T, int NT>
    CF_DEVICE void add_bias_row(float (*s)[4], int r, i64 row_off, int col0, float unit = 1.f) const {
        with_bias<T>([&](auto p) {
            p += row_off;
            float bv[NT][2];
            if (pairs && col0 + (NT - 1) * 8 + 2 <= Nk) {  // every key of the lane's pairs: one base, fixed offsets
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) load_pair<T>(p + col0 + nt * 8, bv[nt]);
            } else if (pairs) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) load_pair<T>(p + min(col0 + nt * 8, Nk - 2), bv[nt]);
            } else {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 2; ++e) bv[nt][e] = bias_float<T>(__ldg(p + min(col0 + nt * 8 + e, Nk - 1) * bias_sn));
            }
            const float inv = __fdividef(1.f, unit);  // MUFU.RCP: an IEEE division is a call with a slow path
            const float to_x = kLog2e * inv, masked = kMaskedLogit2 * inv;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][2 * r] = biased(s[nt][2 * r], bv[nt][0], to_x, masked);
                s[nt][2 * r + 1] = biased(s[nt][2 * r + 1], bv[nt][1], to_x, masked);
            }
        });
    }
};

// Narrows [begin, end) to its first .. last index whose tile is not kTileSkip (empty if all are), in one parallel
// pass by the whole block (call it uniformly). Walking skipped tiles one dependent load at a time from the loop
// cost a dense causal mask passed as a tensor ~0.4 ms of its forward (H200, N = 8192): every Q block scanned all
// the tiles past its diagonal. With Count, returns how many are not kTileSkip, in the same pass, for a loop that
// visits only those without walking the others (flash_fwd_sm90.cuh's consumers).
template <int Threads, bool Count = false, typename IsSkipped>
CF_DEVICE int trim_skipped(int& begin, int& end, IsSkipped is_skipped, int tid) {
    __shared__ int s_first, s_last, s_count;
    if (tid == 0) {
        s_first = end;
        s_last = begin - 1;
        if constexpr (Count) s_count = 0;
    }
    __syncthreads();  // initialised before any thread updates them
    int count = 0;
    for (int i = begin + tid; i < end; i += Threads)
        if (!is_skipped(i)) {
            atomicMin(&s_first, i);
            atomicMax(&s_last, i);
            if constexpr (Count) ++count;
        }
    if constexpr (Count) {
        if (count > 0) atomicAdd(&s_count, count);
    }
    __syncthreads();  // every thread's candidates are in
    begin = s_first;
    end = s_last + 1;
    if constexpr (Count) return s_count;
    return 0;
}

// The kernels' ScoreMods from their launch parameters. Causal clips the right window edge at the diagonal; the
// plain path (Enabled = false) has no window beyond that. The dropout seed is read from device memory, where
// torch's CUDA generator wrote it, so a CUDA graph replay runs with that replay's seed (__ldg: the read-only path
// the restrict-qualified seed parameter had).
template <typename T, bool Causal, bool Enabled, bool Dropout>
CF_DEVICE ScoreMods<Enabled, Dropout> make_score_mods(const ScoreModParams& params, int Nq, int Nk) {
    // Every field read here, before any branch: read through the reference after the seed's branch, the Hopper
    // forward kept the struct's address in a register and spilled (d64 with score mods: 18 bytes).
    const ScoreModParams m = params;
    const unsigned long long sd = Dropout && m.seed != nullptr ? __ldg(m.seed) : 0ull;
    const unsigned long long pair_bytes = 2 * (m.bias_f32 ? 4 : sizeof(typename T::elem));
    const BhmnStrides& bs = m.bias_s;
    const bool pairs = bs.n == 1 && Nk % 2 == 0 && (bs.b | bs.h | bs.m) % 2 == 0 &&
                       reinterpret_cast<unsigned long long>(m.bias) % pair_bytes == 0;
    return ScoreMods<Enabled, Dropout>{m.bias, bs.b, bs.h, bs.m, bs.n, m.bias_f32, m.tile_cls, m.cls_s.b, m.cls_s.h,
                                       m.cls_s.m, m.cls_s.n, Nq, Nk, Nk - Nq, Enabled ? m.win_left : kNoWindow,
                                       Causal ? min(m.win_right, 0) : Enabled ? m.win_right : kNoWindow,
                                       m.keep_threshold, (u32)sd, (u32)(sd >> 32), m.cap_in, m.cap_out, pairs};
}

}  // namespace cupyflash
