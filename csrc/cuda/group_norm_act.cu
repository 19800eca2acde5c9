// CUDA kernels of group_norm_act and its backward: one block per (sample, group), whose slice of a channels-first x
// is one contiguous run. Forward: the block's mean, then its variance about the mean (two reads), then per channel
// y = act(a (x - mean) + b), with a = rstd w (1 + scale) and b = bias (1 + scale) + shift; mean and rstd are saved.
// Backward: per channel the sums S1 = sum dz and S2 = sum dz xhat with dz = dy act'(z) (z recomputed), then
// dx = rstd w (1 + scale) dz + q (x - mean) + r with the group sums folded into q and r (dz recomputed once more
// rather than stored). Sums are block reductions in a fixed order: bitwise repeatable. The parameter gradients are
// small [N, C] expressions of S1 and S2, left to ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "../checks.h"
#include "common.cuh"

namespace dreambooth_fast::cuda {
namespace {

// act(z) and act'(z): torch's formulas (GELU in its erf form).
template <Activation kAct, typename T>
__device__ __forceinline__ T act_value(T z) {
  if constexpr (kAct == Activation::gelu) {
    return T(0.5) * z * (T(1) + erf(z * T(M_SQRT1_2)));
  } else if constexpr (kAct == Activation::silu) {
    return z / (T(1) + exp(-z));
  } else {
    return z;
  }
}

template <Activation kAct, typename T>
__device__ __forceinline__ T act_slope(T z) {
  if constexpr (kAct == Activation::gelu) {
    const T cdf = T(0.5) * (T(1) + erf(z * T(M_SQRT1_2)));
    const T pdf = exp(T(-0.5) * z * z) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
    return cdf + z * pdf;
  } else if constexpr (kAct == Activation::silu) {
    const T s = T(1) / (T(1) + exp(-z));
    return s * (T(1) + z * (T(1) - s));
  } else {
    return T(1);
  }
}

// The layout of one launch: `items` = N * groups blocks' worth of work, cg channels of hw elements per group.
struct Layout {
  int64_t items, groups, channels, cg, hw;
};

template <typename scalar_t, Activation kAct>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const at::opmath_type<scalar_t>* __restrict__ w,
                               const at::opmath_type<scalar_t>* __restrict__ b,
                               const at::opmath_type<scalar_t>* __restrict__ scale,
                               const at::opmath_type<scalar_t>* __restrict__ shift, scalar_t* __restrict__ y,
                               at::opmath_type<scalar_t>* __restrict__ mean_out,
                               at::opmath_type<scalar_t>* __restrict__ rstd_out, Layout l, double eps) {
  using opmath = at::opmath_type<scalar_t>;
  __shared__ opmath stats[2];
  const int64_t size = l.cg * l.hw;
  for (int64_t item = blockIdx.x; item < l.items; item += gridDim.x) {
    const int64_t n = item / l.groups;
    const int64_t c0 = (item % l.groups) * l.cg;
    const scalar_t* xg = x + (n * l.channels + c0) * l.hw;
    opmath sum = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) sum += static_cast<opmath>(xg[i]);
    sum = block_sum(sum);
    if (threadIdx.x == 0) stats[0] = sum / opmath(size);
    __syncthreads();
    const opmath m = stats[0];
    opmath sq = 0;
    for (int64_t i = threadIdx.x; i < size; i += blockDim.x) {
      const opmath d = static_cast<opmath>(xg[i]) - m;
      sq += d * d;
    }
    sq = block_sum(sq);
    if (threadIdx.x == 0) {
      const opmath r = opmath(1) / sqrt(sq / opmath(size) + opmath(eps));
      stats[1] = r;
      mean_out[item] = m;
      rstd_out[item] = r;
    }
    __syncthreads();
    const opmath r = stats[1];
    for (int64_t c = c0; c < c0 + l.cg; ++c) {
      const int64_t nc = n * l.channels + c;
      const opmath gain = opmath(1) + scale[nc];
      const opmath a = r * w[c] * gain;
      const opmath bb = b[c] * gain + shift[nc];
      for (int64_t i = threadIdx.x; i < l.hw; i += blockDim.x) {
        y[nc * l.hw + i] = static_cast<scalar_t>(act_value<kAct>(a * (static_cast<opmath>(x[nc * l.hw + i]) - m) + bb));
      }
    }
    __syncthreads();  // stats is rewritten by the next item
  }
}

