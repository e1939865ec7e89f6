// The little portability layer between csrc/'s sources and the machine they run on.
//
// Normal build (nvcc, setup.py): real CUDA; kernels launch on torch's current stream and every
// launch is checked. Emulated build (KIND_FAST_EMULATE, only for the CPU test suite): the same
// kernels and launchers compile as plain C++ and run on the host through
// emulation/cuda_emulation.h, on CPU tensors, under the op namespace `kind_fast_emu`.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace kind_fast
