// Host side of the CUDA backend: the registered ops, argument checks, and the orchestration
// of cuBLAS (through ATen) and our kernels (kind_linear_kernels.cuh).
//
// Ops (schemas in module.cpp; same contract as the reference kind_fast::kind_linear*):
//   kind_linear_cuda           (x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> (y, h)
//   kind_linear_cuda_backward  (grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, mask) -> 7 grads
//   kind_linear_cuda_merged    (x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes) -> y
//   kind_linear_cuda_merged_gemm          (x, weights, bias, slots) -> y       (path M3, cached weights)
//   kind_linear_cuda_merged_gemm_backward (grad_y, x, weights, slots, mask) -> (dx, dweights, dbias)
//
// Plans (as the reference's tailor_plan, so both pick the same one for a shape):
//   sample (T >= K and K < N_T): y = x·W_Gᵀ + b (cuBLAS), h = shrink(x, V_T), y += expand(h⊙s, U_T).
//       Backward: dhs = shrink(g, U_T), dx = g·W_G (cuBLAS) + expand(dhs⊙s, V_T); dU_T and dV_T
//       from per-sample products (cuBLAS bmm, (B, K, J)) folded onto the tailors by `combine`.
//   row (otherwise): the tailor GEMMs run over all N_T tailors on cuBLAS, and gather/scatter
//       move between those N_T columns and each row's K slots.
//   Then ds (per sample), dσ_T and dval by fixed-order reductions.
//   merged (path M3, sampling): G equal groups of samples, one merged weight per group (the
//       class of its first sample), one cuBLAS GEMM per group, and a rank-2K correction for
//       the samples whose class differs from their group's (see kind_linear_merged below).
//   merged_gemm (path M3 on cached merged weights): one cuBLAS GEMM per run of samples of one
//       slot when the slots are on the host, else every slot's GEMM on all rows (see below).
// Nothing synchronises with the host; everything runs on the current stream.
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kind_linear_kernels.cuh"

#define KF_STRINGIFY2(x) #x
#define KF_STRINGIFY(x) KF_STRINGIFY2(x)

#ifdef KIND_FAST_EMULATE
#define KF_OP_NAMESPACE kind_fast_emu
#define KF_DISPATCH_KEY CPU
#else
#define KF_OP_NAMESPACE kind_fast
#define KF_DISPATCH_KEY CUDA
#endif

namespace kind_fast {

// Architectures this file was compiled for, as nvcc saw them ("800,900"), for kind_fast.info.
const char* cuda_arch_list() {
#if defined(KIND_FAST_EMULATE)
  return "emulated on the host";
#elif defined(__CUDA_ARCH_LIST__)
  return KF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

// CUDA runtime the extension was compiled against ("13.0").
const char* cuda_runtime_version() {
#if defined(KIND_FAST_EMULATE)
  return "none (emulated)";
#else
  static const std::string v = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  return v.c_str();
#endif
}

namespace {

using at::Tensor;
namespace k = kernels;


// ------------------------------------------------------------------------------------------
// Argument checks (clear messages; the Python functional has already validated user input,
// these guard direct calls of the ops)
// ------------------------------------------------------------------------------------------
void check_device(const char* op, const Tensor& ref, const Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x is on ", ref.device(),
              " (all tensors must be on one device)");
}

#ifndef KIND_FAST_EMULATE
// Cached per device: no CUDA API call per op call (and none inside a CUDA-graph capture
// after the first eager call).
int compute_capability_major(int dev) {
  static std::atomic<int> cache[256] = {};
  TORCH_CHECK(dev >= 0 && dev < 256, "kind_fast: device index ", dev, " out of range");
  int major = cache[dev].load(std::memory_order_relaxed);
  if (major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    cache[dev].store(major, std::memory_order_relaxed);
  }
  return major;
}
#endif

// x of every op here: (rows, in_features) fp16/bf16 on this build's device.
void check_x(const char* op, const Tensor& x) {
  TORCH_CHECK(x.device().type() == (kEmulated ? c10::DeviceType::CPU : c10::DeviceType::CUDA), op,
              ": x must be a ", kEmulated ? "CPU (emulated build)" : "CUDA", " tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16 (float32/float64 run on the reference backend), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
}

struct Dims {
  int64_t rows, n_in, n_out, n_tailors, num_classes, samples, rows_per_sample;
  int k_slots;
};

Dims check_inputs(const char* op, const Tensor& x, const Tensor& w_g, const std::optional<Tensor>& bias,
                  const Tensor& u_t, const Tensor& sigma_t, const Tensor& v_t, const Tensor& idx, const Tensor& val,
                  const Tensor& labels) {
  check_x(op, x);
  TORCH_CHECK(w_g.dim() == 2 && w_g.size(1) == x.size(1), op, ": w_g must be (out_features, ", x.size(1),
              "), got ", w_g.sizes());
  const int64_t n_out = w_g.size(0);
  TORCH_CHECK(u_t.dim() == 2 && u_t.size(1) == n_out, op, ": u_t must be (tailor_rank, ", n_out, "), got ",
              u_t.sizes());
  const int64_t n_t = u_t.size(0);
  TORCH_CHECK(v_t.dim() == 2 && v_t.size(0) == n_t && v_t.size(1) == x.size(1), op, ": v_t must be (", n_t, ", ",
              x.size(1), "), got ", v_t.sizes());
  TORCH_CHECK(sigma_t.dim() == 1 && sigma_t.size(0) == n_t, op, ": sigma_t must be (", n_t, ",), got ",
              sigma_t.sizes());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{w_g, "w_g"}, {u_t, "u_t"}, {v_t, "v_t"}}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(), " != x dtype ",
                x.scalar_type());
    check_device(op, x, t, name);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out, op, ": bias must be (", n_out, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(),
                " != x dtype ", x.scalar_type());
    check_device(op, x, *bias, "bias");
  }
  TORCH_CHECK(at::isFloatingType(sigma_t.scalar_type()) && at::isFloatingType(val.scalar_type()), op,
              ": sigma_t and val must be floating point, got ", sigma_t.scalar_type(), " and ", val.scalar_type());
  TORCH_CHECK(idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong, op,
              ": idx must be int32 or int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.dim() == 2 && val.sizes() == idx.sizes() && idx.size(0) >= 1, op,
              ": idx and val must both be (num_classes + 1, K), got ", idx.sizes(), " and ", val.sizes());
  TORCH_CHECK(labels.dim() == 1 && at::isIntegralType(labels.scalar_type(), /*includeBool=*/false), op,
              ": labels must be a 1-D integer tensor, got shape ", labels.sizes(), " dtype ", labels.scalar_type());
  for (const auto& [t, name] : {std::pair<const Tensor&, const char*>{sigma_t, "sigma_t"},
                                {idx, "idx"},
                                {val, "val"},
                                {labels, "labels"}}) {
    check_device(op, x, t, name);
  }
  Dims d{};
  d.rows = x.size(0);
  d.n_in = x.size(1);
  d.n_out = n_out;
  d.n_tailors = n_t;
  d.num_classes = idx.size(0);
  d.k_slots = static_cast<int>(idx.size(1));
  d.samples = labels.size(0);
  TORCH_CHECK(d.rows == 0 || d.samples > 0, op, ": labels is empty but x has ", d.rows, " rows");
  TORCH_CHECK(d.samples == 0 || d.rows % d.samples == 0, op, ": x has ", d.rows, " rows, not a multiple of the ",
              d.samples, " samples in labels (rows must be grouped by sample)");
  d.rows_per_sample = d.samples > 0 ? d.rows / d.samples : 0;