template <typename scalar_t, Activation kAct>
__global__ void backward_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                const at::opmath_type<scalar_t>* __restrict__ w,
                                const at::opmath_type<scalar_t>* __restrict__ b,
                                const at::opmath_type<scalar_t>* __restrict__ scale,
                                const at::opmath_type<scalar_t>* __restrict__ shift,
                                const at::opmath_type<scalar_t>* __restrict__ mean,
                                const at::opmath_type<scalar_t>* __restrict__ rstd, scalar_t* __restrict__ dx,
                                at::opmath_type<scalar_t>* __restrict__ s1_out,
                                at::opmath_type<scalar_t>* __restrict__ s2_out, Layout l) {
  using opmath = at::opmath_type<scalar_t>;
  __shared__ opmath coef[2];
  const opmath inv_size = opmath(1) / opmath(l.cg * l.hw);
  for (int64_t item = blockIdx.x; item < l.items; item += gridDim.x) {
    const int64_t n = item / l.groups;
    const int64_t c0 = (item % l.groups) * l.cg;
    const opmath m = mean[item];
    const opmath r = rstd[item];
    opmath c1 = 0, c2 = 0;  // valid in thread 0: group sums of dxhat and dxhat xhat, dxhat = dz (1 + scale) w
    for (int64_t c = c0; c < c0 + l.cg; ++c) {
      const int64_t nc = n * l.channels + c;
      const opmath gain = opmath(1) + scale[nc];
      const opmath a = r * w[c] * gain;
      const opmath bb = b[c] * gain + shift[nc];
      opmath t1 = 0, t2 = 0;
      for (int64_t i = threadIdx.x; i < l.hw; i += blockDim.x) {
        const opmath xc = static_cast<opmath>(x[nc * l.hw + i]) - m;
        const opmath dz = static_cast<opmath>(dy[nc * l.hw + i]) * act_slope<kAct>(a * xc + bb);
        t1 += dz;
        t2 += dz * xc;
      }
      t1 = block_sum(t1);
      t2 = block_sum(t2);
      if (threadIdx.x == 0) {
        s1_out[nc] = t1;
        s2_out[nc] = t2 * r;
        c1 += gain * w[c] * t1;
        c2 += gain * w[c] * t2 * r;
      }
    }
    if (threadIdx.x == 0) {
      coef[0] = -r * r * c2 * inv_size;
      coef[1] = -r * c1 * inv_size;
    }
    __syncthreads();
    const opmath q = coef[0];
    const opmath rr = coef[1];
    for (int64_t c = c0; c < c0 + l.cg; ++c) {
      const int64_t nc = n * l.channels + c;
      const opmath gain = opmath(1) + scale[nc];
      const opmath a = r * w[c] * gain;
      const opmath bb = b[c] * gain + shift[nc];
      for (int64_t i = threadIdx.x; i < l.hw; i += blockDim.x) {
        const opmath xc = static_cast<opmath>(x[nc * l.hw + i]) - m;
        const opmath dz = static_cast<opmath>(dy[nc * l.hw + i]) * act_slope<kAct>(a * xc + bb);
        dx[nc * l.hw + i] = static_cast<scalar_t>(a * dz + q * xc + rr);
      }
    }
    __syncthreads();  // coef is rewritten by the next item
  }
}

Layout layout(const at::Tensor& x, int64_t groups) {
  const int64_t n = x.size(0), c = x.size(1);
  return {n * groups, groups, c, c / groups, x.numel() / (n * c)};
}

unsigned grid_size(int64_t items) { return static_cast<unsigned>(std::min<int64_t>(items, int64_t(1) << 30)); }

