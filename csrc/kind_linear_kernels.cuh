// Kernels of the CUDA backend of kind_linear (the parts cuBLAS cannot do).
//
// Math (kind_fast/ops/kind_linear.py, docs/design.md §2). Rows are grouped by sample: row m belongs to
// sample b = m / T, of class c = labels[b]. A gate row c has K slots: tailor id ids[c, k] and
// scale s[c, k] = σ_T[ids[c, k]] · val[c, k] (fp32; padding slots have val 0, hence s 0).
//
//   shrink   out[m, k]  = Σ_i A[m, i] · W[ids[c, k], i]                h = x·V_T[ids]ᵀ, dhs = g·U_T[ids]ᵀ
//   expand   Y[m, n]   += Σ_k T(P[m, k]·s[c, k]) · W[ids[c, k], n]     y += (h⊙s)·U_T[ids], dx += (dhs⊙s)·V_T[ids]
//   gather   out[m, k]  = H[m, ids[c, k]]                              row plan: pick K of N_T columns
//   scatter  Q[m, n]    = T(Σ_{k: ids[c,k] = n} P[m, k]·s[c, k])       row plan: back to N_T columns
//   combine  dW[n, j]   = Σ_b Σ_{k: ids[c_b,k] = n} R[b, k, j]         dU_T, dV_T from per-sample products
//   ds       ds[b, k]   = Σ_{m in b} dhs[m, k] · h[m, k]
//   dsigma   dσ_T[n]    = Σ_b Σ_{k: ids[c_b,k] = n} ds[b, k] · val[c_b, k]
//   dval     dval[c, k] = σ_T[ids[c, k]] · Σ_{b: c_b = c} ds[b, k]
//
// Row tiles never straddle samples: sample b owns tiles [b·tps, (b+1)·tps) with
// tps = ceil(T / BM), tile j of b covers rows b·T + j·BM ... b·T + min(T, (j+1)·BM) - 1. So a
// tile has exactly one class (one scalar load) whatever T is; when T % BM != 0 the last tile of
// each sample is partly masked. This is docs/design.md §2's "tile lies in one sample" made exact.
//
// Determinism: no atomics anywhere. Every output element is written by exactly one thread,
// and every sum runs in a fixed order (k ascending inside a chain, b ascending across samples,
// row chunks ascending), so results are bitwise reproducible run to run.
//
// "Chains" invert a gate row: first[c, n] is the smallest slot k with ids[c, k] == n (or -1),
// next[c, k] the next larger slot with the same id (or -1). Ids normally appear once per row,
// but padding repeats id 0 (with val 0) and nothing forbids duplicates, which are summed.
//
// Every dense GEMM (x·W_Gᵀ, dx = g·W_G, dW_G, the per-sample products of the backward, and
// path M3's per-group GEMMs) runs on cuBLAS through ATen; these kernels do only what cuBLAS
// cannot: GEMMs whose second operand is gathered per row tile by class.
//
// Tensor cores: shrink and expand multiply tiles staged in shared memory with WMMA m16n16k16
// (fp16/bf16 operands, fp32 accumulation); they need sm_80+ (bf16 WMMA, cp.async), which the
// host code checks. Their K-loops are double-buffered: the next tile's 16-byte cp.async copies
// are in flight while the tensor cores work on the current one (one __syncthreads() pair per
// step). The "vector" instantiation (kVec) is used when rows are 16-byte aligned (width a
// multiple of 8 elements, aligned base pointers): 16-byte asynchronous copies into shared
// memory, and 16-byte loads and stores in expand's epilogue. Otherwise (odd widths) the same
// kernel stages tiles with masked 2-byte loads. Every other kernel is a plain loop.
#pragma once

#include "kf_cuda.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define KF_HAS_TENSOR_CORES 0  // device pass for an arch without bf16 WMMA: kernels trap
#else
#define KF_HAS_TENSOR_CORES 1
#endif

