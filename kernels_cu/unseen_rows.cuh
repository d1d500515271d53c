// Rows that see no key, as eager gives them under a finite mask fill (cupyflash/unseen_rows.py has the math): the
// attention kernels leave such a row's out 0 and lse +inf; these kernels run after them on the op's outputs, in
// place. Eager's row is uniform over all Nk keys: out_i = v̄; its gradient is dv_j += dO_i / Nk and, where the fill
// was added to the scores (mode 2), dq_i = scale · dO_i M with M = Cᵀ K / Nk (c_j = v_j − v̄), dk_j += (scale / Nk)
// · GQᵀ c_j with GQ = Σ_i dO_i ⊗ q_i over the K/V head's unseen rows.
//
// The sums live in an fp32 workspace, zeroed by the caller, one block of `ws_per` floats per (batch, K/V head):
// [flag, 3 unused] v_sum[Dv] gsum[Dv] k_sum[D] vk[Dv][D] gq[Dv][D] (the forward uses the first two). unseen_flags
// sets the flag where one of the K/V head's query rows has lse = +inf; every later kernel returns at once where it
// is 0, so a call with no such row costs a few launches of empty thread blocks.
#pragma once
#include "params.cuh"

namespace cupyflash {

constexpr int kUnseenThreads = 256;
constexpr int kUnseenRowsPerBlock = 128;  // unseen_fill, unseen_dq: query rows per thread block
constexpr int kUnseenSumRows = 256;       // unseen_sums: query rows per thread block
constexpr int kUnseenKeysPerBlock = 128;  // unseen_key_sums: keys per thread block
constexpr int kUnseenKvKeys = 64;         // unseen_kv: keys per thread block (one unseen_gemm row block)
constexpr int kUnseenStage = 16;          // rows or keys staged in shared memory at a time (D, Dv <= 256)
// Every kernel loads its rows a stage (or a GEMM's k chunk) ahead of their use, into registers, and converts and
// stores them to shared memory only when the stage before is done: the loads are in flight while the block
// multiplies. The first forms loaded, converted and stored element by element, each load's latency exposed: about
// 0.7 ms a call at the Llama layer's shape with left padding (H100; results/llama-profile-left-padding-…md).
// The products run on the tensor cores (mma.sync through common.cuh's fragment loads; TF32 for fp32), fp32
// accumulators. The Dv x D sums vk and gq: a stage's 16 rows are one k16 step of Aᵀ B, in passes of 128 x 128 of
// the sum, each warp 16 of its rows (register-tiled outer products on the CUDA cores took 56 µs a launch of
// unseen_sums at the Llama layer's shape with left padding, H100; results/session26-…md).
constexpr int kUnseenSumTile = 128;
// dk and dq as GEMMs (rows x Dv times Dv x D): 64 rows x 128 columns a pass, warps 4 x 2 of 16 x 64, the operands
// staged 16 of Dv at a time as the inputs' type (71 and 42 µs a launch of unseen_dq and unseen_kv on the CUDA cores;
// 32 at a time held 160-190 registers, the fetched entries' addresses).
constexpr int kUnseenGemmRows = 64;
constexpr int kUnseenGemmCols = 128;
constexpr int kUnseenGemmK = 16;

struct UnseenWs {
    float* base;
    int D, Dv;
    CF_DEVICE float* flag() const { return base; }
    CF_DEVICE float* v_sum() const { return base + 4; }
    CF_DEVICE float* gsum() const { return base + 4 + Dv; }
    CF_DEVICE float* k_sum() const { return base + 4 + 2 * Dv; }
    CF_DEVICE float* vk() const { return base + 4 + 2 * Dv + D; }
    CF_DEVICE float* gq() const { return base + 4 + 2 * Dv + D + Dv * D; }
};

template <typename E>
CF_DEVICE UnseenWs unseen_ws(const UnseenRowsParams<E>& p, int b, int g) {
    return UnseenWs{p.ws + ((i64)b * p.Hkv + g) * p.ws_per, p.D, p.Dv};
}

CF_DEVICE bool unseen(float lse) { return lse == inf_f(); }

// grid (ceil(G·Nq / (4·threads)), Hkv, B): the flag of (b, g) from the lse of its G query heads (contiguous rows).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_flags(const UnseenRowsParams<typename T::elem> p) {
    const int g = blockIdx.y, b = blockIdx.z, group = p.H / p.Hkv;
    const float* lse = p.lse + ((i64)b * p.H + (i64)g * group) * p.Nq;
    const i64 n = (i64)group * p.Nq, r0 = ((i64)blockIdx.x * kUnseenThreads + threadIdx.x) * 4;
    bool any = false;
#pragma unroll
    for (int r = 0; r < 4; ++r) any |= r0 + r < n && unseen(lse[r0 + r]);
    if (__syncthreads_or(any) && threadIdx.x == 0) *unseen_ws(p, b, g).flag() = 1.f;
}

