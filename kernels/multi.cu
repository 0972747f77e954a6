// The multi-adapter forward (serving: every token of a batch on its own adapter, or none),
// around the base product base = x·W0ᵀ that the engine computed (possibly one column slice of
// a fused QKV or gate/up output), finished in place:
//   multi_shrink   U[t, i] = x_t·A_kᵀ                 k = adapter_index[t], i < r_k
//   multi_expand   y_t = g_k ⊙ (base_t + s_k·U_t·B_kᵀ) + b        (g_k = 1 for plain LoRA)
//                  y_t = base_t + b                     for k = −1 (base layer only)
//
// Adapters are reached through per-slot tables in device memory (S-LoRA / Punica style), so
// they may live anywhere the engine put them: a_ptrs[k], b_ptrs[k] (addresses of A_k [r_k, d_in]
// and B_k [d_out, r_k], row-major, in the adapter dtype TA), g_ptrs[k] (g_k [d_out] f32, or 0
// for plain LoRA), ranks[k] (1..=r_max; 0 = empty slot), scales[k] (s_k). The slot of each
// token is read on the device: nothing on the host depends on the batch's indices, and
// nothing is allocated, so a launch is CUDA-graph capturable (the grid depends on T only).
//
// Batch invariance: every output of token t is computed by one block from token t's own data
// alone, with a reduction order fixed by d_in (shrink: lane-strided sums then a fixed
// butterfly) or by r_k (expand: a sequential sum over i), never by T, the neighbours' slots or
// the order of the batch. A token's y is bit-identical alone or in any batch.
//
// Bad indices cannot be refused on the host without reading the batch's indices, so the
// kernels flag them in a device word instead: err |= MULTI_ERR_INDEX for a slot outside
// −1..slots−1, err |= MULTI_ERR_EMPTY for a slot whose rank is outside 1..=r_max (empty);
// such a token is finished as a base-only token. The checked launcher reads the word after
// the batch (src/kernels/multi.rs); an engine reads it whenever it synchronises anyway.
#include "common.cuh"

