// The little portability layer between csrc/'s sources and the machine they run on.
//
// Normal build (nvcc, setup.py): real CUDA; kernels launch on torch's current stream and every
// launch is checked. Emulated build (KIND_FAST_EMULATE, only for the CPU test suite): the same
// kernels and launchers compile as plain C++ and run on the host through
// emulation/cuda_emulation.h, on CPU tensors, under the op namespace `kind_fast_emu`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

#ifdef KIND_FAST_EMULATE
#include "emulation/cuda_emulation.h"
#else
// (not ATen/cuda/CUDAContext.h: it pulls in cuSPARSE/cuBLAS headers that a minimal CUDA
// toolkit, e.g. the one beside a pip-installed torch, does not have)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#endif

namespace kind_fast {

#ifdef KIND_FAST_EMULATE
using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
constexpr bool kEmulated = true;
#define KF_DEVICE_CHECK(cond, msg) ::kf_emu::device_check((cond), (msg))
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
constexpr bool kEmulated = false;
// Like ATen's index checks: an asynchronous device-side assertion (no host synchronisation).
#define KF_DEVICE_CHECK(cond, msg) CUDA_KERNEL_ASSERT(cond)
#endif

// Launches kernel<<<grid, block, 0, stream>>>(args...) and checks the launch. An empty grid
// launches nothing (CUDA rejects it, and there is no work).
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, Stream stream, Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  TORCH_CHECK(grid.y <= 65535 && grid.z <= 65535, "kind_fast: launch grid too large: (", grid.x, ", ", grid.y,
              ", ", grid.z, ")");
#ifdef KIND_FAST_EMULATE
  (void)stream;
  ::kf_emu::run(kernel, grid, block, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// The element type WMMA fragments use for a c10 storage type (same bits, same layout).
template <typename T>
struct WmmaElem;
#ifdef KIND_FAST_EMULATE
template <>
struct WmmaElem<c10::Half> {
  using type = c10::Half;
};
template <>
struct WmmaElem<c10::BFloat16> {
  using type = c10::BFloat16;
};
#else
template <>
struct WmmaElem<c10::Half> {
  using type = __half;
};
template <>
struct WmmaElem<c10::BFloat16> {
  using type = __nv_bfloat16;
};
#endif

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

// ------------------------------------------------------------------------------------------
// Asynchronous 16-byte copies global -> shared (cp.async, sm_80+), and 16-byte vectors.
//
// cp_async_16(dst, src, full) starts copying 16 bytes from src to dst, or writes 16 zero bytes
// when !full (src-size 0: nothing is read, so src only has to be a valid address). Copies
// issued since the last commit form one group; cp_async_wait<N>() waits until at most the N
// newest committed groups are still in flight. As on the GPU, what a copy wrote is visible to
// other threads only after the issuing thread waited AND a __syncthreads() followed.
// Both addresses must be 16-byte aligned (the launchers check the global side).
// ------------------------------------------------------------------------------------------
#ifdef KIND_FAST_EMULATE
using ::kf_emu::cp_async_16;
using ::kf_emu::cp_async_commit;
using ::kf_emu::cp_async_wait;
using Vec16 = ::kf_emu::Vec16;
#else
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool full) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(full ? 16 : 0) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
using Vec16 = uint4;
#endif

__host__ __device__ inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// 8 consecutive 2-byte elements (16-byte aligned) as floats, and back: one 16-byte load/store.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
  static_assert(sizeof(T) == 2, "8 elements of 2 bytes per 16-byte vector");
#ifdef KIND_FAST_EMULATE
  KF_DEVICE_CHECK(aligned16(p), "16-byte vector load from an address that is not 16-byte aligned");
  T e[8];
  std::memcpy(e, p, 16);
#else
  Vec16 v = *reinterpret_cast<const Vec16*>(p);
  const T* e = reinterpret_cast<const T*>(&v);
#endif
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(e[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
#ifdef KIND_FAST_EMULATE
  KF_DEVICE_CHECK(aligned16(p), "16-byte vector store to an address that is not 16-byte aligned");
  T e[8];
  for (int i = 0; i < 8; ++i) e[i] = T(f[i]);
  std::memcpy(p, e, 16);
#else
  // packed explicitly (T's raw 16 bits in `.x`)
  const auto pack = [&](int i) {
    return static_cast<unsigned>(T(f[i]).x) | (static_cast<unsigned>(T(f[i + 1]).x) << 16);
  };
  // (a plain uint4 store was split into four 32-bit stores by nvcc 13.0; this is one STG.E.128)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(pack(0)), "r"(pack(2)), "r"(pack(4)),
               "r"(pack(6))
               : "memory");
#endif
}

}  // namespace kind_fast
