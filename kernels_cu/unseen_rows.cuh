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
constexpr int kUnseenSumRows = 512;       // unseen_sums: query rows per thread block
constexpr int kUnseenKeysPerBlock = 256;  // unseen_key_sums, unseen_kv: keys per thread block
constexpr int kUnseenStage = 16;          // rows or keys staged in shared memory at a time (D, Dv <= 256: 16 KiB)
// The (Dv x D) sums vk and gq: each thread holds kUnseenAcc of a pass's kUnseenPass entries in registers over the
// block's rows or keys and adds them to the workspace once (a D x D pass per stage of 16 rows made ~30 M atomics a
// Llama layer with left padding); D·Dv > kUnseenPass (head dims above 128) takes more than one pass.
constexpr int kUnseenAcc = 64;
constexpr int kUnseenPass = kUnseenAcc * kUnseenThreads;

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

// acc[m] += Σ_r a[r][x / D] · b[r][x % D] for the thread's entries x of pass `pass` (kUnseenAcc of them) over
// staged rows a (Dv wide) and b (D wide).
CF_DEVICE void unseen_outer(float (&acc)[kUnseenAcc], const float (*a)[256], const float (*b)[256], int pass, int D,
                            int Dv) {
#pragma unroll
    for (int m = 0; m < kUnseenAcc; ++m) {
        const int x = pass * kUnseenPass + m * kUnseenThreads + threadIdx.x;
        if (x >= D * Dv) break;
        const int e = x / D, c = x % D;
        float sum = 0.f;
#pragma unroll
        for (int r = 0; r < kUnseenStage; ++r) sum += a[r][e] * b[r][c];
        acc[m] += sum;
    }
}

CF_DEVICE void unseen_add(float* dst, const float (&acc)[kUnseenAcc], int pass, int D, int Dv) {
#pragma unroll
    for (int m = 0; m < kUnseenAcc; ++m) {
        const int x = pass * kUnseenPass + m * kUnseenThreads + threadIdx.x;
        if (x >= D * Dv) break;
        atomicAdd(dst + x, acc[m]);
    }
}

