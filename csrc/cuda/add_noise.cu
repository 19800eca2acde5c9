// CUDA kernel of add_noise: one pass reads x0 and eps once and writes x_t (and v for "v_prediction") once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string_view>
#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace dreambooth_fast::cuda {
namespace {

// blockIdx.y walks the rows (samples), blockIdx.x grid-strides over a row in VEC-element steps. The per-row
// coefficients are gathered on the device; the timestep range check is a device assert, as reading the
// timesteps on the host would synchronise. A failed device assert poisons the CUDA context (every later CUDA call
// in the process fails): ops.add_noise checks timesteps that are still on the host before they get here.
template <typename scalar_t, int VEC>
__global__ void add_noise_kernel(const scalar_t* __restrict__ x0, const scalar_t* __restrict__ eps,
                                 const void* __restrict__ timesteps, bool timesteps_int64,
                                 const void* __restrict__ alphas_cumprod, bool table_float64, int64_t table_size,
                                 scalar_t* __restrict__ x_t, scalar_t* __restrict__ v, int64_t rows,
                                 int64_t row_size) {
  using opmath_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t vecs_per_row = row_size / VEC;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t t = timesteps_int64 ? static_cast<const int64_t*>(timesteps)[row]
                                      : static_cast<const int32_t*>(timesteps)[row];
    CUDA_KERNEL_ASSERT_MSG(t >= 0 && t < table_size, "add_noise: a timestep is outside alphas_cumprod");
    const opmath_t ac = table_float64 ? static_cast<opmath_t>(static_cast<const double*>(alphas_cumprod)[t])
                                      : static_cast<opmath_t>(static_cast<const float*>(alphas_cumprod)[t]);
    const opmath_t a = sqrt(ac);
    const opmath_t s = sqrt(opmath_t(1) - ac);
    const vec_t* x0_row = reinterpret_cast<const vec_t*>(x0 + row * row_size);
    const vec_t* eps_row = reinterpret_cast<const vec_t*>(eps + row * row_size);
    vec_t* x_t_row = reinterpret_cast<vec_t*>(x_t + row * row_size);
    vec_t* v_row = v == nullptr ? nullptr : reinterpret_cast<vec_t*>(v + row * row_size);
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < vecs_per_row;
         i += int64_t(gridDim.x) * blockDim.x) {
      const vec_t xv = x0_row[i];
      const vec_t ev = eps_row[i];
      vec_t out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        out.val[k] = static_cast<scalar_t>(a * static_cast<opmath_t>(xv.val[k]) + s * static_cast<opmath_t>(ev.val[k]));
      }
      x_t_row[i] = out;
      if (v_row != nullptr) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          out.val[k] = static_cast<scalar_t>(a * static_cast<opmath_t>(ev.val[k]) - s * static_cast<opmath_t>(xv.val[k]));
        }
        v_row[i] = out;
      }
    }
  }
}

template <typename scalar_t, int VEC>
void launch_add_noise(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& timesteps,
                      const at::Tensor& alphas_cumprod, at::Tensor& x_t, at::Tensor* v) {
  const int64_t rows = x0.size(0);
  const int64_t row_size = x0.numel() / rows;
  const dim3 grid = row_grid(rows, row_size / VEC, x0.get_device());
  add_noise_kernel<scalar_t, VEC><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x0.const_data_ptr<scalar_t>(), eps.const_data_ptr<scalar_t>(), timesteps.const_data_ptr(),
      timesteps.scalar_type() == at::kLong, alphas_cumprod.const_data_ptr(),
      alphas_cumprod.scalar_type() == at::kDouble, alphas_cumprod.size(0), x_t.mutable_data_ptr<scalar_t>(),
      v == nullptr ? nullptr : v->mutable_data_ptr<scalar_t>(), rows, row_size);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> add_noise_cuda(const at::Tensor& x0_arg, const at::Tensor& eps_arg,
                                                  const at::Tensor& timesteps_arg,
                                                  const at::Tensor& alphas_cumprod_arg,
                                                  std::string_view prediction_type) {
  check_add_noise_args(x0_arg, eps_arg, timesteps_arg, alphas_cumprod_arg);
  const bool with_v = parse_prediction_type(prediction_type) == PredictionType::v_prediction;
  const c10::cuda::CUDAGuard guard(x0_arg.device());
  const at::Tensor x0 = x0_arg.contiguous();
  const at::Tensor eps = eps_arg.contiguous();
  const at::Tensor timesteps = timesteps_arg.contiguous();
  const at::Tensor alphas_cumprod = alphas_cumprod_arg.contiguous();
  at::Tensor x_t = at::empty_like(x0, at::MemoryFormat::Contiguous);
  at::Tensor v = with_v ? at::empty_like(x0, at::MemoryFormat::Contiguous) : at::empty({0}, x0.options());
  if (x0.numel() == 0) return {x_t, v};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "add_noise_cuda", [&] {
    constexpr int VEC = vec_width<scalar_t>();
    const bool vectorize = (x0.numel() / x0.size(0)) % VEC == 0 && aligned16(x0.const_data_ptr()) &&
                           aligned16(eps.const_data_ptr()) && aligned16(x_t.const_data_ptr()) &&
                           (!with_v || aligned16(v.const_data_ptr()));
    if (vectorize) {
      launch_add_noise<scalar_t, VEC>(x0, eps, timesteps, alphas_cumprod, x_t, with_v ? &v : nullptr);
    } else {
      launch_add_noise<scalar_t, 1>(x0, eps, timesteps, alphas_cumprod, x_t, with_v ? &v : nullptr);
    }
  });
  return {x_t, v};
}

}  // namespace
}  // namespace dreambooth_fast::cuda

TORCH_LIBRARY_IMPL(dreambooth_fast, CUDA, m) {
  m.impl("add_noise", &dreambooth_fast::cuda::add_noise_cuda);
}