// Pass `pass` of a Dv x D sum: its first row e_base and column c_base.
CF_DEVICE int unseen_passes(int D, int Dv) {
    return (Dv + kUnseenSumTile - 1) / kUnseenSumTile * ((D + kUnseenSumTile - 1) / kUnseenSumTile);
}
CF_DEVICE void unseen_pass(int pass, int D, int& e_base, int& c_base) {
    const int col_passes = (D + kUnseenSumTile - 1) / kUnseenSumTile;
    e_base = pass / col_passes * kUnseenSumTile;
    c_base = pass % col_passes * kUnseenSumTile;
}

// c += Σ_r a_r[e_row0 + i] b_r[c_base + j] over a stage's 16 rows (i < 16, j < 128: the warp's m16 x n128), a and b
// stored [row][column] (Tile<T, 256>): Aᵀ's fragments come transposed by ldmatrix (load_a_km), B's by load_b_kn.
// Columns past Dv or D hold stale values; they reach only the sum's entries past them, which unseen_sum_add drops.
template <typename T>
CF_DEVICE void unseen_outer(float (&c)[kUnseenSumTile / 8][4], u32 s_a, u32 s_b, int e_row0, int c_base, int lane) {
    u32 a[T::kARegs];
    load_a_km<T, 256>(a, s_a, 0, e_row0, lane);
#pragma unroll
    for (int np = 0; np < kUnseenSumTile / 16; ++np) {
        u32 b[2 * T::kBRegs];
        load_b_kn<T, 256>(b, s_b, 0, c_base + 16 * np, lane);
        T::mma16(c[2 * np], a, b);
        T::mma16(c[2 * np + 1], a, b + T::kBRegs);
    }
}

// dst[e][a] += c (unseen_outer's tile of rows e_row0.., columns c_base..) inside Dv x D: red_add_tile's vector
// reductions where D and Dv are multiples of 8 (every sum of UnseenWs then starts 16-byte aligned, rows D apart),
// else one atomic per entry.
CF_DEVICE void unseen_sum_add(float* dst, const float (&c)[kUnseenSumTile / 8][4], int e_row0, int c_base, int D,
                              int Dv, int lane) {
    constexpr int kNt = kUnseenSumTile / 8;
    const int row = e_row0 + lane / 4;
    if (D % 8 == 0 && Dv % 8 == 0) {
        red_add_tile<kNt>(dst + (i64)e_row0 * D + c_base, D, c, row < Dv, row + 8 < Dv, lane,
                          min(kNt, (D - c_base) / 8));
        return;
    }
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int e = row + 8 * h, col = c_base + 8 * nt + 2 * (lane % 4) + j;
                if (e < Dv && col < D) atomicAdd(dst + (i64)e * D + col, c[nt][2 * h + j]);
            }
        }
    }
}

