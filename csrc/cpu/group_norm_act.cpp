// CPU kernels of dreambooth_fast::group_norm_act and its backward: y = act(GroupNorm(x) * (1 + scale) + shift),
// one task per (sample, group), whose slice of a channels-first x is one contiguous run.
//
// Forward: per group the mean, then the variance about it (two reads of a slice that stays in cache), then per
// channel y = act(a (x - mean) + b) with a = rstd w (1 + scale), b = bias (1 + scale) + shift. Only mean and rstd
// are saved. Backward: per channel dz = dy act'(z) (z recomputed) into a per-thread buffer with its sums
// S1 = sum dz and S2 = sum dz xhat; then dx in a second pass over the cached slice. The parameter gradients come
// from S1 and S2 per (sample, channel), reduced over the batch in a fixed order (bitwise the same for any number of
// threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace dreambooth_fast::cpu {
namespace {

// Elements per parallel task; smaller problems run on one thread.
constexpr int64_t kGrain = 32768;

// A per-(sample, channel) tensor as contiguous opmath values: scale and shift, or `fill` where not given.
at::Tensor per_sample_channel(const std::optional<at::Tensor>& t, int64_t n, int64_t c, at::ScalarType opmath,
                              double fill) {
  if (!t.has_value()) return at::full({n, c}, fill, at::TensorOptions().dtype(opmath));
  return t->to(opmath).contiguous();
}

at::Tensor as_opmath(const at::Tensor& t, at::ScalarType opmath) { return t.to(opmath).contiguous(); }

struct Shape {
  int64_t n, c, groups, cg, hw;  // cg channels per group, hw elements per channel
  explicit Shape(const at::Tensor& x, int64_t groups_)
      : n(x.size(0)), c(x.size(1)), groups(groups_), cg(x.size(1) / groups_), hw(x.numel() / (x.size(0) * x.size(1))) {}
  int64_t group_size() const { return cg * hw; }
  int64_t grain() const { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, group_size())); }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const at::Tensor& scale,
                    const at::Tensor& shift, const Shape& s, double eps, Activation act, at::Tensor& y,
                    at::Tensor& mean, at::Tensor& rstd) {
  using opmath = opmath_t<scalar_t>;
  const Kernels<scalar_t> k = cpu_kernels<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  const opmath* w_data = w.const_data_ptr<opmath>();
  const opmath* b_data = b.const_data_ptr<opmath>();
  const opmath* scale_data = scale.const_data_ptr<opmath>();
  const opmath* shift_data = shift.const_data_ptr<opmath>();
  opmath* mean_data = mean.mutable_data_ptr<opmath>();
  opmath* rstd_data = rstd.mutable_data_ptr<opmath>();
  at::parallel_for(0, s.n * s.groups, s.grain(), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / s.groups;
      const int64_t c0 = (item % s.groups) * s.cg;
      const int64_t offset = (n * s.c + c0) * s.hw;
      const double m = k.sum(x_data + offset, s.group_size()) / double(s.group_size());
      const double var = k.sum_sq_dev(x_data + offset, s.group_size(), opmath(m)) / double(s.group_size());
      const opmath r = opmath(1.0 / std::sqrt(var + eps));
      mean_data[item] = opmath(m);
      rstd_data[item] = r;
      for (int64_t c = c0; c < c0 + s.cg; ++c) {
        const opmath gain = opmath(1) + scale_data[n * s.c + c];
        k.norm_act(x_data + (n * s.c + c) * s.hw, y_data + (n * s.c + c) * s.hw, s.hw, opmath(m),
                   r * w_data[c] * gain, b_data[c] * gain + shift_data[n * s.c + c], act);
      }
    }
  });
}

// Returns (y, mean, rstd); mean and rstd are [N, groups] in x's opmath dtype (float32 for half x).
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                                  const at::Tensor& bias,
                                                                  const std::optional<at::Tensor>& scale,
                                                                  const std::optional<at::Tensor>& shift,
                                                                  int64_t groups, double eps,
                                                                  std::string_view act_name) {
  check_group_norm_act_args(x_in, weight, bias, scale, shift, groups);
  const Activation act = parse_activation(act_name);
  const at::Tensor x = x_in.contiguous();  // channels-first; a channels_last x is copied here
  const Shape s(x, groups);
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({s.n, groups}, x.options().dtype(opmath));
  at::Tensor rstd = at::empty({s.n, groups}, x.options().dtype(opmath));
  const at::Tensor w = as_opmath(weight, opmath), b = as_opmath(bias, opmath);
  const at::Tensor sc = per_sample_channel(scale, s.n, s.c, opmath, 0.0);
  const at::Tensor sh = per_sample_channel(shift, s.n, s.c, opmath, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cpu", [&] {
    forward_kernel<scalar_t>(x, w, b, sc, sh, s, eps, act, y, mean, rstd);
  });
  return {y, mean, rstd};
}