#ifndef KIND_FAST_EMULATE
  if (d.rows > 0) {
    const int dev = x.device().index();
    const int major = compute_capability_major(dev);
    TORCH_CHECK(major >= 8, op, ": the kind_fast CUDA kernels need compute capability 8.0 or newer (bf16 ",
                "tensor cores); cuda:", dev, " is ", major, ".x. Use kind_fast.use_backend('torch') or 'triton'.");
  }
#endif
  return d;
}

bool sample_plan(const Dims& d) {  // = kind_fast.ops.kind_linear.tailor_plan(...) == "sample"
  return d.rows_per_sample >= d.k_slots && d.k_slots < d.n_tailors;
}

// ------------------------------------------------------------------------------------------
// Gate tables for one call (all tiny: (C1, K) and (C1, N_T))
// ------------------------------------------------------------------------------------------
struct Tables {
  Tensor ids;     // (C1, K) int32
  Tensor s;       // (C1, K) fp32, σ_T[ids] ⊙ val
  Tensor val;     // (C1, K) fp32
  Tensor sigma;   // (N_T,) fp32
  Tensor labels;  // (B,) int32
  Tensor first;   // (C1, N_T) int32
  Tensor next;    // (C1, K) int32
};

Tables make_tables(const Dims& d, const Tensor& sigma_t, const Tensor& idx, const Tensor& val, const Tensor& labels,
                   Stream stream) {
  Tables t;
  t.sigma = sigma_t.to(at::kFloat).contiguous();
  t.val = val.to(at::kFloat).contiguous();
  const Tensor ids_in = idx.contiguous();
  const Tensor lab_in = (labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong)
                            ? labels.contiguous() : labels.to(at::kLong);
  auto iopt = ids_in.options().dtype(at::kInt);
  t.ids = at::empty({d.num_classes, d.k_slots}, iopt);
  t.labels = at::empty({d.samples}, iopt);
  t.s = at::empty({d.num_classes, d.k_slots}, t.val.options());
  t.first = at::empty({d.num_classes, d.n_tailors}, iopt);
  t.next = at::empty({d.num_classes, d.k_slots}, iopt);
  // one launch: range checks, int32 copies, s = σ_T[ids] ⊙ val, chains (before anything indexes with them)
  const dim3 grid(ceil_div(std::max<int64_t>(d.num_classes, d.samples), 128));
  auto run = [&](auto ids_ptr, auto lab_ptr) {
    launch(k::gate_tables_kernel<std::remove_const_t<std::remove_pointer_t<decltype(ids_ptr)>>,
                                 std::remove_const_t<std::remove_pointer_t<decltype(lab_ptr)>>>,
           grid, dim3(128), stream, ids_ptr, lab_ptr, t.sigma.data_ptr<float>(), t.val.data_ptr<float>(),
           t.ids.data_ptr<int32_t>(), t.labels.data_ptr<int32_t>(), t.s.data_ptr<float>(),
           t.first.data_ptr<int32_t>(), t.next.data_ptr<int32_t>(), d.num_classes, d.k_slots, d.n_tailors,
           d.samples);
  };
  const bool ids64 = ids_in.scalar_type() == at::kLong, lab64 = lab_in.scalar_type() == at::kLong;
  if (ids64 && lab64) run(ids_in.data_ptr<int64_t>(), lab_in.data_ptr<int64_t>());
  if (ids64 && !lab64) run(ids_in.data_ptr<int64_t>(), lab_in.data_ptr<int32_t>());
  if (!ids64 && lab64) run(ids_in.data_ptr<int32_t>(), lab_in.data_ptr<int64_t>());
  if (!ids64 && !lab64) run(ids_in.data_ptr<int32_t>(), lab_in.data_ptr<int32_t>());
  return t;
}

// (M, K) fp32 P ⊙ s[labels], rounded to `dtype`: the per-row scaled slot values.
Tensor scaled_slots(const Tensor& P, const Tables& t, const Dims& d, at::ScalarType dtype) {
  const Tensor s_b = t.s.index_select(0, t.labels);  // (B, K)
  return (P.view({d.samples, d.rows_per_sample, d.k_slots}) * s_b.unsqueeze(1)).to(dtype);
}

