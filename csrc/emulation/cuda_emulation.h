// Host emulation of the small CUDA subset that csrc/ uses, for the CPU test suite.
//
// No GPU is available where kind_fast is developed and tested (CI has 2 CPU cores), so the
// CUDA kernels are also compiled as plain C++ (KIND_FAST_EMULATE, see csrc/kf_cuda.h) and run
// here: every CUDA thread of a block is a host thread, blocks run one after another, and
// `__shared__` variables become function-local statics (one block at a time, so a static is
// exactly that block's shared memory). tests/test_kind_linear_cuda.py builds this with g++
// through torch.utils.cpp_extension and checks the *same kernel source* against the
// reference on CPU tensors.
//
// What this checks: index math, tile bounds and masks, class lookup, reduction order and
// determinism, WMMA operand layouts (row/col-major, ldm, 32-byte pointer alignment, all
// enforced below), and that every __syncthreads() is reached by all threads of a block or by
// none (a divergent barrier is reported as an error instead of hanging).
// What it cannot check: the GPU memory model beyond block barriers, warp-level behaviour,
// occupancy, shared-memory limits, real tensor-core rounding, and speed.
#pragma once

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Blocks run one at a time, so a function-local static is one block's shared memory.
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace kf_emu {

struct Abort {};  // unwinds a thread of a block whose run has failed

// __syncthreads(): a reusable barrier that also reports divergence (a thread leaving the
// kernel while others wait, or waiting after another has left) and can be aborted.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}

  void wait() {
    std::unique_lock<std::mutex> lk(mu_);
    if (aborted_) throw Abort{};
    if (exited_ > 0) fail_locked("__syncthreads() reached after another thread of the block returned");
    const uint64_t gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return gen_ != gen || aborted_; });
    if (aborted_) throw Abort{};
  }

  void exit() {
    std::unique_lock<std::mutex> lk(mu_);
    ++exited_;
    if (count_ > 0 && !aborted_) fail_locked("a thread returned while others wait in __syncthreads()");
  }

  void fail(const std::string& msg) {
    std::unique_lock<std::mutex> lk(mu_);
    fail_locked(msg);
  }

  std::string error() {
    std::lock_guard<std::mutex> lk(mu_);
    return error_;
  }

 private:
  void fail_locked(const std::string& msg) {
    if (!aborted_) error_ = msg;
    aborted_ = true;
    cv_.notify_all();
    throw Abort{};
  }

  std::mutex mu_;
  std::condition_variable cv_;
  const int n_;
  int count_ = 0;
  int exited_ = 0;
  uint64_t gen_ = 0;
  bool aborted_ = false;
  std::string error_;
};

inline thread_local Barrier* current_barrier = nullptr;

// Stands in for CUDA_KERNEL_ASSERT: fails the launch with a message (raised as a C++
// exception by run(), which torch turns into a Python RuntimeError).
inline void device_check(bool ok, const char* msg) {
  if (!ok) current_barrier->fail(std::string("device-side check failed: ") + msg);
}

inline int lane_id() {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  return static_cast<int>(t % 32);
}

// cp.async, emulated with its real ordering rules: a copy reads its source when issued but
// writes its destination only when the issuing thread waits for its group
// (cp_async_wait<N>), so a kernel that reads shared memory before waiting (or without the
// __syncthreads() after the wait, when another thread issued the copy) reads stale data and
// fails the tests. Copies still in flight when a thread returns from the kernel are an error.
struct Vec16 {
  alignas(16) unsigned char b[16];
};

struct PendingCopy {
  void* dst;
  Vec16 data;
};

struct AsyncCopies {
  std::vector<PendingCopy> open;                  // issued since the last commit
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
  bool empty() const { return open.empty() && groups.empty(); }
  void clear() {
    open.clear();
    groups.clear();
  }
};

inline thread_local AsyncCopies async_copies;

inline void cp_async_16(void* dst, const void* src, bool full) {
  device_check(reinterpret_cast<std::uintptr_t>(dst) % 16 == 0, "cp.async destination is not 16-byte aligned");
  device_check(reinterpret_cast<std::uintptr_t>(src) % 16 == 0, "cp.async source is not 16-byte aligned");
  PendingCopy c{dst, {}};
  if (full) std::memcpy(c.data.b, src, 16);  // else 16 zero bytes
  async_copies.open.push_back(c);
}