// A stage of kUnseenStage rows as thread t holds it: column t of each row (nothing where t is past the width),
// raw until stored to shared memory (UnseenStage::load issues the loads; the first use waits for them).
template <typename T>
struct UnseenStage {
    using E = typename T::elem;
    E x[kUnseenStage];
    // Rows r whose bit is set in `rows` are read from col + r · row_stride; the others are 0.
    CF_DEVICE void load(const E* col, i64 row_stride, bool in_width, unsigned rows) {
#pragma unroll
        for (int r = 0; r < kUnseenStage; ++r) x[r] = in_width && (rows >> r & 1u) ? col[r * row_stride] : E(0);
    }
    CF_DEVICE float at(int r) const { return T::to_float(x[r]); }
    // into rows 0 .. kUnseenStage - 1 of a Tile<T, 256> at s, column t
    CF_DEVICE void store(unsigned char* s, int t, bool in_width) const {
        if (!in_width) return;
#pragma unroll
        for (int r = 0; r < kUnseenStage; ++r) reinterpret_cast<E*>(s + r * Tile<T, 256>::kRowBytes)[t] = x[r];
    }
};

// The stage's rows r with r0 + r < end, as UnseenStage::load's bits.
CF_DEVICE unsigned unseen_stage_rows(int r0, int end) {
    const int n = min(kUnseenStage, end - r0);
    return n > 0 ? (1u << n) - 1u : 0u;
}

// Pass `pass` of unseen_key_sums and unseen_sums over rows r0 .. end of two tensors a (Dv wide) and b (D wide),
// thread t reading column t of each (a_col, b_col: the column's entry in row 0; in_a, in_b: t within the width), a
// stage of kUnseenStage rows loaded ahead of its use: on pass 0 a_sum += Σ a (SumB: b_sum += Σ b too); with `gram`
// its warp's tile of the pass's 128 x 128 of Aᵀ B, staged through s_a and s_b, added into the Dv x D sum `dst`.
// rows_of(r) gives the rows of the stage from r as UnseenStage::load's bits; a stage without any is skipped (the same
// in every thread).
template <typename T, bool SumB, typename RowsOf>
CF_DEVICE void unseen_sum_pass(int pass, float* dst, float& a_sum, float& b_sum, const typename T::elem* a_col,
                               i64 a_sn, bool in_a, const typename T::elem* b_col, i64 b_sn, bool in_b, int r0, int end,
                               RowsOf rows_of, bool gram, int D, int Dv, unsigned char* s_a, unsigned char* s_b) {
    const int t = threadIdx.x, warp = t / 32, lane = t % 32;
    const bool sums = pass == 0;
    float c[kUnseenSumTile / 8][4] = {};
    int e_base, c_base;
    unseen_pass(pass, D, e_base, c_base);
    const int e_row0 = e_base + 16 * warp;
    const bool tiled = gram && e_row0 < Dv;  // the same in the warp
    UnseenStage<T> sa, sb;
    const auto fetch = [&](int r) {
        const unsigned rows = rows_of(r);
        sa.load(a_col + r * a_sn, a_sn, in_a, rows);
        sb.load(b_col + r * b_sn, b_sn, in_b, rows);
    };
    fetch(r0);
    for (int rs = r0; rs < end; rs += kUnseenStage) {
        const bool here = rows_of(rs) != 0u;
        if (here) {
            if (sums) {
#pragma unroll
                for (int r = 0; r < kUnseenStage; ++r) {
                    a_sum += sa.at(r);
                    if (SumB) b_sum += sb.at(r);
                }
            }
            if (gram) {
                __syncthreads();  // the previous stage is read
                sa.store(s_a, t, in_a);
                sb.store(s_b, t, in_b);
            }
        }
        if (rs + kUnseenStage < end) fetch(rs + kUnseenStage);
        if (here && gram) {
            __syncthreads();
            if (tiled) unseen_outer<T>(c, smem_addr(s_a), smem_addr(s_b), e_row0, c_base, lane);
        }
    }
    if (tiled) unseen_sum_add(dst, c, e_row0, c_base, D, Dv, lane);
}

