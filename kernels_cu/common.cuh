// Shared device helpers: element types (fp16, bf16, fp32 on TF32), tensor-core MMA, fragment loads, cp.async.
//
// No CUDA headers are included: NVRTC compiles this without cuda_fp16.h / cuda_bf16.h (CuPy does not ship
// the bf16 header for every toolkit), so fp16/bf16 values live as raw 16-bit words and are converted with PTX.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

namespace cupyflash {

#define CF_DEVICE __device__ __forceinline__

CF_DEVICE float inf_f() { return __int_as_float(0x7f800000); }
// exp(x) = exp2(x · log2 e): scores are scaled by scale · log2(e) once so the softmax uses exp2 (one MUFU op).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;  // log2 → natural log for the saved LSE

// ---- element types: the tag selects the element type in memory, the MMA and the fragment loads ----
// Every GEMM is built from "k16 blocks": an A fragment covers 16 rows x 16 k (kARegs registers per lane), a B
// fragment one n8 tile x 16 k (kBRegs), and mma16 adds A·B into an m16n8 fp32 accumulator.
struct f16 {
    using elem = u16;
    static constexpr bool kTF32 = false, kBf16 = false;
    static constexpr int kARegs = 4, kBRegs = 2;
    // cvt.rn.f16x2.f32 d, a, b puts a in the upper half and b in the lower half.
    static CF_DEVICE u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static CF_DEVICE u16 from_float(float x) {
        u16 r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    static CF_DEVICE float to_float(u16 x) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    }
    // D = A·B + C, m16n8k16, row-major A, column-major B, fp32 accumulate. Not volatile: a pure register op,
    // which the compiler may schedule freely.
    static CF_DEVICE void mma16(float c[4], const u32* a, const u32* b) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

struct bf16 {
    using elem = u16;
    static constexpr bool kTF32 = false, kBf16 = true;
    static constexpr int kARegs = 4, kBRegs = 2;
    static CF_DEVICE u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static CF_DEVICE u16 from_float(float x) { return (u16)(pack(x, 0.f) & 0xffffu); }
    static CF_DEVICE float to_float(u16 x) { return __uint_as_float((u32)x << 16); }  // bf16 is the top half of f32
    static CF_DEVICE void mma16(float c[4], const u32* a, const u32* b) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
};

// fp32 in memory, TF32 tensor cores (mma m16n8k8 .tf32: 10-bit mantissa in, fp32 accumulate). A k16 block is
// two k8 MMAs: A registers 0-3 and B registers 0-1 hold k 0-7, the rest k 8-15.
struct tf32 {
    using elem = float;
    static constexpr bool kTF32 = true, kBf16 = false;
    static constexpr int kARegs = 8, kBRegs = 4;
    static CF_DEVICE float from_float(float x) { return x; }
    static CF_DEVICE float to_float(float x) { return x; }
    // Round to nearest (ties away), as cuBLAS's TF32 GEMMs: the MMA itself would truncate the low 13 bits.
    static CF_DEVICE u32 round(float x) {
        u32 r;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
        return r;
    }
    static CF_DEVICE void mma16(float c[4], const u32* a, const u32* b) {
#pragma unroll
        for (int h = 0; h < 2; ++h)
            asm(
                "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                "{%0,%1,%2,%3};"
                : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                : "r"(a[4 * h]), "r"(a[4 * h + 1]), "r"(a[4 * h + 2]), "r"(a[4 * h + 3]), "r"(b[2 * h]),
                  "r"(b[2 * h + 1]));
    }
};

// A compile-time flag as a value, for generic lambdas that one body instantiates twice (NVRTC has no <type_traits>).
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// ---- shared memory ----
CF_DEVICE u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
// threadIdx.x read afresh where it is called (volatile: not hoisted or merged with another read), so that what a
// kernel derives from it (a lane, a warp's place) is recomputed there instead of held in a register across a loop.
CF_DEVICE int fresh_tid() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(t));
    return t;
}
// This thread's warpgroup as a warp-uniform value: broadcast from lane 0, which tells ptxas every lane holds the
// same (as CUTLASS's canonical_warp_group_idx), so what is formed from it (wgmma descriptors, shared addresses) lives
// in uniform registers. Derived from tid / 128 it is a per-thread value to ptxas, and every wgmma descriptor formed
// from it was built in vector registers and moved over with R2UR (ncu, session 24).
CF_DEVICE int warpgroup_uniform(int tid) { return __shfl_sync(0xffffffffu, tid / 128, 0); }
CF_DEVICE int lds_s32(u32 addr) {
    int x;
    asm volatile("ld.shared.s32 %0, [%1];" : "=r"(x) : "r"(addr));
    return x;
}
CF_DEVICE void st_shared_s32(u32 addr, int x) { asm volatile("st.shared.s32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory"); }
CF_DEVICE float lds_f32(u32 addr) {
    float x;
    asm volatile("ld.shared.f32 %0, [%1];" : "=f"(x) : "r"(addr));
    return x;
}
CF_DEVICE void lds_f32x2(float& x, float& y, u32 addr) {
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(x), "=f"(y) : "r"(addr));
}