namespace kind_fast {
namespace kernels {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps per block in the tiled kernels

// ------------------------------------------------------------------------------------------
// Row tiles inside one sample
// ------------------------------------------------------------------------------------------
struct RowTile {
  int64_t sample;  // b
  int64_t row0;    // first row of the tile (global row index)
  int rows;        // valid rows, 1..BM
};

__device__ __forceinline__ RowTile row_tile(int64_t tile, int64_t rows_per_sample, int bm) {
  const int64_t tiles_per_sample = (rows_per_sample + bm - 1) / bm;
  const int64_t b = tile / tiles_per_sample;
  const int64_t j = tile - b * tiles_per_sample;  // tile index inside sample b
  const int64_t left = rows_per_sample - j * bm;  // rows of b from this tile on (>= 1)
  return {b, b * rows_per_sample + j * bm, static_cast<int>(left < bm ? left : bm)};
}

inline unsigned num_row_tiles(int64_t samples, int64_t rows_per_sample, int bm) {
  return static_cast<unsigned>(samples * ((rows_per_sample + bm - 1) / bm));
}

// ------------------------------------------------------------------------------------------
// Gate tables
// ------------------------------------------------------------------------------------------
// The per-call tables of a gate, in one launch (so that small layers are not launch-bound).
// Thread i < C1 (class c = i): the range check of row c's ids (the device-side twin of the
// reference's indexing errors), their int32 copy, s[c, k] = σ_T[ids[c, k]] · val[c, k] (fp32),
// and the chains of row c (see the header). Thread i < B (sample b = i): the range check of
// labels[b] and its int32 copy. I, L: the caller's index and label types (int32 or int64).
template <typename I, typename L>
__global__ void gate_tables_kernel(const I* __restrict__ ids_in, const L* __restrict__ labels_in,
                                   const float* __restrict__ sigma, const float* __restrict__ val,
                                   int32_t* __restrict__ ids, int32_t* __restrict__ labels, float* __restrict__ s,
                                   int32_t* __restrict__ first, int32_t* __restrict__ next, int64_t num_classes,
                                   int k_slots, int64_t n_tailors, int64_t samples) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < samples) {
    const L c = labels_in[i];
    KF_DEVICE_CHECK(c >= 0 && c < num_classes, "kind_linear: labels out of range [0, num_classes]");
    labels[i] = static_cast<int32_t>(c);
  }
  if (i >= num_classes) return;
  const int64_t c = i;
  for (int64_t n = 0; n < n_tailors; ++n) first[c * n_tailors + n] = -1;
  for (int k = k_slots - 1; k >= 0; --k) {  // descending, so each chain ends up ascending in k
    const I n = ids_in[c * k_slots + k];
    KF_DEVICE_CHECK(n >= 0 && n < n_tailors, "kind_linear: idx holds a tailor id outside [0, N_T)");
    if (n < 0 || n >= n_tailors) return;  // (emulation only: the check above already failed)
    ids[c * k_slots + k] = static_cast<int32_t>(n);
    s[c * k_slots + k] = sigma[n] * val[c * k_slots + k];
    next[c * k_slots + k] = first[c * n_tailors + n];
    first[c * n_tailors + n] = k;
  }
}

