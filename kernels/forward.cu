// The forward of a DoRA/LoRA layer around the base product base = x·W0ᵀ (cuBLAS, or
// supplied by the caller, e.g. one slice of a fused QKV GEMM):
//   shrink   U = x·Aᵀ                                  [T, r] f32
//   compose  y = g ⊙ (base + s·U·Bᵀ) + b               one pass over base; y may be base
//
// Both are generic enough to serve the backward too (src/kernels/launch.rs):
//   shrink with X = V (materialised for the exact gradient) gives V·Aᵀ, accumulated into
//   grad_lora_B with a per-row coefficient;
//   compose with Bm = Aᵀ (strides), g = 1, no bias and y = base = dz·W0 gives
//   grad_x = dz·W0 + s·(dz·B)·A in place.
#include "common.cuh"

namespace df {

// ---------------------------------------------------------------------------------------
// shrink v1: out[z, t, i] (+)= coef[t]·Σ_{k in split z} X[t, k]·A[i, k]
//
// Block: 256 threads over 1024 outputs, rt ranks × 1024/rt rows; rt (16, 32 or 64: the
// launcher's, the least power of two ≥ r within SH_MIN_RANKS..SH_RANKS) follows the rank, so
// no thread computes a rank beyond r when r is 16, 32 or 64 (at r = 16, the 64-rank tile
// left three quarters of the threads idle: the H200 run of 2026-11-29). The reduction
// is walked in chunks of SH_KCHUNK = 32, both operands staged in shared memory (padded rows:
// no bank conflicts). Thread (il = tid % rt, tq = tid / rt) owns rows tq + (256/rt)·q,
// q = 0..3. Grid: (⌈rows/(1024/rt)⌉, ⌈r/rt⌉, splits). With few rows (decode) the launcher
// splits d_in so that enough blocks stream A; compose then sums the splits' slabs in order.
//
// Bytes: X ⌈r/rt⌉ times (rows·d_in·sz; once for r ≤ 64) + A once per row block
// (⌈rows·rt/1024⌉·r·d_in·sz, L2) + out 4·rows·r.   FLOPs: 2·rows·d_in·r.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA>
__device__ __forceinline__ void shrink(
    const T* __restrict__ x,         // [rows, d_in] at (t, k) -> x[t*ldx_t + k*ldx_k]
    long long ldx_t, long long ldx_k,
    const TA* __restrict__ a,        // [r, d_in]
    int rows, int d_in, int r,
    int k_per_split,                 // reduction columns per split (grid.z splits)
    const float* __restrict__ coef,  // [rows] or null (then a single split)
    float* __restrict__ out,         // [splits, rows, r]: = acc, or += coef[t]·acc
    int rt) {                        // rank tile: 16, 32 or 64 (divides THREADS)
    constexpr int Q = SH_ROWS / (THREADS / SH_RANKS);  // 4 rows per thread at every tile
    __shared__ float xs[Q * (THREADS / SH_MIN_RANKS)][SH_KCHUNK + 1];
    __shared__ float as[SH_RANKS][SH_KCHUNK + 1];
    const int tid = threadIdx.x;
    const int groups = THREADS / rt;  // row groups of the block
    const int brows = Q * groups;     // rows of the block
    const int t0 = blockIdx.x * brows;
    const int i0 = blockIdx.y * rt;
    const int il = tid % rt;
    const int tq = tid / rt;
    // Split-K (decode: few rows, long d_in): split z reduces columns [kb, ke) into its own
    // slab of `out`; the consumer (compose) sums the slabs in a fixed order.
    const int kb = blockIdx.z * k_per_split;
    const int ke = min(d_in, kb + k_per_split);
    out += (long long)blockIdx.z * rows * r;

    float acc[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = 0.f;

    for (int k0 = kb; k0 < ke; k0 += SH_KCHUNK) {
        __syncthreads();  // readers of the previous chunk are done
        for (int f = tid; f < brows * SH_KCHUNK; f += THREADS) {
            int tt, c;
            if (ldx_k == 1) {
                tt = f / SH_KCHUNK;
                c = f % SH_KCHUNK;
            } else {
                c = f / brows;
                tt = f % brows;
            }
            const int t = t0 + tt, k = k0 + c;
            xs[tt][c] = (t < rows && k < ke) ? to_f32(x[t * ldx_t + k * ldx_k]) : 0.f;
        }
        for (int f = tid; f < rt * SH_KCHUNK; f += THREADS) {
            const int ii = f / SH_KCHUNK, c = f % SH_KCHUNK;
            const int i = i0 + ii, k = k0 + c;
            as[ii][c] = (i < r && k < ke) ? to_f32(a[(long long)i * d_in + k]) : 0.f;
        }
        __syncthreads();
        const int nc = min(SH_KCHUNK, ke - k0);
        for (int c = 0; c < nc; ++c) {
            const float av = as[il][c];
#pragma unroll
            for (int q = 0; q < Q; ++q) acc[q] += xs[tq + groups * q][c] * av;
        }
    }
    const int i = i0 + il;
    if (i >= r) return;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        const int t = t0 + tq + groups * q;
        if (t < rows) {
            const long long o = (long long)t * r + i;
            out[o] = coef ? out[o] + coef[t] * acc[q] : acc[q];
        }
    }
}

// ---------------------------------------------------------------------------------------
// compose v1: y[t, j] = g[j]·(base[t, j] + s·Σ_i U[t, i]·Bm(j, i)) + bias[j]
//
// Block: 256 threads, CO_ROWS = 16 tokens × CO_COLS = 64 columns; the rank in chunks of
// CO_RCHUNK = 32 (U and B chunks in shared memory, padded). Thread (jl = tid % 64,
// tq = tid / 64) owns tokens tq + 4q: consecutive threads touch consecutive columns of base
// and y (coalesced). Each element of base is read once and y written once by the same
// thread, so y may alias base (the in-place variant): base and y are not __restrict__.
// Row strides ld_base, ld_y let base and y be column slices of a wider buffer (one
// projection of a fused QKV GEMM's output), in place.
// Grid: (⌈T/16⌉, ⌈d_out/64⌉).
//
// Bytes: base T·d_out·sz + y T·d_out·sz + U ⌈d_out/64⌉·4·T·r (L2) + B ⌈T/16⌉·d_out·r·sz
// (L2) + g, b.   FLOPs: 2·T·d_out·r + 4·T·d_out.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA>
__device__ __forceinline__ void compose(
    const T* base,                   // [T, d_out] rows ld_base apart (may alias y)
    long long ld_base,
    T* y,                            // [T, d_out] rows ld_y apart
    long long ld_y,
    const float* __restrict__ u,     // [u_splits, T, r]: U = Σ of the slabs
    int u_splits,
    const TA* __restrict__ bm,        // Bm [d_out, r] at (j, i) -> bm[j*ldb_j + i*ldb_i]
    long long ldb_j, long long ldb_i,
    const float* __restrict__ g,     // [d_out] or null (g = 1: plain LoRA, grad_x)
    const float* __restrict__ bias,  // [d_out] or null
    float s, int t_rows, int d_out, int r) {
    __shared__ float us[CO_ROWS][CO_RCHUNK + 1];
    __shared__ float bsh[CO_COLS][CO_RCHUNK + 1];
    const int tid = threadIdx.x;
    const int t0 = blockIdx.x * CO_ROWS;
    const int j0 = blockIdx.y * CO_COLS;
    const int jl = tid % CO_COLS;
    const int tq = tid / CO_COLS;
    constexpr int Q = CO_ROWS / (THREADS / CO_COLS);  // 4

    float acc[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = 0.f;

    for (int i0 = 0; i0 < r; i0 += CO_RCHUNK) {
        __syncthreads();
        for (int f = tid; f < CO_ROWS * CO_RCHUNK; f += THREADS) {
            const int tt = f / CO_RCHUNK, ii = f % CO_RCHUNK;
            const int t = t0 + tt, i = i0 + ii;
            float v = 0.f;
            if (t < t_rows && i < r) {
                for (int sp = 0; sp < u_splits; ++sp)
                    v += u[((long long)sp * t_rows + t) * r + i];
            }
            us[tt][ii] = v;
        }
        for (int f = tid; f < CO_COLS * CO_RCHUNK; f += THREADS) {
            int jj, ii;
            if (ldb_i == 1) {
                jj = f / CO_RCHUNK;
                ii = f % CO_RCHUNK;
            } else {  // Bm = Aᵀ: consecutive j are consecutive in memory
                ii = f / CO_COLS;
                jj = f % CO_COLS;
            }
            const int j = j0 + jj, i = i0 + ii;
            bsh[jj][ii] = (j < d_out && i < r) ? to_f32(bm[j * ldb_j + i * ldb_i]) : 0.f;
        }
        __syncthreads();
        const int ni = min(CO_RCHUNK, r - i0);
        for (int ii = 0; ii < ni; ++ii) {
            const float bv = bsh[jl][ii];
#pragma unroll
            for (int q = 0; q < Q; ++q) acc[q] += us[tq + 4 * q][ii] * bv;
        }
    }
    const int j = j0 + jl;
    if (j >= d_out) return;
    const float gj = g ? g[j] : 1.f;
    const float bj = bias ? bias[j] : 0.f;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        const int t = t0 + tq + 4 * q;
        if (t < t_rows) {
            const float z = to_f32(base[(long long)t * ld_base + j]) + s * acc[q];
            y[(long long)t * ld_y + j] = from_f32<T>(gj * z + bj);
        }
    }
}

}  // namespace df

