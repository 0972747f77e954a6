// Passes over V = W0 + s·B·A, one tile at a time, never writing B·A:
//   norm   n_j = ‖V_j‖₂ and g_j = m_j / max(n_j, ε)          (docs/design.md §1)
//   merged_weight  W' = diag(g)·V, written out (g = 1 gives V itself)
//
// Both read W0 exactly once. W0 is addressed through two strides, so the same body serves
// nn.Linear ([d_out, d_in]: ldw_j = d_in, ldw_k = 1) and fan_in_fan_out / Conv1D
// ([d_in, d_out]: ldw_j = 1, ldw_k = d_out); the tile loaders pick the coalesced order for
// whichever stride is 1.
//
// Variants (all checked against the same f64 reference in tests/kernels/layer.rs):
//   v1  CUDA cores, any dtype, any rank, any layout, and f32 adapters beside 16-bit
//       W0 (`_a32`).                                     dora_norm_v1_{f32,f16,bf16,*_a32}
//   v2  tensor cores (mma.sync m16n8k16) for the B·A tile;      dora_norm_v2_{f16,bf16}
//       f16/bf16, any rank ≥ 1 (padded to 16 with zeros, so r % 16 == 0 wastes nothing),
//       any layout; with f32 adapters (`_a32`) each f32 is split into three bf16 terms
//       and the B·A tile keeps f32 accuracy (r ≤ 112).   dora_norm_v2_{f16,bf16}_a32
// The launcher (src/kernels/launch.rs) picks v2 for f16/bf16 when r ≥ 16 (and, with f32
// adapters, its tiles fit 48 KB of shared memory), v1 otherwise.
//
// Launch configurations (spec::Tuning; the same code, two grids):
//   previous  grid (⌈d_out/rows⌉, 1): each block walks all of d_in and writes n (and g);
//   tuned     grid (⌈d_out/rows⌉, splits): block (x, y) walks the columns [y·k_per_split,
//             (y+1)·k_per_split) (whole 64-column chunks) and writes its rows' partial Σ v²
//             into part[y, :]; dora_norm_reduce_f32 then sums the partials in split order
//             (deterministic, no atomics) and writes n and g. With `vec` (row-major W0 and
//             A whose rows are 16-byte aligned, checked by the launcher) W0 and A tiles are
//             read in 16-byte loads; otherwise, and for fan_in_fan_out, element by element.
#include "common.cuh"
#include "tensor_core.cuh"

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
// merged_weight adds a write of d_out·d_in·sizeof(OutT) and drops the reduction.
// ---------------------------------------------------------------------------------------
template <typename T, typename TA, typename OutT, bool MERGE>
__device__ __forceinline__ void vtile_pass(
    const T* __restrict__ w0,     // [d_out, d_in] at (j, k) -> w0[j*ldw_j + k*ldw_k]
    long long ldw_j, long long ldw_k,
    const TA* __restrict__ a,     // [r, d_in]
    const TA* __restrict__ b,     // [d_out, r]
    const float* __restrict__ m,  // [d_out] or null (norm only: then g is not written)
    const float* __restrict__ g,  // [d_out] or null (merged_weight only: null means g = 1)
    float s, float eps, int d_out, int d_in, int r,
    int k_per_split,              // columns of d_in per grid.y split (a multiple of VT_COLS)
    float* __restrict__ part,     // [splits, d_out] or null (norm split: Σ v² of the split)
    float* __restrict__ n_out,    // [d_out] (norm, unsplit)
    float* __restrict__ g_out,    // [d_out] or null (norm, unsplit)
    OutT* __restrict__ out) {     // [d_out, d_in] row-major (merged_weight)
    extern __shared__ float bs[];  // [VT_ROWS, r]
    __shared__ float ws[VT_ROWS][VT_COLS + 1];
    __shared__ float as[VT_RCHUNK][VT_COLS + 1];
    __shared__ float red[VT_ROWS][VT_COLS / 32];

    const int tid = threadIdx.x;
    const int j0 = blockIdx.x * VT_ROWS;
    const int kk = tid % VT_COLS;
    const int jq = tid / VT_COLS;  // 0..3
    constexpr int Q = VT_ROWS / (THREADS / VT_COLS);  // 4 rows per thread
    // This block's columns [kb, ke): whole VT_COLS chunks, the last split ending at d_in
    // (merged_weight is never split: all of d_in).
    const int kb = MERGE ? 0 : blockIdx.y * k_per_split;
    const int ke = MERGE ? d_in : min(d_in, kb + k_per_split);

    for (int f = tid; f < VT_ROWS * r; f += THREADS) {
        const int jj = f / r, i = f % r;
        const int j = j0 + jj;
        bs[f] = j < d_out ? to_f32(b[(long long)j * r + i]) : 0.f;
    }

    float sq[Q];
#pragma unroll
    for (int q = 0; q < Q; ++q) sq[q] = 0.f;

    for (int k0 = kb; k0 < ke; k0 += VT_COLS) {
        // Every reader of the previous chunk's ws/as (and, first time, the writers of bs)
        // must be done before they are overwritten.
        __syncthreads();
        stage_w0_tile<VT_ROWS, VT_COLS, THREADS>(
            w0, ldw_j, ldw_k, j0, k0, d_out, ke, from_f32<T>(0.f),
            [&](int jj, int c, T v) { ws[jj][c] = to_f32(v); });
        float acc[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q) acc[q] = 0.f;
        for (int i0 = 0; i0 < r; i0 += VT_RCHUNK) {
            if (i0 > 0) __syncthreads();  // readers of the previous A chunk are done
            for (int f = tid; f < VT_RCHUNK * VT_COLS; f += THREADS) {
                const int ii = f / VT_COLS, c = f % VT_COLS;
                const int i = i0 + ii, k = k0 + c;
                as[ii][c] = (i < r && k < ke) ? to_f32(a[(long long)i * d_in + k]) : 0.f;
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
            if constexpr (MERGE) {
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
    if constexpr (!MERGE) {
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
                if (part) {
                    part[(long long)blockIdx.y * d_out + j] = tot;
                } else {
                    const float nj = sqrtf(tot);
                    n_out[j] = nj;
                    if (m && g_out) g_out[j] = m[j] / fmaxf(nj, eps);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// v2: the B·A tile on tensor cores (mma.sync m16n8k16, bf16/f16 operands, f32 accumulate).
//
// Block: NT_WARPS = 4 warps (128 threads), NT_ROWS = 64 rows of V; warp w owns rows
// 16w..16w+15. Columns are walked in chunks of NT_COLS = 64 (8 n-tiles of 8), the padded
// rank rp = ⌈r/16⌉·16 in chunks of NT_RK = 32 (2 k-steps). Shared memory (dynamic, 16-bit
// elements, every row 16-byte aligned for ldmatrix and padded by 8 elements so the 8 row
// addresses of an ldmatrix hit distinct banks):
//   bs  [64, rp + 8]   the block's rows of B, zero beyond r / d_out    (loaded once)
//   as  [32, 64 + 8]   one rank chunk of the A chunk, zero beyond r / d_in
//   ws  [64, 64 + 8]   the W0 tile (loaded coalesced for either layout)
// Per chunk, each warp keeps 8 accumulator tiles (32 f32), takes A fragments of B with
// ldmatrix.x4 and B fragments of A with ldmatrix.x4.trans (two n-tiles per load), adds the
// W0 tile at its accumulator positions and squares. Row sums: 2 per thread (rows g, g+8),
// then a fixed-order butterfly over the 4 lanes of a row.
//
// Bytes: as v1 (W0 once; A once per row tile: ⌈d_out/64⌉·r·d_in·sz, L2; B once per block:
// splits·d_out·r·sz, L2) + the partials 4·splits·d_out written and read once when split.
// FLOPs: 2·d_out·d_in·rp on tensor cores + 3·d_out·d_in on CUDA cores.
// Shared: 2·(64·(rp+8) + 32·72 + 64·72) bytes ≤ 47 616 for r ≤ 256.
// ---------------------------------------------------------------------------------------
constexpr int NT_LD = NT_COLS + 8;

// The W0 tile [NT_ROWS, NT_COLS] at rows j0.., columns k0.. (zero outside W0 and past
// column ke) into ws [NT_ROWS, NT_LD], shared by both v2 variants: 16-byte loads when `vec`
// (row-major W0; rows of ws are 16-byte aligned, NT_LD·2 = 144 bytes), else the
// layout-aware loader. The caller places the barriers around it.
template <typename T>
__device__ __forceinline__ void norm_v2_stage_w0(int vec, const T* __restrict__ w0,
                                                 long long ldw_j, long long ldw_k, int j0,
                                                 int k0, int d_out, int ke, T zero, T* ws) {
    constexpr int NTH = NT_WARPS * 32;
    if (vec) {
        stage_tile_vec16<NT_ROWS, NT_COLS, NTH>(
            w0, ldw_j, j0, k0, d_out, ke, [&](int jj, int c, const uint4& v) {
                *reinterpret_cast<uint4*>(ws + jj * NT_LD + c) = v;
            });
    } else {
        stage_w0_tile<NT_ROWS, NT_COLS, NTH>(
            w0, ldw_j, ldw_k, j0, k0, d_out, ke, zero,
            [&](int jj, int c, T v) { ws[jj * NT_LD + c] = v; });
    }
}

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2], const float (&c)[4],
                                         __nv_bfloat16) {
    mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2], const float (&c)[4], __half) {
    mma_m16n8k16_f16(d, a, b, c);
}

// The end of a norm v2 block: lane (gq, tq) of warp w holds partial sums of V² of rows
// j0 + 16w + gq (sq0) and + 8 (sq1) over its columns; the 4 lanes of a row are summed by a
// fixed-order butterfly, then lane tq = 0 writes the row's partial (split) or n and g.
__device__ __forceinline__ void norm_v2_rows_out(float sq0, float sq1,
                                                 const float* __restrict__ m, float eps,
                                                 int d_out, float* __restrict__ part,
                                                 float* __restrict__ n_out,
                                                 float* __restrict__ g_out) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int j0 = blockIdx.x * NT_ROWS;
#pragma unroll
    for (int o = 1; o < 4; o <<= 1) {
        sq0 += __shfl_xor_sync(0xffffffffu, sq0, o);
        sq1 += __shfl_xor_sync(0xffffffffu, sq1, o);
    }
    if (tq == 0 && part) {
        const int ja = j0 + 16 * warp + gq;
        const int jb = ja + 8;
        if (ja < d_out) part[(long long)blockIdx.y * d_out + ja] = sq0;
        if (jb < d_out) part[(long long)blockIdx.y * d_out + jb] = sq1;
    } else if (tq == 0) {
        const int ja = j0 + 16 * warp + gq;
        const int jb = ja + 8;
        if (ja < d_out) {
            const float n = sqrtf(sq0);
            n_out[ja] = n;
            if (m && g_out) g_out[ja] = m[ja] / fmaxf(n, eps);
        }
        if (jb < d_out) {
            const float n = sqrtf(sq1);
            n_out[jb] = n;
            if (m && g_out) g_out[jb] = m[jb] / fmaxf(n, eps);
        }
    }
}

template <typename T>
__device__ __forceinline__ void norm_v2(
    const T* __restrict__ w0,     // [d_out, d_in] at (j, k) -> w0[j*ldw_j + k*ldw_k]
    long long ldw_j, long long ldw_k,
    const T* __restrict__ a,      // [r, d_in]
    const T* __restrict__ b,      // [d_out, r]
    const float* __restrict__ m,  // [d_out] or null
    float s, float eps, int d_out, int d_in, int r,
    int k_per_split,              // columns of d_in per grid.y split (a multiple of NT_COLS)
    int vec,                      // 1: W0 rows and A rows are read in 16-byte loads
    float* __restrict__ part,     // [splits, d_out] or null (split: Σ v² of the split)
    float* __restrict__ n_out,    // [d_out] (unsplit)
    float* __restrict__ g_out) {  // [d_out] or null (unsplit)
    extern __shared__ uint4 smem_v2[];
    const int rp = (r + 15) / 16 * 16;
    const int ldb = rp + 8;
    T* bs = reinterpret_cast<T*>(smem_v2);  // [NT_ROWS, ldb]
    T* as = bs + NT_ROWS * ldb;              // [NT_RK, NT_LD]
    T* ws = as + NT_RK * NT_LD;              // [NT_ROWS, NT_LD]
    constexpr int NTH = NT_WARPS * 32;

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int j0 = blockIdx.x * NT_ROWS;
    const T zero = from_f32<T>(0.f);
    // This block's columns [kb, ke): whole NT_COLS chunks, the last split ending at d_in.
    const int kb = blockIdx.y * k_per_split;
    const int ke = min(d_in, kb + k_per_split);

    for (int f = tid; f < NT_ROWS * rp; f += NTH) {
        const int jj = f / rp, i = f % rp;
        const int j = j0 + jj;
        bs[jj * ldb + i] = (j < d_out && i < r) ? b[(long long)j * r + i] : zero;
    }

    float sq0 = 0.f, sq1 = 0.f;  // rows 16·warp + gq and + 8
    // ldmatrix row addresses: A operand (B rows) matrix mi = lane / 8 is rows +8·(mi & 1),
    // columns +8·(mi >> 1); B operand (A chunk, .trans) matrix mi is ranks +8·(mi & 1),
    // columns +8·(mi >> 1).
    const int lrow = (lane % 8) + 8 * ((lane / 8) & 1);
    const int lcol = 8 * (lane / 16);

    for (int k0 = kb; k0 < ke; k0 += NT_COLS) {
        __syncthreads();  // readers of the previous ws/as (first time: writers of bs) done
        norm_v2_stage_w0(vec, w0, ldw_j, ldw_k, j0, k0, d_out, ke, zero, ws);
        float acc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

        for (int i0 = 0; i0 < rp; i0 += NT_RK) {
            if (i0 > 0) __syncthreads();  // readers of the previous rank chunk are done
            if (vec) {  // ranks r..rp-1 and columns past ke are zero-filled
                stage_tile_vec16<NT_RK, NT_COLS, NTH>(
                    a, d_in, i0, k0, r, ke, [&](int ii, int c, const uint4& v) {
                        *reinterpret_cast<uint4*>(as + ii * NT_LD + c) = v;
                    });
            } else {
                for (int f = tid; f < NT_RK * NT_COLS; f += NTH) {
                    const int ii = f / NT_COLS, c = f % NT_COLS;
                    const int i = i0 + ii, k = k0 + c;
                    as[ii * NT_LD + c] = (i < r && k < ke) ? a[(long long)i * d_in + k] : zero;
                }
            }
            __syncthreads();
            const int nk = min(NT_RK, rp - i0) / 16;
            for (int ks = 0; ks < nk; ++ks) {
                uint32_t af[4];
                ldmatrix_x4(af, bs + (16 * warp + lrow) * ldb + i0 + 16 * ks + lcol);
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, as + (16 * ks + lrow) * NT_LD + 16 * np + lcol);
                    const uint32_t b0[2] = {bf[0], bf[1]};
                    const uint32_t b1[2] = {bf[2], bf[3]};
                    mma16816(acc[2 * np], af, b0, acc[2 * np], zero);
                    mma16816(acc[2 * np + 1], af, b1, acc[2 * np + 1], zero);
                }
            }
        }
        // Padded rows/columns: W0 tile, B rows and A columns are all zero there, so v = 0.
        const int r0 = 16 * warp + gq;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const int c = 8 * nt + 2 * tq;
            const float v0 = to_f32(ws[r0 * NT_LD + c]) + s * acc[nt][0];
            const float v1 = to_f32(ws[r0 * NT_LD + c + 1]) + s * acc[nt][1];
            const float v2 = to_f32(ws[(r0 + 8) * NT_LD + c]) + s * acc[nt][2];
            const float v3 = to_f32(ws[(r0 + 8) * NT_LD + c + 1]) + s * acc[nt][3];
            sq0 += v0 * v0 + v1 * v1;
            sq1 += v2 * v2 + v3 * v3;
        }
    }
    norm_v2_rows_out(sq0, sq1, m, eps, d_out, part, n_out, g_out);
}