// ------------------------------------------------------------------------------------------
// shrink: out[z, m, k] = Σ_{i in split z} A[m, i] · W[ids[c, k], i]      (fp32 out)
// grid (row tiles, ceil(K / 32), splits), 128 threads. A (M, D), W (N_T, D) row-major;
// out (splits, M, K). Split z covers depth [z·split_depth, (z+1)·split_depth) (a multiple of
// 32): with few row tiles (small M) the depth is cut so that the GPU has enough blocks, and
// sum_splits_kernel adds the splits in order afterwards (deterministic, no atomics).
// A class c < 0 skips the tile (path M3 marks the samples that need no correction).
// kVec: D % 8 == 0 and A, W 16-byte aligned (the launcher checks), so every 8-element chunk of
// a row is one 16-byte cp.async, whole or (past the split's end / past the tile's rows /
// an unused slot) zero-filled.
// ------------------------------------------------------------------------------------------
constexpr int kShrinkBM = 64, kShrinkBN = 32, kShrinkBK = 32;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const T* __restrict__ A, const T* __restrict__ W, const int32_t* __restrict__ ids,
                  const int32_t* __restrict__ labels, float* __restrict__ out, int64_t rows, int64_t rows_per_sample,
                  int64_t depth, int64_t split_depth, int k_slots) {
#if KF_HAS_TENSOR_CORES
  using E = typename WmmaElem<T>::type;
  constexpr int BM = kShrinkBM, BN = kShrinkBN, BK = kShrinkBK, LDA = BK + 8, LDC = BN + 4, CH = BK / 8;
  // two stages: As[s][r][kk] = A[row0 + r, k0 + kk], Ws[s][n][kk] = W[ids[c, n0 + n], k0 + kk]
  __shared__ __align__(128) T As[2][BM * LDA];
  __shared__ __align__(128) T Ws[2][BN * LDA];
  __shared__ __align__(32) float Cs[BM * LDC];
  __shared__ int64_t w_off[BN];  // ids[c, n0 + n] · depth, or -1 for slots past K

  const RowTile tile = row_tile(blockIdx.x, rows_per_sample, BM);
  const int c = labels[tile.sample];
  if (c < 0) return;  // whole block: no barrier is skipped by only some threads
  const int n0 = blockIdx.y * BN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.z) * split_depth;
  const int64_t k_end = k_begin + split_depth < depth ? k_begin + split_depth : depth;
  out += static_cast<int64_t>(blockIdx.z) * rows * k_slots;  // this split's partial (M, K)
  const int tid = threadIdx.x, warp = tid / 32;
  if (tid < BN) {
    const int n = n0 + tid;
    w_off[tid] = n < k_slots ? static_cast<int64_t>(ids[static_cast<int64_t>(c) * k_slots + n]) * depth : -1;
  }
  // warp w computes rows [16w, 16w + 16) × slots [0, 32): two 16×16 accumulators
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  __syncthreads();

  // stage the depth slice [k0, k0 + BK) into buffer `st` (asynchronously when kVec)
  auto load = [&](int st, int64_t k0) {
    if constexpr (kVec) {
      for (int e = tid; e < BM * CH; e += kThreads) {
        const int r = e / CH, kk = (e % CH) * 8;
        const bool ok = r < tile.rows && k0 + kk < k_end;
        cp_async_16(&As[st][r * LDA + kk], ok ? A + (tile.row0 + r) * depth + k0 + kk : A, ok);
      }
      for (int e = tid; e < BN * CH; e += kThreads) {
        const int n = e / CH, kk = (e % CH) * 8;
        const bool ok = w_off[n] >= 0 && k0 + kk < k_end;
        cp_async_16(&Ws[st][n * LDA + kk], ok ? W + w_off[n] + k0 + kk : W, ok);
      }
      cp_async_commit();
    } else {
      for (int e = tid; e < BM * BK; e += kThreads) {
        const int r = e / BK, kk = e % BK;
        const int64_t col = k0 + kk;
        As[st][r * LDA + kk] = (r < tile.rows && col < k_end) ? A[(tile.row0 + r) * depth + col] : T(0.0f);
      }
      for (int e = tid; e < BN * BK; e += kThreads) {
        const int n = e / BK, kk = e % BK;
        const int64_t col = k0 + kk;
        Ws[st][n * LDA + kk] = (w_off[n] >= 0 && col < k_end) ? W[w_off[n] + col] : T(0.0f);
      }
    }
  };

  const int64_t steps = (k_end - k_begin + BK - 1) / BK;
  if (steps > 0) load(0, k_begin);
  for (int64_t it = 0; it < steps; ++it) {
    const int st = static_cast<int>(it & 1);
    if (it + 1 < steps) {  // prefetch the next slice into the other buffer, then wait for this one
      load(st ^ 1, k_begin + (it + 1) * BK);
      if constexpr (kVec) cp_async_wait<1>();
    } else if constexpr (kVec) {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const E*>(&As[st][(warp * 16) * LDA + kk]), LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // operand b is (kk × n): element (kk, n) = Ws[n][kk], i.e. column-major with ldm LDA
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const E*>(&Ws[st][(j * 16) * LDA + kk]), LDA);
        wmma::mma_sync(acc[j], a, bf, acc[j]);
      }
    }
    __syncthreads();  // everyone is done with buffer st before it is refilled
  }
  for (int j = 0; j < 2; ++j) {
    wmma::store_matrix_sync(&Cs[(warp * 16) * LDC + j * 16], acc[j], LDC, wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    if (r < tile.rows && n0 + n < k_slots) out[(tile.row0 + r) * k_slots + n0 + n] = Cs[r * LDC + n];
  }
#else
  KF_DEVICE_CHECK(false, "kind_fast CUDA kernels need sm_80 or newer");
#endif
}

