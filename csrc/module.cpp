// kind_fast._C: op schemas and the Python module that `import kind_fast._C` loads.
//
// The ops live in the `kind_fast` namespace beside the pure-PyTorch reference ops, which
// Python defines with torch.library.custom_op (itself a FRAGMENT of that namespace), so this
// file must use TORCH_LIBRARY_FRAGMENT: a second TORCH_LIBRARY(kind_fast, ...) would clash.
// Schemas are those of kind_fast::kind_linear / kind_linear_backward; fake (meta) kernels,
// autograd and FLOP formulas are added from Python in kind_fast/ops/kind_linear_cuda.py,
// which set_python_module names so torch.compile can find them.
#include <torch/library.h>

#ifndef KIND_FAST_EMULATE
#include <Python.h>
#include <torch/version.h>
#endif

#ifndef KF_OP_NAMESPACE
#define KF_OP_NAMESPACE kind_fast
#endif

namespace kind_fast {
const char* cuda_arch_list();
const char* cuda_runtime_version();
}  // namespace kind_fast

TORCH_LIBRARY_FRAGMENT(KF_OP_NAMESPACE, m) {
#ifndef KIND_FAST_EMULATE
  m.set_python_module("kind_fast.ops.kind_linear_cuda");
#endif
  m.def(
      "kind_linear_cuda(Tensor x, Tensor w_g, Tensor? bias, Tensor u_t, Tensor sigma_t, Tensor v_t, Tensor idx, "
      "Tensor val, Tensor labels) -> (Tensor, Tensor)");
  m.def(
      "kind_linear_cuda_backward(Tensor grad_y, Tensor x, Tensor w_g, Tensor u_t, Tensor sigma_t, Tensor v_t, "
      "Tensor idx, Tensor val, Tensor labels, Tensor h, bool[] output_mask) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor)");
  // path M3 (sampling): inference only, no autograd
  m.def(
      "kind_linear_cuda_merged(Tensor x, Tensor w_g, Tensor? bias, Tensor u_t, Tensor sigma_t, Tensor v_t, "
      "Tensor idx, Tensor val, Tensor labels, int max_classes) -> Tensor");
  // path M3 on cached merged weights: the schemas of kind_fast::kind_linear_merged_gemm(_backward)
  m.def("kind_linear_cuda_merged_gemm(Tensor x, Tensor weights, Tensor? bias, Tensor slots) -> Tensor");
  m.def(
      "kind_linear_cuda_merged_gemm_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor slots, "
      "bool[] output_mask) -> (Tensor, Tensor, Tensor)");
}

#ifndef KIND_FAST_EMULATE
// A plain module (no pybind11): importing it runs the registrations above; its attributes
// say what was built, for `python -m kind_fast.info`.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C",
                            "kind_fast's compiled CUDA backend (ops torch.ops.kind_fast.kind_linear_cuda*)", -1,
                            nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  PyObject* ops = Py_BuildValue("(sssss)", "kind_linear_cuda", "kind_linear_cuda_backward", "kind_linear_cuda_merged",
                                "kind_linear_cuda_merged_gemm", "kind_linear_cuda_merged_gemm_backward");
  if (ops == nullptr || PyModule_AddStringConstant(m, "ARCH_LIST", kind_fast::cuda_arch_list()) < 0 ||
      PyModule_AddStringConstant(m, "CUDA_VERSION", kind_fast::cuda_runtime_version()) < 0 ||
      PyModule_AddStringConstant(m, "TORCH_VERSION", TORCH_VERSION) < 0 || PyModule_AddObject(m, "OPS", ops) < 0) {
    Py_XDECREF(ops);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