// ---------------------------------------------------------------------------------------
// v2 with f32 adapters (`_a32`: f16/bf16 W0, f32 lora_A/lora_B, PEFT's default mix): the
// same block, grid and W0 tile as v2, with the B·A tile on bf16 tensor cores at f32
// accuracy. B rows and the A chunk stay f32 in shared memory; each f32 x entering an mma
// fragment is split in registers into three bf16 terms, x ≈ h + mi + l with
// h = bf16(x), mi = bf16(x − h), l = bf16(x − h − mi) (every difference exact in f32), and
// each product a·b is formed from the six terms of order ≤ u² (u = 2⁻⁸, bf16's unit
// roundoff): l·h, h·l, mi·mi, mi·h, h·mi, h·h, accumulated in f32 in that order (smallest
// first). Bound: |a − h − mi − l| ≤ u³|a|, and the terms left out (mi·l, l·mi, l·l) are
// ≤ 2u³|a·b| + u⁴|a·b|, so each product is off by at most ≈ 4u³|a·b| = 4·2⁻²⁴|a·b| before the
// f32 accumulation, the order of the one rounding v1 makes forming it in f32; bf16 has f32's
// exponent range, so no value overflows or loses precision to the split (only terms below
// 2⁻¹²⁶ go subnormal). That bound takes each mma's f32 sums as rounded to nearest, as the
// emulator's are. A GPU's are truncated after aligning the addends to the largest (Fasi et al.,
// "Numerical behavior of NVIDIA tensor cores", PeerJ Comput. Sci. 7:e330, 2021): up to one
// f32 ulp more per mma, one-sided, 6·⌈r/16⌉ mma per element; the H200 run of 2026-11-29
// (docs/gpu/h200-2026-11-29/norm-v2-a32.txt) measured the error growing with r accordingly.
// tests/kernels/layer.rs holds it to v1 `_a32` with V = s·B·A alone, with that term on a GPU.
// Shared memory (dynamic):
//   bsf [64, rp + 8]   f32, the block's rows of B, zero beyond r / d_out   (loaded once)
//   asf [32, 64 + 4]   f32, one rank chunk of the A chunk, zero beyond r / d_in
//   ws  [64, 64 + 8]   the W0 tile, 16-bit, as in v2
// Fragments are read straight from the f32 tiles (no ldmatrix): the A operand as float2
// pairs of a B row (row stride ≡ 8 or 24 words mod 32: a half-warp of float2 hits 32
// distinct banks), the B operand as single floats of A (row stride 68 ≡ 4 mod 32: the 32
// lanes hit 32 distinct banks). Shared: 4·64·(rp+8) + 4·32·68 + 2·64·72 bytes (24 064 at
// r = 16); ranks whose tiles pass 48 KB (r > 112) run v1.
// FLOPs: 6·2·d_out·d_in·rp on tensor cores + 3·d_out·d_in on CUDA cores.
// ---------------------------------------------------------------------------------------
constexpr int NT_LDA32 = NT_COLS + 4;
// Minimum resident blocks per SM the entry points declare (`__launch_bounds__`): 0 (no
// constraint) for 16-bit adapters; 3 with f32 adapters, a cap of 170 registers, which keeps
// ptxas from choosing 80 registers and spilling on sm_86/89 (it uses 146 to 162, no spill).
template <typename TA> constexpr int norm_v2_min_blocks() { return sizeof(TA) == 4 ? 3 : 0; }