// grid (ceil(Nk / kUnseenKeysPerBlock), Hkv, B): v_sum += Σ_j v_j over the block's keys; with mode 2 also k_sum and
// vk[e][a] += Σ_j v_j[e] k_j[a] (unseen_sum_pass; zero past Nk).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_key_sums(const UnseenRowsParams<typename T::elem> p) {
    const int g = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, g);
    if (*ws.flag() == 0.f) return;
    using Tl = Tile<T, 256>;
    __shared__ __align__(16) unsigned char s_v[Tl::template bytes<kUnseenStage>()];
    __shared__ __align__(16) unsigned char s_k[Tl::template bytes<kUnseenStage>()];
    const int j0 = blockIdx.x * kUnseenKeysPerBlock, j_end = min(j0 + kUnseenKeysPerBlock, p.Nk);
    const bool gram = p.mode == 2;
    const int t = threadIdx.x, passes = gram ? unseen_passes(p.D, p.Dv) : 1;
    const bool in_v = t < p.Dv, in_k = gram && t < p.D;
    const auto* v = p.v + b * p.v_s.b + g * p.v_s.h + t;  // column t
    const auto* k = p.k + b * p.k_s.b + g * p.k_s.h + t;
    for (int pass = 0; pass < passes; ++pass) {
        float v_sum = 0.f, k_sum = 0.f;
        unseen_sum_pass<T, true>(pass, ws.vk(), v_sum, k_sum, v, p.v_s.n, in_v, k, p.k_s.n, in_k, j0, j_end,
                                 [&](int js) { return unseen_stage_rows(js, j_end); }, gram, p.D, p.Dv, s_v, s_k);
        if (pass == 0 && in_v) atomicAdd(ws.v_sum() + t, v_sum);
        if (pass == 0 && in_k) atomicAdd(ws.k_sum() + t, k_sum);
    }
}

