// Tensor-core wrappers for tests/emu/tensor_core.rs (one warp per launch).
#include "prelude.cuh"
#include "tensor_core.cuh"

__device__ __forceinline__ uint32_t pack2(unsigned short lo, unsigned short hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// D = A * B + C with fragments built straight from the PTX ISA's formulas:
// A [16][16] and B [16][8] (k rows, n columns) as 16-bit patterns (bf16 if `bf16`, else f16),
// C and D [16][8] f32, all row-major.
extern "C" __global__ void emu_mma_frag(const unsigned short* __restrict__ A,  // [16, 16]
                                        const unsigned short* __restrict__ B,  // [16, 8]
                                        const float* __restrict__ C,           // [16, 8]
                                        float* __restrict__ D,                 // [16, 8]
                                        int bf16) {
  const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  a[0] = pack2(A[g * 16 + 2 * t], A[g * 16 + 2 * t + 1]);
  a[1] = pack2(A[(g + 8) * 16 + 2 * t], A[(g + 8) * 16 + 2 * t + 1]);
  a[2] = pack2(A[g * 16 + 2 * t + 8], A[g * 16 + 2 * t + 9]);
  a[3] = pack2(A[(g + 8) * 16 + 2 * t + 8], A[(g + 8) * 16 + 2 * t + 9]);
  b[0] = pack2(B[(2 * t) * 8 + g], B[(2 * t + 1) * 8 + g]);
  b[1] = pack2(B[(2 * t + 8) * 8 + g], B[(2 * t + 9) * 8 + g]);
  const float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                      C[(g + 8) * 8 + 2 * t + 1]};
  float d[4];
  if (bf16)
    mma_m16n8k16_bf16(d, a, b, c);
  else
    mma_m16n8k16_f16(d, a, b, c);
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

// The same product with operands staged in shared memory and loaded the way GEMM kernels do:
// ldmatrix.x4 for A (lanes 0-15 rows 0-15 at column 0, lanes 16-31 at column 8) and
// ldmatrix.x2.trans for B stored [k][n] (lanes 0-15 rows k = 0..15). C is accumulated twice:
// D = A*B + (A*B + C), so the accumulator path is exercised too.
extern "C" __global__ void emu_mma_ldmatrix(const unsigned short* __restrict__ A,  // [16, 16]
                                            const unsigned short* __restrict__ B,  // [16, 8]
                                            const float* __restrict__ C,           // [16, 8]
                                            float* __restrict__ D,                 // [16, 8]
                                            int bf16) {
  __shared__ __align__(16) unsigned short sA[16][16];
  __shared__ __align__(16) unsigned short sB[16][8];
  const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, t = lane & 3;
  for (int i = lane; i < 256; i += 32) sA[i / 16][i % 16] = A[i];
  for (int i = lane; i < 128; i += 32) sB[i / 8][i % 8] = B[i];
  __syncwarp();
  uint32_t a[4], b[2];
  ldmatrix_x4(a, &sA[lane % 16][(lane / 16) * 8]);
  ldmatrix_x2_trans(b, &sB[lane % 16][0]);
  float c[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t],
                C[(g + 8) * 8 + 2 * t + 1]};
  for (int rep = 0; rep < 2; ++rep) {
    if (bf16)
      mma_m16n8k16_bf16(c, a, b, c);
    else
      mma_m16n8k16_f16(c, a, b, c);
  }
  D[g * 8 + 2 * t] = c[0];
  D[g * 8 + 2 * t + 1] = c[1];
  D[(g + 8) * 8 + 2 * t] = c[2];
  D[(g + 8) * 8 + 2 * t + 1] = c[3];
}

// Every ldmatrix variant on four 8x8 matrices M [4][8][8] of 16-bit values. Row r of matrix m
// is stored at row slot (3r + 1) % 8 of that matrix's block in shared memory, and lane
// 8m + r passes that slot's address, so only per-lane addressing finds the rows.
// out[(v * 32 + lane) * 4 + i] = register i of `lane` for variant v = x1, x2, x4, x2.trans,
// x4.trans (registers a variant does not produce stay as they are).
extern "C" __global__ void emu_ldmatrix(const unsigned short* __restrict__ M,  // [4, 8, 8]
                                        unsigned int* __restrict__ out) {      // [5, 32, 4]
  __shared__ __align__(16) unsigned short s[4][8][8];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 256; i += 32) {
    const int m = i / 64, r = (i / 8) % 8, c = i % 8;
    s[m][(3 * r + 1) % 8][c] = M[i];
  }
  __syncwarp();
  const void* row = &s[lane / 8][(3 * (lane % 8) + 1) % 8][0];
  uint32_t r1[1], r2[2], r4[4], t2[2], t4[4];
  ldmatrix_x1(r1, row);
  ldmatrix_x2(r2, row);
  ldmatrix_x4(r4, row);
  ldmatrix_x2_trans(t2, row);
  ldmatrix_x4_trans(t4, row);
  unsigned int* o = out + lane * 4;
  o[0] = r1[0];
  for (int i = 0; i < 2; ++i) o[1 * 128 + i] = r2[i];
  for (int i = 0; i < 4; ++i) o[2 * 128 + i] = r4[i];
  for (int i = 0; i < 2; ++i) o[3 * 128 + i] = t2[i];
  for (int i = 0; i < 4; ++i) o[4 * 128 + i] = t4[i];
}