// Splits x into three bf16 terms (see above), returned as their bit patterns.
__device__ __forceinline__ void split_bf16x3(float x, uint32_t& h, uint32_t& mi, uint32_t& l) {
    const __nv_bfloat16 bh = __float2bfloat16_rn(x);
    const float r1 = x - __bfloat162float(bh);
    const __nv_bfloat16 bm = __float2bfloat16_rn(r1);
    const float r2 = r1 - __bfloat162float(bm);
    h = __bfloat16_as_ushort(bh);
    mi = __bfloat16_as_ushort(bm);
    l = __bfloat16_as_ushort(__float2bfloat16_rn(r2));
}

// Two f32 values (lower column or k index first) as the three packed bf16x2 registers of
// their terms.
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t& h, uint32_t& mi,
                                           uint32_t& l) {
    uint32_t h0, m0, l0, h1, m1, l1;
    split_bf16x3(x0, h0, m0, l0);
    split_bf16x3(x1, h1, m1, l1);
    h = h0 | (h1 << 16);
    mi = m0 | (m1 << 16);
    l = l0 | (l1 << 16);
}

template <typename T>
__device__ __forceinline__ void norm_v2(
    const T* __restrict__ w0,         // [d_out, d_in] at (j, k) -> w0[j*ldw_j + k*ldw_k]
    long long ldw_j, long long ldw_k,
    const float* __restrict__ a,      // [r, d_in] f32
    const float* __restrict__ b,      // [d_out, r] f32
    const float* __restrict__ m,      // [d_out] or null
    float s, float eps, int d_out, int d_in, int r,
    int k_per_split,                  // columns of d_in per grid.y split (a multiple of NT_COLS)
    int vec,                          // 1: W0 rows and A rows are read in 16-byte loads
    float* __restrict__ part,         // [splits, d_out] or null (split: Σ v² of the split)
    float* __restrict__ n_out,        // [d_out] (unsplit)
    float* __restrict__ g_out) {      // [d_out] or null (unsplit)
    extern __shared__ uint4 smem_v2[];
    const int rp = (r + 15) / 16 * 16;
    const int ldb = rp + 8;
    float* bsf = reinterpret_cast<float*>(smem_v2);  // [NT_ROWS, ldb]
    float* asf = bsf + NT_ROWS * ldb;                 // [NT_RK, NT_LDA32]
    T* ws = reinterpret_cast<T*>(asf + NT_RK * NT_LDA32);  // [NT_ROWS, NT_LD]
    constexpr int NTH = NT_WARPS * 32;

    const int tid = threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    const int gq = lane / 4, tq = lane % 4;
    const int j0 = blockIdx.x * NT_ROWS;
    const T zero = from_f32<T>(0.f);
    const int kb = blockIdx.y * k_per_split;
    const int ke = min(d_in, kb + k_per_split);

    for (int f = tid; f < NT_ROWS * rp; f += NTH) {
        const int jj = f / rp, i = f % rp;
        const int j = j0 + jj;
        bsf[jj * ldb + i] = (j < d_out && i < r) ? b[(long long)j * r + i] : 0.f;
    }

    float sq0 = 0.f, sq1 = 0.f;  // rows 16·warp + gq and + 8
    const float* brow0 = bsf + (16 * warp + gq) * ldb + 2 * tq;
    const float* brow1 = brow0 + 8 * ldb;

    for (int k0 = kb; k0 < ke; k0 += NT_COLS) {
        __syncthreads();  // readers of the previous ws/asf (first time: writers of bsf) done
        norm_v2_stage_w0(vec, w0, ldw_j, ldw_k, j0, k0, d_out, ke, zero, ws);
        float acc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

        for (int i0 = 0; i0 < rp; i0 += NT_RK) {
            if (i0 > 0) __syncthreads();  // readers of the previous rank chunk are done
            if (vec) {  // rows of asf are 16-byte aligned (68·4 = 272 bytes)
                stage_tile_vec16<NT_RK, NT_COLS, NTH>(
                    a, d_in, i0, k0, r, ke, [&](int ii, int c, const uint4& v) {
                        *reinterpret_cast<uint4*>(asf + ii * NT_LDA32 + c) = v;
                    });
            } else {
                for (int f = tid; f < NT_RK * NT_COLS; f += NTH) {
                    const int ii = f / NT_COLS, c = f % NT_COLS;
                    const int i = i0 + ii, k = k0 + c;
                    asf[ii * NT_LDA32 + c] =
                        (i < r && k < ke) ? a[(long long)i * d_in + k] : 0.f;
                }
            }
            __syncthreads();
            const int nk = min(NT_RK, rp - i0) / 16;
            for (int ks = 0; ks < nk; ++ks) {
                // A operand (rows of B): (row gq, k 2tq..+1), (row gq+8, ...), then k + 8.
                const int kc = i0 + 16 * ks;
                uint32_t ah[4], am[4], al[4];
                split_pair(brow0[kc], brow0[kc + 1], ah[0], am[0], al[0]);
                split_pair(brow1[kc], brow1[kc + 1], ah[1], am[1], al[1]);
                split_pair(brow0[kc + 8], brow0[kc + 9], ah[2], am[2], al[2]);
                split_pair(brow1[kc + 8], brow1[kc + 9], ah[3], am[3], al[3]);
                const float* acol = asf + (16 * ks + 2 * tq) * NT_LDA32 + gq;
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    // B operand (columns of the A chunk): (k 2tq..+1, n gq), then k + 8.
                    const float* p = acol + 8 * nt;
                    uint32_t bh[2], bm[2], bl[2];
                    split_pair(p[0], p[NT_LDA32], bh[0], bm[0], bl[0]);
                    split_pair(p[8 * NT_LDA32], p[9 * NT_LDA32], bh[1], bm[1], bl[1]);
                    mma_m16n8k16_bf16(acc[nt], al, bh, acc[nt]);
                    mma_m16n8k16_bf16(acc[nt], ah, bl, acc[nt]);
                    mma_m16n8k16_bf16(acc[nt], am, bm, acc[nt]);
                    mma_m16n8k16_bf16(acc[nt], am, bh, acc[nt]);
                    mma_m16n8k16_bf16(acc[nt], ah, bm, acc[nt]);
                    mma_m16n8k16_bf16(acc[nt], ah, bh, acc[nt]);
                }
            }
        }
        // Padded rows/columns: W0 tile, B rows and A columns are all zero there, so v = 0.
        const int r0 = 16 * warp + gq;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
            const int c = 8 * nt + 2 * tq;
            const float v0 = to_f32(ws[r0 * NT_LD + c]) + s * acc[nt][0];
            const float v1 = to_f32(ws[r0 * NT_LD + c + 1]) + s * acc[nt][1];
            const float v2 = to_f32(ws[(r0 + 8) * NT_LD + c]) + s * acc[nt][2];
            const float v3 = to_f32(ws[(r0 + 8) * NT_LD + c + 1]) + s * acc[nt][3];
            sq0 += v0 * v0 + v1 * v1;
            sq1 += v2 * v2 + v3 * v3;
        }
    }
    norm_v2_rows_out(sq0, sq1, m, eps, d_out, part, n_out, g_out);
}


}  // namespace df

