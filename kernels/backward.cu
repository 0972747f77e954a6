// The backward of a DoRA/LoRA layer (docs/design.md §1), everything deterministic: no float
// atomics; every reduction is per-block partials summed afterwards in a fixed order.
//
//   bwd_dz        one pass over dy: z = base + s·U·Bᵀ recomputed on the fly,
//                 dz = dy ⊙ g (written), c-partials Σ_{t in block} dy⊙z per column, and
//                 dz·B [T, r] (f32).  Plain LoRA: dz = dy (not written), no c.
//   mag_reduce    c = Σ partials (fixed order); grad_m = c / max(n, ε); for the exact
//                 gradient kcoef = −s·m⊙c/n³ (0 where n < ε).
//   tn_{r16,r64}  part[split, i, k] = Σ_{t in split} L[t, i]·R[t, k]: the skinny products
//                 with a long reduction (grad_B = s·g⊙(dyᵀ·U), grad_A = s·(dz·B)ᵀ·x, and the
//                 exact-gradient term (kcoef⊙B)ᵀ·V), T split across blocks.
//   sum_partials  out (+)= alpha·colscale⊙Σ_split part, optionally transposed (fixed
//                 order). grad_B = s·diag(g)·dyᵀ·U this way: from dy as given, not the
//                 rounded dz, so it keeps f32 accuracy beside f32 adapters.
//   scale_rows    out[j, i] = coef[j]·in[j, i] in f32 (kcoef⊙B for the exact gradient).
// grad_x = dz·W0 goes to Backend::gemm; its low-rank term s·(dz·B)·A is forward.cu's
// compose run in place.
#include "common.cuh"