// grid (ceil(Nk / kUnseenKeysPerBlock), Hkv, B): v_sum += Σ_j v_j over the block's keys; with mode 2 also k_sum and
// vk[e][a] += Σ_j v_j[e] k_j[a], from keys staged kUnseenStage at a time in fp32 (zero past Nk).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_key_sums(const UnseenRowsParams<typename T::elem> p) {
    const int g = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, g);
    if (*ws.flag() == 0.f) return;
    __shared__ float s_v[kUnseenStage][256], s_k[kUnseenStage][256];
    const int j0 = blockIdx.x * kUnseenKeysPerBlock, j_end = min(j0 + kUnseenKeysPerBlock, p.Nk);
    const bool gram = p.mode == 2;
    const int t = threadIdx.x, passes = gram ? (p.D * p.Dv + kUnseenPass - 1) / kUnseenPass : 1;
    const auto* v = p.v + b * p.v_s.b + g * p.v_s.h;
    const auto* k = p.k + b * p.k_s.b + g * p.k_s.h;
    for (int pass = 0; pass < passes; ++pass) {
        float acc[kUnseenAcc] = {}, v_sum = 0.f, k_sum = 0.f;
        for (int js = j0; js < j_end; js += kUnseenStage) {
            const int n = min(kUnseenStage, j_end - js);
            __syncthreads();  // the previous stage is read
            for (int x = t; x < kUnseenStage * p.Dv; x += kUnseenThreads) {
                const int r = x / p.Dv, e = x % p.Dv;
                s_v[r][e] = r < n ? T::to_float(v[(js + r) * p.v_s.n + e]) : 0.f;
            }
            if (gram) {
                for (int x = t; x < kUnseenStage * p.D; x += kUnseenThreads) {
                    const int r = x / p.D, a = x % p.D;
                    s_k[r][a] = r < n ? T::to_float(k[(js + r) * p.k_s.n + a]) : 0.f;
                }
            }
            __syncthreads();
            if (pass == 0) {
                for (int r = 0; r < kUnseenStage; ++r) {
                    if (t < p.Dv) v_sum += s_v[r][t];
                    if (gram && t < p.D) k_sum += s_k[r][t];
                }
            }
            if (gram) unseen_outer(acc, s_v, s_k, pass, p.D, p.Dv);
        }
        if (pass == 0 && t < p.Dv) atomicAdd(ws.v_sum() + t, v_sum);
        if (pass == 0 && gram && t < p.D) atomicAdd(ws.k_sum() + t, k_sum);
        if (gram) unseen_add(ws.vk(), acc, pass, p.D, p.Dv);
    }
}

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
// gq[e][a] += Σ_i dO_i[e] q_i[a]. Rows staged kUnseenStage at a time: an unseen row's values, others' zero.
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_sums(const UnseenRowsParams<typename T::elem> p) {
    const int h = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, h / (p.H / p.Hkv));
    if (*ws.flag() == 0.f) return;
    __shared__ float s_do[kUnseenStage][256], s_q[kUnseenStage][256];
    __shared__ bool s_row[kUnseenStage];
    const float* lse = p.lse + ((i64)b * p.H + h) * p.Nq;
    const auto* dout = p.dout + b * p.do_s.b + h * p.do_s.h;
    const auto* q = p.q + b * p.q_s.b + h * p.q_s.h;
    const bool gram = p.mode == 2;
    const int t = threadIdx.x, passes = gram ? (p.D * p.Dv + kUnseenPass - 1) / kUnseenPass : 1;
    const int i0 = blockIdx.x * kUnseenSumRows, i_end = min(i0 + kUnseenSumRows, p.Nq);
    for (int pass = 0; pass < passes; ++pass) {
        float acc[kUnseenAcc] = {}, gsum = 0.f;
        bool any = false;
        for (int is = i0; is < i_end; is += kUnseenStage) {
            const bool mine = t < kUnseenStage && is + t < i_end && unseen(lse[is + t]);
            if (!__syncthreads_or(mine)) continue;  // also: the previous stage is read
            any = true;
            if (t < kUnseenStage) s_row[t] = mine;
            __syncthreads();
            for (int x = t; x < kUnseenStage * p.Dv; x += kUnseenThreads) {
                const int r = x / p.Dv, e = x % p.Dv;
                s_do[r][e] = s_row[r] ? T::to_float(dout[(is + r) * p.do_s.n + e]) : 0.f;
            }
            if (gram) {
                for (int x = t; x < kUnseenStage * p.D; x += kUnseenThreads) {
                    const int r = x / p.D, a = x % p.D;
                    s_q[r][a] = s_row[r] ? T::to_float(q[(is + r) * p.q_s.n + a]) : 0.f;
                }
            }
            __syncthreads();
            if (pass == 0 && t < p.Dv) {
                for (int r = 0; r < kUnseenStage; ++r) gsum += s_do[r][t];
            }
            if (gram) unseen_outer(acc, s_do, s_q, pass, p.D, p.Dv);
        }
        if (!any) return;  // the same in every thread
        if (pass == 0 && t < p.Dv) atomicAdd(ws.gsum() + t, gsum);
        if (gram) unseen_add(ws.gq(), acc, pass, p.D, p.Dv);
    }
}

