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
//   seg_mm   Y[m, o]    = Σ_i x[m, i] · W_slot(b)[o, i] + bias[o]      path M3 (merged weight per class)
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
// Tensor cores: shrink, expand and seg_mm multiply tiles staged in shared memory with WMMA
// m16n16k16 (fp16/bf16 operands, fp32 accumulation); they need sm_80+ (bf16 WMMA), which the
// host code checks. Every other kernel is a plain loop. Loads are element-wise and masked
// (no vector loads): simple first, fast later (see bench/ for what it costs).
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
// One thread per class c: chains of gate row c (see the header), and the range check of its
// ids (the device-side twin of the reference's indexing errors).
__global__ void gate_chains_kernel(const int32_t* __restrict__ ids,  // (C1, K)
                                   int32_t* __restrict__ first,      // (C1, N_T)
                                   int32_t* __restrict__ next,       // (C1, K)
                                   int64_t num_classes, int k_slots, int64_t n_tailors) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= num_classes) return;
  for (int64_t n = 0; n < n_tailors; ++n) first[c * n_tailors + n] = -1;
  for (int k = k_slots - 1; k >= 0; --k) {  // descending, so each chain ends up ascending in k
    const int32_t n = ids[c * k_slots + k];
    KF_DEVICE_CHECK(n >= 0 && n < n_tailors, "kind_linear: idx holds a tailor id outside [0, N_T)");
    if (n < 0 || n >= n_tailors) return;  // (emulation only: the check above already failed)
    next[c * k_slots + k] = first[c * n_tailors + n];
    first[c * n_tailors + n] = k;
  }
}

// One thread per sample: labels must name a gate row.
__global__ void check_labels_kernel(const int32_t* __restrict__ labels, int64_t samples, int64_t num_classes) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= samples) return;
  const int32_t c = labels[b];
  KF_DEVICE_CHECK(c >= 0 && c < num_classes, "kind_linear: labels out of range [0, num_classes]");
}