// Tiles of T's elements are stored row-major with each row padded by 16 bytes: 8 consecutive rows then start in
// 8 distinct 16-byte bank groups, so ldmatrix (8 rows × 16 bytes per 8x8 matrix) is conflict-free for every head
// dim (fp32 tiles take 2-way conflicts on some TF32 fragment loads, which ldmatrix cannot serve).
template <typename T, int Cols>
struct Tile {
    static constexpr int kElemBytes = sizeof(typename T::elem);
    static constexpr int kRowBytes = Cols * kElemBytes + 16;
    template <int Rows>
    __host__ __device__ static constexpr int bytes() { return Rows * kRowBytes; }
    static CF_DEVICE u32 at(u32 base, int row, int col) { return base + row * kRowBytes + col * kElemBytes; }
};

// ldmatrix.x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i; register i receives, in each lane,
// row lane/4, columns 2·(lane%4) and +1 of matrix i (or of its transpose with .trans).
CF_DEVICE void ldmatrix_x4(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
CF_DEVICE void ldmatrix_x4_trans(u32 r[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// The four fragment loads every GEMM here is built from. `row0`/`col0` locate the 16x16 block in the stored tile.
// 16-bit types: ldmatrix, layouts of the PTX ISA "Matrix Fragments for mma.m16n8k16".
// TF32 (layouts of "mma.m16n8k8" .tf32): within each k8 half, fragment slot k = t (lane%4) holds column 2t and
// slot t + 4 column 2t + 1. Any k order gives the same product as long as A and B share it, and this one makes an
// accumulator's own registers an A fragment (acc_to_a) and lets row-major loads fetch both of a lane's k in one
// 8-byte load.
//
// A operand (16 x 16, rows = M, cols = K) from a tile stored [M][K]: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15).
template <typename T, int Cols>
CF_DEVICE void load_a(u32* a, u32 base, int row0, int col0, int lane) {
    using Tl = Tile<T, Cols>;
    if constexpr (T::kTF32) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // a0/a2: row g, a1/a3: row g + 8
                float x, y;
                lds_f32x2(x, y, Tl::at(base, row0 + g + 8 * r, col0 + 8 * h + 2 * t));
                a[4 * h + r] = T::round(x);
                a[4 * h + r + 2] = T::round(y);
            }
    } else {
        ldmatrix_x4(a, Tl::at(base, row0 + (lane & 15), col0 + (lane >> 4) * 8));
    }
}
// B operands of two n8 tiles (n = 16 stored rows, k = 16 stored cols) from a tile stored [N][K]:
// b[0 .. kBRegs) of stored rows row0..+7, b[kBRegs ..) of rows row0+8..+15.
template <typename T, int Cols>
CF_DEVICE void load_b_nk(u32* b, u32 base, int row0, int col0, int lane) {
    using Tl = Tile<T, Cols>;
    if constexpr (T::kTF32) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float x, y;
                lds_f32x2(x, y, Tl::at(base, row0 + 8 * nt + g, col0 + 8 * h + 2 * t));
                b[4 * nt + 2 * h] = T::round(x);
                b[4 * nt + 2 * h + 1] = T::round(y);
            }
    } else {
        ldmatrix_x4(b, Tl::at(base, row0 + (lane & 7) + ((lane >> 4) << 3), col0 + ((lane >> 3) & 1) * 8));
    }
}
// B operands of two n8 tiles from a tile stored [K][N] (k = 16 stored rows, n = 16 stored cols), transposed by
// ldmatrix: b[0 .. kBRegs) of stored cols col0..+7, b[kBRegs ..) of cols col0+8..+15.
template <typename T, int Cols>
CF_DEVICE void load_b_kn(u32* b, u32 base, int row0, int col0, int lane) {
    using Tl = Tile<T, Cols>;
    if constexpr (T::kTF32) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    b[4 * nt + 2 * h + j] = T::round(lds_f32(Tl::at(base, row0 + 8 * h + 2 * t + j, col0 + 8 * nt + g)));
    } else {
        ldmatrix_x4_trans(b, Tl::at(base, row0 + (lane & 15), col0 + (lane >> 4) * 8));
    }
}
// A operand (rows = M, cols = K) from a tile stored transposed, [K][M].
template <typename T, int Cols>
CF_DEVICE void load_a_km(u32* a, u32 base, int k0, int m0, int lane) {
    using Tl = Tile<T, Cols>;
    if constexpr (T::kTF32) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int r = 0; r < 2; ++r)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    a[4 * h + r + 2 * j] = T::round(lds_f32(Tl::at(base, k0 + 8 * h + 2 * t + j, m0 + g + 8 * r)));
    } else {
        ldmatrix_x4_trans(a, Tl::at(base, k0 + (lane & 7) + ((lane >> 4) << 3), m0 + ((lane >> 3) & 1) * 8));
    }
}

