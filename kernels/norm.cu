// Passes over V = W0 + s·B·A, one tile at a time, never writing B·A:
//   norm   n_j = ‖V_j‖₂ and g_j = m_j / max(n_j, ε)          (DESIGN.md §1)
//   merge  W'  = diag(g)·V, written out (g = 1 gives V itself)
//
// Both read W0 exactly once. W0 is addressed through two strides, so the same body serves
// nn.Linear ([d_out, d_in]: ldw_j = d_in, ldw_k = 1) and fan_in_fan_out / Conv1D
// ([d_in, d_out]: ldw_j = 1, ldw_k = d_out); the tile loaders pick the coalesced order for
// whichever stride is 1.
//
// Variants (all checked against the same f64 reference in tests/kernels_norm.rs):
//   v1  CUDA cores, any dtype, any rank, any layout.           dora_norm_v1_{f32,f16,bf16}
//   v2  tensor cores (mma.sync m16n8k16) for the B·A tile;      dora_norm_v2_{f16,bf16}
//       f16/bf16, any rank ≥ 1 (padded to 16 with zeros, so r % 16 == 0 wastes nothing),
//       any layout.
// The launcher (src/kernels/launch.rs) picks v2 for f16/bf16 when r ≥ 16, v1 otherwise.
#include "common.cuh"

namespace df {

// ---------------------------------------------------------------------------------------
// v1: the V-tile pass on CUDA cores.
//
// Block: THREADS = 256 threads, VT_ROWS = 16 rows of V; the columns are walked in chunks of
// VT_COLS = 64 and the rank in chunks of VT_RCHUNK = 32. Thread (kk = tid % 64, jq = tid / 64)
// owns the 4 elements (jq + 4q, kk), q = 0..3, of each chunk.
// Shared: B rows [16, r] f32 (dynamic, 64·r bytes), the W0 tile and the A chunk (static).
//
// Bytes (norm): W0 once (d_out·d_in·sz) + A once per block (⌈d_out/16⌉·r·d_in·sz, served
// by L2) + B (d_out·r·sz) + m (4·d_out) + n, g (8·d_out).
// FLOPs: 2·d_out·d_in·r (the B·A tile) + 3·d_out·d_in (add, square, sum).
// merge adds a write of d_out·d_in·sizeof(OutT) and drops the reduction.
// ---------------------------------------------------------------------------------------
template <typename T, typename OutT, bool MERGE>
__device__ __forceinline__ void vtile_pass(
    const T* __restrict__ w0,     // [d_out, d_in] at (j, k) -> w0[j*ldw_j + k*ldw_k]
    long long ldw_j, long long ldw_k,
    const T* __restrict__ a,      // [r, d_in]
    const T* __restrict__ b,      // [d_out, r]
    const float* __restrict__ m,  // [d_out] or null (norm only: then g is not written)
    const float* __restrict__ g,  // [d_out] or null (merge only: null means g = 1)
    float s, float eps, int d_out, int d_in, int r,
    float* __restrict__ n_out,    // [d_out] (norm)
    float* __restrict__ g_out,    // [d_out] or null (norm)
    OutT* __restrict__ out) {     // [d_out, d_in] row-major (merge)
    extern __shared__ float bs[];  // [VT_ROWS, r]
    __shared__ float ws[VT_ROWS][VT_COLS + 1];
    __shared__ float as[VT_RCHUNK][VT_COLS + 1];
    __shared__ float red[VT_ROWS][VT_COLS / 32];

    const int tid = threadIdx.x;
    const int j0 = blockIdx.x * VT_ROWS;
    const int kk = tid % VT_COLS;
    const int jq = tid / VT_COLS;  // 0..3
    constexpr int Q = VT_ROWS / (THREADS / VT_COLS);  // 4 rows per thread

    for (int f = tid; f < VT_ROWS * r; f += THREADS) {
        const int jj = f / r, i = f % r;
        const int j = j0 + jj;
        bs[f] = j < d_out ? to_f32(b[(long long)j * r + i]) : 0.f;
    }

    float sq[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) sq[q] = 0.f;

    for (int k0 = 0; k0 < d_in; k0 += VT_COLS) {
        // Every reader of the previous chunk's ws/as (and, first time, the writers of bs)
        // must be done before they are overwritten.
        __syncthreads();
        for (int f = tid; f < VT_ROWS * VT_COLS; f += THREADS) {
            int jj, c;
            if (ldw_k == 1) {
                jj = f / VT_COLS;
                c = f % VT_COLS;
            } else {  // fan_in_fan_out: consecutive j are consecutive in memory
                c = f / VT_ROWS;
                jj = f % VT_ROWS;
            }
            const int j = j0 + jj, k = k0 + c;
            ws[jj][c] = (j < d_out && k < d_in) ? to_f32(w0[j * ldw_j + k * ldw_k]) : 0.f;
        }
        float acc[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) acc[q] = 0.f;
        for (int i0 = 0; i0 < r; i0 += VT_RCHUNK) {
            if (i0 > 0) __syncthreads();  // readers of the previous A chunk are done
            for (int f = tid; f < VT_RCHUNK * VT_COLS; f += THREADS) {
                const int ii = f / VT_COLS, c = f % VT_COLS;
                const int i = i0 + ii, k = k0 + c;
                as[ii][c] = (i < r && k < d_in) ? to_f32(a[(long long)i * d_in + k]) : 0.f;
            }
            __syncthreads();
            const int ni = min(VT_RCHUNK, r - i0);
            for (int ii = 0; ii < ni; ++ii) {
                const float av = as[ii][kk];
#pragma unroll
                for (int q = 0; q < Q; ++q) acc[q] += bs[(jq + 4 * q) * r + i0 + ii] * av;
            }
        }
        // Padded rows/columns have ws = 0 and (B or A) = 0, so they contribute v = 0.
#pragma unroll
        for (int q = 0; q < Q; ++q) {
            const int jj = jq + 4 * q;
            const float v = ws[jj][kk] + s * acc[q];
            if (MERGE) {
                const int j = j0 + jj, k = k0 + kk;
                if (j < d_out && k < d_in) {
                    const float gj = g ? g[j] : 1.f;
                    out[(long long)j * d_in + k] = from_f32<OutT>(gj * v);
                }
            } else {
                sq[q] += v * v;
            }
        }
    }
    if (MERGE) return;

    // Row sums: the 64 threads of a row are 2 whole warps; fixed-order butterfly, then the
    // two warp sums in order.
#pragma unroll
    for (int q = 0; q < Q; ++q) {
        const float w = warp_sum(sq[q]);
        if (tid % 32 == 0) red[jq + 4 * q][kk / 32] = w;
    }
    __syncthreads();
    if (tid < VT_ROWS) {
        const int j = j0 + tid;
        if (j < d_out) {
            float tot = 0.f;
#pragma unroll
            for (int h = 0; h < VT_COLS / 32; ++h) tot += red[tid][h];
            const float nj = sqrtf(tot);
            n_out[j] = nj;
            if (m && g_out) g_out[j] = m[j] / fmaxf(nj, eps);
        }
    }
}

// ---------------------------------------------------------------------------------------
// v2: the B·A tile on tensor cores (mma.sync m16n8k16, bf16/f16 operands, f32 accumulate).
//
// Block: 4 warps (128 threads), NT_ROWS = 64 rows of V, warp w owns rows 16w..16w+15; the
// columns are walked in chunks of NT_COLS = 64 (8 n-tiles of 8). The rank is padded to a
// multiple of 16 (zeros) in shared memory, so any r works; r % 16 == 0 wastes nothing.
// Per chunk: A chunk [rp, 64] staged in shared memory in its storage dtype, B rows
// [64, rp] staged once per block; each warp issues rp/16 · 8 mma per chunk, then adds the
// W0 values at its accumulator positions (read straight from global: a warp's 8 n-tiles
// cover 64 consecutive columns of 16 rows) and squares.
//
// Bytes: as v1 (W0 once; A once per block, ⌈d_out/64⌉·r·d_in·sz, L2).
// FLOPs: 2·d_out·d_in·rp on tensor cores (rp = r rounded up to 16) + 3·d_out·d_in.
// Shared: 2·(64·rp + rp·(64+8)) bytes (dynamic) — at most 70 KB for r = 256, so the launcher
// keeps v2 for rp ≤ 128 (≤ 35 KB) and splits larger ranks... no: see NT_MAX_RANK below.
// ---------------------------------------------------------------------------------------

}  // namespace df

