// Conversions for tests/emu_convert.rs: f32 -> f16/bf16 (RNE) and back.
#include "prelude.cuh"

// h[i] = bits of __float2half_rn(x[i]), bf[i] = bits of __float2bfloat16_rn(x[i]);
// back[2i] = __half2float(h), back[2i+1] = __bfloat162float(bf); pair[i] = bits of
// __floats2bfloat162_rn(x[i], -x[i]) as uint32 (low = first).
extern "C" __global__ void emu_convert(const float* __restrict__ x,        // [n]
                                       unsigned short* __restrict__ h,     // [n]
                                       unsigned short* __restrict__ bf,    // [n]
                                       float* __restrict__ back,           // [2n]
                                       unsigned int* __restrict__ pair,    // [n]
                                       int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  const __half hv = __float2half_rn(x[i]);
  const __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
  h[i] = __half_as_ushort(hv);
  bf[i] = __bfloat16_as_ushort(bv);
  back[2 * i] = __half2float(hv);
  back[2 * i + 1] = __bfloat162float(bv);
  const __nv_bfloat162 p = __floats2bfloat162_rn(x[i], -x[i]);
  unsigned int u;
  memcpy(&u, &p, 4);
  pair[i] = u;
}
