// Shared helpers of the dorafuse kernels: dtype conversions, warp reductions, the dtype
// stamping macro and the tile constants that the Rust launchers mirror
// (src/kernels/spec.rs checks them against this file in a test).
//
// Everything here must compile both with nvcc and with the host emulator, so it uses only
// what prelude.cuh (CUDA built-ins, or their emulation) and tensor_core.cuh (mma wrappers)
// provide.
#pragma once

#include "prelude.cuh"
// tensor_core.cuh (the mma wrappers) is included by norm.cu, its only user.

namespace df {

// ---- tile constants (mirrored in src/kernels/spec.rs; a test compares the two) ----------

// Threads per block of every kernel but `mag_reduce`, `sum_partials`, `scale_rows`.
constexpr int THREADS = 256;

// norm v1 / merge (the V-tile pass): rows of W0 per block, columns per chunk, rank chunk.
constexpr int VT_ROWS = 16;
constexpr int VT_COLS = 64;
constexpr int VT_RCHUNK = 32;

// norm v2 (tensor cores): rows per block (4 warps x 16 rows), columns per chunk.
constexpr int NT_ROWS = 64;
constexpr int NT_COLS = 64;
constexpr int NT_WARPS = 4;

// shrink: rows (tokens) per block, ranks per block, reduction chunk.
constexpr int SH_ROWS = 16;
constexpr int SH_RANKS = 64;
constexpr int SH_KCHUNK = 32;

// compose: tokens per block, output columns per block, rank chunk.
constexpr int CO_ROWS = 16;
constexpr int CO_COLS = 64;
constexpr int CO_RCHUNK = 32;

// tn (long-reduction outer products): columns per block, reduction chunk.
constexpr int TN_COLS = 64;
constexpr int TN_TCHUNK = 16;

// 1-D helper kernels.
constexpr int SMALL_THREADS = 256;

// ---- dtype conversions ----------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even from f32, as PyTorch's .to(dtype) does.
template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// ---- W0 tile staging (norm v1, merge, norm v2) ---------------------------------------

// Reads the W0 tile rows [j0, j0 + ROWS) x columns [k0, k0 + COLS), W0 element (j, k) at
// w0[j*ldw_j + k*ldw_k], and hands each element to put(jj, c, value), with `zero` outside W0.
// The thread-to-element order follows the stored layout (ldw_k == 1: along a row;
// fan_in_fan_out: along consecutive j), so the global reads coalesce either way. The caller
// places the barriers around it.
template <int ROWS, int COLS, int NTH, typename T, typename Put>
__device__ __forceinline__ void stage_w0_tile(const T* __restrict__ w0, long long ldw_j,
                                              long long ldw_k, int j0, int k0, int d_out,
                                              int d_in, T zero, Put put) {
    for (int f = threadIdx.x; f < ROWS * COLS; f += NTH) {
        int jj, c;
        if (ldw_k == 1) {
            jj = f / COLS;
            c = f % COLS;
        } else {  // fan_in_fan_out: consecutive j are consecutive in memory
            c = f / ROWS;
            jj = f % ROWS;
        }
        const int j = j0 + jj, k = k0 + c;
        put(jj, c, (j < d_out && k < d_in) ? w0[j * ldw_j + k * ldw_k] : zero);
    }
}

// ---- reductions -----------------------------------------------------------------------

// Butterfly sum over the 32 lanes of a full warp: every lane gets the same value, and the
// order of the additions is fixed (deterministic run to run).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

}  // namespace df

// Stamps one `extern "C"` entry point per storage dtype from a templated body:
// DF_FOR_EACH_DTYPE(X) expands X(f32, float) X(f16, __half) X(bf16, __nv_bfloat16).
#define DF_FOR_EACH_DTYPE(X) X(f32, float) X(f16, __half) X(bf16, __nv_bfloat16)
// The (activation, adapter) pairs of the kernels that read A or B: the same dtype, or f32
// adapters beside 16-bit activations (PEFT's default mix: bf16 base, f32 lora_A/lora_B),
// suffixed `_a32`: X(sfx, T, TA).
#define DF_FOR_EACH_DTYPE_ADAPTER(X)                                                        \
    X(f32, float, float) X(f16, __half, __half) X(bf16, __nv_bfloat16, __nv_bfloat16)      \
    X(f16_a32, __half, float) X(bf16_a32, __nv_bfloat16, float)
// The same for the dtypes the tensor cores take (mma.sync m16n8k16 has bf16 and f16 forms).
#define DF_FOR_EACH_MMA_DTYPE(X) X(f16, __half) X(bf16, __nv_bfloat16)