// ------------------------------------------------------------------------------------------
// Kernel launchers
// ------------------------------------------------------------------------------------------
// out (M, K) fp32 = the shrink of A against the rows of W that ids (indexed by labels32, one
// class per sample) selects. When M gives few row tiles and allow_split, the depth is split
// over blockIdx.z (about 4 blocks per SM of an H100, each split at least 256 deep) and the
// partial sums are added in a fixed order. Rows whose class is < 0 are not written.
template <typename T>
void run_shrink(const Tensor& A, const Tensor& W, const Tensor& ids, const Tensor& labels32, int k_slots,
                int64_t samples, int64_t rows_per_sample, Tensor& out, bool allow_split, Stream stream) {
  constexpr int64_t kTargetBlocks = 528, kMinSplitDepth = 256, kBK = k::kShrinkBK;
  const int64_t rows = A.size(0), depth = A.size(1);
  const unsigned tiles = k::num_row_tiles(samples, rows_per_sample, k::kShrinkBM);
  const unsigned slot_tiles = ceil_div(k_slots, k::kShrinkBN);
  const int64_t blocks = std::max<int64_t>(1, static_cast<int64_t>(tiles) * slot_tiles);
  int64_t splits = !allow_split ? 1 : std::max<int64_t>(1, std::min((kTargetBlocks + blocks - 1) / blocks,
                                                                    (depth + kMinSplitDepth - 1) / kMinSplitDepth));
  const int64_t split_depth = std::max<int64_t>(kBK, (depth + splits - 1) / splits + kBK - 1) / kBK * kBK;
  splits = std::max<int64_t>(1, (depth + split_depth - 1) / split_depth);  // no empty splits
  Tensor part = splits == 1 ? out : at::empty({splits, rows, k_slots}, out.options());
  const bool vec = depth % 8 == 0 && aligned16(A.data_ptr()) && aligned16(W.data_ptr());
  const auto kernel = vec ? k::shrink_kernel<T, true> : k::shrink_kernel<T, false>;
  launch(kernel, dim3(tiles, slot_tiles, static_cast<unsigned>(splits)), dim3(k::kThreads), stream,
         A.data_ptr<T>(), W.data_ptr<T>(), ids.data_ptr<int32_t>(), labels32.data_ptr<int32_t>(),
         part.data_ptr<float>(), rows, rows_per_sample, depth, split_depth, k_slots);
  if (splits > 1) {
    const int64_t n = rows * k_slots;
    launch(k::sum_splits_kernel, dim3(ceil_div(n, 256)), dim3(256), stream, part.data_ptr<float>(),
           out.data_ptr<float>(), n, static_cast<int>(splits));
  }
}

// Y = Base + (P ⊙ s[labels])·W[ids[labels]] row tile by row tile; Base is Y itself (in place,
// base_per_sample false) or one (T, N) matrix every sample adds to (base_per_sample true).
// Rows whose class is < 0 are not written.
template <typename T>
void run_expand(const Tensor& P, const Tensor& s, const Tensor& W, const Tensor& ids, const Tensor& labels32,
                int64_t samples, int64_t rows_per_sample, int k_slots, const Tensor& base, bool base_per_sample,
                Tensor& Y, Stream stream) {
  const int64_t width = Y.size(1);
  const dim3 grid(k::num_row_tiles(samples, rows_per_sample, k::kExpandBM), ceil_div(width, k::kExpandBN));
  const bool vec = width % 8 == 0 && aligned16(W.data_ptr()) && aligned16(base.data_ptr()) &&
                   aligned16(Y.data_ptr());
  const auto kernel = vec ? k::expand_kernel<T, true> : k::expand_kernel<T, false>;
  launch(kernel, grid, dim3(k::kThreads), stream, P.data_ptr<float>(), s.data_ptr<float>(), W.data_ptr<T>(),
         ids.data_ptr<int32_t>(), labels32.data_ptr<int32_t>(), base.data_ptr<T>(), base_per_sample, Y.data_ptr<T>(),
         rows_per_sample, width, k_slots);
}

template <typename T>
Tensor run_gather(const Tensor& H, const Tables& t, const Dims& d, Stream stream) {
  Tensor out = at::empty({d.rows, d.k_slots}, H.options().dtype(at::kFloat));
  launch(k::gather_slots_kernel<T>, dim3(ceil_div(d.rows * d.k_slots, 256)), dim3(256), stream, H.data_ptr<T>(),
         t.ids.data_ptr<int32_t>(), t.labels.data_ptr<int32_t>(), out.data_ptr<float>(), d.rows, d.rows_per_sample,
         d.k_slots, d.n_tailors);
  return out;
}

template <typename T>
Tensor run_scatter(const Tensor& P, const Tables& t, const Dims& d, const at::TensorOptions& opt, Stream stream) {
  Tensor Q = at::empty({d.rows, d.n_tailors}, opt);
  launch(k::scatter_slots_kernel<T>, dim3(ceil_div(d.rows * d.n_tailors, 256)), dim3(256), stream,
         P.data_ptr<float>(), t.s.data_ptr<float>(), t.first.data_ptr<int32_t>(), t.next.data_ptr<int32_t>(),
         t.labels.data_ptr<int32_t>(), Q.data_ptr<T>(), d.rows, d.rows_per_sample, d.k_slots, d.n_tailors);
  return Q;
}

template <typename T>
Tensor run_combine(const Tensor& R, const Tables& t, const Dims& d, const at::TensorOptions& opt, Stream stream) {
  const int64_t width = R.size(2);
  Tensor dW = at::empty({d.n_tailors, width}, opt);
  launch(k::combine_slots_kernel<T>, dim3(static_cast<unsigned>(d.n_tailors), ceil_div(width, 128)), dim3(128),
         stream, R.data_ptr<T>(), t.first.data_ptr<int32_t>(), t.next.data_ptr<int32_t>(),
         t.labels.data_ptr<int32_t>(), dW.data_ptr<T>(), d.samples, d.k_slots, d.n_tailors, width);
  return dW;
}