namespace df {

// ---------------------------------------------------------------------------------------
// bwd_dz v1. Block: 256 threads over tt tokens; it walks its split of d_out (all of it when
// unsplit) in chunks of jt columns (tt, jt chosen by the launcher so shared memory stays
// ≤ 48 KB; see src/kernels/spec.rs). Dynamic shared memory, f32:
//   us   [tt, r]        the block's rows of U
//   dzb  [tt, r]        dz·B accumulators (each element owned by one thread)
//   bsh  [jt, r + 1]    the chunk's rows of B (padded)
//   zs   [tt, jt + 1]   the chunk's dz
//   ps   [tt, jt + 1]   the chunk's dy⊙z
// Grid: (⌈T/tt⌉, splits of d_out). Writes every element of dz (DoRA) and of cpart (column j
// of row blockIdx.x by the block whose split holds j), and split s's slab of dzb, the
// partial dz·B over that split's columns; with splits > 1 the launcher sums the slabs in
// split order (sum_partials), so the result stays deterministic.
//
// Bytes: dy, base read once (2·T·d_out·sz), dz written once (T·d_out·sz; not for LoRA),
// U once (4·T·r), B ⌈T/tt⌉ times (L2), cpart 4·⌈T/tt⌉·d_out, dzb 4·T·r.
// FLOPs: 2·T·d_out·r (z) + 2·T·d_out·r (dz·B) + 4·T·d_out; LoRA: 2·T·d_out·r.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA>
__device__ __forceinline__ void bwd_dz(
    const T* __restrict__ dy,     // [T, d_out]
    const T* __restrict__ base,   // [T, d_out] x·W0ᵀ (DoRA only; may be null for LoRA)
    const float* __restrict__ u,  // [T, r]
    const TA* __restrict__ b,     // [d_out, r]
    const float* __restrict__ g,  // [d_out], or null: plain LoRA (dz = dy)
    float s, int t_rows, int d_out, int r, int tt, int jt,
    int cols_per_split,           // columns of d_out per grid.y split (a multiple of jt)
    T* __restrict__ dz,           // [T, d_out] (DoRA)
    float* __restrict__ cpart,    // [⌈T/tt⌉, d_out] (DoRA)
    float* __restrict__ dzb) {    // [splits, T, r]: split s holds Σ over its columns
    extern __shared__ float smem[];
    float* us = smem;               // [tt, r]
    float* acc = us + tt * r;       // [tt, r]
    float* bsh = acc + tt * r;      // [jt, r + 1]
    float* zs = bsh + jt * (r + 1); // [tt, jt + 1]
    float* ps = zs + tt * (jt + 1); // [tt, jt + 1]
    const int tid = threadIdx.x;
    const int t0 = blockIdx.x * tt;
    const bool dora = g != nullptr;
    // This block's columns [ja, jb): whole jt chunks, the last split ending at d_out.
    const int ja = blockIdx.y * cols_per_split;
    const int jb = min(d_out, ja + cols_per_split);
    dzb += (long long)blockIdx.y * t_rows * r;

    for (int f = tid; f < tt * r; f += THREADS) {
        const int t = t0 + f / r;
        us[f] = (dora && t < t_rows) ? u[(long long)t0 * r + f] : 0.f;
        acc[f] = 0.f;
    }
    for (int j0 = ja; j0 < jb; j0 += jt) {
        __syncthreads();  // the previous chunk's readers of bsh/zs/ps are done
        for (int f = tid; f < jt * r; f += THREADS) {
            const int jj = f / r, i = f % r;
            const int j = j0 + jj;
            bsh[jj * (r + 1) + i] = j < jb ? to_f32(b[(long long)j * r + i]) : 0.f;
        }
        __syncthreads();
        for (int e = tid; e < tt * jt; e += THREADS) {
            const int tl = e / jt, jj = e % jt;
            const int t = t0 + tl, j = j0 + jj;
            float dzv = 0.f, prod = 0.f;
            if (t < t_rows && j < jb) {
                const long long o = (long long)t * d_out + j;
                const float dyv = to_f32(dy[o]);
                if (dora) {
                    float lr = 0.f;
                    for (int i = 0; i < r; ++i) lr += us[tl * r + i] * bsh[jj * (r + 1) + i];
                    const float z = to_f32(base[o]) + s * lr;
                    dzv = dyv * g[j];
                    prod = dyv * z;
                    dz[o] = from_f32<T>(dzv);
                } else {
                    dzv = dyv;
                }
            }
            zs[tl * (jt + 1) + jj] = dzv;
            ps[tl * (jt + 1) + jj] = prod;
        }
        __syncthreads();
        if (dora) {
            for (int jj = tid; jj < jt; jj += THREADS) {
                const int j = j0 + jj;
                if (j < jb) {
                    float c = 0.f;
                    for (int tl = 0; tl < tt; ++tl) c += ps[tl * (jt + 1) + jj];
                    cpart[(long long)blockIdx.x * d_out + j] = c;
                }
            }
        }
        const int nj = min(jt, jb - j0);
        for (int e = tid; e < tt * r; e += THREADS) {
            const int tl = e / r, i = e % r;
            float v = acc[e];
            for (int jj = 0; jj < nj; ++jj) v += zs[tl * (jt + 1) + jj] * bsh[jj * (r + 1) + i];
            acc[e] = v;
        }
    }
    __syncthreads();
    for (int f = tid; f < tt * r; f += THREADS) {
        const int t = t0 + f / r;
        if (t < t_rows) dzb[(long long)t0 * r + f] = acc[f];
    }
}

// ---------------------------------------------------------------------------------------
// tn v1: part[split, i, k] = Σ_{t in split} L[t, i]·R[t, k].
// Block: 256 threads, RT ranks (16 or 64: the rank tile, one entry point each) × TN_COLS = 64
// columns; the split's rows are walked in chunks of TN_TCHUNK = 16 staged in shared memory.
// Thread (kl = tid % 64, iq = tid / 64) owns ranks iq + 4q, q < RT/4.
// Grid: (⌈ncols/64⌉, ⌈r/RT⌉, splits).
//
// Bytes: R ⌈r/RT⌉ times (rows·ncols·sz) + L ⌈ncols/64⌉ times (4·rows·r, L2) + part
// 4·splits·r·ncols.   FLOPs: 2·rows·r·ncols.
// ---------------------------------------------------------------------------------------
template <typename T, int RT>
__device__ __forceinline__ void tn(
    const float* __restrict__ l,  // [rows, r]
    const T* __restrict__ rm,     // [rows, ncols]
    int rows, int r, int ncols, int rows_per_split,
    float* __restrict__ part) {   // [splits, r, ncols]
    __shared__ float ls[TN_TCHUNK][RT];
    __shared__ float rs[TN_TCHUNK][TN_COLS + 1];
    constexpr int Q = RT / (THREADS / TN_COLS);
    const int tid = threadIdx.x;
    const int k0 = blockIdx.x * TN_COLS;
    const int i0 = blockIdx.y * RT;
    const int split = blockIdx.z;
    const int kl = tid % TN_COLS;
    const int iq = tid / TN_COLS;
    const int ta = split * rows_per_split;
    const int tb = min(rows, ta + rows_per_split);

    float acc[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) acc[q] = 0.f;

    for (int c0 = ta; c0 < tb; c0 += TN_TCHUNK) {
        __syncthreads();
        for (int f = tid; f < TN_TCHUNK * RT; f += THREADS) {
            const int tl = f / RT, ii = f % RT;
            const int t = c0 + tl, i = i0 + ii;
            ls[tl][ii] = (t < tb && i < r) ? l[(long long)t * r + i] : 0.f;
        }
        for (int f = tid; f < TN_TCHUNK * TN_COLS; f += THREADS) {
            const int tl = f / TN_COLS, c = f % TN_COLS;
            const int t = c0 + tl, k = k0 + c;
            rs[tl][c] = (t < tb && k < ncols) ? to_f32(rm[(long long)t * ncols + k]) : 0.f;
        }
        __syncthreads();
        const int nt = min(TN_TCHUNK, tb - c0);
        // Not unrolled: the 16 accumulators already give the FMA pipe independent work, and
        // unrolling this loop too made ptxas spill at RT = 64.
#pragma unroll 1
        for (int tl = 0; tl < nt; ++tl) {
            const float rv = rs[tl][kl];
#pragma unroll
            for (int q = 0; q < Q; ++q) acc[q] += ls[tl][iq + 4 * q] * rv;
        }
    }
    const int k = k0 + kl;
    if (k >= ncols) return;
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        const int i = i0 + iq + 4 * q;
        if (i < r) part[((long long)split * r + i) * ncols + k] = acc[q];
    }
}

}  // namespace df

