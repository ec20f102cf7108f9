// Shared pieces of the row-wise (one row per task) bandwidth kernels: launch geometry, packed
// 16-byte loads/stores, and a deterministic block reduction.
#pragma once

// Per-op ATen headers instead of ATen/ATen.h (much faster to compile), and c10 instead of
// ATen/cuda/CUDAContext.h, which pulls in cuSPARSE/cuBLAS headers that a bare CUDA toolkit may not ship.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/full_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace gessl_ext {

constexpr int kThreads = 256;
// Each row is split into at most this many blocks; the per-block partial sums of a row are then
// re-reduced by one block, so this also bounds that second reduction.
constexpr int kMaxBlocksPerRow = 1024;

// VEC consecutive elements moved as one aligned (up to 16-byte) memory transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Elements per 16-byte pack for scalar_t.
template <typename scalar_t>
constexpr int pack_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// True when every row of every buffer can be read as whole packs of `vec` elements.
inline bool rows_are_packable(int64_t cols, int vec, std::initializer_list<const void*> pointers) {
  if (cols % vec != 0) return false;
  for (const void* p : pointers) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Blocks per row for `kernel` launched with kThreads threads: together the rows fill exactly one wave
// of resident blocks (every block grid-strides over its share of the row, so a partial second wave
// would leave the device idle), a row never gets more blocks than it has packs for, and at most
// kMaxBlocksPerRow.
template <typename Kernel>
int blocks_per_row(Kernel kernel, int64_t rows, int64_t cols, int vec) {
  int sm_count = 0;
  int resident_per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident_per_sm, kernel, kThreads, 0));
  const int64_t one_wave = int64_t{sm_count} * std::max(resident_per_sm, 1);
  const int64_t wanted = std::max<int64_t>(1, one_wave / std::max<int64_t>(rows, 1));
  const int64_t packs = cols / vec;
  const int64_t useful = std::max<int64_t>(1, (packs + kThreads - 1) / kThreads);
  return static_cast<int>(std::min<int64_t>({wanted, useful, int64_t{kMaxBlocksPerRow}}));
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. Fixed reduction order (deterministic).
template <typename T>
__device__ T block_sum(T v) {
  __shared__ alignas(16) unsigned char storage[33 * sizeof(double)];
  T* shared = reinterpret_cast<T*>(storage);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : T(0);
    v = warp_sum(v);
    if (lane == 0) shared[32] = v;
  }
  __syncthreads();
  return shared[32];
}

// Sum of the `count` partial sums stored for one row, returned to every thread of the block.
template <typename acc_t>
__device__ acc_t sum_row_partials(const acc_t* __restrict__ row_partials, int count) {
  acc_t s = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) s += row_partials[i];
  return block_sum(s);
}

// Output buffer like `like`: NaN-filled when poison is set (tests prove every element is written).
inline at::Tensor new_output(const at::Tensor& like, bool poison) {
  return poison ? at::full_like(like, std::numeric_limits<double>::quiet_NaN()) : at::empty_like(like);
}

inline at::Tensor new_row_vector(int64_t rows, at::ScalarType dtype, const at::Tensor& like, bool poison) {
  const auto options = like.options().dtype(dtype);
  return poison ? at::full({rows}, std::numeric_limits<double>::quiet_NaN(), options) : at::empty({rows}, options);
}

// Validates a [rows, cols] CUDA operand against the reference operand and returns it contiguous.
inline at::Tensor checked_rows(const at::Tensor& t, const at::Tensor& reference, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == reference.device(), name, " must be on ", reference.device(), ", got ", t.device());
  TORCH_CHECK(t.sizes() == reference.sizes(), name, " must have shape ", reference.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == reference.scalar_type(), name, " must have dtype ", reference.scalar_type(),
              ", got ", t.scalar_type());
  return t.contiguous();
}

// Calls fn(std::integral_constant<int, VEC>) with VEC = the 16-byte pack width when every buffer
// allows it, else VEC = 1.
template <typename scalar_t, typename Fn>
void with_pack_width(int64_t cols, std::initializer_list<const void*> pointers, Fn&& fn) {
  if (rows_are_packable(cols, pack_width<scalar_t>(), pointers)) {
    fn(std::integral_constant<int, pack_width<scalar_t>()>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

}  // namespace gessl_ext