Tensor run_ds(const Tensor& dhs, const Tensor& h, const Dims& d, Stream stream) {
  const int64_t chunks = (d.rows_per_sample + k::kDsChunk - 1) / k::kDsChunk;
  Tensor part = at::empty({d.samples, chunks, d.k_slots}, dhs.options());
  Tensor ds = at::empty({d.samples, d.k_slots}, dhs.options());
  launch(k::ds_partial_kernel, dim3(static_cast<unsigned>(d.samples * chunks)), dim3(128), stream,
         dhs.data_ptr<float>(), h.data_ptr<float>(), part.data_ptr<float>(), d.rows_per_sample, d.k_slots);
  launch(k::ds_final_kernel, dim3(ceil_div(d.samples * d.k_slots, 256)), dim3(256), stream, part.data_ptr<float>(),
         ds.data_ptr<float>(), d.samples, chunks, d.k_slots);
  return ds;
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> kind_linear_forward(const Tensor& x_, const Tensor& w_g_, const std::optional<Tensor>& bias_,
                                               const Tensor& u_t_, const Tensor& sigma_t, const Tensor& v_t_,
                                               const Tensor& idx, const Tensor& val, const Tensor& labels) {
  const char* op = "kind_fast::kind_linear_cuda";
  const Dims d = check_inputs(op, x_, w_g_, bias_, u_t_, sigma_t, v_t_, idx, val, labels);
  DeviceGuard guard(x_.device());
  const Stream stream = current_stream();
  const Tensor x = x_.contiguous(), w_g = w_g_.contiguous(), u_t = u_t_.contiguous(), v_t = v_t_.contiguous();

  // dense learngene part on cuBLAS: y = x·W_Gᵀ + b
  Tensor y = bias_.has_value() ? at::addmm(*bias_, x, w_g.t()) : at::mm(x, w_g.t());
  if (d.rows == 0 || d.k_slots == 0 || d.n_tailors == 0) {
    return {y, at::zeros({d.rows, d.k_slots}, x.options().dtype(at::kFloat))};
  }
  const Tables t = make_tables(d, sigma_t, idx, val, labels, stream);
  Tensor h;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "kind_linear_cuda", [&] {
    if (sample_plan(d)) {
      h = at::empty({d.rows, d.k_slots}, x.options().dtype(at::kFloat));
      run_shrink<scalar_t>(x, v_t, t.ids, t.labels, d.k_slots, d.samples, d.rows_per_sample, h, true,
                           stream);  // h = x·V_T[ids]ᵀ
      run_expand<scalar_t>(h, t.s, u_t, t.ids, t.labels, d.samples, d.rows_per_sample, d.k_slots, y, false, y,
                           stream);  // y += (h⊙s)·U_T[ids]
    } else {
      h = run_gather<scalar_t>(at::mm(x, v_t.t()), t, d, stream);        // all N_T on cuBLAS, keep K
      Tensor q = run_scatter<scalar_t>(h, t, d, x.options(), stream);  // (M, N_T): h⊙s at the tailor ids
      y.addmm_(q, u_t);
    }
  });
  return {y, h};
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

Grads kind_linear_backward(const Tensor& grad_y, const Tensor& x_, const Tensor& w_g_, const Tensor& u_t_,
                           const Tensor& sigma_t, const Tensor& v_t_, const Tensor& idx, const Tensor& val,
                           const Tensor& labels, const Tensor& h_, c10::List<bool> output_mask) {
  const char* op = "kind_fast::kind_linear_cuda_backward";
  const Dims d = check_inputs(op, x_, w_g_, std::nullopt, u_t_, sigma_t, v_t_, idx, val, labels);
  TORCH_CHECK(output_mask.size() == 7, op, ": output_mask must have 7 entries, got ", output_mask.size());
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == d.rows && grad_y.size(1) == d.n_out, op, ": grad_y must be (",
              d.rows, ", ", d.n_out, "), got ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x_.scalar_type(), op, ": grad_y dtype ", grad_y.scalar_type(),
              " != x dtype ", x_.scalar_type());
  TORCH_CHECK(h_.dim() == 2 && h_.size(0) == d.rows && h_.size(1) == d.k_slots && h_.scalar_type() == at::kFloat, op,
              ": h must be the forward's (", d.rows, ", ", d.k_slots, ") float32 output, got ", h_.sizes(), " ",
              h_.scalar_type());
  check_device(op, x_, grad_y, "grad_y");
  check_device(op, x_, h_, "h");
  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2],
             need_du = output_mask[3], need_ds = output_mask[4], need_dv = output_mask[5],
             need_dval = output_mask[6];
  DeviceGuard guard(x_.device());
  const Stream stream = current_stream();
  const Tensor g = grad_y.contiguous(), x = x_.contiguous(), w_g = w_g_.contiguous(), u_t = u_t_.contiguous(),
               v_t = v_t_.contiguous(), h = h_.contiguous();
  auto empty = [&] { return at::empty({0}, x.options()); };  // a fresh one per output (no aliasing)

  Tensor dx = need_dx ? at::mm(g, w_g) : empty();
  Tensor dw = need_dw ? at::mm(g.t(), x) : empty();
  Tensor db = need_db ? at::sum(g, {0}, /*keepdim=*/false, at::kFloat).to(x.scalar_type()) : empty();
  // (every requested tailor gradient is written below; zeros only when there is nothing to add)
  Tensor du = empty(), dv = empty(), dsig = empty(), dval = empty();
  const bool need_dhs = need_dx || need_dv || need_ds || need_dval;
  if (d.rows == 0 || d.k_slots == 0 || d.n_tailors == 0 || !(need_dhs || need_du)) {
    if (need_du) du = at::zeros_like(u_t);
    if (need_dv) dv = at::zeros_like(v_t);
    if (need_ds) dsig = at::zeros_like(sigma_t);
    if (need_dval) dval = at::zeros_like(val);
    return {dx, dw, db, du, dsig, dv, dval};
  }
  const Tables t = make_tables(d, sigma_t, idx, val, labels, stream);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dhs;  // (M, K) fp32: g·U_T[ids]ᵀ
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "kind_linear_cuda_backward", [&] {
    if (sample_plan(d)) {
      const auto bview = [&](const Tensor& a) { return a.view({d.samples, d.rows_per_sample, a.size(1)}); };
      if (need_dhs) {
        dhs = at::empty({d.rows, d.k_slots}, f32);
        run_shrink<scalar_t>(g, u_t, t.ids, t.labels, d.k_slots, d.samples, d.rows_per_sample, dhs, true, stream);
      }
      if (need_dx) {
        run_expand<scalar_t>(dhs, t.s, v_t, t.ids, t.labels, d.samples, d.rows_per_sample, d.k_slots, dx, false,
                             dx, stream);
      }
      if (need_du) {  // R[b] = (h⊙s)_bᵀ·g_b, then dU_T[n] = Σ over (b, k) with ids = n
        const Tensor r = at::bmm(scaled_slots(h, t, d, x.scalar_type()).transpose(1, 2), bview(g));
        du = run_combine<scalar_t>(r.contiguous(), t, d, u_t.options(), stream);
      }
      if (need_dv) {
        const Tensor r = at::bmm(scaled_slots(dhs, t, d, x.scalar_type()).transpose(1, 2), bview(x));
        dv = run_combine<scalar_t>(r.contiguous(), t, d, v_t.options(), stream);
      }
    } else {
      Tensor qd;  // (M, N_T): dhs⊙s at the tailor ids
      if (need_dhs) dhs = run_gather<scalar_t>(at::mm(g, u_t.t()), t, d, stream);
      if (need_dx || need_dv) qd = run_scatter<scalar_t>(dhs, t, d, x.options(), stream);
      if (need_dx) dx.addmm_(qd, v_t);
      if (need_du) du = at::mm(run_scatter<scalar_t>(h, t, d, x.options(), stream).t(), g);
      if (need_dv) dv = at::mm(qd.t(), x);
    }
  });
  if (need_ds || need_dval) {
    const Tensor ds = run_ds(dhs, h, d, stream);  // (B, K)
    if (need_ds) {
      Tensor acc = at::empty({d.n_tailors}, f32);
      launch(k::dsigma_kernel, dim3(ceil_div(d.n_tailors, 128)), dim3(128), stream, ds.data_ptr<float>(),
             t.val.data_ptr<float>(), t.first.data_ptr<int32_t>(), t.next.data_ptr<int32_t>(),
             t.labels.data_ptr<int32_t>(), acc.data_ptr<float>(), d.samples, d.k_slots, d.n_tailors);
      dsig = acc.to(sigma_t.scalar_type());
    }
    if (need_dval) {
      Tensor acc = at::empty({d.num_classes, d.k_slots}, f32);
      launch(k::dval_kernel, dim3(ceil_div(d.num_classes * d.k_slots, 128)), dim3(128), stream, ds.data_ptr<float>(),
             t.sigma.data_ptr<float>(), t.ids.data_ptr<int32_t>(), t.labels.data_ptr<int32_t>(),
             acc.data_ptr<float>(), d.samples, d.num_classes, d.k_slots);
      dval = acc.to(val.scalar_type());
    }
  }
  return {dx, dw, db, du, dsig, dv, dval};
}

