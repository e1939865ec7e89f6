// Host side of the CUDA backend: the registered ops, argument checks, and the orchestration
// of cuBLAS (through ATen) and our kernels (kind_linear_kernels.cuh).
//
// Ops (schemas in module.cpp; same contract as the reference kind_fast::kind_linear*):
//   kind_linear_cuda           (x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels) -> (y, h)
//   kind_linear_cuda_backward  (grad_y, x, w_g, u_t, sigma_t, v_t, idx, val, labels, h, mask) -> 7 grads
//   kind_linear_cuda_merged    (x, w_g, bias, u_t, sigma_t, v_t, idx, val, labels, max_classes) -> y
//
// Plans (as the reference's tailor_plan, so both pick the same one for a shape):
//   sample (T >= K and K < N_T): y = x·W_Gᵀ + b (cuBLAS), h = shrink(x, V_T), y += expand(h⊙s, U_T).
//       Backward: dhs = shrink(g, U_T), dx = g·W_G (cuBLAS) + expand(dhs⊙s, V_T); dU_T and dV_T
//       from per-sample products (cuBLAS bmm, (B, K, J)) folded onto the tailors by `combine`.
//   row (otherwise): the tailor GEMMs run over all N_T tailors on cuBLAS, and gather/scatter
//       move between those N_T columns and each row's K slots.
//   Then ds (per sample), dσ_T and dval by fixed-order reductions.
// Nothing synchronises with the host; everything runs on the current stream.
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>
#include <tuple>

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

constexpr int kShrinkBM = 64, kShrinkBN = 32;  // must match the kernels' tiles
constexpr int kExpandBM = 64, kExpandBN = 64;
constexpr int kSegBM = 64, kSegBN = 64;

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

struct Dims {
  int64_t rows, n_in, n_out, n_tailors, num_classes, samples, rows_per_sample;
  int k_slots;
};