// out[i] = Σ_z part[z, i], z ascending, one thread per element (the shrink's split-K sum).
__global__ void sum_splits_kernel(const float* __restrict__ part, float* __restrict__ out, int64_t n, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float acc = 0.0f;
  for (int z = 0; z < splits; ++z) acc += part[z * n + i];
  out[i] = acc;
}

// ------------------------------------------------------------------------------------------
// expand: Y[m, n] = T(float(Base[m', n]) + Σ_k T(P[m, k] · s[c, k]) · W[ids[c, k], n])
// grid (row tiles, ceil(N / 64)), 128 threads. P (M, K) fp32; s (C1, K) fp32; W (N_T, N)
// row-major; Y (M, N). m' = m: Base = Y adds in place (each element read and written by one
// thread). base_per_sample: m' = m - b·T, the row inside its sample, so every sample adds to the
// same Base; path M3's merge passes Base = W_G with one "sample" of out rows per group to write
// W_g = W_G + U_T[ids_c]ᵀ·diag(s_c)·V_T[ids_c] for every group in one pass. The scaled operand
// is rounded to T before the product, as the reference rounds h⊙s before its GEMM.
// kVec: N % 8 == 0 and W, Base, Y 16-byte aligned: 16-byte cp.async for the gathered W rows,
// 16-byte loads and stores in the epilogue.
// ------------------------------------------------------------------------------------------
constexpr int kExpandBM = 64, kExpandBN = 64, kExpandBK = 16;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const float* __restrict__ P, const float* __restrict__ s, const T* __restrict__ W,
                  const int32_t* __restrict__ ids, const int32_t* __restrict__ labels, const T* Base,
                  bool base_per_sample, T* Y, int64_t rows_per_sample, int64_t width, int k_slots) {
#if KF_HAS_TENSOR_CORES
  using E = typename WmmaElem<T>::type;
  constexpr int BM = kExpandBM, BN = kExpandBN, BK = kExpandBK, LDP = BK + 8, LDW = BN + 8, LDC = BN + 4;
  constexpr int CH = BN / 8;
  // two stages: Ps[s][r][kk] = T(P[row0 + r, k0 + kk] · s[c, k0 + kk]), Ws[s][kk][n] = W[ids[c, k0 + kk], n0 + n]
  __shared__ __align__(128) T Ps[2][BM * LDP];
  __shared__ __align__(128) T Ws[2][BK * LDW];
  __shared__ __align__(32) float Cs[BM * LDC];

  const RowTile tile = row_tile(blockIdx.x, rows_per_sample, BM);
  const int c = labels[tile.sample];
  if (c < 0) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t base0 = base_per_sample ? tile.row0 - tile.sample * rows_per_sample : tile.row0;  // Base row of r = 0
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // warp tile: rows [32wm, 32wm + 32) × cols [32wn, 32wn + 32)
  const int32_t* ids_c = ids + static_cast<int64_t>(c) * k_slots;
  const float* s_c = s + static_cast<int64_t>(c) * k_slots;
  const float* P_tile = P + tile.row0 * k_slots;  // this tile's rows of P
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  auto load = [&](int st, int k0) {
    if constexpr (kVec) {  // the gathered W rows: 16 rows × 8 chunks of 16 bytes, one per thread
      for (int e = tid; e < BK * CH; e += kThreads) {
        const int kk = e / CH, n = (e % CH) * 8, k = k0 + kk;
        const int64_t col = n0 + n;
        const bool ok = k < k_slots && col < width;
        cp_async_16(&Ws[st][kk * LDW + n], ok ? W + static_cast<int64_t>(ids_c[k]) * width + col : W, ok);
      }
      cp_async_commit();
    } else {
      for (int e = tid; e < BK * BN; e += kThreads) {
        const int kk = e / BN, n = e % BN, k = k0 + kk;
        const int64_t col = n0 + n;
        Ws[st][kk * LDW + n] = (k < k_slots && col < width) ? W[static_cast<int64_t>(ids_c[k]) * width + col]
                                                             : T(0.0f);
      }
    }
    for (int e = tid; e < BM * BK; e += kThreads) {  // scaled and rounded: through registers
      const int r = e / BK, kk = e % BK, k = k0 + kk;
      Ps[st][r * LDP + kk] = (r < tile.rows && k < k_slots) ? T(P_tile[r * k_slots + k] * s_c[k]) : T(0.0f);
    }
  };

  const int steps = (k_slots + BK - 1) / BK;
  if (steps > 0) load(0, 0);
  for (int it = 0; it < steps; ++it) {
    const int st = it & 1;
    if (it + 1 < steps) {
      load(st ^ 1, (it + 1) * BK);
      if constexpr (kVec) cp_async_wait<1>();
    } else if constexpr (kVec) {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const E*>(&Ps[st][(wm * 32 + i * 16) * LDP]), LDP);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const E*>(&Ws[st][wn * 32 + j * 16]), LDW);
        wmma::mma_sync(acc[i][j], a, bf, acc[i][j]);
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[(wm * 32 + i * 16) * LDC + wn * 32 + j * 16], acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  if constexpr (kVec) {  // 8 columns per thread and step: 16-byte load of Base, 16-byte store of Y
    const T* base_tile = Base + base0 * width + n0;
    T* y_tile = Y + tile.row0 * width + n0;
    const int cols = width - n0 < BN ? static_cast<int>(width - n0) : BN;
#pragma unroll 1
    for (int e = tid; e < BM * CH; e += kThreads) {
      const int r = e / CH, n = (e % CH) * 8;
      if (r < tile.rows && n < cols) {
        const int64_t off = static_cast<int64_t>(r) * width + n;
        float v[8];
        load8(base_tile + off, v);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] += Cs[r * LDC + n + q];
        store8(y_tile + off, v);
      }
    }
  } else {
    for (int e = tid; e < BM * BN; e += kThreads) {
      const int r = e / BN, n = e % BN;
      const int64_t col = n0 + n, row = tile.row0 + r;
      if (r < tile.rows && col < width) {
        Y[row * width + col] = T(static_cast<float>(Base[(base0 + r) * width + col]) + Cs[r * LDC + n]);
      }
    }
  }
