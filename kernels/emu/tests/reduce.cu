// Reductions for tests/emu/reduce.rs: a shared-memory tree, warp shuffles, ballots.
#include "prelude.cuh"

// out[b] = sum of x[b*chunk .. min(n, (b+1)*chunk)), chunk = 4 * blockDim.x.
// Tree reduction in shared memory; blockDim.x must be a power of two <= 1024.
extern "C" __global__ void emu_block_reduce_f32(const float* __restrict__ x,  // [n]
                                                float* __restrict__ out,      // [gridDim.x]
                                                int n) {
  __shared__ float partial[1024];
  const int chunk = 4 * static_cast<int>(blockDim.x);
  const int begin = static_cast<int>(blockIdx.x) * chunk;
  float v = 0.0f;
  for (int i = begin + static_cast<int>(threadIdx.x); i < begin + chunk && i < n;
       i += static_cast<int>(blockDim.x))
    v += x[i];
  partial[threadIdx.x] = v;
  __syncthreads();
  for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

__device__ __forceinline__ float warp_sum_xor(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
  return v;
}
__device__ __forceinline__ float warp_sum_down(float v) {
  for (unsigned int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
  return __shfl_sync(0xFFFFFFFFu, v, 0);
}

// Same contract as emu_block_reduce_f32, through warp shuffles: xor butterflies inside each
// warp, per-warp partials in shared memory, then a shfl_down reduction by warp 0.
extern "C" __global__ void emu_warp_reduce_f32(const float* __restrict__ x,  // [n]
                                               float* __restrict__ out,      // [gridDim.x]
                                               int n) {
  __shared__ float warp_part[32];
  const int chunk = 4 * static_cast<int>(blockDim.x);
  const int begin = static_cast<int>(blockIdx.x) * chunk;
  float v = 0.0f;
  for (int i = begin + static_cast<int>(threadIdx.x); i < begin + chunk && i < n;
       i += static_cast<int>(blockDim.x))
    v += x[i];
  v = warp_sum_xor(v);
  const unsigned int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const unsigned int nwarps = blockDim.x / 32;
    float w = lane < nwarps ? warp_part[lane] : 0.0f;
    w = warp_sum_down(w);
    if (lane == 0) out[blockIdx.x] = w;
  }
}

// out[w] = number of x[i] > 0 among the 32 elements of warp w (global warp index), by ballot;
// also checks __any_sync/__all_sync agree with it (out[w] = -1 if not).
extern "C" __global__ void emu_ballot_count(const float* __restrict__ x,  // [n]
                                            int* __restrict__ out,        // [n / 32]
                                            int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int pred = i < n && x[i] > 0.0f;
  const unsigned int b = __ballot_sync(0xFFFFFFFFu, pred);
  const int any = __any_sync(0xFFFFFFFFu, pred), all = __all_sync(0xFFFFFFFFu, pred);
  if (threadIdx.x % 32 == 0 && i < n) {
    const int c = __popc(b);
    out[i / 32] = (any == (c > 0) && all == (c == 32)) ? c : -1;
  }
}

// Every shuffle mode with distinct per-lane values; out[mode * 32 + lane] (7 modes).
extern "C" __global__ void emu_shfl_modes(int* __restrict__ out) {  // [7 * 32]
  const int lane = static_cast<int>(threadIdx.x);
  const int v = 100 + lane;
  out[0 * 32 + lane] = __shfl_sync(0xFFFFFFFFu, v, (lane + 3) % 32);
  out[1 * 32 + lane] = __shfl_sync(0xFFFFFFFFu, v, lane + 3, 8);
  out[2 * 32 + lane] = __shfl_up_sync(0xFFFFFFFFu, v, 2, 16);
  out[3 * 32 + lane] = __shfl_down_sync(0xFFFFFFFFu, v, 3, 16);
  out[4 * 32 + lane] = __shfl_xor_sync(0xFFFFFFFFu, v, 5);
  out[5 * 32 + lane] = __shfl_xor_sync(0xFFFFFFFFu, v, 4, 4);
  // A partial mask: the even lanes exchange among themselves; odd lanes do a separate shuffle.
  if (lane % 2 == 0)
    out[6 * 32 + lane] = __shfl_sync(0x55555555u, v, (lane + 2) % 32);
  else
    out[6 * 32 + lane] = __shfl_sync(0xAAAAAAAAu, v, 1);
}

// __syncthreads_count/_and/_or and __reduce_*_sync: out[t*5 + k].
extern "C" __global__ void emu_sync_reductions(int* __restrict__ out) {  // [blockDim.x * 5]
  const int t = static_cast<int>(threadIdx.x);
  out[t * 5 + 0] = __syncthreads_count(t % 3 == 0);
  out[t * 5 + 1] = __syncthreads_and(t < 1000);
  out[t * 5 + 2] = __syncthreads_or(t == 5);
  out[t * 5 + 3] = static_cast<int>(__reduce_add_sync(0xFFFFFFFFu, static_cast<unsigned int>(t)));
  out[t * 5 + 4] = __reduce_max_sync(0xFFFFFFFFu, -t);
}