// Accumulator fragments c[nt][0..3] of a 16 x (8·NT) tile hold rows lane/4 (c0, c1) and lane/4 + 8 (c2, c3),
// cols nt·8 + 2·(lane%4) + {0, 1}. As an A operand for the next GEMM (k = those cols) k16 block kk is:
template <typename T>
CF_DEVICE void acc_to_a(u32* a, const float (*c)[4], int kk) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float* ch = c[2 * kk + h];
        if constexpr (T::kTF32) {  // the TF32 k order above: slot t = col 2t (c0, c2), slot t + 4 = col 2t + 1
            a[4 * h] = T::round(ch[0]);
            a[4 * h + 1] = T::round(ch[2]);
            a[4 * h + 2] = T::round(ch[1]);
            a[4 * h + 3] = T::round(ch[3]);
        } else {
            a[2 * h] = T::pack(ch[0], ch[1]);
            a[2 * h + 1] = T::pack(ch[2], ch[3]);
        }
    }
}

// Two adjacent fp32 values (cols 2·(lane%4) + {0, 1} of an accumulator row) stored as T's elements.
template <typename T>
CF_DEVICE void store2(typename T::elem* p, float lo, float hi) {
    if constexpr (T::kTF32) {
        p[0] = lo;
        p[1] = hi;
    } else {
        *reinterpret_cast<u32*>(p) = T::pack(lo, hi);
    }
}
// The backward's epilogue (flash_bwd.cuh, flash_bwd_sm90.cuh): dK = scale · acc_dk and dV = acc_dv for this lane's
// two keys, key0 and key0 + 8, of a 16-row accumulator slice (m16n8 layout), its first D columns; keys at or past Nk
// are not written. dk, dv point at the head's row 0.
template <typename T, int D>
CF_DEVICE void store_dk_dv(typename T::elem* dk, typename T::elem* dv, i64 dk_sn, i64 dv_sn, int key0, int Nk,
                           const float (*acc_dk)[4], const float (*acc_dv)[4], float scale, int lane) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + r * 8;
        if (key < Nk) {
            typename T::elem* dk_row = dk + key * dk_sn;
            typename T::elem* dv_row = dv + key * dv_sn;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const int col = dt * 8 + 2 * (lane % 4);
                store2<T>(dk_row + col, acc_dk[dt][2 * r] * scale, acc_dk[dt][2 * r + 1] * scale);
                store2<T>(dv_row + col, acc_dv[dt][2 * r], acc_dv[dt][2 * r + 1]);
            }
        }
    }
}
template <typename T>
CF_DEVICE void store2_shared(u32 addr, float lo, float hi) {
    if constexpr (T::kTF32)
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(lo), "f"(hi));
    else
        asm volatile("st.shared.b32 [%0], %1;" ::"r"(addr), "r"(T::pack(lo, hi)));
}

