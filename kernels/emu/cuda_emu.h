// cuda_emu.h: the CUDA C++ subset that dorafuse kernels may use, for host C++17 compilers.
//
// Included by kernels/prelude.cuh when __CUDACC__ is not defined. The runtime behind it
// (kernels/emu/runtime.cpp) runs each block's threads as cooperatively scheduled fibers; see
// kernels/emu/README.md for what is modelled and what is not. `DORAFUSE_EMU` is defined to 1.
//
// Provided names (everything else is a compile error, on purpose):
//   qualifiers  __global__ __device__ __host__ __forceinline__ __noinline__ __restrict__
//               __launch_bounds__(...) __align__(n) __constant__ (a plain global) __shared__
//               (static, per block) and `extern __shared__ T name[];` (dynamic, per block)
//   indices     threadIdx blockIdx (uint3) blockDim gridDim (dim3) warpSize (32)
//   vectors     dim3 uint3 int2 int3 int4 uint2 uint4 float2 float3 float4 double2
//               short2 ushort2 ushort4 char4 uchar4 longlong2 ulonglong2, with make_<type>(...)
//   half/bf16   __half __half2 __half_raw half half2, __nv_bfloat16 __nv_bfloat162
//               __nv_bfloat16_raw nv_bfloat16 nv_bfloat162: RNE conversions from float/double,
//               implicit conversion to float, + - * / (result rounded once), comparisons;
//               __float2half __float2half_rn __float2half_rz __double2half __half2float
//               __float2half2_rn __floats2half2_rn __half22float2 __halves2half2
//               __half2half2 __low2half __high2half __low2float __high2float make_half2
//               __int2half_rn __half2int_rn __half_as_ushort __ushort_as_half
//               __float2bfloat16 __float2bfloat16_rn __float2bfloat16_rz __double2bfloat16
//               __bfloat162float __float2bfloat162_rn __floats2bfloat162_rn
//               __bfloat1622float2 __halves2bfloat162 __bfloat162bfloat162 __low2bfloat16
//               __high2bfloat16 make_bfloat162 __int2bfloat16_rn __bfloat16_as_ushort
//               __ushort_as_bfloat16; overloaded for both types: __hadd __hsub __hmul __hdiv
//               __hfma __hneg __habs __hmax __hmin __hisnan __hisinf __hadd2 __hsub2
//               __hmul2 __hfma2 __hneg2 __hmax2 __hmin2. NaN stays NaN (quiet).
//   math        <cmath> (sqrtf expf logf fabsf fmaxf fminf fmaf tanhf erff exp2f ...),
//               rsqrtf rsqrt __fdividef __frcp_rn __fsqrt_rn __expf __logf __exp10f __powf
//               __sinf __cosf __tanhf __fmaf_rn __fmul_rn __fadd_rn __fsub_rn __fdiv_rn
//               __saturatef isfinite isnan isinf signbit, max/min for int, unsigned, long,
//               long long (both signs), float, double; __float2int_rn __float2int_rz
//               __float2uint_rn __int2float_rn __uint2float_rn __float_as_int __int_as_float
//               __float_as_uint __uint_as_float __double_as_longlong __longlong_as_double
//               __popc __popcll __clz __clzll __ffs __ffsll __brev __umulhi
//   sync        __syncthreads __syncthreads_count __syncthreads_and __syncthreads_or
//               __syncwarp(mask) __threadfence __threadfence_block __nanosleep
//   warp        __shfl_sync __shfl_up_sync __shfl_down_sync __shfl_xor_sync (any trivially
//               copyable type of at most 8 bytes: int unsigned float double long long
//               __half2 __nv_bfloat162 ..., optional width), __ballot_sync __any_sync
//               __all_sync __activemask __reduce_add_sync __reduce_min_sync
//               __reduce_max_sync (int, unsigned); `::dfemu::laneid()` for the lane.
//   atomics     atomicAdd (int unsigned unsigned-long-long float double __half
//               __nv_bfloat16 __half2 __nv_bfloat162), atomicSub (int unsigned),
//               atomicMax atomicMin (int unsigned long long unsigned-long-long),
//               atomicExch (int unsigned unsigned-long-long float), atomicCAS (int unsigned
//               unsigned-long-long unsigned short), atomicAnd atomicOr atomicXor (int unsigned)
//   memory      __ldg __ldcg __ldca __ldcs __ldlu __ldcv __stcg __stcs __stwb __stwt (plain
//               loads/stores), __cvta_generic_to_shared (the address itself), memcpy, printf
//   misc        __trap() (fails the launch), clock64() (a per-launch counter; clock() is
//               the C library's),
//               assert (aborts the process: prefer __trap for expected failures)
// Tensor-core and cp.async wrappers are in kernels/tensor_core.cuh.
//
// How `__shared__` works here: build.rs (build/shared_rewrite.rs) rewrites every `__shared__`
// declaration of the kernel sources before compiling them for the host, into a reference to
// per-block storage (allocated on first use in the block, NaN-filled at block start), e.g.
//   __shared__ __align__(16) float tile[2][64];
//     -> float (&tile)[2][64] = *::dfemu::shared_static<float[2][64], 16>([] {}, "tile");
//   extern __shared__ __align__(16) unsigned char smem[];
//     -> unsigned char* const smem = ::dfemu::shared_dynamic<unsigned char>("smem");
// So write plain CUDA, one declarator per `__shared__` declaration, inside functions. A
// `__shared__` that was not rewritten (e.g. this header compiled by hand) fails to compile.
#pragma once

