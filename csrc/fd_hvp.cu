// Finite-difference Hessian-vector product helpers over flat per-task parameter rows.
//
// fd_perturb: two passes over memory. Pass 1 writes per-block partial sums of u^2; pass 2 has every
// block re-reduce its row's partials (at most kMaxBlocksPerRow values, cached in L2), derive
// eps = radius / max(||u||, tiny), and write theta +- eps*u. Bytes moved: read u, read theta and u,
// write two outputs.
// fd_update: one pass, u - alpha * (g_plus - g_minus) / (2 eps_row).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include "gessl_ops.h"
#include "rows_common.cuh"

namespace gessl_ext {
namespace {

template <typename scalar_t, int VEC>
__global__ void row_sumsq_partials_kernel(const scalar_t* __restrict__ x, int64_t cols, int blocks_per_row,
                                          at::opmath_type<scalar_t>* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int chunk = blockIdx.x % blocks_per_row;
  const pack_t* x_row = reinterpret_cast<const pack_t*>(x + row * cols);
  const int64_t packs = cols / VEC;
  acc_t sumsq = 0;
  for (int64_t j = int64_t(chunk) * blockDim.x + threadIdx.x; j < packs; j += int64_t(blocks_per_row) * blockDim.x) {
    const pack_t p = x_row[j];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t v = static_cast<acc_t>(p.v[k]);
      sumsq += v * v;
    }
  }
  sumsq = block_sum(sumsq);
  if (threadIdx.x == 0) partials[row * blocks_per_row + chunk] = sumsq;
}

template <typename scalar_t, int VEC>
__global__ void fd_perturb_apply_kernel(const scalar_t* __restrict__ theta, const scalar_t* __restrict__ u,
                                        const at::opmath_type<scalar_t>* __restrict__ partials, int64_t cols,
                                        int blocks_per_row, at::opmath_type<scalar_t> radius,
                                        at::opmath_type<scalar_t> tiny, scalar_t* __restrict__ theta_plus,
                                        scalar_t* __restrict__ theta_minus, at::opmath_type<scalar_t>* __restrict__ eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int chunk = blockIdx.x % blocks_per_row;
  const acc_t norm = sqrt(sum_row_partials(partials + row * blocks_per_row, blocks_per_row));
  // Written so a NaN norm stays NaN, like torch's clamp_min.
  const acc_t row_eps = radius / (norm < tiny ? tiny : norm);
  if (chunk == 0 && threadIdx.x == 0) eps[row] = row_eps;

  const int64_t offset = row * cols;
  const pack_t* theta_row = reinterpret_cast<const pack_t*>(theta + offset);
  const pack_t* u_row = reinterpret_cast<const pack_t*>(u + offset);
  pack_t* plus_row = reinterpret_cast<pack_t*>(theta_plus + offset);
  pack_t* minus_row = reinterpret_cast<pack_t*>(theta_minus + offset);
  const int64_t packs = cols / VEC;
  for (int64_t j = int64_t(chunk) * blockDim.x + threadIdx.x; j < packs; j += int64_t(blocks_per_row) * blockDim.x) {
    const pack_t t = theta_row[j];
    const pack_t d = u_row[j];
    pack_t plus, minus;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t step = row_eps * static_cast<acc_t>(d.v[k]);
      const acc_t base = static_cast<acc_t>(t.v[k]);
      plus.v[k] = static_cast<scalar_t>(base + step);
      minus.v[k] = static_cast<scalar_t>(base - step);
    }
    plus_row[j] = plus;
    minus_row[j] = minus;
  }
}