namespace df {

// Error flags of the multi-adapter kernels (mirrored in src/kernels/multi.rs).
constexpr int MULTI_ERR_INDEX = 1;
constexpr int MULTI_ERR_EMPTY = 2;
// The rank of a slot whose adapter leaves this module alone: its tokens get base + bias,
// unflagged (mirrored in src/kernels/multi.rs).
constexpr int MULTI_BASE_ONLY = -1;

// Ranks per shrink block: one warp per rank.
constexpr int MS_WARPS = THREADS / 32;

// The largest rank a slot may have (spec::MAX_RANK; the launcher refuses r_max above it).
constexpr int MAX_MULTI_RANK = 256;

// Ranks of B_k per shared-memory chunk in multi_expand (a 32-element row segment: 128 bytes in
// f32, 64 in 16-bit types).
constexpr int ME_RC = 32;

// The slot of token t, or −1 (base only), flagging a bad index or an empty slot in *err when
// `report` (one thread per token reports, so a bad token sets the word once per kernel).
__device__ __forceinline__ int multi_slot(const int* __restrict__ index, int t, int slots,
                                          const int* __restrict__ ranks, int r_max,
                                          int* __restrict__ err, bool report) {
    const int k = index[t];
    if (k == -1) return -1;
    if (k < -1 || k >= slots) {
        if (report) atomicOr(err, MULTI_ERR_INDEX);
        return -1;
    }
    const int r = ranks[k];
    if (r == MULTI_BASE_ONLY) return -1;  // an adapter that does not adapt this module
    if (r < 1 || r > r_max) {
        if (report) atomicOr(err, MULTI_ERR_EMPTY);
        return -1;
    }
    return k;
}

// ---------------------------------------------------------------------------------------
// multi_shrink: U[t, i] = Σ_c x[t, c]·A_k[i, c] for token t on slot k, i < r_k.
//
// Block: 256 threads = 8 warps, one token, 8 ranks (warp w takes rank blockIdx.y·8 + w).
// Lane l sums columns c ≡ l (mod 32) in increasing order, then a fixed butterfly: the order
// depends on d_in only. Reads of x and of A's row coalesce across the lanes.
// Grid: (T, ⌈r_max/8⌉). Rows of U of base-only tokens and ranks ≥ r_k are not written.
//
// Bytes: A_k once per token (r_k·d_in·sz; L2 when tokens share a slot) + x ⌈r_k/8⌉ times per
// token (L1) + U 4·r_k per token.   FLOPs: 2·d_in·r_k per token.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA>
__device__ __forceinline__ void multi_shrink(
    const T* __restrict__ x, long long ldx,           // [T, d_in], rows ldx apart
    const int* __restrict__ index,                     // [T] slot per token, −1 = none
    const unsigned long long* __restrict__ a_ptrs,     // [slots] → A_k [r_k, d_in] TA
    const int* __restrict__ ranks,                     // [slots]
    int slots, int r_max, int t_rows, int d_in,
    float* __restrict__ u, long long ldu,              // [T, ≥ r_max] f32
    int* __restrict__ err) {
    const int t = blockIdx.x;
    if (t >= t_rows) return;
    const int k = multi_slot(index, t, slots, ranks, r_max, err,
                             threadIdx.x == 0 && blockIdx.y == 0);
    if (k < 0) return;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int i = blockIdx.y * MS_WARPS + warp;
    if (i >= ranks[k]) return;  // the whole warp leaves together
    const TA* a = reinterpret_cast<const TA*>(a_ptrs[k]) + (long long)i * d_in;
    const T* xr = x + (long long)t * ldx;
    float acc = 0.f;
    // Unrolled so that several loads are in flight; the sum stays in column order.
#pragma unroll 8
    for (int c = lane; c < d_in; c += 32) acc += to_f32(xr[c]) * to_f32(a[c]);
    acc = warp_sum(acc);
    if (lane == 0) u[(long long)t * ldu + i] = acc;
}

// ---------------------------------------------------------------------------------------
// multi_expand: y[t, j] = g_k[j]·(base[t, j] + s_k·Σ_{i<r_k} U[t, i]·B_k[j, i]) + bias[j]
//
// Block: 256 threads, one token, 256 output columns (one per thread: base and y coalesce);
// U's row is staged in shared memory, the sum over i is sequential (order fixed by r_k).
// B_k's rows of the block are contiguous in memory ([d_out, r_k] row-major), so they are
// staged through shared memory in chunks of ME_RC ranks, lanes reading consecutive elements
// (coalesced; a thread reading its own row would touch one sector per lane), stored with a
// padded row (ME_RC + 1 words: thread j reading row j hits bank (j + i) mod 32, no conflict).
// Each element of base is read and y written by the same thread, so y may alias base (in
// place), and both may be column slices of a wider buffer (row strides ld_base, ld_y).
// Grid: (T, ⌈d_out/256⌉).  Shared memory: 4·(256·(ME_RC + 1) + MAX_MULTI_RANK) bytes.
//
// Bytes: base T·d_out·sz + y T·d_out·sz + B_k once per token (d_out·r_k·sz; L2 when tokens
// share a slot) + U 4·r_k + g, bias.   FLOPs: 2·d_out·r_k + 4·d_out per token.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA>
__device__ __forceinline__ void multi_expand(
    const T* base, long long ld_base,                  // [T, d_out] (may alias y)
    T* y, long long ld_y,                              // [T, d_out]
    const float* __restrict__ u, long long ldu,        // [T, ≥ r_max] f32 (multi_shrink)
    const int* __restrict__ index,                     // [T]
    const unsigned long long* __restrict__ b_ptrs,     // [slots] → B_k [d_out, r_k] TA
    const unsigned long long* __restrict__ g_ptrs,     // [slots] → g_k [d_out] f32, or 0
    const int* __restrict__ ranks,                     // [slots]
    const float* __restrict__ scales,                  // [slots]
    int slots, int r_max,
    const float* __restrict__ bias,                    // [d_out] or null
    int t_rows, int d_out, int* __restrict__ err) {
    __shared__ float us[MAX_MULTI_RANK];
    __shared__ float bs[THREADS][ME_RC + 1];
    const int t = blockIdx.x;
    if (t >= t_rows) return;  // uniform over the block: no barrier is skipped by some only
    // k, r and the rows below are the same for every thread of the block (one token, one
    // column tile), so every barrier is reached by all or none.
    const int k = multi_slot(index, t, slots, ranks, r_max, err,
                             threadIdx.x == 0 && blockIdx.y == 0);
    const int r = k >= 0 ? ranks[k] : 0;
    for (int i = threadIdx.x; i < r; i += THREADS) us[i] = u[(long long)t * ldu + i];
    const int j0 = blockIdx.y * THREADS;
    const int j = j0 + threadIdx.x;
    const int rows = min(THREADS, d_out - j0);  // ≥ 1: the grid has ⌈d_out/256⌉ column tiles
    float acc = 0.f;
    if (k >= 0) {
        const TA* bk = reinterpret_cast<const TA*>(b_ptrs[k]) + (long long)j0 * r;
        for (int i0 = 0; i0 < r; i0 += ME_RC) {
            const int rc = min(ME_RC, r - i0);
            __syncthreads();  // us written; the previous chunk's bs read by every thread
            // Element e of the chunk is row e / rc, rank i0 + e % rc: consecutive threads
            // read consecutive addresses within a row (the whole tile when rc = r).
            for (int e = threadIdx.x; e < rows * rc; e += THREADS) {
                const int row = e / rc, col = e - row * rc;
                bs[row][col] = to_f32(bk[(long long)row * r + i0 + col]);
            }
            __syncthreads();
            if (j < d_out) {
                // The same sequential sum over i as one loop over r_k: order fixed by r_k.
#pragma unroll 8
                for (int i = 0; i < rc; ++i) acc += us[i0 + i] * bs[threadIdx.x][i];
            }
        }
    }
    if (j >= d_out) return;
    float z = to_f32(base[(long long)t * ld_base + j]);
    float v = z;
    if (k >= 0) {
        z += scales[k] * acc;
        const float* g = reinterpret_cast<const float*>(g_ptrs[k]);
        v = g ? g[j] * z : z;
    }
    if (bias) v += bias[j];
    y[(long long)t * ld_y + j] = from_f32<T>(v);
}

}  // namespace df