#include <algorithm>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>

#define DORAFUSE_EMU 1

// ---------------------------------------------------------------------------------------------
// Qualifiers
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__
#define __shared__ __dfemu_shared_declaration_not_rewritten_by_build_emu_rs__

// ---------------------------------------------------------------------------------------------
// Vector types
// ---------------------------------------------------------------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

#define DFEMU_VEC2(T, N, A)                                                                   \
  struct alignas(A) N {                                                                       \
    T x, y;                                                                                   \
  };                                                                                          \
  inline N make_##N(T x, T y) { return N{x, y}; }
#define DFEMU_VEC3(T, N)                                                                      \
  struct N {                                                                                  \
    T x, y, z;                                                                                \
  };                                                                                          \
  inline N make_##N(T x, T y, T z) { return N{x, y, z}; }
#define DFEMU_VEC4(T, N, A)                                                                   \
  struct alignas(A) N {                                                                       \
    T x, y, z, w;                                                                             \
  };                                                                                          \
  inline N make_##N(T x, T y, T z, T w) { return N{x, y, z, w}; }

DFEMU_VEC2(float, float2, 8)
DFEMU_VEC3(float, float3)
DFEMU_VEC4(float, float4, 16)
DFEMU_VEC2(int, int2, 8)
DFEMU_VEC3(int, int3)
DFEMU_VEC4(int, int4, 16)
DFEMU_VEC2(unsigned int, uint2, 8)
DFEMU_VEC4(unsigned int, uint4, 16)
DFEMU_VEC2(double, double2, 16)
DFEMU_VEC2(short, short2, 4)
DFEMU_VEC2(unsigned short, ushort2, 4)
DFEMU_VEC4(unsigned short, ushort4, 8)
DFEMU_VEC4(signed char, char4, 4)
DFEMU_VEC4(unsigned char, uchar4, 4)
DFEMU_VEC2(long long, longlong2, 16)
DFEMU_VEC2(unsigned long long, ulonglong2, 16)
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return uint3{x, y, z}; }
#undef DFEMU_VEC2
#undef DFEMU_VEC3
#undef DFEMU_VEC4