// ------------------------------------------------------------------------------------------
// Path M3 (sampling, no autograd): merged weights, dense GEMMs on cuBLAS
// ------------------------------------------------------------------------------------------
// The B samples form G = merged_groups(B, max_classes) equal groups of consecutive samples
// (G is the largest divisor of B that is <= max_classes: known on the host, so no sync).
// Group g uses one merged weight, for the class c_g of its first sample (read on the device):
//     W_g = W_G + U_T[ids_g]ᵀ · diag(s_g) · V_T[ids_g]          (one expand pass, base W_G)
//     y[rows of g] = x[rows of g] · W_gᵀ + b                     (cuBLAS, bias in its epilogue)
// A sample b of group g whose class c_b != c_g gets the exact correction
//     y_b += x_b · (U_T[ids_b]ᵀ diag(s_b) V_T[ids_b] - U_T[ids_g]ᵀ diag(s_g) V_T[ids_g])ᵀ,
// path M1's shrink/expand on a per-sample gate of 2K slots ([ids_b, ids_g], [s_b, -s_g]);
// every other sample has class -1 there, and those kernels skip its tiles. CFG batches
// ([c]·n then [null]·n) with max_classes = 2 need no correction: two merges and two GEMMs.
// Any labels give kind_linear's result (up to rounding); few classes in long runs are fast.
int64_t merged_groups(int64_t samples, int64_t max_classes) {
  for (int64_t g = std::min(samples, max_classes); g > 1; --g) {
    if (samples % g == 0) return g;
  }
  return 1;
}

Tensor kind_linear_merged(const Tensor& x_, const Tensor& w_g_, const std::optional<Tensor>& bias_,
                          const Tensor& u_t_, const Tensor& sigma_t, const Tensor& v_t_, const Tensor& idx,
                          const Tensor& val, const Tensor& labels, int64_t max_classes) {
  const char* op = "kind_fast::kind_linear_cuda_merged";
  const Dims d = check_inputs(op, x_, w_g_, bias_, u_t_, sigma_t, v_t_, idx, val, labels);
  TORCH_CHECK(max_classes >= 1 && max_classes <= 1024, op, ": max_classes must be in [1, 1024], got ", max_classes);
  DeviceGuard guard(x_.device());
  const Stream stream = current_stream();
  const Tensor x = x_.contiguous(), w_g = w_g_.contiguous(), u_t = u_t_.contiguous(), v_t = v_t_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  if (d.rows == 0 || d.k_slots == 0 || d.n_tailors == 0) {
    return bias.defined() ? at::addmm(bias, x, w_g.t()) : at::mm(x, w_g.t());
  }
  const Tables t = make_tables(d, sigma_t, idx, val, labels, stream);  // range checks included
  const int64_t groups = merged_groups(d.samples, max_classes), per_group = d.samples / groups;
  const int k2 = 2 * d.k_slots;
  auto iopt = t.labels.options();
  Tensor group_class = at::empty({groups}, iopt);
  Tensor which = at::empty({d.samples}, iopt), ids2 = at::empty({d.samples, k2}, iopt);
  Tensor s2 = at::empty({d.samples, k2}, t.s.options());
  launch(k::merged_plan_kernel, dim3(ceil_div(d.samples, 128)), dim3(128), stream, t.ids.data_ptr<int32_t>(),
         t.s.data_ptr<float>(), t.labels.data_ptr<int32_t>(), group_class.data_ptr<int32_t>(),
         which.data_ptr<int32_t>(), ids2.data_ptr<int32_t>(), s2.data_ptr<float>(),
         d.samples, per_group, d.k_slots);
  Tensor y = at::empty({d.rows, d.n_out}, x.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "kind_linear_cuda_merged", [&] {
    // merged weights (G·out, in) = W_G + expand of the gathered U_T rows (fp32, (G·out, K)):
    // "samples" are the groups, each with out rows and the class of its first sample
    Tensor ug = at::empty({groups * d.n_out, d.k_slots}, x.options().dtype(at::kFloat));
    launch(k::gather_left_kernel<scalar_t>, dim3(ceil_div(groups * d.n_out * d.k_slots, 256)), dim3(256), stream,
           u_t.data_ptr<scalar_t>(), t.ids.data_ptr<int32_t>(), group_class.data_ptr<int32_t>(),
           ug.data_ptr<float>(), groups, d.n_out, d.k_slots);
    Tensor wm = at::empty({groups * d.n_out, d.n_in}, x.options());
    run_expand<scalar_t>(ug, t.s, v_t, t.ids, group_class, groups, d.n_out, d.k_slots, w_g, true, wm, stream);
    // one cuBLAS GEMM per group, written into its rows of y
    const int64_t rows_per_group = per_group * d.rows_per_sample;
    for (int64_t g = 0; g < groups; ++g) {
      Tensor y_g = y.narrow(0, g * rows_per_group, rows_per_group);
      const Tensor x_g = x.narrow(0, g * rows_per_group, rows_per_group);
      const Tensor w_t = wm.narrow(0, g * d.n_out, d.n_out).t();
      if (bias.defined()) {
        at::addmm_out(y_g, bias, x_g, w_t);
      } else {
        at::mm_out(y_g, x_g, w_t);
      }
    }
    if (groups == d.samples) return;  // one sample per group: each got its own class's weight
    // the correction of the samples whose class differs from their group's (which[b] >= 0)
    Tensor h2 = at::empty({d.rows, k2}, x.options().dtype(at::kFloat));  // only those rows are written
    run_shrink<scalar_t>(x, v_t, ids2, which, k2, d.samples, d.rows_per_sample, h2, false, stream);
    run_expand<scalar_t>(h2, s2, u_t, ids2, which, d.samples, d.rows_per_sample, k2, y, false, y, stream);
  });
  return y;
}