// ------------------------------------------------------------------------------------------
// shrink: out[z, m, k] = Σ_{i in split z} A[m, i] · W[ids[c, k], i]      (fp32 out)
// grid (row tiles, ceil(K / 32), splits), 128 threads. A (M, D), W (N_T, D) row-major;
// out (splits, M, K). Split z covers depth [z·split_depth, (z+1)·split_depth) (a multiple of
// 32): with few row tiles (small M) the depth is cut so that the GPU has enough blocks, and
// sum_splits_kernel adds the splits in order afterwards (deterministic, no atomics).
// A class c < 0 skips the tile (path M3 marks samples that a merged weight already served).
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const T* __restrict__ A, const T* __restrict__ W, const int32_t* __restrict__ ids,
                  const int32_t* __restrict__ labels, float* __restrict__ out, int64_t rows, int64_t rows_per_sample,
                  int64_t depth, int64_t split_depth, int k_slots) {
#if KF_HAS_TENSOR_CORES
  using E = typename WmmaElem<T>::type;
  constexpr int BM = 64, BN = 32, BK = 32, LDA = BK + 8, LDC = BN + 4;
  __shared__ __align__(32) T As[BM * LDA];  // As[r][kk] = A[row0 + r, k0 + kk]
  __shared__ __align__(32) T Ws[BN * LDA];  // Ws[n][kk] = W[ids[c, n0 + n], k0 + kk]
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

  for (int64_t k0 = k_begin; k0 < k_end; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int r = e / BK, kk = e % BK;
      const int64_t col = k0 + kk;
      As[r * LDA + kk] = (r < tile.rows && col < k_end) ? A[(tile.row0 + r) * depth + col] : T(0.0f);
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      const int n = e / BK, kk = e % BK;
      const int64_t col = k0 + kk;
      Ws[n * LDA + kk] = (w_off[n] >= 0 && col < k_end) ? W[w_off[n] + col] : T(0.0f);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const E*>(&As[(warp * 16) * LDA + kk]), LDA);
      for (int j = 0; j < 2; ++j) {
        // operand b is (kk × n): element (kk, n) = Ws[n][kk], i.e. column-major with ldm LDA
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const E*>(&Ws[(j * 16) * LDA + kk]), LDA);
        wmma::mma_sync(acc[j], a, bf, acc[j]);
      }
    }
    __syncthreads();
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
// expand: Y[m, n] = T(float(Y[m, n]) + Σ_k T(P[m, k] · s[c, k]) · W[ids[c, k], n])
// grid (row tiles, ceil(N / 64)), 128 threads. P (M, K) fp32; s (C1, K) fp32; W (N_T, N)
// row-major; Y (M, N) updated in place (each element by one thread). The scaled operand is
// rounded to T before the product, as the reference rounds h⊙s before its GEMM.
// ------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    expand_kernel(const float* __restrict__ P, const float* __restrict__ s, const T* __restrict__ W,
                  const int32_t* __restrict__ ids, const int32_t* __restrict__ labels, T* __restrict__ Y,
                  int64_t rows_per_sample, int64_t width, int k_slots) {
#if KF_HAS_TENSOR_CORES
  using E = typename WmmaElem<T>::type;
  constexpr int BM = 64, BN = 64, BK = 16, LDP = BK + 8, LDW = BN + 8, LDC = BN + 4;
  __shared__ __align__(32) T Ps[BM * LDP];  // Ps[r][kk] = T(P[row0 + r, k0 + kk] · s[c, k0 + kk])
  __shared__ __align__(32) T Ws[BK * LDW];  // Ws[kk][n] = W[ids[c, k0 + kk], n0 + n]
  __shared__ __align__(32) float Cs[BM * LDC];

  const RowTile tile = row_tile(blockIdx.x, rows_per_sample, BM);
  const int c = labels[tile.sample];
  if (c < 0) return;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // warp tile: rows [32wm, 32wm + 32) × cols [32wn, 32wn + 32)
  const int32_t* ids_c = ids + static_cast<int64_t>(c) * k_slots;
  const float* s_c = s + static_cast<int64_t>(c) * k_slots;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int k0 = 0; k0 < k_slots; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int r = e / BK, kk = e % BK, k = k0 + kk;
      Ps[r * LDP + kk] = (r < tile.rows && k < k_slots) ? T(P[(tile.row0 + r) * k_slots + k] * s_c[k]) : T(0.0f);
    }
    for (int e = tid; e < BK * BN; e += kThreads) {
      const int kk = e / BN, n = e % BN, k = k0 + kk;
      const int64_t col = n0 + n;
      Ws[kk * LDW + n] = (k < k_slots && col < width) ? W[static_cast<int64_t>(ids_c[k]) * width + col] : T(0.0f);
    }
    __syncthreads();
    for (int i = 0; i < 2; ++i) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
      wmma::load_matrix_sync(a, reinterpret_cast<const E*>(&Ps[(wm * 32 + i * 16) * LDP]), LDP);
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> bf;
        wmma::load_matrix_sync(bf, reinterpret_cast<const E*>(&Ws[wn * 32 + j * 16]), LDW);
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
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    const int64_t col = n0 + n;
    if (r < tile.rows && col < width) {
      T* y = &Y[(tile.row0 + r) * width + col];
      *y = T(static_cast<float>(*y) + Cs[r * LDC + n]);
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
// Path M3 (sampling): few classes, one merged weight per class.
// ------------------------------------------------------------------------------------------
// One block. Slots go to the distinct classes in order of first appearance, at most
// max_slots of them. sample_slot[b] = slot of b's class or -1; rest_labels[b] = labels[b]
// for samples without a slot (they take path M1) and -1 for the others; slot_class[s] =
// class of slot s or -1. class_slot (C1) is scratch.
__global__ void assign_slots_kernel(const int32_t* __restrict__ labels, int32_t* __restrict__ class_slot,
                                    int32_t* __restrict__ slot_class, int32_t* __restrict__ sample_slot,
                                    int32_t* __restrict__ rest_labels, int64_t samples, int64_t num_classes,
                                    int max_slots) {
  for (int64_t c = threadIdx.x; c < num_classes; c += blockDim.x) class_slot[c] = -1;
  for (int64_t s = threadIdx.x; s < max_slots; s += blockDim.x) slot_class[s] = -1;
  __syncthreads();
  if (threadIdx.x == 0) {
    int used = 0;
    for (int64_t b = 0; b < samples; ++b) {
      const int32_t c = labels[b];
      if (class_slot[c] < 0 && used < max_slots) {
        class_slot[c] = used;
        slot_class[used] = c;
        ++used;
      }
    }
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < samples; b += blockDim.x) {
    const int32_t slot = class_slot[labels[b]];
    sample_slot[b] = slot;
    rest_labels[b] = slot < 0 ? labels[b] : -1;
  }
}

// Ug[s, o, k] = float(U_T[ids[c_s, k], o]) for used slots (0 for unused ones), one thread
// per element: the gathered, transposed left factor of slot s's low-rank update.
template <typename T>
__global__ void gather_left_kernel(const T* __restrict__ U, const int32_t* __restrict__ ids,
                                   const int32_t* __restrict__ slot_class, float* __restrict__ Ug,
                                   int64_t max_slots, int64_t n_out, int k_slots) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= max_slots * n_out * k_slots) return;
  const int64_t s = e / (n_out * k_slots);
  const int64_t o = (e / k_slots) % n_out;
  const int k = static_cast<int>(e % k_slots);
  const int64_t c = slot_class[s];
  Ug[e] = c < 0 ? 0.0f : static_cast<float>(U[static_cast<int64_t>(ids[c * k_slots + k]) * n_out + o]);
}