// ---------------------------------------------------------------------------------------------
// The runtime interface (kernels/emu/runtime.cpp). Kernels do not call these directly.
// ---------------------------------------------------------------------------------------------
namespace dfemu {

/// What a running fiber exposes to kernel code; owned by the runtime.
struct ThreadInfo {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned int linear;  // x + y*bx + z*bx*by
  unsigned int lane;    // linear % 32
  unsigned int warp;    // linear / 32
};

/// One lane's operands of a warp collective: `in` is read, `out` is written, by the lane that
/// completes the rendezvous (both point into the owning fiber's stack, which is alive while
/// the fiber waits).
struct LaneIO {
  const void* in;
  void* out;
};

/// Computes every participating lane's `out` from all lanes' `in`; `lanes` is indexed by lane
/// id (entries of lanes outside `mask` are null).
using CollectiveFn = void (*)(unsigned int mask, const LaneIO* lanes);

/// Waits until every lane in `mask` has called `warp_collective` with the same `fn` and mask,
/// then runs `fn` once for all of them. Faults (failing the launch) if the calling lane is
/// not in `mask`, if a lane in `mask` has exited or does not exist, or on a deadlock.
void warp_collective(unsigned int mask, CollectiveFn fn, const char* name, const void* in,
                     void* out);

/// `__syncthreads` and its reductions: kind 0 plain, 1 count, 2 and, 3 or. `file`/`line` name
/// the call site: all threads of a block must wait at the same one.
int block_barrier(int kind, int pred, const char* file, int line);

/// A scheduling point (atomics, __nanosleep): may switch to another thread of the block.
void yield_point();

/// Fails the launch with a message naming the kernel, block and the calling thread.
[[noreturn]] void fault(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

/// Fails the launch naming lane `lane` of the calling thread's warp as the culprit.
[[noreturn]] void fault_lane(unsigned int lane, const char* fmt, ...)
    __attribute__((format(printf, 2, 3)));

/// True when `[p, p + bytes)` lies inside one of the calling block's shared-memory
/// allocations (the dynamic area or a static `__shared__` variable).
bool in_shared(const void* p, std::size_t bytes);

/// Mask of the lanes of the calling thread's warp that exist and have not exited.
unsigned int active_mask();

/// Per-block storage of one `__shared__` declaration (see the header comment).
void* shared_static_alloc(const void* key, std::size_t bytes, std::size_t align,
                          const char* name);
/// The launch's dynamic shared memory of the current block.
void* shared_dynamic_base(const char* name);

/// cp.async model: copies are queued per thread and performed at the wait that covers them.
/// `cp_async_wait(n)` completes every committed group but the `n` most recent; `n < 0`
/// completes everything, committed or not (cp.async.wait_all).
void cp_async(void* dst, const void* src, unsigned int bytes, unsigned int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups_allowed);

/// A counter for clock()/clock64().
long long clock_tick();

}  // namespace dfemu

// The current fiber's indices. Initial-exec TLS: the emulator is linked statically into the
// executable, so every access is one fs-relative load.
extern __thread const dfemu::ThreadInfo* dfemu_current __attribute__((tls_model("initial-exec")));

namespace dfemu {
inline const ThreadInfo& cur() { return *dfemu_current; }
inline unsigned int laneid() { return dfemu_current->lane; }
inline unsigned int warpid() { return dfemu_current->warp; }

template <class T, std::size_t Align, class Tag>
inline T* shared_static(Tag, const char* name) {
  // One key per (declaration, template instantiation): the lambda type `Tag` differs for each.
  static const char key = 0;
  return static_cast<T*>(
      shared_static_alloc(&key, sizeof(T), Align > alignof(T) ? Align : alignof(T), name));
}
template <class T>
inline T* shared_dynamic(const char* name) {
  return static_cast<T*>(shared_dynamic_base(name));
}
}  // namespace dfemu

#define threadIdx (::dfemu::cur().thread_idx)
#define blockIdx (::dfemu::cur().block_idx)
#define blockDim (::dfemu::cur().block_dim)
#define gridDim (::dfemu::cur().grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Bit casts and integer intrinsics
// ---------------------------------------------------------------------------------------------
namespace dfemu {
template <class To, class From>
inline To bits(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between different sizes");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}
}  // namespace dfemu

inline int __float_as_int(float f) { return dfemu::bits<int>(f); }
inline float __int_as_float(int i) { return dfemu::bits<float>(i); }
inline unsigned int __float_as_uint(float f) { return dfemu::bits<unsigned int>(f); }
inline float __uint_as_float(unsigned int i) { return dfemu::bits<float>(i); }
inline long long __double_as_longlong(double d) { return dfemu::bits<long long>(d); }
inline double __longlong_as_double(long long i) { return dfemu::bits<double>(i); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
  return (x >> 16) | (x << 16);
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<unsigned long long>(a) * b) >> 32);
}

