// Conversions for tests/emu/convert.rs: f32 -> f16/bf16 (RNE) and back.
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

// 16-bit arithmetic, one rounding per operation: for i < n, with a, b, c given as f32 values
// exactly representable in both 16-bit types, out16[k * n + i] holds the bits of
// k = 0 __hadd, 1 __hsub, 2 __hmul, 3 __hdiv, 4 __hfma, 5 __hadd2 (x half), 6 operator*
// for __half, and k = 7..13 the same for __nv_bfloat16.
extern "C" __global__ void emu_half_arith(const float* __restrict__ a,  // [n]
                                          const float* __restrict__ b,  // [n]
                                          const float* __restrict__ c,  // [n]
                                          unsigned short* __restrict__ out16,  // [14 * n]
                                          int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  {
    const __half x = __float2half(a[i]), y = __float2half(b[i]), z = __float2half(c[i]);
    out16[0 * n + i] = __half_as_ushort(__hadd(x, y));
    out16[1 * n + i] = __half_as_ushort(__hsub(x, y));
    out16[2 * n + i] = __half_as_ushort(__hmul(x, y));
    out16[3 * n + i] = __half_as_ushort(__hdiv(x, y));
    out16[4 * n + i] = __half_as_ushort(__hfma(x, y, z));
    out16[5 * n + i] = __half_as_ushort(__low2half(__hadd2(__halves2half2(x, z), __halves2half2(y, z))));
    out16[6 * n + i] = __half_as_ushort(x * y);
  }
  {
    const __nv_bfloat16 x = __float2bfloat16(a[i]), y = __float2bfloat16(b[i]),
                        z = __float2bfloat16(c[i]);
    out16[7 * n + i] = __bfloat16_as_ushort(__hadd(x, y));
    out16[8 * n + i] = __bfloat16_as_ushort(__hsub(x, y));
    out16[9 * n + i] = __bfloat16_as_ushort(__hmul(x, y));
    out16[10 * n + i] = __bfloat16_as_ushort(__hdiv(x, y));
    out16[11 * n + i] = __bfloat16_as_ushort(__hfma(x, y, z));
    out16[12 * n + i] = __bfloat16_as_ushort(
        __low2bfloat16(__hadd2(__halves2bfloat162(x, z), __halves2bfloat162(y, z))));
    out16[13 * n + i] = __bfloat16_as_ushort(x * y);
  }
}