// grid (ceil(Nk / kUnseenKeysPerBlock), Hkv, B): dv_j += gsum / Nk, one key row per warp; with mode 2 also
// dk_j[a] += (scale / Nk) Σ_e gq[e][a] c_j[e], c_j = v_j − v̄, for keys staged kUnseenStage at a time (each gq
// entry read once a stage).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_kv(const UnseenRowsParams<typename T::elem> p) {
    const int g = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, g);
    if (*ws.flag() == 0.f) return;
    const float inv_nk = 1.f / p.Nk;
    const int t = threadIdx.x;
    const int j0 = blockIdx.x * kUnseenKeysPerBlock, j_end = min(j0 + kUnseenKeysPerBlock, p.Nk);
    for (int j = j0 + t / 32; j < j_end; j += kUnseenThreads / 32) {
        auto* dv = p.dv + b * p.dv_s.b + g * p.dv_s.h + j * p.dv_s.n;
        for (int e = t % 32; e < p.Dv; e += 32) dv[e] = T::from_float(T::to_float(dv[e]) + ws.gsum()[e] * inv_nk);
    }
    if (p.mode != 2) return;
    __shared__ float s_c[kUnseenStage][256];
    const auto* v = p.v + b * p.v_s.b + g * p.v_s.h;
    for (int js = j0; js < j_end; js += kUnseenStage) {
        const int n = min(kUnseenStage, j_end - js);
        __syncthreads();  // the previous stage is read
        for (int x = t; x < kUnseenStage * p.Dv; x += kUnseenThreads) {
            const int r = x / p.Dv, e = x % p.Dv;
            s_c[r][e] = r < n ? T::to_float(v[(js + r) * p.v_s.n + e]) - ws.v_sum()[e] * inv_nk : 0.f;
        }
        __syncthreads();
        for (int a = t; a < p.D; a += kUnseenThreads) {
            float acc[kUnseenStage] = {};
            for (int e = 0; e < p.Dv; ++e) {
                const float gq = ws.gq()[e * p.D + a];
#pragma unroll
                for (int r = 0; r < kUnseenStage; ++r) acc[r] += gq * s_c[r][e];
            }
            for (int r = 0; r < n; ++r) {
                auto* dk = p.dk + b * p.dk_s.b + g * p.dk_s.h + (js + r) * p.dk_s.n;
                dk[a] = T::from_float(T::to_float(dk[a]) + p.scale * inv_nk * acc[r]);
            }
        }
    }
}

// grid (ceil(Nq / kUnseenRowsPerBlock), H, B), mode 2: dq_i[a] = scale · Σ_e dO_i[e] M[e][a] in the unseen rows
// (where the attention kernels wrote 0), M[e][a] = (vk[e][a] − v_sum[e] · k_sum[a] / Nk) / Nk, for rows staged
// kUnseenStage at a time (each M entry formed once a stage).
template <typename T>
__global__ void __launch_bounds__(kUnseenThreads) unseen_dq(const UnseenRowsParams<typename T::elem> p) {
    const int h = blockIdx.y, b = blockIdx.z;
    const UnseenWs ws = unseen_ws(p, b, h / (p.H / p.Hkv));
    if (*ws.flag() == 0.f) return;
    __shared__ float s_do[kUnseenStage][256];
    __shared__ bool s_row[kUnseenStage];
    const float* lse = p.lse + ((i64)b * p.H + h) * p.Nq;
    const auto* dout = p.dout + b * p.do_s.b + h * p.do_s.h;
    const float inv_nk = 1.f / p.Nk;
    const int t = threadIdx.x;
    const int i0 = blockIdx.x * kUnseenRowsPerBlock, i_end = min(i0 + kUnseenRowsPerBlock, p.Nq);
    for (int is = i0; is < i_end; is += kUnseenStage) {
        const bool mine = t < kUnseenStage && is + t < i_end && unseen(lse[is + t]);
        if (!__syncthreads_or(mine)) continue;  // also: the previous stage is read
        if (t < kUnseenStage) s_row[t] = mine;
        __syncthreads();
        for (int x = t; x < kUnseenStage * p.Dv; x += kUnseenThreads) {
            const int r = x / p.Dv, e = x % p.Dv;
            s_do[r][e] = s_row[r] ? T::to_float(dout[(is + r) * p.do_s.n + e]) : 0.f;
        }
        __syncthreads();
        for (int a = t; a < p.D; a += kUnseenThreads) {
            const float k_mean = ws.k_sum()[a] * inv_nk;
            float acc[kUnseenStage] = {};
            for (int e = 0; e < p.Dv; ++e) {
                const float m = ws.vk()[e * p.D + a] - ws.v_sum()[e] * k_mean;
#pragma unroll
                for (int r = 0; r < kUnseenStage; ++r) acc[r] += s_do[r][e] * m;
            }
#pragma unroll
            for (int r = 0; r < kUnseenStage; ++r) {
                if (s_row[r]) p.dq[b * p.dq_s.b + h * p.dq_s.h + (is + r) * p.dq_s.n + a] =
                    T::from_float(p.scale * inv_nk * acc[r]);
            }
        }
    }
}

}  // namespace cupyflash