// ---------------------------------------------------------------------------------------------
// Math
// ---------------------------------------------------------------------------------------------
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(std::nearbyint(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }

// CUDA's max/min overload set (device functions in the global namespace).
#define DFEMU_MINMAX(T)                                                                       \
  inline T max(T a, T b) { return a > b ? a : b; }                                            \
  inline T min(T a, T b) { return a < b ? a : b; }
DFEMU_MINMAX(int)
DFEMU_MINMAX(unsigned int)
DFEMU_MINMAX(long)
DFEMU_MINMAX(unsigned long)
DFEMU_MINMAX(long long)
DFEMU_MINMAX(unsigned long long)
#undef DFEMU_MINMAX
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline unsigned int max(int a, unsigned int b) { return max(static_cast<unsigned int>(a), b); }
inline unsigned int max(unsigned int a, int b) { return max(a, static_cast<unsigned int>(b)); }
inline unsigned int min(int a, unsigned int b) { return min(static_cast<unsigned int>(a), b); }
inline unsigned int min(unsigned int a, int b) { return min(a, static_cast<unsigned int>(b)); }

// ---------------------------------------------------------------------------------------------
// __half and __nv_bfloat16: storage types with the hardware's round-to-nearest-even
// conversions. Arithmetic is done in double and rounded once to the 16-bit type (exact for
// + - * of two 16-bit values, which is what the hardware's correctly rounded ops give).
// ---------------------------------------------------------------------------------------------
namespace dfemu {
inline std::uint16_t f32_to_f16(float f) {
  const std::uint32_t x = bits<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<std::uint16_t>(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
  if (ax >= 0x477FF000u) return static_cast<std::uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal half (or zero)
    if (ax <= 0x33000000u) return static_cast<std::uint16_t>(sign);  // <= 2^-25 ties to 0
    const std::uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    const int s = 126 - static_cast<int>(ax >> 23);  // 14..24
    std::uint32_t r = m >> s;
    const std::uint32_t rem = m & ((1u << s) - 1u), halfway = 1u << (s - 1);
    if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
    return static_cast<std::uint16_t>(sign | r);
  }
  std::uint32_t r = (ax >> 13) - (112u << 10);
  const std::uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;
  return static_cast<std::uint16_t>(sign | r);
}
inline float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {
    const float v = static_cast<float>(m) * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits<float>(sign | 0x7F800000u | (m << 13));
  return bits<float>(sign | ((e + 112u) << 23) | (m << 13));
}
inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t x = bits<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  x += 0x7FFFu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>(x >> 16);
}
inline float bf16_to_f32(std::uint16_t b) {
  return bits<float>(static_cast<std::uint32_t>(b) << 16);
}
inline std::uint16_t f32_to_bf16_rz(float f) {
  const std::uint32_t x = bits<std::uint32_t>(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  return static_cast<std::uint16_t>(x >> 16);
}
/// double -> float rounded to odd: a later RNE rounding to 16 bits then equals a direct RNE
/// rounding of the double (the float keeps more than two extra bits).
inline float f64_to_f32_odd(double d) {
  float f = static_cast<float>(d);
  if (std::isnan(d) || std::isinf(f) || static_cast<double>(f) == d) return f;
  std::uint32_t b = bits<std::uint32_t>(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) --b;  // truncate toward zero
  return bits<float>(b | 1u);
}
inline std::uint16_t f64_to_f16(double d) { return f32_to_f16(f64_to_f32_odd(d)); }
inline std::uint16_t f64_to_bf16(double d) { return f32_to_bf16(f64_to_f32_odd(d)); }
}  // namespace dfemu

struct __half_raw {
  unsigned short x;
};
struct __nv_bfloat16_raw {
  unsigned short x;
};

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  constexpr __half(const __half_raw& r) : __x(r.x) {}
  __half(float f) : __x(dfemu::f32_to_f16(f)) {}
  __half(double d) : __x(dfemu::f64_to_f16(d)) {}
  __half(int i) : __x(dfemu::f64_to_f16(static_cast<double>(i))) {}
  __half(unsigned int i) : __x(dfemu::f64_to_f16(static_cast<double>(i))) {}
  __half(long long i) : __x(dfemu::f64_to_f16(static_cast<double>(i))) {}
  __half(unsigned long long i) : __x(dfemu::f64_to_f16(static_cast<double>(i))) {}
  operator float() const { return dfemu::f16_to_f32(__x); }
  operator __half_raw() const { return __half_raw{__x}; }
};

struct alignas(2) __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  constexpr __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(dfemu::f32_to_bf16(f)) {}
  __nv_bfloat16(double d) : __x(dfemu::f64_to_bf16(d)) {}
  __nv_bfloat16(int i) : __x(dfemu::f64_to_bf16(static_cast<double>(i))) {}
  __nv_bfloat16(unsigned int i) : __x(dfemu::f64_to_bf16(static_cast<double>(i))) {}
  __nv_bfloat16(long long i) : __x(dfemu::f64_to_bf16(static_cast<double>(i))) {}
  __nv_bfloat16(unsigned long long i) : __x(dfemu::f64_to_bf16(static_cast<double>(i))) {}
  operator float() const { return dfemu::bf16_to_f32(__x); }
  operator __nv_bfloat16_raw() const { return __nv_bfloat16_raw{__x}; }
};

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  constexpr __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
  __nv_bfloat162() = default;
  constexpr __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};

typedef __half half;
typedef __half2 half2;
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit storage");
static_assert(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "32-bit pairs");
static_assert(std::is_trivially_copyable<__half>::value &&
                  std::is_trivially_default_constructible<__nv_bfloat16>::value,
              "16-bit types must behave as raw storage");