// seg_mm: Y[m, o] = T(Σ_i x[m, i] · Wsel[o, i] + bias[o]) with Wsel = Wm[slot] when the
// tile's sample has a merged slot, else W_G. grid (row tiles, ceil(N / 64)), 128 threads.
// x (M, D); Wm (max_slots, N, D); W_G (N, D); bias (N) or null; Y (M, N).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    segmented_linear_kernel(const T* __restrict__ X, const T* __restrict__ Wm, const T* __restrict__ Wg,
                            const T* __restrict__ bias, const int32_t* __restrict__ sample_slot,
                            T* __restrict__ Y, int64_t rows_per_sample, int64_t depth, int64_t width) {
#if KF_HAS_TENSOR_CORES
  using E = typename WmmaElem<T>::type;
  constexpr int BM = 64, BN = 64, BK = 32, LDA = BK + 8, LDC = BN + 4;
  __shared__ __align__(32) T As[BM * LDA];  // As[r][kk] = x[row0 + r, k0 + kk]
  __shared__ __align__(32) T Bs[BN * LDA];  // Bs[n][kk] = Wsel[n0 + n, k0 + kk]
  __shared__ __align__(32) float Cs[BM * LDC];

  const RowTile tile = row_tile(blockIdx.x, rows_per_sample, BM);
  const int slot = sample_slot[tile.sample];
  const T* Wsel = slot >= 0 ? Wm + static_cast<int64_t>(slot) * width * depth : Wg;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < depth; k0 += BK) {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int r = e / BK, kk = e % BK;
      const int64_t col = k0 + kk;
      As[r * LDA + kk] = (r < tile.rows && col < depth) ? X[(tile.row0 + r) * depth + col] : T(0.0f);
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      const int n = e / BK, kk = e % BK;
      const int64_t col = k0 + kk, o = n0 + n;
      Bs[n * LDA + kk] = (o < width && col < depth) ? Wsel[o * depth + col] : T(0.0f);
    }
    __syncthreads();
    for (int kk = 0; kk < BK; kk += 16) {
      for (int i = 0; i < 2; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> a;
        wmma::load_matrix_sync(a, reinterpret_cast<const E*>(&As[(wm * 32 + i * 16) * LDA + kk]), LDA);
        for (int j = 0; j < 2; ++j) {
          // operand b is (kk × o): element (kk, o) = Bs[o][kk], column-major with ldm LDA
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> bf;
          wmma::load_matrix_sync(bf, reinterpret_cast<const E*>(&Bs[(wn * 32 + j * 16) * LDA + kk]), LDA);
          wmma::mma_sync(acc[i][j], a, bf, acc[i][j]);
        }
      }
    }
    __syncthreads();
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&Cs[(wm * 32 + i * 16) * LDC + wn * 32 + j * 16], acc[i][j], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int r = e / BN, n = e % BN;
    const int64_t o = n0 + n;
    if (r < tile.rows && o < width) {
      const float b = bias != nullptr ? static_cast<float>(bias[o]) : 0.0f;
      Y[(tile.row0 + r) * width + o] = T(Cs[r * LDC + n] + b);
    }
  }
#else
  KF_DEVICE_CHECK(false, "kind_fast CUDA kernels need sm_80 or newer");
#endif
}

}  // namespace kernels
}  // namespace kind_fast