#else
  KF_DEVICE_CHECK(false, "kind_fast CUDA kernels need sm_80 or newer");
#endif
}

// ------------------------------------------------------------------------------------------
// Row plan (T < K or every tailor active): the GEMMs run on all N_T tailors through cuBLAS;
// these two kernels move between the N_T columns and a row's K slots.
// ------------------------------------------------------------------------------------------
// gather: out[m, k] = float(H[m, ids[c, k]]), one thread per (m, k). H (M, N_T); out (M, K).
template <typename T>
__global__ void gather_slots_kernel(const T* __restrict__ H, const int32_t* __restrict__ ids,
                                    const int32_t* __restrict__ labels, float* __restrict__ out, int64_t rows,
                                    int64_t rows_per_sample, int k_slots, int64_t n_tailors) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * k_slots) return;
  const int64_t m = e / k_slots;
  const int k = static_cast<int>(e - m * k_slots);
  const int64_t c = labels[m / rows_per_sample];
  out[e] = static_cast<float>(H[m * n_tailors + ids[c * k_slots + k]]);
}

// scatter: Q[m, n] = T(Σ_{k in chain(c, n)} P[m, k] · s[c, k]), one thread per (m, n).
template <typename T>
__global__ void scatter_slots_kernel(const float* __restrict__ P, const float* __restrict__ s,
                                     const int32_t* __restrict__ first, const int32_t* __restrict__ next,
                                     const int32_t* __restrict__ labels, T* __restrict__ Q, int64_t rows,
                                     int64_t rows_per_sample, int k_slots, int64_t n_tailors) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * n_tailors) return;
  const int64_t m = e / n_tailors;
  const int64_t n = e - m * n_tailors;
  const int64_t c = labels[m / rows_per_sample];
  float acc = 0.0f;
  for (int k = first[c * n_tailors + n]; k >= 0; k = next[c * k_slots + k]) {
    acc += P[m * k_slots + k] * s[c * k_slots + k];
  }
  Q[e] = T(acc);
}