// Conversions: __half.
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __float2half_rz(float f) {
  // Truncate: round the magnitude down to the next representable half.
  __half r(f);
  if (std::isnan(f) || std::isinf(f)) return r;
  if (std::fabs(static_cast<float>(r)) > std::fabs(f)) r.__x = static_cast<unsigned short>(r.__x - 1);
  return r;
}
inline __half __double2half(double d) { return __half(d); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __int2half_rn(int i) { return __half(i); }
inline int __half2int_rn(__half h) { return static_cast<int>(std::nearbyint(static_cast<float>(h))); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short x) { return __half(__half_raw{x}); }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __short_as_half(short x) { return __half(__half_raw{static_cast<unsigned short>(x)}); }
inline __half2 __float2half2_rn(float f) { return __half2(__half(f), __half(f)); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half2 make_half2(__half a, __half b) { return __half2(a, b); }
inline float2 __half22float2(__half2 h) { return make_float2(float(h.x), float(h.y)); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }

// Conversions: __nv_bfloat16.
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) {
  return __nv_bfloat16(__nv_bfloat16_raw{dfemu::f32_to_bf16_rz(f)});
}
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short x) {
  return __nv_bfloat16(__nv_bfloat16_raw{x});
}
inline short __bfloat16_as_short(__nv_bfloat16 b) { return static_cast<short>(b.__x); }
inline __nv_bfloat162 __float2bfloat162_rn(float f) {
  return __nv_bfloat162(__nv_bfloat16(f), __nv_bfloat16(f));
}
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat162(a, b);
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat162(a, b);
}
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(float(h.x), float(h.y)); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }
inline __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162(a.x, b.x);
}
inline __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) {
  return __nv_bfloat162(a.y, b.y);
}

// Arithmetic, comparisons and the __h* intrinsics for both 16-bit types and their pairs.
#define DFEMU_HALF_OPS(H, H2)                                                        \
  inline H __hadd(H a, H b) { return H(double(float(a)) + double(float(b))); }    \
  inline H __hsub(H a, H b) { return H(double(float(a)) - double(float(b))); }    \
  inline H __hmul(H a, H b) { return H(double(float(a)) * double(float(b))); }    \
  inline H __hdiv(H a, H b) { return H(double(float(a)) / double(float(b))); }    \
  inline H __hfma(H a, H b, H c) {                                                           \
    return H(std::fma(double(float(a)), double(float(b)), double(float(c))));      \
  }                                                                                          \
  inline H __hneg(H a) {                                                                     \
    a.__x ^= 0x8000u;                                                                        \
    return a;                                                                                \
  }                                                                                          \
  inline H __habs(H a) {                                                                     \
    a.__x &= 0x7FFFu;                                                                        \
    return a;                                                                                \
  }                                                                                          \
  inline bool __hisnan(H a) { return std::isnan(float(a)); }                                 \
  inline int __hisinf(H a) { return std::isinf(float(a)) ? (float(a) < 0 ? -1 : 1) : 0; }   \
  inline H __hmax(H a, H b) { return H(std::fmax(float(a), float(b))); }                     \
  inline H __hmin(H a, H b) { return H(std::fmin(float(a), float(b))); }                     \
  inline H operator+(H a, H b) { return __hadd(a, b); }                                      \
  inline H operator-(H a, H b) { return __hsub(a, b); }                                      \
  inline H operator*(H a, H b) { return __hmul(a, b); }                                      \
  inline H operator/(H a, H b) { return __hdiv(a, b); }                                      \
  inline H operator-(H a) { return __hneg(a); }                                              \
  inline H operator+(H a) { return a; }                                                      \
  inline H& operator+=(H& a, H b) { return a = __hadd(a, b); }                               \
  inline H& operator-=(H& a, H b) { return a = __hsub(a, b); }                               \
  inline H& operator*=(H& a, H b) { return a = __hmul(a, b); }                               \
  inline H& operator/=(H& a, H b) { return a = __hdiv(a, b); }                               \
  inline bool operator==(H a, H b) { return float(a) == float(b); }                          \
  inline bool operator!=(H a, H b) { return float(a) != float(b); }                          \
  inline bool operator<(H a, H b) { return float(a) < float(b); }                            \
  inline bool operator<=(H a, H b) { return float(a) <= float(b); }                          \
  inline bool operator>(H a, H b) { return float(a) > float(b); }                            \
  inline bool operator>=(H a, H b) { return float(a) >= float(b); }                          \
  inline H2 __hadd2(H2 a, H2 b) { return H2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }           \
  inline H2 __hsub2(H2 a, H2 b) { return H2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }           \
  inline H2 __hmul2(H2 a, H2 b) { return H2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }           \
  inline H2 __h2div(H2 a, H2 b) { return H2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }           \
  inline H2 __hfma2(H2 a, H2 b, H2 c) {                                                      \
    return H2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));                                 \
  }                                                                                          \
  inline H2 __hneg2(H2 a) { return H2(__hneg(a.x), __hneg(a.y)); }                           \
  inline H2 __habs2(H2 a) { return H2(__habs(a.x), __habs(a.y)); }                           \
  inline H2 __hmax2(H2 a, H2 b) { return H2(__hmax(a.x, b.x), __hmax(a.y, b.y)); }           \
  inline H2 __hmin2(H2 a, H2 b) { return H2(__hmin(a.x, b.x), __hmin(a.y, b.y)); }           \
  inline H2 operator+(H2 a, H2 b) { return __hadd2(a, b); }                                  \
  inline H2 operator-(H2 a, H2 b) { return __hsub2(a, b); }                                  \
  inline H2 operator*(H2 a, H2 b) { return __hmul2(a, b); }                                  \
  inline H2 operator/(H2 a, H2 b) { return __h2div(a, b); }                                  \
  inline H2& operator+=(H2& a, H2 b) { return a = __hadd2(a, b); }                           \
  inline H2& operator*=(H2& a, H2 b) { return a = __hmul2(a, b); }

