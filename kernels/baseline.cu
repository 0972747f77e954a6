// baseline.cu: the simple passes of DoRA *unfused*, as PEFT runs it in PyTorch eager mode
// (one kernel per tensor operation), so `dorafuse bench` can time the unfused layer in the
// same process as the fused one. The benchmark composes them with Backend::gemm
// (src/bench/device.rs); no layer code uses them. Owned by the benchmark.
//
//   baseline_axpby      out = alpha·a + beta·b, elementwise (PEFT: `weight + scaling *
//                       lora_weight`, `result + result_dora`, the gradient sums)
//   baseline_scale_cols out[t, j] = alpha·(g[j] + shift)·a[t, j] (PEFT: `(g − 1) * base`,
//                       `g * lora * scaling`, and their gradients)
//   baseline_row_norm   n_j = ‖v_j‖₂, g_j = m_j / max(n_j, ε)     (PEFT: `weight.norm(dim=1)`,
//                       `magnitude / weight_norm`)
//   baseline_col_dot    out[j] = Σ_t a[t, j]·b[t, j] / max(n_j, ε)  (the magnitude gradient)
//
// Each is the plainest correct kernel: grid-stride loops, f32 arithmetic, one read of each
// input and one write of each output, like PyTorch's elementwise kernels.
#include "common.cuh"

namespace df {

template <typename T>
__device__ __forceinline__ void axpby(T* __restrict__ out, const T* __restrict__ a,
                                      const T* __restrict__ b, float alpha, float beta,
                                      long long n) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        out[e] = from_f32<T>(alpha * to_f32(a[e]) + beta * to_f32(b[e]));
}

template <typename T>
__device__ __forceinline__ void scale_cols(T* __restrict__ out, const T* __restrict__ a,
                                           const float* __restrict__ g, float shift,
                                           float alpha, long long rows, int cols) {
    const long long n = rows * cols;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (long long)gridDim.x * blockDim.x)
        out[e] = from_f32<T>(alpha * (g[e % cols] + shift) * to_f32(a[e]));
}

// One block of SMALL_THREADS per row: strided partial sums, a warp butterfly, then the
// warps' sums in shared memory in a fixed order (deterministic).
template <typename T>
__device__ __forceinline__ void row_norm(const T* __restrict__ v, const float* __restrict__ m,
                                         int cols, float eps, float* __restrict__ n,
                                         float* __restrict__ g) {
    __shared__ float warp_part[SMALL_THREADS / 32];
    const long long row = blockIdx.x;
    const T* vr = v + row * cols;
    float acc = 0.f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float x = to_f32(vr[i]);
        acc += x * x;
    }
    acc = warp_sum(acc);
    if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) s += warp_part[w];
        const float nr = sqrtf(s);
        n[row] = nr;
        if (g != nullptr) g[row] = m[row] / fmaxf(nr, eps);
    }
}

// One thread per column; consecutive threads read consecutive columns (coalesced).
template <typename T>
__device__ __forceinline__ void col_dot(const T* __restrict__ a, const T* __restrict__ b,
                                        const float* __restrict__ n, float eps, int rows,
                                        int cols, float* __restrict__ out) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float acc = 0.f;
    for (int t = 0; t < rows; ++t) {
        const long long e = (long long)t * cols + j;
        acc += to_f32(a[e]) * to_f32(b[e]);
    }
    out[j] = acc / fmaxf(n[j], eps);
}

}  // namespace df

#define DF_BASELINE_AXPBY(sfx, T, TA)                                                        \
    extern "C" __global__ void __launch_bounds__(256) baseline_axpby_##sfx(                  \
        T* __restrict__ out,          /* [n] */                                              \
        const T* __restrict__ a,      /* [n] */                                              \
        const T* __restrict__ b,      /* [n] */                                              \
        float alpha, float beta, long long n) {                                              \
        df::axpby<T>(out, a, b, alpha, beta, n);                                             \
    }
DF_STAMP(baseline_axpby, DF_BASELINE_AXPBY)

#define DF_BASELINE_SCALE_COLS(sfx, T, TA)                                                   \
    extern "C" __global__ void __launch_bounds__(256) baseline_scale_cols_##sfx(             \
        T* __restrict__ out,          /* [rows, cols] */                                     \
        const T* __restrict__ a,      /* [rows, cols] */                                     \
        const float* __restrict__ g,  /* [cols] */                                           \
        float shift, float alpha, long long rows, int cols) {                                \
        df::scale_cols<T>(out, a, g, shift, alpha, rows, cols);                              \
    }
DF_STAMP(baseline_scale_cols, DF_BASELINE_SCALE_COLS)

#define DF_BASELINE_ROW_NORM(sfx, T, TA)                                                     \
    extern "C" __global__ void __launch_bounds__(256) baseline_row_norm_##sfx(               \
        const T* __restrict__ v,      /* [rows, cols] */                                     \
        const float* __restrict__ m,  /* [rows], unused when g is null */                    \
        int cols, float eps,                                                                 \
        float* __restrict__ n,        /* [rows] */                                           \
        float* __restrict__ g) {      /* [rows] or null */                                   \
        df::row_norm<T>(v, m, cols, eps, n, g);                                              \
    }
DF_STAMP(baseline_row_norm, DF_BASELINE_ROW_NORM)

#define DF_BASELINE_COL_DOT(sfx, T, TA)                                                      \
    extern "C" __global__ void __launch_bounds__(256) baseline_col_dot_##sfx(                \
        const T* __restrict__ a,      /* [rows, cols] */                                     \
        const T* __restrict__ b,      /* [rows, cols] */                                     \
        const float* __restrict__ n,  /* [cols] */                                           \
        float eps, int rows, int cols,                                                       \
        float* __restrict__ out) {    /* [cols] */                                           \
        df::col_dot<T>(a, b, n, eps, rows, cols, out);                                       \
    }
DF_STAMP(baseline_col_dot, DF_BASELINE_COL_DOT)
