// Bias tile classes (TileClass, scores.cuh) computed on the GPU at every call, in two launches; the definition,
// and its reference implementation, is cupyflash/tile_classes.py. Tiles are tq x tk over the bias's own
// broadcast shape (Bb, Hb, nq, nk); elements past nq or nk count as -inf (masked), as the reference pads them.
//
// Doing this in ~20 torch operations cost ~0.7 ms of host time per call on the H200 machine, more than the
// forward kernel itself at N = 2048.
#pragma once
#include "scores.cuh"

namespace cupyflash {

constexpr int kClassThreads = 128;

template <typename T>
CF_DEVICE float bias_value(const void* bias, int bias_f32, i64 off) {
    return bias_f32 ? static_cast<const float*>(bias)[off] : T::to_float(static_cast<const typename T::elem*>(bias)[off]);
}

// One block per tile, blockIdx.x = (bh · QB + qb) · KB + kb: the tile's min and max, and row_keeps[bh · nq + row]
// = 1 for every row with an element above kMaskedBias (the buffer comes zeroed; concurrent writers store the
// same 1). Each thread reads `step` consecutive elements of a row at a time, 16 bytes with vec16 (the caller
// checked sn = 1 and 16-byte aligned rows and tiles), and the block's threads spread over the tile's rows and
// columns together. Lanes along one row only left 24 of 32 lanes idle on a 64-key tile, and 2-byte loads ran at a
// fifth of the memory bandwidth (252 µs and 238 µs for an 8192² bf16 mask on the H200).
template <typename T>
__global__ void __launch_bounds__(kClassThreads)
tile_minmax(const TileMinmaxParams params) {
    const void* __restrict__ bias = params.bias;
    const int bias_f32 = params.bias_f32;
    const i64 sb = params.bias_s.b, sh = params.bias_s.h, sm = params.bias_s.m, sn = params.bias_s.n;
    const int Hb = params.Hb, nq = params.nq, nk = params.nk, tq = params.tq, tk = params.tk, QB = params.QB;
    const int KB = params.KB, vec16 = params.vec16;
    float* __restrict__ tile_min = params.tile_min;
    float* __restrict__ tile_max = params.tile_max;
    int* __restrict__ row_keeps = params.row_keeps;
    const i64 tile = blockIdx.x;
    const int kb = (int)(tile % KB), qb = (int)((tile / KB) % QB);
    const i64 bh = tile / ((i64)KB * QB);
    const int b = (int)(bh / Hb), h = (int)(bh % Hb);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int ebytes = bias_f32 ? 4 : (int)sizeof(typename T::elem);
    const int step = vec16 ? 16 / ebytes : 1;  // elements per thread per load
    const int chunks = ceil_div(tk, step);     // per row
    float lo = inf_f(), hi = -inf_f();
#pragma unroll 4
    for (int item = threadIdx.x; item < tq * chunks; item += kClassThreads) {
        const int r = item / chunks, c = (item - r * chunks) * step;
        const int row = qb * tq + r, col = kb * tk + c;
        const i64 off = b * sb + h * sh + row * sm + col * sn;
        bool keeps = false;
        if (vec16 && row < nq && col + step <= nk) {
            u32 w[4];
            asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                : "l"(static_cast<const unsigned char*>(bias) + off * ebytes));
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                if (i >= step) break;
                float x;
                if (bias_f32)
                    x = __uint_as_float(w[i]);
                else
                    x = T::to_float((typename T::elem)((w[i / 2] >> (16 * (i % 2))) & 0xffffu));
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
                keeps |= x > kMaskedBias;
            }
        } else {
            for (int i = 0; i < step && c + i < tk; ++i) {
                const bool in = row < nq && col + i < nk;
                const float x = in ? bias_value<T>(bias, bias_f32, off + i * sn) : -inf_f();
                lo = fminf(lo, x);
                hi = fmaxf(hi, x);
                keeps |= x > kMaskedBias;
            }
        }
        if (keeps) row_keeps[bh * nq + row] = 1;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    }
    __shared__ float s_lo[kClassThreads / 32], s_hi[kClassThreads / 32];
    if (lane == 0) {
        s_lo[warp] = lo;
        s_hi[warp] = hi;
    }
    __syncthreads();  // every warp's partial min / max is in
    if (threadIdx.x == 0) {
        for (int w = 1; w < kClassThreads / 32; ++w) {
            lo = fminf(lo, s_lo[w]);
            hi = fmaxf(hi, s_hi[w]);
        }
        tile_min[tile] = lo;
        tile_max[tile] = hi;
    }
}

// One thread per tile: classes[(bh · QB + qb) · KB + kb] (int8, contiguous (Bb, Hb, QB, KB)). Without a causal
// mask or window, a tile of masked values (<= kMaskedBias) is skipped only when every row of its Q block keeps a
// key somewhere (else a row masked only by finfo.min attends uniformly, and its masked keys count).
__global__ void tile_classify(const TileClassifyParams params) {
    const float* __restrict__ tile_min = params.tile_min;
    const float* __restrict__ tile_max = params.tile_max;
    const int* __restrict__ row_keeps = params.row_keeps;
    const int nq = params.nq, tq = params.tq, QB = params.QB, KB = params.KB, window = params.window;
    const i64 n_tiles = params.n_tiles;
    signed char* __restrict__ classes = params.classes;
    const i64 tile = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (tile >= n_tiles) return;
    const int qb = (int)((tile / KB) % QB);
    const i64 bh = tile / ((i64)KB * QB);
    const float lo = tile_min[tile], hi = tile_max[tile];
    bool skip = hi == -inf_f();
    if (!skip && !window && hi <= kMaskedBias) {
        skip = true;
        for (int row = qb * tq; row < min(nq, (qb + 1) * tq) && skip; ++row) skip = row_keeps[bh * nq + row] != 0;
    }
    classes[tile] = skip ? kTileSkip : (lo == 0.f && hi == 0.f) ? kTileZero : kTileRead;
}

}  // namespace cupyflash