#define DF_SHRINK(sfx, T, TA)                                                               \
    extern "C" __global__ void __launch_bounds__(256) dora_shrink_##sfx(                    \
        const T* __restrict__ x, /* [rows, d_in] via (ldx_t, ldx_k) */                      \
        long long ldx_t, long long ldx_k,                                                   \
        const TA* __restrict__ a,       /* [r, d_in] */                                     \
        int rows, int d_in, int r, int k_per_split,                                         \
        const float* __restrict__ coef, /* [rows] or null */                                \
        float* __restrict__ out,        /* [splits, rows, r] */                             \
        int rt) {                       /* rank tile: 16, 32 or 64 */                       \
        df::shrink<T, TA>(x, ldx_t, ldx_k, a, rows, d_in, r, k_per_split, coef, out, rt);   \
    }
DF_STAMP(dora_shrink, DF_SHRINK)

#define DF_COMPOSE(sfx, T, TA)                                                              \
    extern "C" __global__ void __launch_bounds__(256) dora_compose_##sfx(                   \
        const T* base,                  /* [T, d_out] rows ld_base apart, may alias y */    \
        long long ld_base,                                                                  \
        T* y,                           /* [T, d_out] rows ld_y apart */                    \
        long long ld_y,                                                                     \
        const float* __restrict__ u,    /* [u_splits, T, r] */                              \
        int u_splits,                                                                       \
        const TA* __restrict__ bm,      /* [d_out, r] via (ldb_j, ldb_i) */                 \
        long long ldb_j, long long ldb_i,                                                   \
        const float* __restrict__ g,    /* [d_out] or null */                               \
        const float* __restrict__ bias, /* [d_out] or null */                               \
        float s, int t_rows, int d_out, int r) {                                            \
        df::compose<T, TA>(base, ld_base, y, ld_y, u, u_splits, bm, ldb_j, ldb_i, g, bias, s,   \
                           t_rows, d_out, r);                                               \
    }
DF_STAMP(dora_compose, DF_COMPOSE)
