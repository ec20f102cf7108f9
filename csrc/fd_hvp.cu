// Finite-difference perturbation of flat per-task parameter rows: theta + eps*u, eps = radius / max(||u||, tiny).
//
// fd_perturb: two passes over memory. Pass 1 writes per-block partial sums of u^2; pass 2 has every
// block re-reduce its row's partials (at most kMaxBlocksPerRow values, cached in L2), derive eps (the
// sign of radius, which may be negative, is the direction) and write theta + eps*u. Bytes moved: read u,
// read theta and u, write one output (4 row-sizes).
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
                                        at::opmath_type<scalar_t> tiny, scalar_t* __restrict__ out,
                                        at::opmath_type<scalar_t>* __restrict__ eps) {
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
  pack_t* out_row = reinterpret_cast<pack_t*>(out + offset);
  const int64_t packs = cols / VEC;
  for (int64_t j = int64_t(chunk) * blockDim.x + threadIdx.x; j < packs; j += int64_t(blocks_per_row) * blockDim.x) {
    const pack_t t = theta_row[j];
    const pack_t d = u_row[j];
    pack_t r;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      r.v[k] = static_cast<scalar_t>(static_cast<acc_t>(t.v[k]) + row_eps * static_cast<acc_t>(d.v[k]));
    }
    out_row[j] = r;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> fd_perturb_cuda(const at::Tensor& theta_in, const at::Tensor& u_in, double radius,
                                                   bool poison) {
  TORCH_CHECK(theta_in.dim() == 2, "fd_perturb: theta must be [rows, cols], got ", theta_in.sizes());
  const at::Tensor theta = checked_rows(theta_in, theta_in, "theta");
  const at::Tensor u = checked_rows(u_in, theta_in, "u");
  const c10::cuda::CUDAGuard device_guard(theta.device());
  const int64_t rows = theta.size(0);
  const int64_t cols = theta.size(1);
  at::Tensor out = new_output(theta, poison);
  const auto acc_dtype = at::toOpMathType(theta.scalar_type());
  at::Tensor eps = new_row_vector(rows, acc_dtype, theta, poison);
  if (rows == 0) return {out, eps};

  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, theta.scalar_type(), "fd_perturb_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* theta_ptr = theta.const_data_ptr<scalar_t>();
    const scalar_t* u_ptr = u.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    with_pack_width<scalar_t>(cols, {theta_ptr, u_ptr, out_ptr}, [&](auto vec_tag) {
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
          static_cast<acc_t>(std::numeric_limits<scalar_t>::min()), out_ptr, eps.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {out, eps};
}

}  // namespace gessl_ext