// ---- the two warp-level GEMMs every product in the kernels is ----
// Accumulators c[mt][n][4] hold MT 16-row tiles of the warp by N/8 column tiles (fp32, m16n8 layout).
//
// c = A·Bᵀ over K: A's MT row tiles from a [M][K] tile in shared memory (rows a_row0 + 16·mt), B the first N rows
// of a [N][K] tile in shared memory (S = Q Kᵀ, Sᵀ = K Qᵀ, dPᵀ = V dOᵀ). Each B fragment feeds MT MMAs. The k loop
// is not unrolled: unrolling it only hoists fragment loads, which costs registers, not speed.
template <typename T, int K, int N, int MT, int ACols, int BCols>
CF_DEVICE void mma_abt(float (*c)[N / 8][4], u32 sA, int a_row0, u32 sB, int lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int n = 0; n < N / 8; ++n) c[mt][n][0] = c[mt][n][1] = c[mt][n][2] = c[mt][n][3] = 0.f;
#pragma unroll 1
    for (int kk = 0; kk < K / 16; ++kk) {
        u32 a[MT][T::kARegs];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) load_a<T, ACols>(a[mt], sA, a_row0 + mt * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            u32 b[2 * T::kBRegs];
            load_b_nk<T, BCols>(b, sB, np * 16, kk * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                T::mma16(c[mt][2 * np], a[mt], b);
                T::mma16(c[mt][2 * np + 1], a[mt], b + T::kBRegs);
            }
        }
    }
}

// c1 = A1·B1ᵀ and c2 = A2·B2ᵀ (one 16-row tile each, same K and N) in one k loop: two independent accumulator
// chains per k step instead of one, so twice the MMAs are in flight (the backward's Sᵀ and dPᵀ; alone, each waited
// on its own previous MMA: ncu's top stall was "wait", fixed-latency dependencies, with 2 warps per scheduler).
template <typename T, int K, int N, int Cols>
CF_DEVICE void mma_abt_x2(float (*c1)[N / 8][4], u32 sA1, u32 sB1, float (*c2)[N / 8][4], u32 sA2, u32 sB2,
                          int a_row0, int lane) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) (*c1)[n][e] = (*c2)[n][e] = 0.f;
#pragma unroll 1
    for (int kk = 0; kk < K / 16; ++kk) {
        u32 a1[T::kARegs], a2[T::kARegs];
        load_a<T, Cols>(a1, sA1, a_row0, kk * 16, lane);
        load_a<T, Cols>(a2, sA2, a_row0, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            u32 b1[2 * T::kBRegs], b2[2 * T::kBRegs];
            load_b_nk<T, Cols>(b1, sB1, np * 16, kk * 16, lane);
            load_b_nk<T, Cols>(b2, sB2, np * 16, kk * 16, lane);
            T::mma16((*c1)[2 * np], a1, b1);
            T::mma16((*c2)[2 * np], a2, b2);
            T::mma16((*c1)[2 * np + 1], a1, b1 + T::kBRegs);
            T::mma16((*c2)[2 * np + 1], a2, b2 + T::kBRegs);
        }
    }
}

// c += A·B over K: a_frag(a, kk) fills A's fragments (u32 a[MT][T::kARegs]) for k16 block kk, from registers or
// shared memory; B is a [K][N] tile in shared memory, columns b_col0.. (O += P V, dV += Pᵀ dO, dK += dSᵀ Q,
// dQ += dS K). Unrolled: A fragments built from accumulators are indexed by kk at compile time.
template <typename T, int K, int N, int MT, int BCols, typename AFrag>
CF_DEVICE void mma_ab(float (*c)[N / 8][4], AFrag a_frag, u32 sB, int b_col0, int lane) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        u32 a[MT][T::kARegs];
        a_frag(a, kk);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            u32 b[2 * T::kBRegs];
            load_b_kn<T, BCols>(b, sB, kk * 16, b_col0 + np * 16, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                T::mma16(c[mt][2 * np], a[mt], b);
                T::mma16(c[mt][2 * np + 1], a[mt], b + T::kBRegs);
            }
        }
    }
}

// ---- fp32 reductions into global memory ----
#if __CUDA_ARCH__ >= 900
// p[0..3] += (x, y, z, w) in one reduction, p 16-byte aligned (red.global.add.v4.f32, PTX ISA 8.1: sm_90 on).
CF_DEVICE void red_add_v4(float* p, float x, float y, float z, float w) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(x), "f"(y), "f"(z), "f"(w) : "memory");
}
#endif