// c (rows 16 · (warp % 4) + lane / 4 (+ 8), columns c_base + 64 · (warp / 4) + 8 · nt + 2 · (lane % 4) (+ 1): the
// m16n8 layout of each warp's 16 x 64 of the block's 64 x 128) = Σ_e A[row][e] B[e][col] over e < Dv, with
// A[row][e] = finish_a(fetch_a(row, e), row, e) from an element of the inputs' type and B[e][col] =
// finish_b(fetch_b(e, col), e, col) from an fp32 workspace entry. The fetches are issued one chunk of kUnseenGemmK
// ahead of their use, the finishing arithmetic done when the chunk is stored to shared memory in the inputs' type
// (0 past Dv).
template <typename T, typename FetchA, typename FinishA, typename FetchB, typename FinishB>
CF_DEVICE void unseen_gemm(float (&c)[8][4], int Dv, FetchA fetch_a, FinishA finish_a, FetchB fetch_b,
                           FinishB finish_b) {
    using E = typename T::elem;
    using TA = Tile<T, kUnseenGemmK>;    // [row][e]
    using TB = Tile<T, kUnseenGemmCols>;  // [e][col]
    __shared__ __align__(16) unsigned char s_a[TA::template bytes<kUnseenGemmRows>()];
    __shared__ __align__(16) unsigned char s_b[TB::template bytes<kUnseenGemmK>()];
    constexpr int kA = kUnseenGemmRows * kUnseenGemmK / kUnseenThreads;  // a thread's A and B entries of a chunk
    constexpr int kB = kUnseenGemmK * kUnseenGemmCols / kUnseenThreads;
    const int t = threadIdx.x, warp = t / 32, lane = t % 32, row0 = 16 * (warp % 4), col0 = 64 * (warp / 4);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
    E a_raw[kA];
    float b_raw[kB];
    const auto fetch = [&](int k0) {
#pragma unroll
        for (int i = 0; i < kA; ++i) {  // a row's 16 values from consecutive threads
            const int x = t + i * kUnseenThreads, r = x / kUnseenGemmK, e = k0 + x % kUnseenGemmK;
            a_raw[i] = e < Dv ? fetch_a(r, e) : E(0);
        }
#pragma unroll
        for (int i = 0; i < kB; ++i) {
            const int x = t + i * kUnseenThreads, e = k0 + x / kUnseenGemmCols, col = x % kUnseenGemmCols;
            b_raw[i] = e < Dv ? fetch_b(e, col) : 0.f;
        }
    };
    fetch(0);
    for (int k0 = 0; k0 < Dv; k0 += kUnseenGemmK) {
        __syncthreads();  // the previous chunk is read
#pragma unroll
        for (int i = 0; i < kA; ++i) {
            const int x = t + i * kUnseenThreads, r = x / kUnseenGemmK, e = x % kUnseenGemmK;
            reinterpret_cast<E*>(s_a + r * TA::kRowBytes)[e] =
                T::from_float(k0 + e < Dv ? finish_a(T::to_float(a_raw[i]), r, k0 + e) : 0.f);
        }
#pragma unroll
        for (int i = 0; i < kB; ++i) {
            const int x = t + i * kUnseenThreads, e = x / kUnseenGemmCols, col = x % kUnseenGemmCols;
            reinterpret_cast<E*>(s_b + e * TB::kRowBytes)[col] =
                T::from_float(k0 + e < Dv ? finish_b(b_raw[i], k0 + e, col) : 0.f);
        }
        if (k0 + kUnseenGemmK < Dv) fetch(k0 + kUnseenGemmK);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kUnseenGemmK / 16; ++kk) {
            u32 a[T::kARegs];
            load_a<T, kUnseenGemmK>(a, smem_addr(s_a), row0, 16 * kk, lane);
#pragma unroll
            for (int np = 0; np < 4; ++np) {
                u32 bf[2 * T::kBRegs];
                load_b_kn<T, kUnseenGemmCols>(bf, smem_addr(s_b), 16 * kk, col0 + 16 * np, lane);
                T::mma16(c[2 * np], a, bf);
                T::mma16(c[2 * np + 1], a, bf + T::kBRegs);
            }
        }
    }
}

// Where unseen_gemm's c[nt][2h + j] lies in the block's 64 x 128: row and column.
CF_DEVICE int unseen_gemm_row(int h) { return 16 * (threadIdx.x / 32 % 4) + threadIdx.x % 32 / 4 + 8 * h; }
CF_DEVICE int unseen_gemm_col(int nt, int j) { return 64 * (threadIdx.x / 128) + 8 * nt + 2 * (threadIdx.x % 4) + j; }

// grid (ceil(Nq / kUnseenRowsPerBlock), H, B): out_i = v̄ in the unseen rows, one warp per row.
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_fill(const UnseenRowsParams<typename T::elem> p) {
    const int h = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, h / (p.H / p.Hkv));
    if (*ws.flag() == 0.f) return;
    const float* lse = p.lse + ((i64)b * p.H + h) * p.Nq;
    const float inv_nk = 1.f / p.Nk;
    const int i_end = min((int)(blockIdx.x + 1) * kUnseenRowsPerBlock, p.Nq);
    for (int i = blockIdx.x * kUnseenRowsPerBlock + threadIdx.x / 32; i < i_end; i += kUnseenThreads / 32) {
        if (!unseen(lse[i])) continue;
        auto* o = p.out + b * p.o_s.b + h * p.o_s.h + i * p.o_s.n;
        for (int e = threadIdx.x % 32; e < p.Dv; e += 32) o[e] = T::from_float(ws.v_sum()[e] * inv_nk);
    }
}

