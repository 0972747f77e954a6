// tensor_core.cuh: warp-level tensor-core and async-copy wrappers, one body per target.
//
// On the device each wrapper is one inline-PTX instruction (sm_80+). On the host (the CPU
// emulator, kernels/emu/) each is a warp rendezvous that follows the PTX ISA fragment layouts
// exactly, so a fragment-indexing mistake in a kernel shows up in `cargo test`.
//
// Provided (all `__device__ __forceinline__`, all lanes of the warp must call them together):
//
//   mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
//                     const float (&c)[4])
//   mma_m16n8k16_f16 (same signature)
//       D[16x8] = A[16x16] * B[16x8] + C, `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}
//       .{bf16,f16}.f32`. With g = lane >> 2, t = lane % 4, and each uint32_t holding two
//       16-bit values, low half = lower column/row index:
//         a[0] = A[g][2t..2t+1]     a[1] = A[g+8][2t..2t+1]
//         a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//         b[0] = B[2t..2t+1][g]     b[1] = B[2t+8..2t+9][g]
//         c[0],c[1] = C[g][2t], C[g][2t+1]        c[2],c[3] = C[g+8][2t], C[g+8][2t+1]
//       (d may alias c.) Host: products of the 16-bit inputs are exact in f32; the 16 products
//       and c are summed in f32 in k order (the hardware's internal order is unspecified).
//
//   ldmatrix_x1(uint32_t (&r)[1], const void* smem_row_ptr)
//   ldmatrix_x2(uint32_t (&r)[2], const void* smem_row_ptr)
//   ldmatrix_x4(uint32_t (&r)[4], const void* smem_row_ptr)
//   ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row_ptr)
//   ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row_ptr)
//       `ldmatrix.sync.aligned.m8n8.x{1,2,4}{.trans}.shared.b16`: lanes 8i..8i+7 pass the
//       addresses of rows 0..7 of matrix i (16 bytes each, 16-byte aligned, in shared memory);
//       r[i] of lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of matrix i (low half =
//       lower column); with .trans it receives rows 2(l%4), 2(l%4)+1 of column l/4 instead.
//       Lanes beyond those the shape reads pass any pointer (it is not read).
//
//   cp_async_16(void* smem, const void* gmem)              16 bytes, cp.async.cg (L2 only)
//   cp_async_16_zfill(void* smem, const void* gmem, bool valid)
//       copies 16 bytes if `valid`, else writes 16 zero bytes (reads nothing from gmem)
//   cp_async_8(void* smem, const void* gmem), cp_async_4(...) cp.async.ca
//   cp_async_commit()            closes the current group of copies
//   cp_async_wait_all()          waits for every group
//   cp_async_wait_group<N>()     waits until at most N most recent groups are pending
//       Host: copies are queued and performed at the wait that covers them, so reading the
//       destination before the wait (or without the __syncthreads after it, for data copied by
//       other threads) reads the NaN fill of shared memory.
//
//   pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) / pack_f16x2(__half lo, __half hi) ->
//   uint32_t, and unpack_bf16x2 / unpack_f16x2 (uint32_t -> float2): fragment helpers.
#pragma once

#include "prelude.cuh"

__device__ __forceinline__ uint32_t pack_bf16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  uint32_t r;
  __nv_bfloat162 v = __halves2bfloat162(lo, hi);
  memcpy(&r, &v, 4);
  return r;
}
__device__ __forceinline__ uint32_t pack_f16x2(__half lo, __half hi) {
  uint32_t r;
  __half2 v = __halves2half2(lo, hi);
  memcpy(&r, &v, 4);
  return r;
}
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t r) {
  __nv_bfloat162 v;
  memcpy(&v, &r, 4);
  return __bfloat1622float2(v);
}
__device__ __forceinline__ float2 unpack_f16x2(uint32_t r) {
  __half2 v;
  memcpy(&v, &r, 4);
  return __half22float2(v);
}

#if defined(__CUDACC__)

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
        "f"(c[2]), "f"(c[3]));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else  // host emulation