// ------------------------------------------------------------------------------------------
// Path M3's segmented GEMM on cuBLAS (the op family's cached path: merged weights come from the
// layer's cache, so only the GEMM runs per call)
// ------------------------------------------------------------------------------------------
// kind_linear_cuda_merged_gemm(x, weights, bias, slots), the schema and semantics of
// kind_fast::kind_linear_merged_gemm: with B = slots.size(0) samples of T = M / B rows,
//     y[m] = x[m] · weights[slots[m / T]]ᵀ + b
// and its backward (kind_linear_cuda_merged_gemm_backward, output_mask [dx, dweights, dbias]):
//     dx[m] = g[m] · weights[slots[m / T]]      dweights[s] = Σ_{m: slot s} g[m]ᵀ · x[m]      db = Σ_m g[m]
// Every GEMM is cuBLAS through ATen (no hand-written GEMM). Two plans, chosen by where the
// slots live:
//   host slots (a CPU tensor, e.g. the op family's once-per-labels host copy): read here for
//       free. Each slot whose samples form one run of consecutive samples gets one GEMM on
//       those rows (at::addmm_out into y's row slice: cuBLAS with the bias in its epilogue, no
//       copy) - a CFG batch [c]*n + [null]*n is two GEMMs, a dense layer's cost. (at::bmm over
//       uniform groups would have no bias epilogue: adding b after costs a read and a write of
//       y, ~30 % of fc1's GEMM.) When some slot's samples are scattered, the rows are gathered
//       into slot order once (one index_select of x), one GEMM per slot runs on contiguous rows,
//       and one index_copy_ puts them back (the order goes to the device by an asynchronous copy
//       from pinned memory); during CUDA-graph capture (no host-to-device copy of the order
//       allowed) each run gets its own GEMM instead.
//   device slots (on x's device): never read on the host (no synchronisation, capture-safe):
//       every slot's GEMM runs on all rows and each sample keeps its own slot's result (S × the
//       FLOPs of the host plan; exact). Slots out of [0, S) trip a device-side assertion.
namespace merged_gemm {

struct Problem {
  int64_t rows, n_in, n_out, n_slots, samples, rows_per_sample;
};

Problem check(const char* op, const Tensor& x, const Tensor& weights, const std::optional<Tensor>& bias,
              const Tensor& slots) {
  check_x(op, x);
  TORCH_CHECK(weights.dim() == 3 && weights.size(0) >= 1 && weights.size(2) == x.size(1), op,
              ": weights must be (S >= 1, out_features, ", x.size(1), "), got ", weights.sizes());
  TORCH_CHECK(weights.scalar_type() == x.scalar_type(), op, ": weights dtype ", weights.scalar_type(),
              " != x dtype ", x.scalar_type());
  check_device(op, x, weights, "weights");
  const int64_t n_out = weights.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n_out, op, ": bias must be (", n_out, ",), got ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias dtype ", bias->scalar_type(), " != x dtype ",
                x.scalar_type());
    check_device(op, x, *bias, "bias");
  }
  TORCH_CHECK(slots.dim() == 1 && (slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong), op,
              ": slots must be a 1-D int32 or int64 tensor, got shape ", slots.sizes(), " dtype ", slots.scalar_type());
  TORCH_CHECK(slots.device() == x.device() || slots.device().is_cpu(), op, ": slots must be on x's device (",
              x.device(), ") or on the CPU (host slots), got ", slots.device());
  Problem p{x.size(0), x.size(1), n_out, weights.size(0), slots.size(0), 0};
  TORCH_CHECK(p.rows == 0 || p.samples > 0, op, ": slots is empty but x has ", p.rows, " rows");
  TORCH_CHECK(p.samples == 0 || p.rows % p.samples == 0, op, ": x has ", p.rows, " rows, not a multiple of the ",
              p.samples, " samples in slots (rows must be grouped by sample)");
  p.rows_per_sample = p.samples > 0 ? p.rows / p.samples : 0;
  return p;
}

// A segment: `samples` consecutive samples (of the order the plan runs in) starting at `first`,
// all of slot `slot`.
struct Segment {
  int64_t slot, first, samples;
};