// grid (ceil(Nq / kUnseenSumRows), H, B): gsum += Σ_i dO_i over the unseen rows; with mode 2 also
// gq[e][a] += Σ_i dO_i[e] q_i[a]. Rows staged kUnseenStage at a time: an unseen row's values, others' zero. The
// block's unseen rows are found first, one lse per thread: a block without any returns at once, and stages without
// one are skipped (the same in every thread).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_sums(const UnseenRowsParams<typename T::elem> p) {
    static_assert(kUnseenSumRows == kUnseenThreads && kUnseenStage == 16, "a stage's rows are half a warp's ballot");
    const int h = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, h / (p.H / p.Hkv));
    if (*ws.flag() == 0.f) return;
    using Tl = Tile<T, 256>;
    __shared__ __align__(16) unsigned char s_do[Tl::template bytes<kUnseenStage>()];
    __shared__ __align__(16) unsigned char s_q[Tl::template bytes<kUnseenStage>()];
    __shared__ unsigned s_rows[kUnseenThreads / 32];  // bit r of word w: row i0 + 32w + r is unseen
    const int t = threadIdx.x;
    const int i0 = blockIdx.x * kUnseenSumRows, i_end = min(i0 + kUnseenSumRows, p.Nq);
    const float* lse = p.lse + ((i64)b * p.H + h) * p.Nq;
    const unsigned ballot = __ballot_sync(0xffffffffu, i0 + t < i_end && unseen(lse[i0 + t]));
    if (t % 32 == 0) s_rows[t / 32] = ballot;
    if (!__syncthreads_or(ballot != 0u)) return;
    const bool gram = p.mode == 2;
    const int passes = gram ? unseen_passes(p.D, p.Dv) : 1;
    const bool in_do = t < p.Dv, in_q = gram && t < p.D;
    const auto* dout = p.dout + b * p.do_s.b + h * p.do_s.h + t;  // column t
    const auto* q = p.q + b * p.q_s.b + h * p.q_s.h + t;
    const auto stage_rows = [&](int is) { return s_rows[(is - i0) / 32] >> ((is - i0) % 32) & 0xffffu; };
    for (int pass = 0; pass < passes; ++pass) {
        float gsum = 0.f, q_sum_unused = 0.f;
        unseen_sum_pass<T, false>(pass, ws.gq(), gsum, q_sum_unused, dout, p.do_s.n, in_do, q, p.q_s.n, in_q, i0,
                                  i_end, stage_rows, gram, p.D, p.Dv, s_do, s_q);
        if (pass == 0 && in_do) atomicAdd(ws.gsum() + t, gsum);
    }
}

// grid (ceil(Nk / kUnseenKvKeys), Hkv, B): dv_j += gsum / Nk; with mode 2 also dk_j[a] += (scale / Nk) Σ_e c_j[e]
// gq[e][a], c_j = v_j − v̄ (unseen_gemm).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_kv(const UnseenRowsParams<typename T::elem> p) {
    const int g = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, g);
    if (*ws.flag() == 0.f) return;
    __shared__ float s_vbar[256];
    const float inv_nk = 1.f / p.Nk;
    const int t = threadIdx.x;
    const int j0 = blockIdx.x * kUnseenKvKeys, j_end = min(j0 + kUnseenKvKeys, p.Nk);
    if (t < p.Dv) {  // column t of the block's rows of dv, a stage's loads in flight at once
        const float g_t = ws.gsum()[t] * inv_nk;
        auto* dv = p.dv + b * p.dv_s.b + g * p.dv_s.h + t;
        UnseenStage<T> st;
        for (int js = j0; js < j_end; js += kUnseenStage) {
            const unsigned rows = unseen_stage_rows(js, j_end);
            st.load(dv + js * p.dv_s.n, p.dv_s.n, true, rows);
#pragma unroll
            for (int r = 0; r < kUnseenStage; ++r) {
                if (rows >> r & 1u) dv[(js + r) * p.dv_s.n] = T::from_float(st.at(r) + g_t);
            }
        }
    }
    if (p.mode != 2) return;
    if (t < p.Dv) s_vbar[t] = ws.v_sum()[t] * inv_nk;  // published by unseen_gemm's first barrier
    const auto* v = p.v + b * p.v_s.b + g * p.v_s.h;
    auto* dk = p.dk + b * p.dk_s.b + g * p.dk_s.h;
    const float* gq = ws.gq();
    for (int js = j0; js < j_end; js += kUnseenGemmRows) {
        for (int c_base = 0; c_base < p.D; c_base += kUnseenGemmCols) {
            float c[8][4];
            unseen_gemm<T>(
                c, p.Dv,
                [&](int r, int e) { return js + r < j_end ? v[(js + r) * p.v_s.n + e] : typename T::elem(0); },
                [&](float x, int r, int e) { return js + r < j_end ? x - s_vbar[e] : 0.f; },
                [&](int e, int c) { return c_base + c < p.D ? gq[e * p.D + c_base + c] : 0.f; },
                [](float x, int, int) { return x; });
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = js + unseen_gemm_row(h);
                if (j >= j_end) continue;
                auto* row = dk + j * p.dk_s.n + c_base;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int col = unseen_gemm_col(nt, x);
                        if (c_base + col < p.D)
                            row[col] = T::from_float(T::to_float(row[col]) + p.scale * inv_nk * c[nt][2 * h + x]);
                    }
                }
            }
        }
    }
}

