// Shared-memory transposes for tests/emu/transpose.rs.
#include "prelude.cuh"
#include "tensor_core.cuh"

// out[c][r] = in[r][c]; block (32, 8), grid (ceil(cols/32), ceil(rows/32)); a 32x33 tile
// (padding against bank conflicts on the GPU).
extern "C" __global__ void emu_transpose_f32(const float* __restrict__ in,  // [rows, cols]
                                             float* __restrict__ out,       // [cols, rows]
                                             int rows, int cols) {
  __shared__ float tile[32][33];
  const int c0 = static_cast<int>(blockIdx.x) * 32, r0 = static_cast<int>(blockIdx.y) * 32;
  for (int k = static_cast<int>(threadIdx.y); k < 32; k += 8) {
    const int r = r0 + k, c = c0 + static_cast<int>(threadIdx.x);
    if (r < rows && c < cols) tile[k][threadIdx.x] = in[static_cast<long long>(r) * cols + c];
  }
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.y); k < 32; k += 8) {
    const int c = c0 + k, r = r0 + static_cast<int>(threadIdx.x);
    if (r < rows && c < cols) out[static_cast<long long>(c) * rows + r] = tile[threadIdx.x][k];
  }
}

// The same transpose of a [rows, cols] matrix with cols % 4 == 0, staged through dynamic
// shared memory with cp.async (16-byte rows of 4 floats; zero-filled past the edge).
// block (32, 8), grid as above, dynamic shared memory 32 * 33 * 4 bytes + 32 * 32 * 4 bytes.
extern "C" __global__ void emu_transpose_cp_async(const float* __restrict__ in,  // [rows, cols]
                                                  float* __restrict__ out,  // [cols, rows]
                                                  int rows, int cols) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* stage = reinterpret_cast<float*>(smem);  // [32][32]
  float* tile = stage + 32 * 32;                   // [32][33]
  const int c0 = static_cast<int>(blockIdx.x) * 32, r0 = static_cast<int>(blockIdx.y) * 32;
  const int t = static_cast<int>(threadIdx.y * 32 + threadIdx.x);
  for (int q = t; q < 32 * 8; q += 256) {  // 32 rows x 8 chunks of 4 floats
    const int k = q / 8, ch = q % 8;
    const int r = r0 + k, c = c0 + ch * 4;
    const bool ok = r < rows && c < cols;
    cp_async_16_zfill(stage + k * 32 + ch * 4, ok ? in + static_cast<long long>(r) * cols + c : in,
                      ok);
  }
  cp_async_commit();
  cp_async_wait_group<0>();
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.y); k < 32; k += 8)
    tile[k * 33 + threadIdx.x] = stage[k * 32 + threadIdx.x];
  __syncthreads();
  for (int k = static_cast<int>(threadIdx.y); k < 32; k += 8) {
    const int c = c0 + k, r = r0 + static_cast<int>(threadIdx.x);
    if (r < rows && c < cols) out[static_cast<long long>(c) * rows + r] = tile[threadIdx.x * 33 + k];
  }
}