// The host plan: the segments, in the samples' own order (order undefined) or, when some slot's
// samples are scattered and a gather is allowed, in slot order (order: (B,) int64 sample ids
// on x's device, a stable sort by slot).
struct HostPlan {
  std::vector<Segment> segments;
  Tensor order;
};

HostPlan host_plan(const char* op, const Tensor& slots, const Problem& p, const at::Device& device, bool allow_gather) {
  const Tensor s = slots.to(at::kLong).contiguous();
  const int64_t* v = s.data_ptr<int64_t>();
  std::vector<int64_t> runs_of(p.n_slots, 0);
  HostPlan plan;
  for (int64_t b = 0; b < p.samples; ++b) {
    TORCH_CHECK(v[b] >= 0 && v[b] < p.n_slots, op, ": slots out of range: sample ", b, " has slot ", v[b],
                ", expected [0, ", p.n_slots, ")");
    if (plan.segments.empty() || plan.segments.back().slot != v[b]) {
      plan.segments.push_back({v[b], b, 1});
      ++runs_of[v[b]];
    } else {
      ++plan.segments.back().samples;
    }
  }
  bool scattered = false;
  for (int64_t r : runs_of) scattered = scattered || r > 1;
  if (!scattered || !allow_gather) return plan;
  std::vector<int64_t> order(p.samples);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] < v[b]; });
  plan.segments.clear();
  for (int64_t i = 0; i < p.samples; ++i) {
    const int64_t slot = v[order[i]];
    if (plan.segments.empty() || plan.segments.back().slot != slot) {
      plan.segments.push_back({slot, i, 1});
    } else {
      ++plan.segments.back().samples;
    }
  }
#ifdef KIND_FAST_EMULATE
  plan.order = at::tensor(order, at::TensorOptions().dtype(at::kLong)).to(device);
#else
  // staged in pinned memory: an asynchronous copy (a pageable one would synchronise the stream)
  Tensor staged = at::empty({p.samples}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(order.begin(), order.end(), staged.data_ptr<int64_t>());
  plan.order = staged.to(device, /*non_blocking=*/true);
#endif
  return plan;
}

Tensor rows_of(const Tensor& a, const Segment& seg, int64_t rows_per_sample) {
  return a.narrow(0, seg.first * rows_per_sample, seg.samples * rows_per_sample);
}

// (B, T, width) view of a 2-D (M, width) tensor, gathered into the plan's order when it has one.
Tensor in_order(const Tensor& a, const HostPlan& plan, const Problem& p) {
  if (!plan.order.defined()) return a;
  return a.view({p.samples, p.rows_per_sample, a.size(1)}).index_select(0, plan.order).view({p.rows, a.size(1)});
}

// out (M, width) rows in the samples' own order from `a` in the plan's order.
void from_order(Tensor& out, const Tensor& a, const HostPlan& plan, const Problem& p) {
  const int64_t width = out.size(1);
  out.view({p.samples, p.rows_per_sample, width})
      .index_copy_(0, plan.order, a.view({p.samples, p.rows_per_sample, width}));
}

// Which plan runs: host (slots on the CPU; runs, or a gather into slot order when some slot's
// samples are scattered), host_runs (host slots, one GEMM per run: what host does during
// CUDA-graph capture), device (slots never read on the host).
enum class Plan { host = 0, host_runs = 1, device = 2 };

Plan plan_for(const Tensor& x, const Tensor& slots) {
#ifdef KIND_FAST_EMULATE
  (void)x;
  (void)slots;
  return Plan::host;  // every tensor is a CPU tensor here; test-only ops run the other plans
#else
  if (!slots.device().is_cpu()) return Plan::device;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(x.device().index()), &status));
  return status == cudaStreamCaptureStatusNone ? Plan::host : Plan::host_runs;
#endif
}

// Per-sample mask (B, 1, 1) of the samples whose device slot is s.
Tensor slot_mask(const Tensor& slots_long, int64_t s) { return slots_long.eq(s).view({-1, 1, 1}); }

void assert_device_slots(const Tensor& slots_long, int64_t n_slots) {
  at::_assert_async(slots_long.ge(0).logical_and(slots_long.lt(n_slots)).all(),
                    "kind_linear_cuda_merged_gemm: slots out of range [0, S)");
}