// dst[row, col] += c for a warp's m16n8 accumulator tiles c[NT] (fp32, 16 rows x 8·NT columns): dst is the tile's
// (0, 0), rows `stride` floats apart, 16-byte aligned; rows 0-7 are added iff ok0, rows 8-15 iff ok1 (the lane's
// rows lane/4 and lane/4 + 8), and only the tiles before nt_end (a run-time bound: the Hopper backward's second
// half of a padded head dim).
//
// sm_90: lanes 2i and 2i+1 hold columns 4·(i%2) .. +3 of an n8 tile, two each, in both rows; one exchange gives
// the even lane four consecutive columns of the first row and the odd lane of the second, and each lane adds them
// with one red.global.add.v4.f32 (PTX ISA 8.1). That is a quarter of the reductions of one per element, and every
// L2 sector they touch is full (per element, a warp reached each sector twice, half used each time): backward
// +9-19% on an H100, L2 throughput 65% -> 42% (ncu). Before sm_90 there is no vector reduction, and four scalar
// ones after the exchange would spread a warp's reduction over twice the sectors: one per element, as before.
template <int NT>
CF_DEVICE void red_add_tile(float* dst, i64 stride, const float (*c)[4], bool ok0, bool ok1, int lane,
                            int nt_end = NT) {
#if __CUDA_ARCH__ >= 900
    const int r = lane & 1;  // the row this lane adds: lane/4 + 8r
    float* p = dst + (lane / 4 + 8 * r) * stride + 2 * (lane % 4 & ~1);
    const bool ok = r ? ok1 : ok0;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        // selects, not c[nt][2r]: a run-time index would put the array in local memory
        const float own0 = r ? c[nt][2] : c[nt][0], own1 = r ? c[nt][3] : c[nt][1];
        const float got0 = __shfl_xor_sync(0xffffffffu, r ? c[nt][0] : c[nt][2], 1);  // the partner's pair of row r
        const float got1 = __shfl_xor_sync(0xffffffffu, r ? c[nt][1] : c[nt][3], 1);
        if (ok && nt < nt_end)
            red_add_v4(p + nt * 8, r ? got0 : own0, r ? got1 : own1, r ? own0 : got0, r ? own1 : got1);
    }
#else
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (r ? ok1 : ok0) {
            float* p = dst + (lane / 4 + 8 * r) * stride + 2 * (lane % 4);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                if (nt < nt_end) {
                    atomicAdd(p + nt * 8, c[nt][2 * r]);
                    atomicAdd(p + nt * 8 + 1, c[nt][2 * r + 1]);
                }
            }
        }
    }
#endif
}

// ---- global → shared copies ----
// cp.async 16 bytes; src_bytes = 0 writes zeros (rows past the sequence end), reading nothing.
CF_DEVICE void cp_async_16(u32 dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
CF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
CF_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

// Copy a Rows x Cols tile whose row r starts at src + r·row_stride (elements, last dim contiguous); rows at or
// past `valid_rows` are zero-filled so they contribute nothing to the MMAs.
// FreshOffsets (tiles.Tiles.fresh_offsets): the stride and the thread index pass through an empty asm at every call,
// so each thread's 64-bit offsets (one per chunk) are recomputed per tile (a few IMAD.WIDE) rather than hoisted out
// of the caller's loop, where they hold 16+ registers for the whole kernel (the 2-tile d128 forward spilled them in
// its prologue, SASS). The extra instructions cost the kernels that fit without it (backward 2-5 % slower in a
// same-run A/B on an H100), so only the shapes that need it take it.
template <typename T, int Rows, int Cols, int Threads, bool FreshOffsets = false>
CF_DEVICE void load_tile_async(u32 dst, const typename T::elem* src, i64 row_stride, int valid_rows, int tid) {
    constexpr int kPerChunk = 16 / sizeof(typename T::elem);  // elements per 16-byte chunk
    constexpr int kChunksPerRow = Cols / kPerChunk;
    constexpr int kChunks = Rows * kChunksPerRow;
    if constexpr (FreshOffsets) asm volatile("" : "+l"(row_stride), "+r"(tid));
#pragma unroll
    for (int it = 0; it < (kChunks + Threads - 1) / Threads; ++it) {
        const int c = it * Threads + tid;
        if (kChunks % Threads == 0 || c < kChunks) {
            const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * kPerChunk;
            const bool valid = row < valid_rows;
            cp_async_16(Tile<T, Cols>::at(dst, row, col), valid ? src + row * row_stride + col : src, valid);
        }
    }
}

CF_DEVICE float warp_max4(float x) {  // over the 4 lanes that share an accumulator row
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
CF_DEVICE float warp_sum4(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// 2^x in one MUFU op. exp2f() without --use_fast_math adds range handling we do not need: arguments here are
// <= 0 (scores minus their row max) or -inf, where ex2.approx returns +0.
CF_DEVICE float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

CF_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace cupyflash
