// Host entry points of the gessl_ext CUDA kernels (registered in ops.cpp under torch.ops.gessl_ext_C).
// Every op works on row-major [rows, cols] buffers: one row per task, cols = flat parameter count.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gessl_ext {

// theta, u: [rows, cols]; radius: finite and nonzero, its sign the direction. Returns (theta + eps*u in
// theta's dtype, eps [rows]) with eps = radius / max(||u_row||, tiny(dtype)); eps is float32 (float64 for
// double inputs). poison: outputs start NaN-filled, so a test sees any element left unwritten.
std::tuple<at::Tensor, at::Tensor> fd_perturb_cuda(const at::Tensor& theta, const at::Tensor& u, double radius,
                                                   bool poison);

}  // namespace gessl_ext