#define DF_BWD_DZ(sfx, T, TA)                                                               \
    extern "C" __global__ void __launch_bounds__(256) dora_bwd_dz_##sfx(                    \
        const T* __restrict__ dy,     /* [T, d_out] */                                      \
        const T* __restrict__ base,   /* [T, d_out] or null (LoRA) */                       \
        const float* __restrict__ u,  /* [T, r] */                                          \
        const TA* __restrict__ b,     /* [d_out, r] */                                      \
        const float* __restrict__ g,  /* [d_out] or null (LoRA) */                          \
        float s, int t_rows, int d_out, int r, int tt, int jt, int cols_per_split,          \
        T* __restrict__ dz,           /* [T, d_out] (DoRA) */                               \
        float* __restrict__ cpart,    /* [ceil(T/tt), d_out] (DoRA) */                      \
        float* __restrict__ dzb) {    /* [gridDim.y, T, r] */                               \
        df::bwd_dz<T, TA>(dy, base, u, b, g, s, t_rows, d_out, r, tt, jt, cols_per_split, dz,   \
                          cpart, dzb);                                                      \
    }
DF_STAMP(dora_bwd_dz, DF_BWD_DZ)

#define DF_TN_R16(sfx, T, TA)                                                               \
    extern "C" __global__ void __launch_bounds__(256) dora_tn_r16_##sfx(                    \
        const float* __restrict__ l, /* [rows, r] */                                        \
        const T* __restrict__ rm,    /* [rows, ncols] */                                    \
        int rows, int r, int ncols, int rows_per_split,                                     \
        float* __restrict__ part) {  /* [splits, r, ncols] */                               \
        df::tn<T, 16>(l, rm, rows, r, ncols, rows_per_split, part);                         \
    }
