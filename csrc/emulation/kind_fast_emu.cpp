// The emulated build used by the CPU tests: the real kernel and launcher sources compiled as
// plain C++ (see cuda_emulation.h), registering the ops as kind_fast_emu::* for CPU tensors.
// Not part of the installed extension (setup.py skips csrc/emulation/).
#define KIND_FAST_EMULATE 1
#include "../kind_linear_cuda.cu"
#include "../module.cpp"

// Here every tensor is a CPU tensor, so kind_linear_cuda_merged_gemm always takes its host plan.
// These test-only ops run any plan of it: 0 host, 1 host_runs (what the host plan does during
// CUDA-graph capture), 2 device (slots never read on the host).
namespace kind_fast {
namespace {
merged_gemm::Plan plan_of(int64_t plan) {
  TORCH_CHECK(plan >= 0 && plan <= 2, "plan must be 0 (host), 1 (host_runs) or 2 (device), got ", plan);
  return static_cast<merged_gemm::Plan>(plan);
}
Tensor merged_gemm_plan(const Tensor& x, const Tensor& weights, const std::optional<Tensor>& bias,
                        const Tensor& slots, int64_t plan) {
  return merged_gemm::forward(x, weights, bias, slots, plan_of(plan));
}
std::tuple<Tensor, Tensor, Tensor> merged_gemm_backward_plan(const Tensor& grad_y, const Tensor& x,
                                                             const Tensor& weights, const Tensor& slots,
                                                             c10::List<bool> output_mask, int64_t plan) {
  return merged_gemm::backward(grad_y, x, weights, slots, output_mask, plan_of(plan));
}
}  // namespace
}  // namespace kind_fast

TORCH_LIBRARY_FRAGMENT(kind_fast_emu, m) {
  m.def("kind_linear_cuda_merged_gemm_plan(Tensor x, Tensor weights, Tensor? bias, Tensor slots, int plan) -> Tensor");
  m.def(
      "kind_linear_cuda_merged_gemm_backward_plan(Tensor grad_y, Tensor x, Tensor weights, Tensor slots, "
      "bool[] output_mask, int plan) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(kind_fast_emu, CPU, m) {
  m.impl("kind_linear_cuda_merged_gemm_plan", TORCH_FN(kind_fast::merged_gemm_plan));
  m.impl("kind_linear_cuda_merged_gemm_backward_plan", TORCH_FN(kind_fast::merged_gemm_backward_plan));
}