DFEMU_HALF_OPS(__half, __half2)
DFEMU_HALF_OPS(__nv_bfloat16, __nv_bfloat162)
#undef DFEMU_HALF_OPS

// ---------------------------------------------------------------------------------------------
// Synchronisation
// ---------------------------------------------------------------------------------------------
// Macros, so that each barrier knows its source line: threads waiting at different
// `__syncthreads()` calls (a barrier in divergent code) fail the launch.
#define __syncthreads() (::dfemu::block_barrier(0, 0, __FILE__, __LINE__), (void)0)
#define __syncthreads_count(pred) ::dfemu::block_barrier(1, (pred), __FILE__, __LINE__)
#define __syncthreads_and(pred) ::dfemu::block_barrier(2, (pred), __FILE__, __LINE__)
#define __syncthreads_or(pred) ::dfemu::block_barrier(3, (pred), __FILE__, __LINE__)
// Fibers of one OS thread see each other's writes in program order; a fence orders nothing more.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline void __nanosleep(unsigned int) { dfemu::yield_point(); }
inline long long clock64() { return dfemu::clock_tick(); }
[[noreturn]] inline void __trap() { dfemu::fault("__trap() called"); }

// ---------------------------------------------------------------------------------------------
// Warp operations: each is a rendezvous of the lanes in `mask` (see dfemu::warp_collective).
// ---------------------------------------------------------------------------------------------
namespace dfemu {
struct ShflIn {
  std::uint64_t v;
  unsigned int src;
};
inline void shfl_fn(unsigned int mask, const LaneIO* lanes) {
  for (unsigned int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const ShflIn* in = static_cast<const ShflIn*>(lanes[l].in);
    if (!((mask >> in->src) & 1u))
      fault_lane(l, "__shfl*_sync: lane %u reads lane %u, which is not in mask 0x%08x", l, in->src,
                 mask);
    *static_cast<std::uint64_t*>(lanes[l].out) = static_cast<const ShflIn*>(lanes[in->src].in)->v;
  }
}
template <class T>
inline T shfl_from(unsigned int mask, T var, unsigned int src) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "__shfl_*_sync takes a trivially copyable value of at most 8 bytes");
  ShflIn in{0, src};
  std::memcpy(&in.v, &var, sizeof(T));
  std::uint64_t out = 0;
  warp_collective(mask, &shfl_fn, "__shfl_sync", &in, &out);
  T r;
  std::memcpy(&r, &out, sizeof(T));
  return r;
}
inline unsigned int shfl_width(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fault("__shfl*_sync: width %d is not a power of two in [1, 32]", width);
  return static_cast<unsigned int>(width);
}
struct VoteIn {
  int pred;
};
inline void ballot_fn(unsigned int mask, const LaneIO* lanes) {
  unsigned int b = 0;
  for (unsigned int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && static_cast<const VoteIn*>(lanes[l].in)->pred) b |= 1u << l;
  for (unsigned int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) *static_cast<unsigned int*>(lanes[l].out) = b;
}
inline void syncwarp_fn(unsigned int, const LaneIO*) {}
template <int Op>  // 0 add, 1 min, 2 max; unsigned or signed per `Signed`
inline void reduce_fn_u(unsigned int mask, const LaneIO* lanes) {
  unsigned int acc = Op == 1 ? 0xFFFFFFFFu : 0u;
  for (unsigned int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const unsigned int v = *static_cast<const unsigned int*>(lanes[l].in);
    acc = Op == 0 ? acc + v : (Op == 1 ? (v < acc ? v : acc) : (v > acc ? v : acc));
  }
  for (unsigned int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) *static_cast<unsigned int*>(lanes[l].out) = acc;
}
template <int Op>
inline void reduce_fn_i(unsigned int mask, const LaneIO* lanes) {
  int acc = Op == 1 ? INT_MAX : (Op == 2 ? INT_MIN : 0);
  for (unsigned int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const int v = *static_cast<const int*>(lanes[l].in);
    acc = Op == 0 ? static_cast<int>(static_cast<unsigned int>(acc) + static_cast<unsigned int>(v))
                  : (Op == 1 ? (v < acc ? v : acc) : (v > acc ? v : acc));
  }
  for (unsigned int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) *static_cast<int*>(lanes[l].out) = acc;
}
}  // namespace dfemu