template <typename scalar_t, int VEC>
__global__ void fd_update_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ g_plus,
                                 const scalar_t* __restrict__ g_minus, const at::opmath_type<scalar_t>* __restrict__ eps,
                                 int64_t cols, int blocks_per_row, at::opmath_type<scalar_t> alpha,
                                 scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t row = blockIdx.x / blocks_per_row;
  const int chunk = blockIdx.x % blocks_per_row;
  const acc_t scale = alpha / (acc_t(2) * eps[row]);
  const int64_t offset = row * cols;
  const pack_t* u_row = reinterpret_cast<const pack_t*>(u + offset);
  const pack_t* plus_row = reinterpret_cast<const pack_t*>(g_plus + offset);
  const pack_t* minus_row = reinterpret_cast<const pack_t*>(g_minus + offset);
  pack_t* out_row = reinterpret_cast<pack_t*>(out + offset);
  const int64_t packs = cols / VEC;
  for (int64_t j = int64_t(chunk) * blockDim.x + threadIdx.x; j < packs; j += int64_t(blocks_per_row) * blockDim.x) {
    const pack_t a = u_row[j];
    const pack_t gp = plus_row[j];
    const pack_t gm = minus_row[j];
    pack_t r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t diff = static_cast<acc_t>(gp.v[k]) - static_cast<acc_t>(gm.v[k]);
      r.v[k] = static_cast<scalar_t>(static_cast<acc_t>(a.v[k]) - scale * diff);
    }
    out_row[j] = r;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> fd_perturb_cuda(const at::Tensor& theta_in, const at::Tensor& u_in,
                                                               double radius, bool poison) {
  TORCH_CHECK(theta_in.dim() == 2, "fd_perturb: theta must be [rows, cols], got ", theta_in.sizes());
  const at::Tensor theta = checked_rows(theta_in, theta_in, "theta");
  const at::Tensor u = checked_rows(u_in, theta_in, "u");
  const c10::cuda::CUDAGuard device_guard(theta.device());
  const int64_t rows = theta.size(0);
  const int64_t cols = theta.size(1);
  at::Tensor theta_plus = new_output(theta, poison);
  at::Tensor theta_minus = new_output(theta, poison);
  const auto acc_dtype = at::toOpMathType(theta.scalar_type());
  at::Tensor eps = new_row_vector(rows, acc_dtype, theta, poison);
  if (rows == 0) return {theta_plus, theta_minus, eps};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "fd_perturb_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* theta_ptr = theta.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    scalar_t* plus_ptr = theta_plus.mutable_data_ptr<scalar_t>();
    scalar_t* minus_ptr = theta_minus.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(cols, {theta_ptr, u_ptr, plus_ptr, minus_ptr}, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      // Both passes share the partials layout; size them for the heavier second pass.
      const int bpr = blocks_per_row(fd_perturb_apply_kernel<scalar_t, VEC>, rows, cols, VEC);
      at::Tensor partials = at::empty({rows * bpr}, theta.options().dtype(acc_dtype));
      const auto grid = static_cast<unsigned int>(rows * bpr);
      row_sumsq_partials_kernel<scalar_t, VEC>
          <<<grid, kThreads, 0, stream>>>(u_ptr, cols, bpr, partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      fd_perturb_apply_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          theta_ptr, u_ptr, partials.const_data_ptr<acc_t>(), cols, bpr, static_cast<acc_t>(radius),
          static_cast<acc_t>(std::numeric_limits<scalar_t>::min()), plus_ptr, minus_ptr,
          eps.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {theta_plus, theta_minus, eps};
}

at::Tensor fd_update_cuda(const at::Tensor& u_in, const at::Tensor& g_plus_in, const at::Tensor& g_minus_in,
                          const at::Tensor& eps_in, double alpha, bool poison) {
  TORCH_CHECK(u_in.dim() == 2, "fd_update: u must be [rows, cols], got ", u_in.sizes());
  const at::Tensor u = checked_rows(u_in, u_in, "u");
  const at::Tensor g_plus = checked_rows(g_plus_in, u_in, "g_plus");
  const at::Tensor g_minus = checked_rows(g_minus_in, u_in, "g_minus");
  const int64_t rows = u.size(0);
  const int64_t cols = u.size(1);
  const auto acc_dtype = at::toOpMathType(u.scalar_type());
  TORCH_CHECK(eps_in.is_cuda() && eps_in.device() == u.device(), "fd_update: eps must be on ", u.device());
  TORCH_CHECK(eps_in.dim() == 1 && eps_in.size(0) == rows, "fd_update: eps must have shape [", rows, "], got ",
              eps_in.sizes());
  TORCH_CHECK(eps_in.scalar_type() == acc_dtype, "fd_update: eps must have dtype ", acc_dtype, ", got ",
              eps_in.scalar_type());
  const at::Tensor eps = eps_in.contiguous();
  const c10::cuda::CUDAGuard device_guard(u.device());
  at::Tensor out = new_output(u, poison);
  if (rows == 0) return out;

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "fd_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    const scalar_t* plus_ptr = g_plus.const_data_ptr<scalar_t>();
    const scalar_t* minus_ptr = g_minus.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(cols, {u_ptr, plus_ptr, minus_ptr, out_ptr}, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      const int bpr = blocks_per_row(fd_update_kernel<scalar_t, VEC>, rows, cols, VEC);
      fd_update_kernel<scalar_t, VEC><<<static_cast<unsigned int>(rows * bpr), kThreads, 0, stream>>>(
          u_ptr, plus_ptr, minus_ptr, eps.const_data_ptr<acc_t>(), cols, bpr, static_cast<acc_t>(alpha), out_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace gessl_ext
