// Mutated kernels for the racecheck tests (tests/emu/racecheck.rs): each is a small copy of a
// correct pattern with one synchronisation mistake, which the racecheck must report on every
// schedule. Never compiled by nvcc.
#include "prelude.cuh"

// emu_block_reduce_f32 (reduce.cu) with the __syncthreads() inside the tree removed: a thread
// reads partial[t + s] while another thread may still be writing it.
extern "C" __global__ void emu_mut_no_barrier(const float* __restrict__ x,  // [n]
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
  }
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// A block sum accumulated with a plain `+=` into one shared variable instead of atomicAdd:
// every thread's read-modify-write races with the others' (a lost update on the GPU).
extern "C" __global__ void emu_mut_shared_accumulate(const float* __restrict__ x,  // [n]
                                                     float* __restrict__ out,  // [gridDim.x]
                                                     int n) {
  __shared__ float total[1];
  if (threadIdx.x == 0) total[0] = 0.0f;
  __syncthreads();
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) total[0] += x[i];
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = total[0];
}

// The same with atomicAdd: race-free (the control of the test above).
extern "C" __global__ void emu_mut_shared_atomic(const float* __restrict__ x,  // [n]
                                                 float* __restrict__ out,      // [gridDim.x]
                                                 int n) {
  __shared__ float total[1];
  if (threadIdx.x == 0) total[0] = 0.0f;
  __syncthreads();
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) atomicAdd(&total[0], x[i]);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = total[0];
}

// Every block writes its partial sum to out[0] instead of out[blockIdx.x]: plain writes of
// one global address by several blocks.
extern "C" __global__ void emu_mut_global_overlap(const float* __restrict__ x,  // [n]
                                                  float* __restrict__ out,      // [1]
                                                  int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (threadIdx.x == 0 && i < n) out[0] = x[i];
}

// A warp-level tree in shared memory whose steps are ordered by __syncwarp(): race-free (the
// warp collective orders the lanes), so the racecheck must not report it.
extern "C" __global__ void emu_mut_syncwarp_tree(const float* __restrict__ x,  // [32·gridDim.x]
                                                 float* __restrict__ out,      // [gridDim.x]
                                                 int n) {
  __shared__ float buf[32];
  const unsigned int lane = threadIdx.x % 32;
  const int i = static_cast<int>(blockIdx.x * 32 + lane);
  buf[lane] = i < n ? x[i] : 0.0f;
  __syncwarp();
  for (unsigned int s = 16; s > 0; s >>= 1) {
    float v = 0.0f;
    if (lane < s) v = buf[lane] + buf[lane + s];
    __syncwarp();
    if (lane < s) buf[lane] = v;
    __syncwarp();
  }
  if (lane == 0) out[blockIdx.x] = buf[0];
}