Tensor forward(const Tensor& x_, const Tensor& weights_, const std::optional<Tensor>& bias_, const Tensor& slots,
               Plan how) {
  const char* op = "kind_fast::kind_linear_cuda_merged_gemm";
  const Problem p = check(op, x_, weights_, bias_, slots);
  TORCH_CHECK(how != Plan::device || slots.device() == x_.device(), op, ": the device plan needs slots on x's device");
  TORCH_CHECK(how == Plan::device || slots.device().is_cpu(), op, ": the host plan needs slots on the CPU");
  DeviceGuard guard(x_.device());
  const Tensor x = x_.contiguous(), w = weights_.contiguous();
  const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
  if (p.rows == 0) {
    return bias.defined() ? bias.expand({0, p.n_out}).contiguous() : at::empty({0, p.n_out}, x.options());
  }
  const auto gemm_out = [&](Tensor out, const Tensor& a, int64_t s) {
    if (bias.defined()) {
      at::addmm_out(out, bias, a, w.select(0, s).t());  // cuBLAS, bias in the epilogue
    } else {
      at::mm_out(out, a, w.select(0, s).t());
    }
  };
  Tensor y = at::empty({p.rows, p.n_out}, x.options());
  if (how != Plan::device) {
    const HostPlan plan = host_plan(op, slots, p, x.device(), how == Plan::host);
    const Tensor xs = in_order(x, plan, p);
    Tensor ys = plan.order.defined() ? at::empty_like(y) : y;
    for (const Segment& seg : plan.segments) {
      gemm_out(rows_of(ys, seg, p.rows_per_sample), rows_of(xs, seg, p.rows_per_sample), seg.slot);
    }
    if (plan.order.defined()) from_order(y, ys, plan, p);
    return y;
  }
  const Tensor sl = slots.to(at::kLong);
  assert_device_slots(sl, p.n_slots);
  gemm_out(y, x, 0);
  auto y3 = y.view({p.samples, p.rows_per_sample, p.n_out});
  for (int64_t s = 1; s < p.n_slots; ++s) {
    Tensor ys = at::empty_like(y);
    gemm_out(ys, x, s);
    y3.copy_(at::where(slot_mask(sl, s), ys.view_as(y3), y3));
  }
  return y;
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_y, const Tensor& x_, const Tensor& weights_,
                                            const Tensor& slots, c10::List<bool> output_mask, Plan how) {
  const char* op = "kind_fast::kind_linear_cuda_merged_gemm_backward";
  const Problem p = check(op, x_, weights_, std::nullopt, slots);
  TORCH_CHECK(output_mask.size() == 3, op, ": output_mask must have 3 entries (dx, dweights, dbias), got ",
              output_mask.size());
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.rows && grad_y.size(1) == p.n_out &&
                  grad_y.scalar_type() == x_.scalar_type(),
              op, ": grad_y must be (", p.rows, ", ", p.n_out, ") of x's dtype, got ", grad_y.sizes(), " ",
              grad_y.scalar_type());
  check_device(op, x_, grad_y, "grad_y");
  TORCH_CHECK(how != Plan::device || slots.device() == x_.device(), op, ": the device plan needs slots on x's device");
  TORCH_CHECK(how == Plan::device || slots.device().is_cpu(), op, ": the host plan needs slots on the CPU");
  DeviceGuard guard(x_.device());
  const bool need_dx = output_mask.get(0), need_dw = output_mask.get(1), need_db = output_mask.get(2);
  const Tensor x = x_.contiguous(), w = weights_.contiguous(), g = grad_y.contiguous();
  const auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor dx = need_dx ? at::empty_like(x) : empty();
  Tensor dw = need_dw ? at::zeros_like(w) : empty();
  Tensor db = need_db ? at::sum(g, {0}, /*keepdim=*/false, at::kFloat).to(x.scalar_type()) : empty();
  if (p.rows == 0 || !(need_dx || need_dw)) {
    if (need_dx) dx.zero_();
    return {dx, dw, db};
  }
  if (how != Plan::device) {
    const HostPlan plan = host_plan(op, slots, p, x.device(), how == Plan::host);
    const Tensor gs = in_order(g, plan, p);
    const Tensor xs = need_dw ? in_order(x, plan, p) : Tensor();
    Tensor dxs = need_dx ? (plan.order.defined() ? at::empty_like(x) : dx) : Tensor();
    std::vector<int64_t> seen(p.n_slots, 0);
    for (const Segment& seg : plan.segments) seen[seg.slot] += 1;
    std::vector<Tensor> acc(p.n_slots);  // fp32 sums for slots with several runs (host_runs only)
    for (const Segment& seg : plan.segments) {
      const Tensor g_s = rows_of(gs, seg, p.rows_per_sample);
      if (need_dx) {
        Tensor out = rows_of(dxs, seg, p.rows_per_sample);
        at::mm_out(out, g_s, w.select(0, seg.slot));
      }
      if (need_dw) {
        const Tensor x_s = rows_of(xs, seg, p.rows_per_sample);
        if (seen[seg.slot] == 1) {
          Tensor out = dw.select(0, seg.slot);
          at::mm_out(out, g_s.t(), x_s);
        } else {
          const Tensor part = at::mm(g_s.t(), x_s).to(at::kFloat);
          acc[seg.slot] = acc[seg.slot].defined() ? acc[seg.slot].add_(part) : part;
        }
      }
    }
    for (int64_t s = 0; s < p.n_slots; ++s) {
      if (acc[s].defined()) dw.select(0, s).copy_(acc[s]);
    }
    if (need_dx && plan.order.defined()) from_order(dx, dxs, plan, p);
    return {dx, dw, db};
  }
  const Tensor sl = slots.to(at::kLong);
  assert_device_slots(sl, p.n_slots);
  const auto g3 = g.view({p.samples, p.rows_per_sample, p.n_out});
  auto dx3 = need_dx ? dx.view({p.samples, p.rows_per_sample, p.n_in}) : Tensor();
  for (int64_t s = 0; s < p.n_slots; ++s) {
    const Tensor mask = slot_mask(sl, s);
    if (need_dx) {
      const Tensor part = at::mm(g, w.select(0, s)).view_as(dx3);
      if (s == 0) {
        dx3.copy_(part);
      } else {
        dx3.copy_(at::where(mask, part, dx3));
      }
    }
    if (need_dw) {
      Tensor out = dw.select(0, s);
      at::mm_out(out, g3.mul(mask).view({p.rows, p.n_out}).t(), x);
    }
  }
  return {dx, dw, db};
}

}  // namespace merged_gemm

// The registered ops: the plan follows where the slots are (CPU: host plan).
Tensor kind_linear_merged_gemm(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& bias,
                               const Tensor& slots) {
  return merged_gemm::forward(x, weights, bias, slots, merged_gemm::plan_for(x, slots));
}

std::tuple<Tensor, Tensor, Tensor> kind_linear_merged_gemm_backward(const Tensor& grad_y, const Tensor& x,
                                                                    const Tensor& weights, const Tensor& slots,
                                                                    c10::List<bool> output_mask) {
  return merged_gemm::backward(grad_y, x, weights, slots, output_mask, merged_gemm::plan_for(x, slots));
}

}  // namespace
}  // namespace kind_fast

TORCH_LIBRARY_IMPL(KF_OP_NAMESPACE, KF_DISPATCH_KEY, m) {
  m.impl("kind_linear_cuda", TORCH_FN(kind_fast::kind_linear_forward));
  m.impl("kind_linear_cuda_backward", TORCH_FN(kind_fast::kind_linear_backward));
  m.impl("kind_linear_cuda_merged", TORCH_FN(kind_fast::kind_linear_merged));
  m.impl("kind_linear_cuda_merged_gemm", TORCH_FN(kind_fast::kind_linear_merged_gemm));
  m.impl("kind_linear_cuda_merged_gemm_backward", TORCH_FN(kind_fast::kind_linear_merged_gemm_backward));
}