// ------------------------------------------------------------------------------------------
// combine: dW[n, j] = Σ_b Σ_{k in chain(c_b, n)} float(R[b, k, j])   (sample plan dU_T, dV_T)
// grid (N_T, ceil(J / 128)), 128 threads; one thread per (n, j), b and k ascending.
// R (B, K, J) holds the per-sample products (h⊙s)ᵀ·g or (dhs⊙s)ᵀ·x; dW (N_T, J).
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void combine_slots_kernel(const T* __restrict__ R, const int32_t* __restrict__ first,
                                     const int32_t* __restrict__ next, const int32_t* __restrict__ labels,
                                     T* __restrict__ dW, int64_t samples, int k_slots, int64_t n_tailors,
                                     int64_t width) {
  const int64_t n = blockIdx.x;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (j >= width) return;
  float acc = 0.0f;
  for (int64_t b = 0; b < samples; ++b) {
    const int64_t c = labels[b];
    for (int k = first[c * n_tailors + n]; k >= 0; k = next[c * k_slots + k]) {
      acc += static_cast<float>(R[(b * k_slots + k) * width + j]);
    }
  }
  dW[n * width + j] = T(acc);
}

// ------------------------------------------------------------------------------------------
// ds[b, k] = Σ_{m in b} dhs[m, k] · h[m, k]: per-chunk partials, then a fixed-order sum.
// ------------------------------------------------------------------------------------------
constexpr int kDsChunk = 64;  // rows per partial

// grid (B · chunks), threads over k. part (B, chunks, K).
__global__ void ds_partial_kernel(const float* __restrict__ dhs, const float* __restrict__ h,
                                  float* __restrict__ part, int64_t rows_per_sample, int k_slots) {
  const int64_t chunks = (rows_per_sample + kDsChunk - 1) / kDsChunk;
  const int64_t b = blockIdx.x / chunks;
  const int64_t j = blockIdx.x - b * chunks;
  const int64_t r0 = b * rows_per_sample + j * kDsChunk;
  const int64_t r1 = b * rows_per_sample + ((j + 1) * kDsChunk < rows_per_sample ? (j + 1) * kDsChunk : rows_per_sample);
  for (int k = threadIdx.x; k < k_slots; k += blockDim.x) {
    float acc = 0.0f;
    for (int64_t m = r0; m < r1; ++m) acc += dhs[m * k_slots + k] * h[m * k_slots + k];
    part[(b * chunks + j) * k_slots + k] = acc;
  }
}

// one thread per (b, k): ds[b, k] = Σ_j part[b, j, k], j ascending.
__global__ void ds_final_kernel(const float* __restrict__ part, float* __restrict__ ds, int64_t samples,
                                int64_t chunks, int k_slots) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= samples * k_slots) return;
  const int64_t b = e / k_slots;
  const int k = static_cast<int>(e - b * k_slots);
  float acc = 0.0f;
  for (int64_t j = 0; j < chunks; ++j) acc += part[(b * chunks + j) * k_slots + k];
  ds[e] = acc;
}