namespace dfemu {
namespace tc {

struct MmaIn {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

template <bool Bf16>
inline float lo16(uint32_t r) {
  return Bf16 ? bf16_to_f32(static_cast<uint16_t>(r & 0xFFFFu))
              : f16_to_f32(static_cast<uint16_t>(r & 0xFFFFu));
}
template <bool Bf16>
inline float hi16(uint32_t r) {
  return Bf16 ? bf16_to_f32(static_cast<uint16_t>(r >> 16))
              : f16_to_f32(static_cast<uint16_t>(r >> 16));
}

template <bool Bf16>
inline void mma_fn(unsigned int mask, const LaneIO* lanes) {
  if (mask != 0xFFFFFFFFu) fault("mma.sync needs all 32 lanes; mask is 0x%08x", mask);
  float A[16][16], B[16][8], C[16][8];
  for (unsigned int l = 0; l < 32; ++l) {
    const MmaIn* in = static_cast<const MmaIn*>(lanes[l].in);
    const unsigned int g = l >> 2, t = l & 3u;
    A[g][2 * t] = lo16<Bf16>(in->a[0]);
    A[g][2 * t + 1] = hi16<Bf16>(in->a[0]);
    A[g + 8][2 * t] = lo16<Bf16>(in->a[1]);
    A[g + 8][2 * t + 1] = hi16<Bf16>(in->a[1]);
    A[g][2 * t + 8] = lo16<Bf16>(in->a[2]);
    A[g][2 * t + 9] = hi16<Bf16>(in->a[2]);
    A[g + 8][2 * t + 8] = lo16<Bf16>(in->a[3]);
    A[g + 8][2 * t + 9] = hi16<Bf16>(in->a[3]);
    B[2 * t][g] = lo16<Bf16>(in->b[0]);
    B[2 * t + 1][g] = hi16<Bf16>(in->b[0]);
    B[2 * t + 8][g] = lo16<Bf16>(in->b[1]);
    B[2 * t + 9][g] = hi16<Bf16>(in->b[1]);
    C[g][2 * t] = in->c[0];
    C[g][2 * t + 1] = in->c[1];
    C[g + 8][2 * t] = in->c[2];
    C[g + 8][2 * t + 1] = in->c[3];
  }
  float D[16][8];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
      D[i][j] = acc;
    }
  for (unsigned int l = 0; l < 32; ++l) {
    float* d = static_cast<float*>(lanes[l].out);
    const unsigned int g = l >> 2, t = l & 3u;
    d[0] = D[g][2 * t];
    d[1] = D[g][2 * t + 1];
    d[2] = D[g + 8][2 * t];
    d[3] = D[g + 8][2 * t + 1];
  }
}

template <bool Bf16>
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                const float (&c)[4]) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  float out[4];
  warp_collective(0xFFFFFFFFu, &mma_fn<Bf16>,
                  Bf16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", &in, out);
  std::memcpy(d, out, sizeof out);
}

template <int Num, bool Trans>
inline void ldmatrix_fn(unsigned int mask, const LaneIO* lanes) {
  if (mask != 0xFFFFFFFFu) fault("ldmatrix needs all 32 lanes; mask is 0x%08x", mask);
  uint16_t M[4][8][8];
  for (int m = 0; m < Num; ++m)
    for (int row = 0; row < 8; ++row) {
      const unsigned int src_lane = static_cast<unsigned int>(m * 8 + row);
      const void* p = *static_cast<const void* const*>(lanes[src_lane].in);
      if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0)
        fault_lane(src_lane, "ldmatrix: lane %u passes row address %p, not 16-byte aligned",
                   src_lane, p);
      if (!in_shared(p, 16))
        fault_lane(src_lane,
                   "ldmatrix: lane %u passes row address %p, which is not in this block's shared "
                   "memory",
                   src_lane, p);
      std::memcpy(M[m][row], p, 16);
    }
  for (unsigned int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(lanes[l].out);
    const unsigned int q = l >> 2, t = l & 3u;
    for (int m = 0; m < Num; ++m) {
      uint16_t lo, hi;
      if (Trans) {
        lo = M[m][2 * t][q];
        hi = M[m][2 * t + 1][q];
      } else {
        lo = M[m][q][2 * t];
        hi = M[m][q][2 * t + 1];
      }
      r[m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

template <int Num, bool Trans>
inline void ldmatrix(uint32_t* r, const void* p) {
  static const char* const names[2][3] = {
      {"ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4"},
      {"ldmatrix.x1.trans", "ldmatrix.x2.trans", "ldmatrix.x4.trans"}};
  uint32_t out[4];
  warp_collective(0xFFFFFFFFu, &ldmatrix_fn<Num, Trans>,
                  names[Trans ? 1 : 0][Num == 1 ? 0 : (Num == 2 ? 1 : 2)], &p, out);
  std::memcpy(r, out, sizeof(uint32_t) * Num);
}

}  // namespace tc
}  // namespace dfemu

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4],
                                                  const uint32_t (&b)[2], const float (&c)[4]) {
  dfemu::tc::mma<true>(d, a, b, c);
}
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2], const float (&c)[4]) {
  dfemu::tc::mma<false>(d, a, b, c);
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* p) {
  dfemu::tc::ldmatrix<1, false>(r, p);
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* p) {
  dfemu::tc::ldmatrix<2, false>(r, p);
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  dfemu::tc::ldmatrix<4, false>(r, p);
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* p) {
  dfemu::tc::ldmatrix<2, true>(r, p);
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  dfemu::tc::ldmatrix<4, true>(r, p);
}
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  dfemu::cp_async(smem, gmem, 16, 16);
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool valid) {
  dfemu::cp_async(smem, gmem, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_8(void* smem, const void* gmem) {
  dfemu::cp_async(smem, gmem, 8, 8);
}
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  dfemu::cp_async(smem, gmem, 4, 4);
}
__device__ __forceinline__ void cp_async_commit() { dfemu::cp_async_commit(); }
__device__ __forceinline__ void cp_async_wait_all() { dfemu::cp_async_wait(-1); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  static_assert(N >= 0, "cp.async.wait_group takes a non-negative count");
  dfemu::cp_async_wait(N);
}

#endif