at::Tensor per_sample_channel(const std::optional<at::Tensor>& t, const at::Tensor& x, at::ScalarType opmath) {
  if (!t.has_value()) return at::zeros({x.size(0), x.size(1)}, x.options().dtype(opmath));
  return t->to(opmath).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                                   const at::Tensor& bias,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& shift,
                                                                   int64_t groups, double eps,
                                                                   std::string_view act_name) {
  check_group_norm_act_args(x_in, weight, bias, scale, shift, groups);
  const Activation act = parse_activation(act_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();  // channels-first; a channels_last x is copied here
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  const Layout l = layout(x, groups);
  const at::Tensor w = weight.to(opmath).contiguous(), b = bias.to(opmath).contiguous();
  const at::Tensor sc = per_sample_channel(scale, x, opmath), sh = per_sample_channel(shift, x, opmath);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({x.size(0), groups}, x.options().dtype(opmath));
  at::Tensor rstd = at::empty({x.size(0), groups}, x.options().dtype(opmath));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<grid_size(l.items), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<op_t>(), b.const_data_ptr<op_t>(), sc.const_data_ptr<op_t>(),
          sh.const_data_ptr<op_t>(), y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<op_t>(),
          rstd.mutable_data_ptr<op_t>(), l, eps);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (act) {
      case Activation::gelu: launch(forward_kernel<scalar_t, Activation::gelu>); break;
      case Activation::silu: launch(forward_kernel<scalar_t, Activation::silu>); break;
      case Activation::identity: launch(forward_kernel<scalar_t, Activation::identity>); break;
    }
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t groups, std::string_view act_name) {
  check_group_norm_act_args(x_in, weight, bias, scale, shift, groups);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "group_norm_act_backward: grad_y has shape ", grad_y.sizes(),
              " but x has ", x_in.sizes());
  TORCH_CHECK(mean_in.numel() == x_in.size(0) * groups && rstd_in.numel() == x_in.size(0) * groups,
              "group_norm_act_backward: mean and rstd must have N * groups = ", x_in.size(0) * groups, " values");
  const Activation act = parse_activation(act_name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous();
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  const Layout l = layout(x, groups);
  const at::Tensor w = weight.to(opmath).contiguous(), b = bias.to(opmath).contiguous();
  const at::Tensor sc = per_sample_channel(scale, x, opmath), sh = per_sample_channel(shift, x, opmath);
  const at::Tensor mean = mean_in.to(opmath).contiguous(), rstd = rstd_in.to(opmath).contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor s1 = at::empty({x.size(0), x.size(1)}, x.options().dtype(opmath));
  at::Tensor s2 = at::empty({x.size(0), x.size(1)}, x.options().dtype(opmath));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_backward_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<grid_size(l.items), kThreads, 0, stream>>>(
          dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), w.const_data_ptr<op_t>(),
          b.const_data_ptr<op_t>(), sc.const_data_ptr<op_t>(), sh.const_data_ptr<op_t>(), mean.const_data_ptr<op_t>(),
          rstd.const_data_ptr<op_t>(), dx.mutable_data_ptr<scalar_t>(), s1.mutable_data_ptr<op_t>(),
          s2.mutable_data_ptr<op_t>(), l);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (act) {
      case Activation::gelu: launch(backward_kernel<scalar_t, Activation::gelu>); break;
      case Activation::silu: launch(backward_kernel<scalar_t, Activation::silu>); break;
      case Activation::identity: launch(backward_kernel<scalar_t, Activation::identity>); break;
    }
  });
  // As on the CPU: dshift = S1, dscale = w S2 + bias S1, dbias = sum_n (1 + scale) S1, dweight = sum_n (1 + scale) S2.
  const at::Tensor gain = sc + 1;
  const at::Tensor dweight = (gain * s2).sum(0).to(weight.scalar_type());
  const at::Tensor dbias = (gain * s1).sum(0).to(bias.scalar_type());
  const at::Tensor dscale = scale.has_value() ? (w * s2 + b * s1).to(scale->scalar_type()) : at::empty({0}, x.options());
  const at::Tensor dshift = shift.has_value() ? s1.to(shift->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias, dscale, dshift};
}

}  // namespace
}  // namespace dreambooth_fast::cuda

TORCH_LIBRARY_IMPL(dreambooth_fast, CUDA, m) {
  m.impl("group_norm_act", &dreambooth_fast::cuda::group_norm_act_cuda);
  m.impl("group_norm_act_backward", &dreambooth_fast::cuda::group_norm_act_backward_cuda);
}