// one thread per tailor n: dσ_T[n] = Σ_b Σ_{k in chain(c_b, n)} ds[b, k] · val[c_b, k]
__global__ void dsigma_kernel(const float* __restrict__ ds, const float* __restrict__ val,
                              const int32_t* __restrict__ first, const int32_t* __restrict__ next,
                              const int32_t* __restrict__ labels, float* __restrict__ dsigma, int64_t samples,
                              int k_slots, int64_t n_tailors) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= n_tailors) return;
  float acc = 0.0f;
  for (int64_t b = 0; b < samples; ++b) {
    const int64_t c = labels[b];
    for (int k = first[c * n_tailors + n]; k >= 0; k = next[c * k_slots + k]) {
      acc += ds[b * k_slots + k] * val[c * k_slots + k];
    }
  }
  dsigma[n] = acc;
}

// one thread per gate slot (c, k): dval[c, k] = σ_T[ids[c, k]] · Σ_{b: c_b = c} ds[b, k]
__global__ void dval_kernel(const float* __restrict__ ds, const float* __restrict__ sigma,
                            const int32_t* __restrict__ ids, const int32_t* __restrict__ labels,
                            float* __restrict__ dval, int64_t samples, int64_t num_classes, int k_slots) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= num_classes * k_slots) return;
  const int64_t c = e / k_slots;
  const int k = static_cast<int>(e - c * k_slots);
  float acc = 0.0f;
  for (int64_t b = 0; b < samples; ++b) {
    if (labels[b] == c) acc += ds[b * k_slots + k];
  }
  dval[e] = acc * sigma[ids[e]];
}

// ------------------------------------------------------------------------------------------
// Path M3 (sampling): the plan of one call, and the left factor of the merges
// ------------------------------------------------------------------------------------------
// One thread per sample b, in group g = b / per_group whose class is c_g = labels[g·per_group]:
// which[b] = b when labels[b] != c_g (b needs the correction), else -1; b's correction gate
// row is ids2[b] = [ids[c_b, :], ids[c_g, :]], s2[b] = [s[c_b, :], -s[c_g, :]] (2K slots).
// The first sample of each group also writes group_class[g] = c_g.
__global__ void merged_plan_kernel(const int32_t* __restrict__ ids, const float* __restrict__ s,
                                   const int32_t* __restrict__ labels, int32_t* __restrict__ group_class,
                                   int32_t* __restrict__ which,
                                   int32_t* __restrict__ ids2, float* __restrict__ s2, int64_t samples,
                                   int64_t per_group, int k_slots) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= samples) return;
  const int64_t g = b / per_group;
  const int32_t cb = labels[b], cg = labels[g * per_group];
  if (b == g * per_group) group_class[g] = cg;
  which[b] = cb != cg ? static_cast<int32_t>(b) : -1;
  for (int k = 0; k < k_slots; ++k) {
    ids2[b * 2 * k_slots + k] = ids[static_cast<int64_t>(cb) * k_slots + k];
    ids2[b * 2 * k_slots + k_slots + k] = ids[static_cast<int64_t>(cg) * k_slots + k];
    s2[b * 2 * k_slots + k] = s[static_cast<int64_t>(cb) * k_slots + k];
    s2[b * 2 * k_slots + k_slots + k] = -s[static_cast<int64_t>(cg) * k_slots + k];
  }
}

// Ug[g, o, k] = float(U[ids[c_g, k], o]) (fp32, (G, out, K)), one thread per element: the
// gathered, transposed left factor of group g's low-rank update (expand scales it by s).
template <typename T>
__global__ void gather_left_kernel(const T* __restrict__ U, const int32_t* __restrict__ ids,
                                   const int32_t* __restrict__ group_class, float* __restrict__ Ug, int64_t groups,
                                   int64_t n_out, int k_slots) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= groups * n_out * k_slots) return;
  const int64_t g = e / (n_out * k_slots);
  const int64_t o = (e / k_slots) % n_out;
  const int k = static_cast<int>(e % k_slots);
  const int64_t c = group_class[g];
  Ug[e] = static_cast<float>(U[static_cast<int64_t>(ids[c * k_slots + k]) * n_out + o]);
}

}  // namespace kernels
}  // namespace kind_fast
