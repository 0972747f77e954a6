// prelude.cuh: the first include of every kernel translation unit (through common.cuh).
//
// Under nvcc (__CUDACC__) it pulls in the CUDA headers the kernels use. Under the host C++17
// compiler (the CPU emulator, see kernels/emu/README.md) it pulls in kernels/emu/cuda_emu.h,
// which models the subset of CUDA C++ listed in that header's comment, so the very same
// kernel sources run inside `cargo test` with no GPU and no nvcc.
//
// Kernel authors write plain CUDA: `__shared__ T name[N];`, `extern __shared__ T smem[];`,
// `__syncthreads()`, `__shfl_xor_sync(...)`, `__float2bfloat16(...)`, and the tensor-core
// wrappers of tensor_core.cuh. Rules the emulator enforces (they are CUDA's rules too):
//   * every thread of a block reaches every `__syncthreads()`, at the same call site; a thread
//     that returns early while others wait at a barrier fails the launch;
//   * every lane named in a warp op's mask calls the same warp op with the same mask;
//   * one declarator per `__shared__` declaration, inside a function (not at namespace scope).
#pragma once

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>
#else
#include "emu/cuda_emu.h"
#endif