#define DF_NORM_V1(sfx, T, TA)                                                              \
    extern "C" __global__ void __launch_bounds__(256) dora_norm_v1_##sfx(                   \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const TA* __restrict__ a,     /* [r, d_in] */                                       \
        const TA* __restrict__ b,     /* [d_out, r] */                                      \
        const float* __restrict__ m,  /* [d_out] or null */                                 \
        float s, float eps, int d_out, int d_in, int r,                                     \
        int k_per_split,                                                                    \
        float* __restrict__ part,     /* [gridDim.y, d_out] or null (unsplit) */            \
        float* __restrict__ n_out,    /* [d_out] */                                         \
        float* __restrict__ g_out) {  /* [d_out] or null */                                 \
        df::vtile_pass<T, TA, float, false>(w0, ldw_j, ldw_k, a, b, m, nullptr, s, eps, d_out,  \
                                        d_in, r, k_per_split, part, n_out, g_out,           \
                                        nullptr);                                           \
    }
DF_STAMP(dora_norm_v1, DF_NORM_V1)

#define DF_NORM_V2(sfx, T, TA)                                                              \
    extern "C" __global__ void __launch_bounds__(128, df::norm_v2_min_blocks<TA>()) dora_norm_v2_##sfx(                   \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const TA* __restrict__ a,     /* [r, d_in] */                                       \
        const TA* __restrict__ b,     /* [d_out, r] */                                      \
        const float* __restrict__ m,  /* [d_out] or null */                                 \
        float s, float eps, int d_out, int d_in, int r,                                     \
        int k_per_split, int vec,                                                           \
        float* __restrict__ part,     /* [gridDim.y, d_out] or null (unsplit) */            \
        float* __restrict__ n_out,    /* [d_out] */                                         \
        float* __restrict__ g_out) {  /* [d_out] or null */                                 \
        df::norm_v2<T>(w0, ldw_j, ldw_k, a, b, m, s, eps, d_out, d_in, r, k_per_split, vec, \
                       part, n_out, g_out);                                                 \
    }