#define DF_NORM_V1(sfx, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) dora_norm_v1_##sfx(                   \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const T* __restrict__ a,      /* [r, d_in] */                                       \
        const T* __restrict__ b,      /* [d_out, r] */                                      \
        const float* __restrict__ m,  /* [d_out] or null */                                 \
        float s, float eps, int d_out, int d_in, int r,                                     \
        float* __restrict__ n_out,    /* [d_out] */                                         \
        float* __restrict__ g_out) {  /* [d_out] or null */                                 \
        df::vtile_pass<T, float, false>(w0, ldw_j, ldw_k, a, b, m, nullptr, s, eps, d_out,  \
                                        d_in, r, n_out, g_out, nullptr);                    \
    }
DF_FOR_EACH_DTYPE(DF_NORM_V1)

#define DF_MERGE(sfx, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) dora_merge_##sfx(                     \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const T* __restrict__ a,     /* [r, d_in] */                                        \
        const T* __restrict__ b,     /* [d_out, r] */                                       \
        const float* __restrict__ g, /* [d_out] or null (g = 1) */                          \
        float s, int d_out, int d_in, int r,                                                \
        T* __restrict__ out) {       /* [d_out, d_in] */                                    \
        df::vtile_pass<T, T, true>(w0, ldw_j, ldw_k, a, b, nullptr, g, s, 0.f, d_out, d_in, \
                                   r, nullptr, nullptr, out);                               \
    }                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) dora_merge_f32out_##sfx(              \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const T* __restrict__ a,     /* [r, d_in] */                                        \
        const T* __restrict__ b,     /* [d_out, r] */                                       \
        const float* __restrict__ g, /* [d_out] or null (g = 1) */                          \
        float s, int d_out, int d_in, int r,                                                \
        float* __restrict__ out) {   /* [d_out, d_in] */                                    \
        df::vtile_pass<T, float, true>(w0, ldw_j, ldw_k, a, b, nullptr, g, s, 0.f, d_out,   \
                                       d_in, r, nullptr, nullptr, out);                     \
    }
DF_FOR_EACH_DTYPE(DF_MERGE)
