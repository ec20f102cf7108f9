// Host entry points of the gessl_ext CUDA kernels (registered in ops.cpp under torch.ops.gessl_ext_C).
// Every op works on row-major [rows, cols] buffers: one row per task, cols = flat parameter count.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace gessl_ext {

// theta, u: [rows, cols]. Returns (theta + eps*u, theta - eps*u, eps [rows]) with
// eps = radius / max(||u_row||, tiny(dtype)); eps is float32 (float64 for double inputs).
std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_perturb_cuda(
    const at::Tensor& theta, const at::Tensor& u, double radius, bool poison);

// u, g_plus, g_minus: [rows, cols]; eps: [rows] in u's accumulation dtype.
// Returns u - alpha * (g_plus - g_minus) / (2 * eps_row).
at::Tensor fd_update_cuda(const at::Tensor& u, const at::Tensor& g_plus, const at::Tensor& g_minus,
                          const at::Tensor& eps, double alpha, bool poison);

}  // namespace gessl_ext