inline void cp_async_commit() {
  async_copies.groups.push_back(std::move(async_copies.open));
  async_copies.open.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& g = async_copies.groups;
  while (static_cast<int>(g.size()) > N) {
    for (const PendingCopy& c : g.front()) std::memcpy(c.dst, c.data.b, 16);
    g.erase(g.begin());
  }
}

// Runs kernel(args...) over the grid: blocks in order, each block's threads concurrently.
// The host threads are created once per launch and step through the blocks together.
template <typename Kernel, typename... Args>
void run(Kernel kernel, dim3 grid, dim3 block, Args... args) {
  static std::mutex launch_mu;  // one emulated launch at a time (statics are shared memory)
  std::lock_guard<std::mutex> launch_lock(launch_mu);
  gridDim = grid;
  blockDim = block;
  const int nt = static_cast<int>(block.x * block.y * block.z);
  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::vector<std::unique_ptr<Barrier>> bars;  // one per block: a failed block stops the launch
  bars.reserve(nblocks);
  for (int64_t i = 0; i < nblocks; ++i) bars.emplace_back(new Barrier(nt));
  Barrier between(nt);  // all threads leave block i before any enters block i + 1
  std::vector<std::thread> threads;
  threads.reserve(nt);
  for (int t = 0; t < nt; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (int64_t i = 0; i < nblocks; ++i) {
        blockIdx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                        static_cast<unsigned>(i / (static_cast<int64_t>(grid.x) * grid.y)));
        Barrier& bar = *bars[i];
        current_barrier = &bar;
        try {
          async_copies.clear();
          kernel(args...);
          if (!async_copies.empty()) bar.fail("cp.async copies still in flight when the kernel returned");
          bar.exit();
        } catch (const Abort&) {
        } catch (const std::exception& e) {
          try {
            bar.fail(e.what());
          } catch (const Abort&) {
          }
        }
        current_barrier = &between;
        try {
          between.wait();
        } catch (const Abort&) {
          return;
        }
        if (!bar.error().empty()) return;  // every thread sees the same error after the wait
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int64_t i = 0; i < nblocks; ++i) {
    const std::string err = bars[i]->error();
    if (!err.empty()) {
      throw std::runtime_error("kind_fast CUDA emulation: block (" + std::to_string(i % grid.x) + "," +
                               std::to_string((i / grid.x) % grid.y) + "," +
                               std::to_string(i / (static_cast<int64_t>(grid.x) * grid.y)) + "): " + err);
    }
  }
}

}  // namespace kf_emu

inline void __syncthreads() { kf_emu::current_barrier->wait(); }

// ---------------------------------------------------------------------------------------
// nvcuda::wmma, emulated: a fragment holds its whole tile. The API's preconditions that the
// hardware needs are checked (32-byte aligned pointers; ldm a multiple of 16 bytes).
// Only lane 0 of a warp does the arithmetic and the store (the kernels never read fragment
// elements, so the other lanes' copies are never observed); callers must __syncthreads()
// before reading what was stored, as they must on the GPU.
// ---------------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  T x[rows * cols];
};

template <typename T>
inline void check_operand(const T* p, unsigned ldm) {
  kf_emu::device_check(reinterpret_cast<std::uintptr_t>(p) % 32 == 0,
                       "wmma pointer is not 32-byte aligned");
  kf_emu::device_check((ldm * sizeof(T)) % 16 == 0, "wmma ldm is not a multiple of 16 bytes");
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, V v) {
  if (kf_emu::lane_id() != 0) return;
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = static_cast<T>(v);
}

// Element (r, c) of the operand: row-major at p[r * ldm + c], column-major at p[c * ldm + r].
template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same<Layout, row_major>::value || std::is_same<Layout, col_major>::value,
                "operand fragments carry their layout");
  check_operand(p, ldm);
  if (kf_emu::lane_id() != 0) return;
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r];
    }
  }
}

template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
  if (kf_emu::lane_id() != 0) return;
  float out[M * N];
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += static_cast<float>(a.x[i * K + k]) * static_cast<float>(b.x[k * N + j]);
      out[i * N + j] = acc;
    }
  }
  for (int i = 0; i < M * N; ++i) d.x[i] = out[i];
}

template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm,
                              layout_t layout) {
  check_operand(p, ldm);
  if (kf_emu::lane_id() != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      if (layout == mem_row_major) {
        p[r * ldm + c] = f.x[r * N + c];
      } else {
        p[c * ldm + r] = f.x[r * N + c];
      }
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
