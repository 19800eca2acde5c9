// CUDA kernels of dreambooth_loss: one pass reads pred and target once, writes dL/dpred = 2 c_i (P - Y) once (in
// float32 for half pred: see csrc/cpu/kernels.h) and leaves one partial sum per block; a second single-block pass
// adds the partials in a fixed order, so the loss is bitwise reproducible (no float atomics), and in the same read
// also the subject rows' and the prior rows' partials apart: the loss's two parts.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace dreambooth_fast::cuda {
namespace {

// blockIdx.y walks the rows, blockIdx.x grid-strides over a row in VEC-element steps. Rows of pred and
// target are contiguous blocks `row_stride` elements apart; grad is contiguous, in opmath precision.
template <typename scalar_t, int VEC>
__global__ void loss_partials_kernel(const scalar_t* __restrict__ pred, int64_t pred_row_stride,
                                     const scalar_t* __restrict__ target, int64_t target_row_stride,
                                     const at::opmath_type<scalar_t>* __restrict__ weights, int64_t n_instance,
                                     at::opmath_type<scalar_t> subject_scale, at::opmath_type<scalar_t> prior_coef,
                                     at::opmath_type<scalar_t>* __restrict__ grad,
                                     at::opmath_type<scalar_t>* __restrict__ partials,
                                     int64_t rows, int64_t row_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VEC>;
  using grad_vec_t = Vec<opmath_t, VEC>;
  const int64_t vecs_per_row = row_size / VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const opmath_t c =
        row < n_instance ? (weights == nullptr ? opmath_t(1) : weights[row]) * subject_scale : prior_coef;
    const opmath_t two_c = 2 * c;
    const vec_t* pred_row = reinterpret_cast<const vec_t*>(pred + row * pred_row_stride);
    const vec_t* target_row = reinterpret_cast<const vec_t*>(target + row * target_row_stride);
    grad_vec_t* grad_row = reinterpret_cast<grad_vec_t*>(grad + row * row_size);
    opmath_t sum_sq = 0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vecs_per_row;
         i += int64_t(gridDim.x) * blockDim.x) {
      const vec_t pv = pred_row[i];
      const vec_t yv = target_row[i];
      grad_vec_t gv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const opmath_t d = static_cast<opmath_t>(pv.val[k]) - static_cast<opmath_t>(yv.val[k]);
        sum_sq += d * d;
        gv.val[k] = two_c * d;
      }
      grad_row[i] = gv;
    }
    sum_sq = block_sum(sum_sq);
    if (threadIdx.x == 0) partials[row * gridDim.x + blockIdx.x] = c * sum_sq;
  }
}

// Partials [0, n_subject) are the subject rows' (rows are laid out one after another), the rest the prior rows'.
// The loss is summed exactly as without the parts.
template <typename scalar_t>
__global__ void loss_finalize_kernel(const at::opmath_type<scalar_t>* __restrict__ partials, int64_t n,
                                     int64_t n_subject, scalar_t* __restrict__ loss, scalar_t* __restrict__ parts) {
  at::opmath_type<scalar_t> sum = 0;
  at::opmath_type<scalar_t> subject = 0;
  at::opmath_type<scalar_t> prior = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    sum += partials[i];
    if (i < n_subject) {
      subject += partials[i];
    } else {
      prior += partials[i];
    }
  }
  sum = block_sum(sum);
  subject = block_sum(subject);
  prior = block_sum(prior);
  if (threadIdx.x == 0) {
    *loss = static_cast<scalar_t>(sum);
    parts[0] = static_cast<scalar_t>(subject);
    parts[1] = static_cast<scalar_t>(prior);
  }
}

template <typename scalar_t, int VEC>
void launch_loss(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& weights,
                 int64_t n_instance, double prior_weight, at::Tensor& grad, at::Tensor& loss, at::Tensor& parts) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t rows = pred.size(0);
  const int64_t row_size = pred.numel() / rows;
  const int64_t n_prior = rows - n_instance;
  const double subject_scale = 1.0 / (double(n_instance) * double(row_size));
  const double prior_coef = n_prior > 0 ? prior_weight / (double(n_prior) * double(row_size)) : 0.0;
  const dim3 grid = row_grid(rows, row_size / VEC, pred.get_device());
  at::Tensor partials = at::empty({rows * int64_t(grid.x)}, pred.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  loss_partials_kernel<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
      pred.const_data_ptr<scalar_t>(), pred.stride(0), target.const_data_ptr<scalar_t>(), target.stride(0),
      weights.has_value() ? weights->const_data_ptr<opmath_t>() : nullptr, n_instance,
      static_cast<opmath_t>(subject_scale), static_cast<opmath_t>(prior_coef), grad.mutable_data_ptr<opmath_t>(),
      partials.mutable_data_ptr<opmath_t>(), rows, row_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  loss_finalize_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<opmath_t>(), partials.numel(),
                                                             n_instance * int64_t(grid.x),
                                                             loss.mutable_data_ptr<scalar_t>(),
                                                             parts.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte accesses need every row start of pred, target and grad on a 16-byte boundary.
bool can_vectorize(const at::Tensor& t, int vec, int64_t row_size) {
  return row_size % vec == 0 && aligned16(t.const_data_ptr()) && (t.stride(0) * t.element_size()) % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dreambooth_loss_cuda(const at::Tensor& pred_arg, const at::Tensor& target_arg,
                                                        const std::optional<at::Tensor>& weights_arg,
                                                        int64_t n_instance, double prior_weight) {
  check_dreambooth_loss_args(pred_arg, target_arg, weights_arg, n_instance);
  const c10::cuda::CUDAGuard guard(pred_arg.device());
  const at::Tensor pred = rows_contiguous(pred_arg) ? pred_arg : pred_arg.contiguous();
  const at::Tensor target = rows_contiguous(target_arg) ? target_arg : target_arg.contiguous();
  const at::ScalarType opmath_dtype = at::toOpMathType(pred.scalar_type());
  std::optional<at::Tensor> weights;
  if (weights_arg.has_value()) weights = weights_arg->to(opmath_dtype).contiguous();
  at::Tensor grad = at::empty(pred.sizes(), pred.options().dtype(opmath_dtype));
  at::Tensor loss = at::empty({}, pred.options());
  at::Tensor parts = at::empty({2}, pred.options());
  const int64_t row_size = pred.numel() / pred.size(0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dreambooth_loss_cuda", [&] {
    constexpr int VEC = vec_width<scalar_t>();
    using grad_vec_t = Vec<at::opmath_type<scalar_t>, VEC>;  // 32 bytes for half pred, else 16
    if (can_vectorize(pred, VEC, row_size) && can_vectorize(target, VEC, row_size) &&
        aligned_to(grad.const_data_ptr(), sizeof(grad_vec_t))) {
      launch_loss<scalar_t, VEC>(pred, target, weights, n_instance, prior_weight, grad, loss, parts);
    } else {
      launch_loss<scalar_t, 1>(pred, target, weights, n_instance, prior_weight, grad, loss, parts);
    }
  });
  return {loss, grad, parts};
}

}  // namespace
}  // namespace dreambooth_fast::cuda

TORCH_LIBRARY_IMPL(dreambooth_fast, CUDA, m) {
  m.impl("dreambooth_loss", &dreambooth_fast::cuda::dreambooth_loss_cuda);
}