template <class T>
inline T __shfl_sync(unsigned int mask, T var, int srcLane, int width = 32) {
  const unsigned int w = dfemu::shfl_width(width), lane = dfemu::laneid();
  const unsigned int src = (lane & ~(w - 1)) + (static_cast<unsigned int>(srcLane) & (w - 1));
  return dfemu::shfl_from(mask, var, src);
}
template <class T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  const unsigned int w = dfemu::shfl_width(width), lane = dfemu::laneid();
  const unsigned int base = lane & ~(w - 1);
  const unsigned int src = (lane >= base + delta) ? lane - delta : lane;
  return dfemu::shfl_from(mask, var, src);
}
template <class T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = 32) {
  const unsigned int w = dfemu::shfl_width(width), lane = dfemu::laneid();
  const unsigned int base = lane & ~(w - 1);
  const unsigned int src = (lane + delta < base + w) ? lane + delta : lane;
  return dfemu::shfl_from(mask, var, src);
}
template <class T>
inline T __shfl_xor_sync(unsigned int mask, T var, int laneMask, int width = 32) {
  const unsigned int w = dfemu::shfl_width(width), lane = dfemu::laneid();
  const unsigned int base = lane & ~(w - 1);
  const unsigned int x = lane ^ static_cast<unsigned int>(laneMask);
  // Lanes of later width-groups (and past the warp) are not readable: the lane keeps its value.
  const unsigned int src = (x < base + w && x < 32) ? x : lane;
  return dfemu::shfl_from(mask, var, src);
}
inline unsigned int __ballot_sync(unsigned int mask, int pred) {
  dfemu::VoteIn in{pred};
  unsigned int out = 0;
  dfemu::warp_collective(mask, &dfemu::ballot_fn, "__ballot_sync", &in, &out);
  return out;
}
inline int __any_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned int mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu) {
  dfemu::warp_collective(mask, &dfemu::syncwarp_fn, "__syncwarp", nullptr, nullptr);
}
inline unsigned int __activemask() { return dfemu::active_mask(); }
#define DFEMU_REDUCE(NAME, OP)                                                                 \
  inline unsigned int NAME(unsigned int mask, unsigned int v) {                              \
    unsigned int out = 0;                                                                    \
    dfemu::warp_collective(mask, &dfemu::reduce_fn_u<OP>, #NAME, &v, &out);                  \
    return out;                                                                              \
  }                                                                                          \
  inline int NAME(unsigned int mask, int v) {                                                \
    int out = 0;                                                                             \
    dfemu::warp_collective(mask, &dfemu::reduce_fn_i<OP>, #NAME, &v, &out);                  \
    return out;                                                                              \
  }
DFEMU_REDUCE(__reduce_add_sync, 0)
DFEMU_REDUCE(__reduce_min_sync, 1)
DFEMU_REDUCE(__reduce_max_sync, 2)
#undef DFEMU_REDUCE

// ---------------------------------------------------------------------------------------------
// Atomics. Blocks of a launch run one after another and a block's threads are fibers of one OS
// thread, so a plain read-modify-write is atomic; each atomic is a scheduling point, so the
// interleaving of the threads around it varies with the seed.
// ---------------------------------------------------------------------------------------------
#if DFEMU_RECORD
// The recording build (build/emu.rs): the read-modify-write is reported once, as atomic, and
// performed without the compiler's per-access hooks.
extern "C" void dfemu_record_atomic(const void* p, std::size_t n);
#endif
namespace dfemu {
template <class T, class F>
#if DFEMU_RECORD
__attribute__((no_sanitize_thread, noinline))
#endif
inline T atomic_rmw_plain(T* p, F f) {
  const T old = *p;
  *p = f(old);
  return old;
}
template <class T, class F>
inline T atomic_rmw(T* p, F f) {
  yield_point();
#if DFEMU_RECORD
  dfemu_record_atomic(p, sizeof(T));
#endif
  return atomic_rmw_plain(p, f);
}
}  // namespace dfemu
#define DFEMU_ATOMIC(NAME, T, EXPR)                                                           \
  inline T NAME(T* p, T v) {                                                                  \
    return dfemu::atomic_rmw(p, [v](T o) -> T { return EXPR; });                              \
  }
DFEMU_ATOMIC(atomicAdd, int, static_cast<int>(static_cast<unsigned int>(o) + static_cast<unsigned int>(v)))
DFEMU_ATOMIC(atomicAdd, unsigned int, o + v)
DFEMU_ATOMIC(atomicAdd, unsigned long long, o + v)
DFEMU_ATOMIC(atomicAdd, float, o + v)
DFEMU_ATOMIC(atomicAdd, double, o + v)
DFEMU_ATOMIC(atomicAdd, __half, __hadd(o, v))
DFEMU_ATOMIC(atomicAdd, __nv_bfloat16, __hadd(o, v))
DFEMU_ATOMIC(atomicAdd, __half2, __hadd2(o, v))
DFEMU_ATOMIC(atomicAdd, __nv_bfloat162, __hadd2(o, v))
DFEMU_ATOMIC(atomicSub, int, static_cast<int>(static_cast<unsigned int>(o) - static_cast<unsigned int>(v)))
DFEMU_ATOMIC(atomicSub, unsigned int, o - v)
DFEMU_ATOMIC(atomicMax, int, o > v ? o : v)
DFEMU_ATOMIC(atomicMax, unsigned int, o > v ? o : v)
DFEMU_ATOMIC(atomicMax, long long, o > v ? o : v)
DFEMU_ATOMIC(atomicMax, unsigned long long, o > v ? o : v)
DFEMU_ATOMIC(atomicMin, int, o < v ? o : v)
DFEMU_ATOMIC(atomicMin, unsigned int, o < v ? o : v)
DFEMU_ATOMIC(atomicMin, long long, o < v ? o : v)
DFEMU_ATOMIC(atomicMin, unsigned long long, o < v ? o : v)
DFEMU_ATOMIC(atomicExch, int, ((void)o, v))
DFEMU_ATOMIC(atomicExch, unsigned int, ((void)o, v))
DFEMU_ATOMIC(atomicExch, unsigned long long, ((void)o, v))
DFEMU_ATOMIC(atomicExch, float, ((void)o, v))
DFEMU_ATOMIC(atomicAnd, int, o & v)
DFEMU_ATOMIC(atomicAnd, unsigned int, o & v)
DFEMU_ATOMIC(atomicOr, int, o | v)
DFEMU_ATOMIC(atomicOr, unsigned int, o | v)
DFEMU_ATOMIC(atomicXor, int, o ^ v)
DFEMU_ATOMIC(atomicXor, unsigned int, o ^ v)
#undef DFEMU_ATOMIC
#define DFEMU_CAS(T)                                                                          \
  inline T atomicCAS(T* p, T compare, T v) {                                                  \
    return dfemu::atomic_rmw(p, [compare, v](T o) -> T { return o == compare ? v : o; });     \
  }
DFEMU_CAS(int)
DFEMU_CAS(unsigned int)
DFEMU_CAS(unsigned long long)
DFEMU_CAS(unsigned short)
#undef DFEMU_CAS

// ---------------------------------------------------------------------------------------------
// Cache-hinted loads and stores are plain accesses here.
// ---------------------------------------------------------------------------------------------
template <class T>
inline T __ldg(const T* p) { return *p; }
template <class T>
inline T __ldcg(const T* p) { return *p; }
template <class T>
inline T __ldca(const T* p) { return *p; }
template <class T>
inline T __ldcs(const T* p) { return *p; }
template <class T>
inline T __ldlu(const T* p) { return *p; }
template <class T>
inline T __ldcv(const T* p) { return *p; }
template <class T>
inline void __stcg(T* p, T v) { *p = v; }
template <class T>
inline void __stcs(T* p, T v) { *p = v; }
template <class T>
inline void __stwb(T* p, T v) { *p = v; }
template <class T>
inline void __stwt(T* p, T v) { *p = v; }
inline std::size_t __cvta_generic_to_shared(const void* p) {
  return reinterpret_cast<std::size_t>(p);
}