// grid (ceil(Nq / kUnseenRowsPerBlock), H, B), mode 2: dq_i[a] = (scale / Nk) Σ_e dO_i[e] (vk[e][a] − v_sum[e] ·
// k_sum[a] / Nk) in the unseen rows (where the attention kernels wrote 0), by unseen_gemm over 64 rows at a time.
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_dq(const UnseenRowsParams<typename T::elem> p) {
    const int h = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, h / (p.H / p.Hkv));
    if (*ws.flag() == 0.f) return;
    __shared__ bool s_row[kUnseenGemmRows];
    __shared__ float s_vbar[256], s_ksum[256];
    const float* lse = p.lse + ((i64)b * p.H + h) * p.Nq;
    const auto* dout = p.dout + b * p.do_s.b + h * p.do_s.h;
    auto* dq = p.dq + b * p.dq_s.b + h * p.dq_s.h;
    const float inv_nk = 1.f / p.Nk;
    const int t = threadIdx.x;
    if (t < p.Dv) s_vbar[t] = ws.v_sum()[t] * inv_nk;  // published by unseen_gemm's first barrier
    if (t < p.D) s_ksum[t] = ws.k_sum()[t];
    const float* vk = ws.vk();
    const int i0 = blockIdx.x * kUnseenRowsPerBlock, i_end = min(i0 + kUnseenRowsPerBlock, p.Nq);
    for (int is = i0; is < i_end; is += kUnseenGemmRows) {
        const bool mine = t < kUnseenGemmRows && is + t < i_end && unseen(lse[is + t]);
        if (!__syncthreads_or(mine)) continue;  // also: the previous rows' flags are read
        if (t < kUnseenGemmRows) s_row[t] = mine;
        __syncthreads();  // unseen_gemm's first loads read s_row
        for (int c_base = 0; c_base < p.D; c_base += kUnseenGemmCols) {
            float c[8][4];
            unseen_gemm<T>(
                c, p.Dv,
                [&](int r, int e) { return s_row[r] ? dout[(is + r) * p.do_s.n + e] : typename T::elem(0); },
                [](float x, int, int) { return x; },
                [&](int e, int c) { return c_base + c < p.D ? vk[e * p.D + c_base + c] : 0.f; },
                [&](float x, int e, int c) { return c_base + c < p.D ? x - s_vbar[e] * s_ksum[c_base + c] : 0.f; });
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = unseen_gemm_row(h);
                if (!s_row[r]) continue;
                auto* row = dq + (is + r) * p.dq_s.n + c_base;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int col = unseen_gemm_col(nt, x);
                        if (c_base + col < p.D) row[col] = T::from_float(p.scale * inv_nk * c[nt][2 * h + x]);
                    }
                }
            }
        }
    }
}

}  // namespace cupyflash