DF_STAMP(dora_norm_v2, DF_NORM_V2)

#define DF_MERGED_WEIGHT(sfx, T, TA)                                                        \
    extern "C" __global__ void __launch_bounds__(256) dora_merged_weight_##sfx(             \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const TA* __restrict__ a,    /* [r, d_in] */                                        \
        const TA* __restrict__ b,    /* [d_out, r] */                                       \
        const float* __restrict__ g, /* [d_out] or null (g = 1) */                          \
        float s, int d_out, int d_in, int r,                                                \
        T* __restrict__ out) {       /* [d_out, d_in] */                                    \
        df::vtile_pass<T, TA, T, true>(w0, ldw_j, ldw_k, a, b, nullptr, g, s, 0.f, d_out, d_in, \
                                   r, d_in, nullptr, nullptr, nullptr, out);                \
    }
DF_STAMP(dora_merged_weight, DF_MERGED_WEIGHT)

#define DF_MERGED_WEIGHT_F32OUT(sfx, T, TA)                                                 \
    extern "C" __global__ void __launch_bounds__(256) dora_merged_weight_f32out_##sfx(      \
        const T* __restrict__ w0, /* [d_out, d_in] via (ldw_j, ldw_k) */                    \
        long long ldw_j, long long ldw_k,                                                   \
        const TA* __restrict__ a,    /* [r, d_in] */                                        \
        const TA* __restrict__ b,    /* [d_out, r] */                                       \
        const float* __restrict__ g, /* [d_out] or null (g = 1) */                          \
        float s, int d_out, int d_in, int r,                                                \
        float* __restrict__ out) {   /* [d_out, d_in] */                                    \
        df::vtile_pass<T, TA, float, true>(w0, ldw_j, ldw_k, a, b, nullptr, g, s, 0.f, d_out,   \
                                       d_in, r, d_in, nullptr, nullptr, nullptr, out);      \
    }
DF_STAMP(dora_merged_weight_f32out, DF_MERGED_WEIGHT_F32OUT)

// norm_reduce: the second pass of a split norm. n_j = sqrt(Σ_split part[split, j]) summed in
// split order (deterministic), g_j = m_j / max(n_j, ε). One thread per row.
// Bytes: 4·(splits + 3)·d_out. FLOPs: splits·d_out.
extern "C" __global__ void __launch_bounds__(256) dora_norm_reduce_f32(
    const float* __restrict__ part,  // [splits, d_out]
    int splits,
    const float* __restrict__ m,     // [d_out] or null (then g is not written)
    float eps, int d_out,
    float* __restrict__ n_out,       // [d_out]
    float* __restrict__ g_out) {     // [d_out] or null
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d_out) return;
    float tot = 0.f;
    for (int p = 0; p < splits; ++p) tot += part[(long long)p * d_out + j];
    const float nj = sqrtf(tot);
    n_out[j] = nj;
    if (m && g_out) g_out[j] = m[j] / fmaxf(nj, eps);
}
