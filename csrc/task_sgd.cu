// Batched per-task inner SGD step over [rows, cols] task parameters: theta - lr * grad in one pass,
// optionally with ||grad_row|| accumulated from the same reads (per-block partials, then one block
// per row sums them in a fixed order).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "gessl_ops.h"
#include "rows_common.cuh"

namespace gessl_ext {
namespace {

template <typename scalar_t, int VEC, bool WITH_NORM>
__global__ void task_sgd_kernel(const scalar_t* __restrict__ theta, const scalar_t* __restrict__ grad, int64_t cols,
                                int blocks_per_row, at::opmath_type<scalar_t> lr, scalar_t* __restrict__ out,
                                at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int chunk = blockIdx.x % blocks_per_row;
  const int64_t offset = row * cols;
  const pack_t* theta_row = reinterpret_cast<const pack_t*>(theta + offset);
  const pack_t* grad_row = reinterpret_cast<const pack_t*>(grad + offset);
  pack_t* out_row = reinterpret_cast<pack_t*>(out + offset);
  const int64_t packs = cols / VEC;
  acc_t sumsq = 0;
  for (int64_t j = int64_t(chunk) * blockDim.x + threadIdx.x; j < packs; j += int64_t(blocks_per_row) * blockDim.x) {
    const pack_t t = theta_row[j];
    const pack_t g = grad_row[j];
    pack_t r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t gk = static_cast<acc_t>(g.v[k]);
      r.v[k] = static_cast<scalar_t>(static_cast<acc_t>(t.v[k]) - lr * gk);
      if constexpr (WITH_NORM) sumsq += gk * gk;
    }
    out_row[j] = r;
  }
  if constexpr (WITH_NORM) {
    sumsq = block_sum(sumsq);
    if (threadIdx.x == 0) partials[row * blocks_per_row + chunk] = sumsq;
  }
}

template <typename acc_t>
__global__ void row_norm_kernel(const acc_t* __restrict__ partials, int blocks_per_row, acc_t* __restrict__ norm) {
  const acc_t sumsq = sum_row_partials(partials + int64_t(blockIdx.x) * blocks_per_row, blocks_per_row);
  if (threadIdx.x == 0) norm[blockIdx.x] = sqrt(sumsq);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> task_sgd_cuda(const at::Tensor& theta_in, const at::Tensor& grad_in, double lr,
                                                 bool return_norm, bool poison) {
  TORCH_CHECK(theta_in.dim() == 2, "task_sgd: theta must be [rows, cols], got ", theta_in.sizes());
  const at::Tensor theta = checked_rows(theta_in, theta_in, "theta");
  const at::Tensor grad = checked_rows(grad_in, theta_in, "grad");
  const c10::cuda::CUDAGuard device_guard(theta.device());
  const int64_t rows = theta.size(0);
  const int64_t cols = theta.size(1);
  const auto acc_dtype = at::toOpMathType(theta.scalar_type());
  at::Tensor out = new_output(theta, poison);
  at::Tensor norm = new_row_vector(return_norm ? rows : 0, acc_dtype, theta, poison);
  if (rows == 0) return {out, norm};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "task_sgd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* theta_ptr = theta.const_data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(cols, {theta_ptr, grad_ptr, out_ptr}, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int bpr = blocks_per_row(task_sgd_kernel<scalar_t, VEC, true>, rows, cols, VEC);
      const auto grid = static_cast<unsigned int>(rows * bpr);
      if (return_norm) {
        at::Tensor partials = at::empty({rows * bpr}, theta.options().dtype(acc_dtype));
        task_sgd_kernel<scalar_t, VEC, true><<<grid, kThreads, 0, stream>>>(
            theta_ptr, grad_ptr, cols, bpr, static_cast<acc_t>(lr), out_ptr, partials.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        row_norm_kernel<acc_t><<<static_cast<unsigned int>(rows), kThreads, 0, stream>>>(
            partials.const_data_ptr<acc_t>(), bpr, norm.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        task_sgd_kernel<scalar_t, VEC, false><<<grid, kThreads, 0, stream>>>(
            theta_ptr, grad_ptr, cols, bpr, static_cast<acc_t>(lr), out_ptr, nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {out, norm};
}

}  // namespace gessl_ext
