// The kernels' launch parameters: each kernel takes one of these structs by value (as FlashAttention-3's
// Flash_fwd_params), but the Hopper backward (flash_bwd_sm90.cuh says why). The pieces shared by the forward and the
// backward, mma.sync and Hopper (strides, sizes, score mods) are sub-structs.
//
// The Hopper forward takes its struct as `const __grid_constant__`: the struct stays in parameter space, so its TMA
// maps are addressed in place by cp.async.bulk.tensor (wgmma.cuh tma_load_4d) rather than copied. The others take it
// as a plain `const` parameter: there __grid_constant__ let LLVM read fields through a register holding the struct's
// address, which cost registers (tile_minmax: 40 -> 55). The attention kernels read each field where they use it:
// copied into locals at the top, the fields were loaded once and held in registers across the kernel (LLVM merges
// the loads of read-only memory), where a scalar parameter was re-read from the constant bank at each use; the
// mma.sync backward then spilled (d96 with score mods on sm_90: 16 bytes). The small kernels copy them into locals.
//
// cupyflash/params.py holds the one Python description of each layout, from which the plan (cupyflash/plan.py)
// packs a launch's bytes; tests/test_params.py compiles static_asserts of every field's offset, type and each
// struct's size against these definitions. A field added here is added there, in the same place.
#pragma once
#include "common.cuh"

