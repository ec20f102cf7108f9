// Registers the CUDA kernels as torch.ops.gessl_ext_C.* (CUDA dispatch key only; the Python layer in
// gessl_ext/ops defines the public custom ops and routes CUDA tensors here when this module loads).
#include <Python.h>
#include <torch/library.h>

#include "gessl_ops.h"

extern "C" {
// Importing gessl_ext._C runs the static registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "gessl_ext CUDA kernels", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(gessl_ext_C, m) {
  m.def("fd_perturb(Tensor theta, Tensor u, float radius, bool poison=False) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gessl_ext_C, CUDA, m) {
  m.impl("fd_perturb", &gessl_ext::fd_perturb_cuda);
}