Dims check_inputs(const char* op, const Tensor& x, const Tensor& w_g, const std::optional<Tensor>& bias,
                  const Tensor& u_t, const Tensor& sigma_t, const Tensor& v_t, const Tensor& idx, const Tensor& val,
                  const Tensor& labels) {
  TORCH_CHECK(x.device().type() == (kEmulated ? c10::DeviceType::CPU : c10::DeviceType::CUDA), op,
              ": x must be a ", kEmulated ? "CPU (emulated build)" : "CUDA", " tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": x must be float16 or bfloat16 (float32/float64 run on the reference backend), got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, in_features), got shape ", x.sizes());
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
  t.ids = idx.to(at::kInt).contiguous();
  t.labels = labels.to(at::kInt).contiguous();
  t.sigma = sigma_t.to(at::kFloat).contiguous();
  t.val = val.to(at::kFloat).contiguous();
  auto iopt = t.ids.options();
  t.first = at::empty({d.num_classes, d.n_tailors}, iopt);
  t.next = at::empty({d.num_classes, d.k_slots}, iopt);
  // the range checks run before anything indexes with ids or labels
  launch(k::gate_chains_kernel, dim3(ceil_div(d.num_classes, 128)), dim3(128), stream, t.ids.data_ptr<int32_t>(),
         t.first.data_ptr<int32_t>(), t.next.data_ptr<int32_t>(), d.num_classes, d.k_slots, d.n_tailors);
  launch(k::check_labels_kernel, dim3(ceil_div(d.samples, 128)), dim3(128), stream, t.labels.data_ptr<int32_t>(),
         d.samples, d.num_classes);
  t.s = (t.sigma.index_select(0, t.ids.reshape({-1})).view({d.num_classes, d.k_slots}) * t.val).contiguous();
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
// out (M, K) fp32 = the shrink of A against W's gathered rows. When M gives few row tiles,
// the depth is split over blockIdx.z (about 4 blocks per SM of an H100, each split at least 256
// deep) and the partial sums are added in a fixed order.
template <typename T>
void run_shrink(const Tensor& A, const Tensor& W, const Tables& t, const Dims& d, const Tensor& labels32,
                Tensor& out, Stream stream) {
  constexpr int64_t kTargetBlocks = 528, kMinSplitDepth = 256, kBK = 32;
  const int64_t depth = A.size(1);
  const unsigned tiles = k::num_row_tiles(d.samples, d.rows_per_sample, kShrinkBM);
  const unsigned slot_tiles = ceil_div(d.k_slots, kShrinkBN);
  const int64_t blocks = std::max<int64_t>(1, static_cast<int64_t>(tiles) * slot_tiles);
  int64_t splits = std::max<int64_t>(1, std::min((kTargetBlocks + blocks - 1) / blocks,
                                                 (depth + kMinSplitDepth - 1) / kMinSplitDepth));
  const int64_t split_depth = std::max<int64_t>(kBK, (depth + splits - 1) / splits + kBK - 1) / kBK * kBK;
  splits = std::max<int64_t>(1, (depth + split_depth - 1) / split_depth);  // no empty splits
  Tensor part = splits == 1 ? out : at::empty({splits, d.rows, d.k_slots}, out.options());
  launch(k::shrink_kernel<T>, dim3(tiles, slot_tiles, static_cast<unsigned>(splits)), dim3(k::kThreads), stream,
         A.data_ptr<T>(), W.data_ptr<T>(), t.ids.data_ptr<int32_t>(), labels32.data_ptr<int32_t>(),
         part.data_ptr<float>(), d.rows, d.rows_per_sample, depth, split_depth, d.k_slots);
  if (splits > 1) {
    const int64_t n = d.rows * d.k_slots;
    launch(k::sum_splits_kernel, dim3(ceil_div(n, 256)), dim3(256), stream, part.data_ptr<float>(),
           out.data_ptr<float>(), n, static_cast<int>(splits));
  }
}

template <typename T>
void run_expand(const Tensor& P, const Tensor& W, const Tables& t, const Tensor& labels32, int64_t samples,
                int64_t rows_per_sample, int k_slots, Tensor& Y, Stream stream) {
  const int64_t width = Y.size(1);
  const dim3 grid(k::num_row_tiles(samples, rows_per_sample, kExpandBM), ceil_div(width, kExpandBN));
  launch(k::expand_kernel<T>, grid, dim3(k::kThreads), stream, P.data_ptr<float>(), t.s.data_ptr<float>(),
         W.data_ptr<T>(), t.ids.data_ptr<int32_t>(), labels32.data_ptr<int32_t>(), Y.data_ptr<T>(), rows_per_sample,
         width, k_slots);
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
      run_shrink<scalar_t>(x, v_t, t, d, t.labels, h, stream);                             // h = x·V_T[ids]ᵀ
      run_expand<scalar_t>(h, u_t, t, t.labels, d.samples, d.rows_per_sample, d.k_slots, y, stream);  // y += (h⊙s)·U_T[ids]
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
  Tensor du = need_du ? at::zeros_like(u_t) : empty();
  Tensor dv = need_dv ? at::zeros_like(v_t) : empty();
  Tensor dsig = need_ds ? at::zeros_like(sigma_t) : empty();
  Tensor dval = need_dval ? at::zeros_like(val) : empty();
  const bool need_dhs = need_dx || need_dv || need_ds || need_dval;
  if (d.rows == 0 || d.k_slots == 0 || d.n_tailors == 0 || !(need_dhs || need_du)) {
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
        run_shrink<scalar_t>(g, u_t, t, d, t.labels, dhs, stream);
      }
      if (need_dx) run_expand<scalar_t>(dhs, v_t, t, t.labels, d.samples, d.rows_per_sample, d.k_slots, dx, stream);
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
// Path M3 (sampling, no autograd): merged weight per class for up to max_classes classes
// ------------------------------------------------------------------------------------------
Tensor kind_linear_merged(const Tensor& x_, const Tensor& w_g_, const std::optional<Tensor>& bias_,
                          const Tensor& u_t_, const Tensor& sigma_t, const Tensor& v_t_, const Tensor& idx,
                          const Tensor& val, const Tensor& labels, int64_t max_classes) {
  const char* op = "kind_fast::kind_linear_cuda_merged";
  const Dims d = check_inputs(op, x_, w_g_, bias_, u_t_, sigma_t, v_t_, idx, val, labels);
  TORCH_CHECK(max_classes >= 1 && max_classes <= 1024, op, ": max_classes must be in [1, 1024], got ", max_classes);
  DeviceGuard guard(x_.device());
  const Stream stream = current_stream();
  const Tensor x = x_.contiguous(), w_g = w_g_.contiguous(), u_t = u_t_.contiguous(), v_t = v_t_.contiguous();
  if (d.rows == 0 || d.k_slots == 0 || d.n_tailors == 0) {
    return bias_.has_value() ? at::addmm(*bias_, x, w_g.t()) : at::mm(x, w_g.t());
  }
  const Tables t = make_tables(d, sigma_t, idx, val, labels, stream);
  const int slots = static_cast<int>(std::min<int64_t>(max_classes, std::min(d.samples, d.num_classes)));
  auto iopt = t.labels.options();
  Tensor class_slot = at::empty({d.num_classes}, iopt), slot_class = at::empty({slots}, iopt);
  Tensor sample_slot = at::empty({d.samples}, iopt), rest_labels = at::empty({d.samples}, iopt);
  launch(k::assign_slots_kernel, dim3(1), dim3(256), stream, t.labels.data_ptr<int32_t>(),
         class_slot.data_ptr<int32_t>(), slot_class.data_ptr<int32_t>(), sample_slot.data_ptr<int32_t>(),
         rest_labels.data_ptr<int32_t>(), d.samples, d.num_classes, slots);
  Tensor y = at::empty({d.rows, d.n_out}, x.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "kind_linear_cuda_merged", [&] {
    // W_s = W_G + U_T[ids_c]ᵀ·diag(s_c)·V_T[ids_c] for each used slot s (class c): rows (s, o)
    // of Wm are "samples" of out rows each, so expand() adds the low-rank part.
    // (repeat always copies; expand().contiguous() would alias w_g when slots == 1)
    Tensor wm = w_g.unsqueeze(0).repeat({slots, 1, 1}).view({slots * d.n_out, d.n_in});
    Tensor ug = at::empty({slots, d.n_out, d.k_slots}, x.options().dtype(at::kFloat));
    launch(k::gather_left_kernel<scalar_t>, dim3(ceil_div(slots * d.n_out * d.k_slots, 256)), dim3(256), stream,
           u_t.data_ptr<scalar_t>(), t.ids.data_ptr<int32_t>(), slot_class.data_ptr<int32_t>(), ug.data_ptr<float>(),
           static_cast<int64_t>(slots), d.n_out, d.k_slots);
    Tensor ug2 = ug.view({slots * d.n_out, d.k_slots});
    run_expand<scalar_t>(ug2, v_t, t, slot_class, slots, d.n_out, d.k_slots, wm, stream);
    // y = x·W_slot(b)ᵀ + b for every sample (W_G for samples without a slot) ...
    const Tensor bias = bias_.has_value() ? bias_->contiguous() : Tensor();
    const scalar_t* bias_ptr = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    const dim3 grid(k::num_row_tiles(d.samples, d.rows_per_sample, kSegBM), ceil_div(d.n_out, kSegBN));
    launch(k::segmented_linear_kernel<scalar_t>, grid, dim3(k::kThreads), stream, x.data_ptr<scalar_t>(),
           wm.data_ptr<scalar_t>(), w_g.data_ptr<scalar_t>(), bias_ptr, sample_slot.data_ptr<int32_t>(),
           y.data_ptr<scalar_t>(), d.rows_per_sample, d.n_in, d.n_out);
    // ... and the tailor term of path M1 for those without one (their rest_labels >= 0)
    Tensor h = at::empty({d.rows, d.k_slots}, x.options().dtype(at::kFloat));
    run_shrink<scalar_t>(x, v_t, t, d, rest_labels, h, stream);
    run_expand<scalar_t>(h, u_t, t, rest_labels, d.samples, d.rows_per_sample, d.k_slots, y, stream);
  });
  return y;
}

}  // namespace
}  // namespace kind_fast

TORCH_LIBRARY_IMPL(KF_OP_NAMESPACE, KF_DISPATCH_KEY, m) {
  m.impl("kind_linear_cuda", TORCH_FN(kind_fast::kind_linear_forward));
  m.impl("kind_linear_cuda_backward", TORCH_FN(kind_fast::kind_linear_backward));
  m.impl("kind_linear_cuda_merged", TORCH_FN(kind_fast::kind_linear_merged));
}