namespace cupyflash {

// A TMA tensor map (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned), encoded on the host by
// cuTensorMapEncodeTiled (cupyflash/tma.py).
struct alignas(64) TmaDesc {
    unsigned long long opaque[16];
};

struct BhnStrides {  // a (B, H, N, D) or (B, H, N) tensor's strides, in elements
    i64 b, h, n;
};
struct BhmnStrides {  // a (B, H, Nq, Nk) tensor's (bias, tile classes, dBias), in elements, 0 along broadcast dims
    i64 b, h, m, n;
};

// The sizes and the softmax scale every attention kernel takes.
struct AttnParams {
    int Nq, Nk;
    int group;         // query heads per K/V head (grouped-query attention)
    float scale_log2;  // scale · log2 e
};

// The score mods (scores.cuh defines each; make_score_mods reads them). Pointers are null where a feature is off.
struct ScoreModParams {
    const void* bias;
    BhmnStrides bias_s;
    int bias_f32;  // 1: fp32 bias, 0: bias in q's element type
    const signed char* tile_cls;  // TileClass per (b, h, Q block, K block) tile of cls_tq x cls_tk
    BhmnStrides cls_s;
    int cls_tq, cls_tk;  // the tiles tile_cls classifies (read by the Hopper kernels: ScoreMods::tile_class_span)
    float* dbias;  // the backward's fp32 dBias accumulator, shaped like the bias
    BhmnStrides dbias_s;
    int win_left, win_right;  // visibility window; kNoWindow: unbounded
    u32 keep_threshold;       // dropout keeps an element iff its 8-bit number < this; 0xffffffff: no dropout
    float inv_keep;           // 1 / keep probability
    const unsigned long long* seed;  // device address of the dropout seed
    float cap_in, cap_out;           // soft-capping: scale / softcap and softcap · log2 e; 0: off
};

// A key mask's meta rows (key_mask.cuh), as the plain Hopper kernels read them: batch row b's at meta + b · sb.
struct KeyMaskArgs {
    const int* meta;
    i64 sb;  // 0: one row for every batch row
};

// flash_fwd.cuh flash_fwd_kernel. row_stats non-null: its stats mode (lse read, o never written).
template <typename E>
struct FwdParams {
    const E* q;
    const E* k;
    const E* v;
    E* o;
    float* lse;
    BhnStrides q_s, k_s, v_s, o_s;
    AttnParams attn;
    ScoreModParams mods;
    float2* row_stats;
};

// The Hopper forward (flash_fwd_sm90.cuh): Q, K, V through their tensor maps.
template <typename E>
struct FwdSm90Params {
    TmaDesc tm_q, tm_k, tm_v;
    E* o;
    float* lse;
    BhnStrides o_s;
    AttnParams attn;
    ScoreModParams mods;
    KeyMaskArgs keys;  // read with KeyMask only
};

// flash_bwd.cuh flash_bwd_kernel. row_lse non-null (a backward with a bias): the rows' (hi, lo) pairs replace LSE.
template <typename E>
struct BwdParams {
    const E* q;
    const E* k;
    const E* v;
    const E* dout;
    const float* lse;
    const float* d_vec;
    float* dq_accum;
    E* dk;
    E* dv;
    BhnStrides q_s, k_s, v_s, do_s, dk_s, dv_s;
    AttnParams attn;
    float scale;  // dK's factor
    int col0;     // the first of this launch's columns of dK, dV and dQ (flash_bwd_kernel's DOut)
    ScoreModParams mods;
    const float2* row_lse;
};

// flash_bwd.cuh flash_bwd_preprocess. lse and row_lse both null or both set; dlse null, or the LSE's gradient
// (contiguous (B, H, Nq) fp32).
template <typename E>
struct BwdPreprocessParams {
    const E* dout;
    const E* out;
    float* d_vec;
    float* dq_accum;
    BhnStrides do_s, o_s;
    int H, Nq, Nq_accum;
    i64 n_rows;  // B·H·Nq_accum
    const float* lse;
    float2* row_lse;
    const float* dlse;
};

// flash_bwd.cuh flash_bwd_convert_dq and flash_bwd_sm90.cuh flash_bwd_convert_dq_sm90.
template <typename E>
struct ConvertDqParams {
    const float* dq_accum;
    E* dq;
    BhnStrides dq_s;
    int H, Nq;
    i64 n_rows;  // the threads' work items: rows (B·H·Nq) for flash_bwd_convert_dq, float4s for _sm90
    float scale;
};

// flash_bwd_sm90.cuh flash_bwd_expand_kv_sm90 and flash_bwd_sum_kv_sm90: K, V, dK, dV (B, H, Nk, DHead) with their
// strides, and the split copies k_split, v_split, dk_part, dv_part (B, H · split, Nk, DHead) with split_s.
template <typename E>
struct SplitKvParams {
    const E* k;
    const E* v;
    E* k_split;
    E* v_split;
    const E* dk_part;
    const E* dv_part;
    E* dk;
    E* dv;
    BhnStrides k_s, v_s, split_s, dk_s, dv_s;
    int H, Nk, DHead, split;
    i64 n_items;  // B·H·Nk·DHead / 8
};

// unseen_rows.cuh: every kernel (each reads what it needs). ws: the fp32 workspace, ws_per floats per (batch, K/V
// head); mode 1: uniform rows (replaced scores), 2: with the scores' gradient (an added fill).
template <typename E>
struct UnseenRowsParams {
    const E* q;
    const E* k;
    const E* v;
    const E* dout;
    E* out;
    E* dq;
    E* dk;
    E* dv;
    const float* lse;
    float* ws;
    BhnStrides q_s, k_s, v_s, do_s, o_s, dq_s, dk_s, dv_s;
    int H, Hkv, Nq, Nk, D, Dv;
    i64 ws_per;
    float scale;
    int mode;
};

// tile_classes.cuh tile_minmax: tiles tq x tk of a bias (Hb heads, nq x nk), QB x KB of them per head.
struct TileMinmaxParams {
    const void* bias;
    int bias_f32;
    BhmnStrides bias_s;
    int Hb, nq, nk, tq, tk, QB, KB;
    int vec16;  // 16-byte loads (unit key stride, 16-byte aligned rows and tiles)
    float* tile_min;
    float* tile_max;
    int* row_keeps;
};

// key_mask.cuh key_mask_prep: one meta row per batch row of a boolean (Bb, 1, 1, Nk) mask, `words` words each.
struct KeyMaskPrepParams {
    const unsigned char* mask;
    i64 mask_sb, mask_sn;
    int Nk, words;
    int* meta;
    i64 meta_sb;
};

// tile_classes.cuh tile_classify.
struct TileClassifyParams {
    const float* tile_min;
    const float* tile_max;
    const int* row_keeps;
    int nq, tq, QB, KB;
    i64 n_tiles;
    int window;  // a causal mask or window applies
    signed char* classes;
};

}  // namespace cupyflash