#define DF_MULTI_SHRINK(sfx, T, TA)                                                         \
    extern "C" __global__ void __launch_bounds__(256) dora_multi_shrink_##sfx(              \
        const T* __restrict__ x, long long ldx, const int* __restrict__ index,              \
        const unsigned long long* __restrict__ a_ptrs, const int* __restrict__ ranks,       \
        int slots, int r_max, int t_rows, int d_in, float* __restrict__ u, long long ldu,   \
        int* __restrict__ err) {                                                            \
        df::multi_shrink<T, TA>(x, ldx, index, a_ptrs, ranks, slots, r_max, t_rows, d_in,   \
                                u, ldu, err);                                               \
    }
DF_STAMP(dora_multi_shrink, DF_MULTI_SHRINK)

#define DF_MULTI_EXPAND(sfx, T, TA)                                                         \
    extern "C" __global__ void __launch_bounds__(256) dora_multi_expand_##sfx(              \
        const T* base, long long ld_base, T* y, long long ld_y,                             \
        const float* __restrict__ u, long long ldu, const int* __restrict__ index,          \
        const unsigned long long* __restrict__ b_ptrs,                                      \
        const unsigned long long* __restrict__ g_ptrs, const int* __restrict__ ranks,       \
        const float* __restrict__ scales, int slots, int r_max,                             \
        const float* __restrict__ bias, int t_rows, int d_out, int* __restrict__ err) {     \
        df::multi_expand<T, TA>(base, ld_base, y, ld_y, u, ldu, index, b_ptrs, g_ptrs,      \
                                ranks, scales, slots, r_max, bias, t_rows, d_out, err);     \
    }
DF_STAMP(dora_multi_expand, DF_MULTI_EXPAND)

// ---------------------------------------------------------------------------------------
// multi_copy_table: dst[i] = src[i] for i < words (32-bit words). Commits a slot-table image
// staged by a side stream into the live tables, ordered on the serving stream after the
// event that ends the staging (src/kernels/pool.rs): the batches queued before this launch
// read the old tables, those queued after it the new ones, and the host never waits.
// Grid: ⌈words/256⌉ blocks of 256 threads, one word each.
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256)
    dora_multi_copy_table(const unsigned* __restrict__ src, unsigned* __restrict__ dst,
                          int words) {
    const int i = blockIdx.x * df::THREADS + threadIdx.x;
    if (i < words) dst[i] = src[i];
}