// Fills dx and the per-(sample, channel) sums S1 = sum dz, S2 = sum dz xhat (double, [N, C]).
template <typename scalar_t>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                     const at::Tensor& scale, const at::Tensor& shift, const at::Tensor& mean, const at::Tensor& rstd,
                     const Shape& s, Activation act, at::Tensor& dx, at::Tensor& s1, at::Tensor& s2) {
  using opmath = opmath_t<scalar_t>;
  const Kernels<scalar_t> k = cpu_kernels<scalar_t>();
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
  const opmath* w_data = w.const_data_ptr<opmath>();
  const opmath* b_data = b.const_data_ptr<opmath>();
  const opmath* scale_data = scale.const_data_ptr<opmath>();
  const opmath* shift_data = shift.const_data_ptr<opmath>();
  const opmath* mean_data = mean.const_data_ptr<opmath>();
  const opmath* rstd_data = rstd.const_data_ptr<opmath>();
  double* s1_data = s1.mutable_data_ptr<double>();
  double* s2_data = s2.mutable_data_ptr<double>();
  const double inv_size = 1.0 / double(s.group_size());
  at::parallel_for(0, s.n * s.groups, s.grain(), [&](int64_t begin, int64_t end) {
    std::vector<opmath> dz(s.group_size());  // one group's dz, reused by this task's groups
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / s.groups;
      const int64_t c0 = (item % s.groups) * s.cg;
      const opmath m = mean_data[item];
      const opmath r = rstd_data[item];
      // c1 = sum over the group of dxhat, c2 = sum of dxhat xhat, where dxhat = dz (1 + scale) w.
      double c1 = 0.0, c2 = 0.0;
      for (int64_t c = c0; c < c0 + s.cg; ++c) {
        const int64_t nc = n * s.c + c;
        const opmath gain = opmath(1) + scale_data[nc];
        double sums[2];
        k.norm_act_grad(x_data + nc * s.hw, dy_data + nc * s.hw, dz.data() + (c - c0) * s.hw, s.hw, m,
                        r * w_data[c] * gain, b_data[c] * gain + shift_data[nc], act, sums);
        s1_data[nc] = sums[0];
        s2_data[nc] = sums[1] * double(r);
        c1 += double(gain) * double(w_data[c]) * s1_data[nc];
        c2 += double(gain) * double(w_data[c]) * s2_data[nc];
      }
      // dx = rstd (dxhat - c1 / M - xhat c2 / M) with xhat = rstd (x - mean).
      const opmath q = opmath(-double(r) * double(r) * c2 * inv_size);
      const opmath rr = opmath(-double(r) * c1 * inv_size);
      for (int64_t c = c0; c < c0 + s.cg; ++c) {
        const int64_t nc = n * s.c + c;
        k.norm_input_grad(x_data + nc * s.hw, dz.data() + (c - c0) * s.hw, dx_data + nc * s.hw, s.hw, m,
                          r * w_data[c] * (opmath(1) + scale_data[nc]), q, rr);
      }
    }
  });
}

// Returns (dx, dweight, dbias, dscale, dshift); dscale and dshift are empty where scale and shift were not given.
// Each gradient has its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, std::string_view act_name) {
  check_group_norm_act_args(x_in, weight, bias, scale, shift, groups);
  TORCH_CHECK(grad_y.sizes() == x_in.sizes(), "group_norm_act_backward: grad_y has shape ", grad_y.sizes(),
              " but x has ", x_in.sizes());
  const Activation act = parse_activation(act_name);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor dy = grad_y.to(x.scalar_type()).contiguous();
  const Shape s(x, groups);
  const at::ScalarType opmath = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(mean.numel() == s.n * groups && rstd.numel() == s.n * groups,
              "group_norm_act_backward: mean and rstd must have N * groups = ", s.n * groups, " values");
  const at::Tensor w = as_opmath(weight, opmath), b = as_opmath(bias, opmath);
  const at::Tensor sc = per_sample_channel(scale, s.n, s.c, opmath, 0.0);
  const at::Tensor sh = per_sample_channel(shift, s.n, s.c, opmath, 0.0);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  const auto sums_options = x.options().dtype(at::kDouble);
  at::Tensor s1 = at::empty({s.n, s.c}, sums_options);
  at::Tensor s2 = at::empty({s.n, s.c}, sums_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_backward_cpu", [&] {
    backward_kernel<scalar_t>(dy, x, w, b, sc, sh, as_opmath(mean, opmath), as_opmath(rstd, opmath), s, act, dx, s1,
                              s2);
  });
  // With a = dz (1 + scale): dshift = S1, dscale = w S2 + bias S1, dbias = sum_n (1 + scale) S1,
  // dweight = sum_n (1 + scale) S2.
  const at::Tensor gain = sc.to(at::kDouble) + 1.0;
  const at::Tensor dweight = (gain * s2).sum(0).to(weight.scalar_type());
  const at::Tensor dbias = (gain * s1).sum(0).to(bias.scalar_type());
  const at::Tensor dscale = scale.has_value()
                                ? (weight.to(at::kDouble) * s2 + bias.to(at::kDouble) * s1).to(scale->scalar_type())
                                : at::empty({0}, x.options());
  const at::Tensor dshift = shift.has_value() ? s1.to(shift->scalar_type()) : at::empty({0}, x.options());
  return {dx, dweight, dbias, dscale, dshift};
}

}  // namespace
}  // namespace dreambooth_fast::cpu

TORCH_LIBRARY_IMPL(dreambooth_fast, CPU, m) {
  m.impl("group_norm_act", &dreambooth_fast::cpu::group_norm_act_cpu);
  m.impl("group_norm_act_backward", &dreambooth_fast::cpu::group_norm_act_backward_cpu);
}
