// Deliberately broken kernels for tests/emu/faults.rs: each must be caught by the emulator.
#include "prelude.cuh"
#include "tensor_core.cuh"

// A race: each thread writes its slot and reads its neighbour's with no barrier between.
// Correct only if thread t+1 happened to run before thread t. out[t] should be t + 1 (mod n).
extern "C" __global__ void emu_racy(float* __restrict__ out) {  // [blockDim.x]
  __shared__ float s[1024];
  const unsigned int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t);
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// The same with the barrier: always right.
extern "C" __global__ void emu_race_free(float* __restrict__ out) {  // [gridDim.x * blockDim.x]
  __shared__ float s[1024];
  const unsigned int t = threadIdx.x, n = blockDim.x;
  s[t] = static_cast<float>(t);
  __syncthreads();
  out[blockIdx.x * n + t] = s[(t + 1) % n];
}

// A barrier only some threads reach: the others return.
extern "C" __global__ void emu_divergent_exit(float* __restrict__ out) {  // [blockDim.x]
  if (threadIdx.x < 64) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  }
}

// Every thread reaches a barrier, but two different ones.
extern "C" __global__ void emu_divergent_sites(float* __restrict__ out) {  // [blockDim.x]
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// Half of warp 0 waits in a full-warp shuffle while the other half waits at __syncthreads.
extern "C" __global__ void emu_deadlock(float* __restrict__ out) {  // [blockDim.x]
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Lane 31 leaves before a full-mask shuffle.
extern "C" __global__ void emu_missing_lane(float* __restrict__ out) {  // [blockDim.x]
  if (threadIdx.x % 32 == 31) return;
  out[threadIdx.x] = __shfl_xor_sync(0xFFFFFFFFu, static_cast<float>(threadIdx.x), 1);
}

// cp.async without the wait: the copy has not landed when the data is read (NaN), unless
// `wait` is set.
extern "C" __global__ void emu_cp_async_no_wait(const float* __restrict__ in,  // [4 * blockDim.x]
                                                float* __restrict__ out,  // [4 * blockDim.x]
                                                int wait) {
  __shared__ __align__(16) float s[4 * 256];
  const unsigned int t = threadIdx.x;
  cp_async_16(&s[4 * t], &in[4 * t]);
  cp_async_commit();
  if (wait) cp_async_wait_all();
  for (int k = 0; k < 4; ++k) out[4 * t + k] = s[4 * t + k];
}

// Thread 0 spins on a flag nobody sets.
extern "C" __global__ void emu_spin(int* __restrict__ flag) {  // [1], zero
  if (threadIdx.x == 0)
    while (atomicAdd(flag, 0) == 0) {
    }
}

// __trap() in one thread.
extern "C" __global__ void emu_trap(int* __restrict__ out, int bad) {  // [blockDim.x]
  out[threadIdx.x] = 1;
  if (static_cast<int>(threadIdx.x) == bad) __trap();
}

// Many barriers and shuffles, for measuring the emulator's speed: `iters` rounds of a
// __syncthreads and a 5-step warp reduction. out[block * blockDim.x + t] = iters * 31 * ... .
extern "C" __global__ void emu_switch_bench(float* __restrict__ out, int iters) {
  float acc = 0.0f;
  for (int i = 0; i < iters; ++i) {
    float v = static_cast<float>(threadIdx.x % 32);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
    acc += v;
    __syncthreads();
  }
  out[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// Reads s[idx] of a 64-element shared array and writes out[widx]: in bounds for idx < 64 and
// widx < the buffer's length; beyond them only AddressSanitizer (DORAFUSE_EMU_ASAN=1) sees it.
extern "C" __global__ void emu_oob(float* __restrict__ out,  // [n]
                                   int idx, int widx) {
  __shared__ float s[64];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[widx] = s[idx];
}

// ldmatrix on a row address in global memory: the .shared state space needs a shared address
// (on a GPU this reads the wrong bytes or faults), so the emulator fails the launch.
extern "C" __global__ void emu_ldmatrix_global(const unsigned short* __restrict__ m,  // [8, 8]
                                               unsigned int* __restrict__ out) {      // [32]
  uint32_t r[1];
  ldmatrix_x1(r, &m[8 * (threadIdx.x % 8)]);
  out[threadIdx.x] = r[0];
}