DF_STAMP(dora_tn_r16, DF_TN_R16)

#define DF_TN_R64(sfx, T, TA)                                                               \
    extern "C" __global__ void __launch_bounds__(256) dora_tn_r64_##sfx(                    \
        const float* __restrict__ l, /* [rows, r] */                                        \
        const T* __restrict__ rm,    /* [rows, ncols] */                                    \
        int rows, int r, int ncols, int rows_per_split,                                     \
        float* __restrict__ part) {  /* [splits, r, ncols] */                               \
        df::tn<T, 64>(l, rm, rows, r, ncols, rows_per_split, part);                         \
    }
DF_STAMP(dora_tn_r64, DF_TN_R64)

#define DF_SCALE_ROWS(sfx, T, TA)                                                           \
    extern "C" __global__ void __launch_bounds__(256) dora_scale_rows_##sfx(                \
        const T* __restrict__ in,      /* [rows, cols] */                                   \
        const float* __restrict__ coef, /* [rows] */                                        \
        int rows, int cols,                                                                 \
        float* __restrict__ out) {     /* [rows, cols] */                                   \
        const long long n = (long long)rows * cols;                                         \
        for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;         \
             e += (long long)gridDim.x * blockDim.x)                                        \
            out[e] = coef[e / cols] * df::to_f32(in[e]);                                    \
    }
DF_STAMP(dora_scale_rows, DF_SCALE_ROWS)

// mag_reduce: one thread per column. Bytes: 4·(parts + 4)·d_out. FLOPs: parts·d_out.
extern "C" __global__ void __launch_bounds__(256) dora_mag_reduce_f32(
    const float* __restrict__ cpart,  // [parts, d_out]
    int parts,
    const float* __restrict__ n,      // [d_out]
    const float* __restrict__ m,      // [d_out]
    float eps, float neg_s, int d_out,
    float* __restrict__ dm,           // [d_out]
    float* __restrict__ kcoef) {      // [d_out] or null: −s·m⊙c/n³, 0 where n < ε
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d_out) return;
    float c = 0.f;
    for (int p = 0; p < parts; ++p) c += cpart[(long long)p * d_out + j];
    const float nj = n[j];
    dm[j] = c / fmaxf(nj, eps);
    if (kcoef) kcoef[j] = nj < eps ? 0.f : neg_s * (m[j] / nj) * (c / nj) / nj;
}

// sum_partials: out[idx] (+)= alpha·colscale[k]·Σ_split part[split, i, k], idx = i·ncols + k,
// or k·r + i when transposed (colscale null: 1). Grid-stride over r·ncols.
// Bytes: 4·(splits + 1 (+1))·r·ncols.
extern "C" __global__ void __launch_bounds__(256) dora_sum_partials_f32(
    const float* __restrict__ part,      // [splits, r, ncols]
    int splits, int r, int ncols, float alpha,
    const float* __restrict__ colscale,  // [ncols] or null
    int transpose, int accumulate,
    float* __restrict__ out) {           // [r, ncols], or [ncols, r] when transposed
    const long long n = (long long)r * ncols;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x) {
        float v = 0.f;
        for (int sp = 0; sp < splits; ++sp) v += part[(long long)sp * n + e];
        const long long i = e / ncols, k = e % ncols;
        v *= colscale ? alpha * colscale[k] : alpha;
        const long long o = transpose ? k * r + i : e;
        out[o] = accumulate ? out[o] + v : v;
    }
}
