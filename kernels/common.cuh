// Shared helpers of the dorafuse kernels: dtype conversions, warp reductions, the dtype
// stamping macro and the tile constants (the one definition; the Rust launchers read them
// from the module build.rs generates from this file).
//
// Everything here must compile both with nvcc and with the host emulator, so it uses only
// what prelude.cuh (CUDA built-ins, or their emulation) and tensor_core.cuh (mma wrappers)
// provide.
#pragma once

#include "prelude.cuh"
// tensor_core.cuh (the mma wrappers) is included by norm.cu, its only user.

namespace df {

// ---- tile constants ------------------------------------------------------------------
// Defined here only: build.rs turns each `constexpr int NAME = <integer>;  // doc` line at the
// start of a line into `pub const NAME: usize` of `dorafuse::kernels::spec`, with the comment
// as its doc.

constexpr int THREADS = 256;  // Threads per block of the tiled kernels (not norm v2, 1-D helpers)
constexpr int SMALL_THREADS = 256;  // Threads per block of mag_reduce, sum_partials, scale_rows
constexpr int WARP_SIZE = 32;  // Threads per warp

constexpr int VT_ROWS = 16;  // Rows of W0 per block of the V-tile pass (norm v1, merged_weight)
constexpr int VT_COLS = 64;  // Columns per chunk of the V-tile pass
constexpr int VT_RCHUNK = 32;  // Rank chunk of the V-tile pass

constexpr int NT_ROWS = 64;  // Rows of W0 per block of norm v2: NT_WARPS warps × 16
constexpr int NT_COLS = 64;  // Columns per chunk of norm v2
constexpr int NT_WARPS = 4;  // Warps per block of norm v2
constexpr int NT_RK = 32;  // Rank chunk of norm v2 (two mma k-steps of 16)

constexpr int SH_ROWS = 16;  // Rows (tokens) per block of shrink at its widest rank tile
constexpr int SH_RANKS = 64;  // Widest rank tile of shrink (SH_ROWS·SH_RANKS outputs per block)
constexpr int SH_MIN_RANKS = 16;  // Narrowest rank tile of shrink (then SH_ROWS·SH_RANKS/16 rows)
constexpr int SH_KCHUNK = 32;  // Reduction chunk of shrink (a split of d_in holds whole chunks)

constexpr int CO_ROWS = 16;  // Tokens per block of compose
constexpr int CO_COLS = 64;  // Output columns per block of compose
constexpr int CO_RCHUNK = 32;  // Rank chunk of compose

constexpr int TN_COLS = 64;  // Columns per block of tn (long-reduction products)
constexpr int TN_TCHUNK = 16;  // Rows per reduction chunk of tn (a split holds whole chunks)

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

// ---- W0 tile staging (norm v1, merged_weight, norm v2) ---------------------------------------

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

// ---- 16-byte vector loads (the tuned launch configuration) ----------------------------

// Elements of T in one 16-byte load.
template <typename T> constexpr int VEC16 = 16 / static_cast<int>(sizeof(T));

// One 16-byte global load from a 16-byte aligned address (ld.global.v4.u32 under nvcc). On
// the emulator the load goes through a 16-byte vector type, so the host compiler keeps it
// one access (its recording build then reports one 16-byte read, as the GPU issues it,
// where a copy of the uint4 struct may be split into four 4-byte reads).
__device__ __forceinline__ uint4 load16(const void* p) {
#if defined(__CUDACC__)
    return *reinterpret_cast<const uint4*>(p);
#else
    typedef unsigned int v4u __attribute__((vector_size(16)));
    const v4u v = *reinterpret_cast<const v4u*>(p);
    return make_uint4(v[0], v[1], v[2], v[3]);
#endif
}

// Reads rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of a row-major matrix
// (element (i, k) at src[i*ld + k]) in 16-byte loads and hands each group of
// VEC16<T> consecutive columns to put(rr, c, uint4), zero outside [0, nrows) x
// [0, ncols). Consecutive threads read consecutive 16 bytes of a row, so a warp reads whole
// 32-byte sectors. The launcher guarantees the alignment this needs (it passes `vec` = 1
// only then): src and ld·sizeof(T) are multiples of 16 bytes and ncols a multiple of
// VEC16<T>, so a group is either wholly inside the matrix or wholly outside. The
// caller places the barriers around it.
template <int ROWS, int COLS, int NTH, typename T, typename Put>
__device__ __forceinline__ void stage_tile_vec16(const T* __restrict__ src, long long ld,
                                                 int row0, int col0, int nrows, int ncols,
                                                 Put put) {
    constexpr int V = VEC16<T>;
    static_assert(COLS % V == 0, "a tile row holds whole 16-byte groups");
    constexpr int G = COLS / V;  // groups per tile row
    for (int f = threadIdx.x; f < ROWS * G; f += NTH) {
        const int rr = f / G, c = (f % G) * V;
        const int i = row0 + rr, k = col0 + c;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (i < nrows && k < ncols) v = load16(src + i * ld + k);
        put(rr, c, v);
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

// Stamps one `extern "C"` entry point per dtype suffix from a templated body:
// DF_STAMP(dora_norm_v1, DF_NORM_V1) expands DF_NORM_V1(sfx, T, TA) once per suffix that
// kernels/kernels.list gives the family `dora_norm_v1`, e.g. DF_NORM_V1(bf16_a32,
// __nv_bfloat16, float): T is the storage type of the activations (W0, x, y, ...), TA that of
// the adapter (A, B); `_a32` suffixes read f32 adapters beside 16-bit activations (PEFT's
// default mix). The DF_STAMPS_<family> macros are generated by build.rs from the list and
// included before every .cu file, so the list is the only place the dtypes are named, and a
// family missing from it fails to compile here.
#define DF_STAMP(family, X) DF_STAMPS_##family(X)
