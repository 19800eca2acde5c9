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

at::Tensor as_opmath(const at::Tensor& t, at::ScalarType opmath) { return t.to(opmath).contiguous(); }

// The data of an optional per-(sample, channel) tensor as contiguous opmath values (null when not given: 0), and
// the tensor that owns them.
template <typename opmath>
struct Optional {
  at::Tensor owner;
  const opmath* data = nullptr;
  Optional(const std::optional<at::Tensor>& t, at::ScalarType type) {
    if (!t.has_value()) return;
    owner = as_opmath(*t, type);
    data = owner.const_data_ptr<opmath>();
  }
  opmath operator[](int64_t i) const { return data == nullptr ? opmath(0) : data[i]; }
};

struct Shape {
  int64_t n, c, groups, cg, hw;  // cg channels per group, hw elements per channel
  explicit Shape(const at::Tensor& x, int64_t groups_)
      : n(x.size(0)), c(x.size(1)), groups(groups_), cg(x.size(1) / groups_), hw(x.numel() / (x.size(0) * x.size(1))) {}
  int64_t group_size() const { return cg * hw; }
  int64_t grain() const { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, group_size())); }
};

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                    const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
                    const Shape& s, double eps, Activation act, at::Tensor& y, at::Tensor& mean, at::Tensor& rstd) {
  using opmath = opmath_t<scalar_t>;
  const Kernels<scalar_t> k = cpu_kernels<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
  const opmath* w_data = w.const_data_ptr<opmath>();
  const opmath* b_data = b.const_data_ptr<opmath>();
  const Optional<opmath> scale_data(scale_in, mean.scalar_type());
  const Optional<opmath> shift_data(shift_in, mean.scalar_type());
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
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_cpu", [&] {
    forward_kernel<scalar_t>(x, w, b, scale, shift, s, eps, act, y, mean, rstd);
  });
  return {y, mean, rstd};
}

// Fills dx and the parameter gradients (opmath, contiguous: dweight, dbias [C]; dscale, dshift [N, C] where scale
// and shift were given). Per (sample, channel): S1 = sum dz and S2 = sum dz xhat; then, with a = dz (1 + scale):
// dshift = S1, dscale = w S2 + bias S1, dbias = sum_n (1 + scale) S1, dweight = sum_n (1 + scale) S2, the batch
// summed in a fixed order.
template <typename scalar_t>
void backward_kernel(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                     const std::optional<at::Tensor>& scale_in, const std::optional<at::Tensor>& shift_in,
                     const at::Tensor& mean, const at::Tensor& rstd, const Shape& s, Activation act, at::Tensor& dx,
                     at::Tensor& dweight, at::Tensor& dbias, at::Tensor& dscale, at::Tensor& dshift) {
  using opmath = opmath_t<scalar_t>;
  const Kernels<scalar_t> k = cpu_kernels<scalar_t>();
  const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
  const opmath* w_data = w.const_data_ptr<opmath>();
  const opmath* b_data = b.const_data_ptr<opmath>();
  const Optional<opmath> scale_data(scale_in, mean.scalar_type());
  const Optional<opmath> shift_data(shift_in, mean.scalar_type());
  const opmath* mean_data = mean.const_data_ptr<opmath>();
  const opmath* rstd_data = rstd.const_data_ptr<opmath>();
  std::vector<double> s1(s.n * s.c), s2(s.n * s.c);
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
        s1[nc] = sums[0];
        s2[nc] = sums[1] * double(r);
        c1 += double(gain) * double(w_data[c]) * s1[nc];
        c2 += double(gain) * double(w_data[c]) * s2[nc];
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
  opmath* dw = dweight.mutable_data_ptr<opmath>();
  opmath* db = dbias.mutable_data_ptr<opmath>();
  opmath* dsc = scale_in.has_value() ? dscale.mutable_data_ptr<opmath>() : nullptr;
  opmath* dsh = shift_in.has_value() ? dshift.mutable_data_ptr<opmath>() : nullptr;
  for (int64_t c = 0; c < s.c; ++c) {
    double sum_w = 0.0, sum_b = 0.0;
    for (int64_t n = 0; n < s.n; ++n) {
      const int64_t nc = n * s.c + c;
      const double gain = 1.0 + double(scale_data[nc]);
      sum_w += gain * s2[nc];
      sum_b += gain * s1[nc];
      if (dsc != nullptr) dsc[nc] = opmath(double(w_data[c]) * s2[nc] + double(b_data[c]) * s1[nc]);
      if (dsh != nullptr) dsh[nc] = opmath(s1[nc]);
    }
    dw[c] = opmath(sum_w);
    db[c] = opmath(sum_b);
  }
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
  const auto options = x.options().dtype(opmath);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dweight = at::empty({s.c}, options), dbias = at::empty({s.c}, options);
  at::Tensor dscale = at::empty({scale.has_value() ? s.n : 0, s.c}, options);
  at::Tensor dshift = at::empty({shift.has_value() ? s.n : 0, s.c}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_act_backward_cpu", [&] {
    backward_kernel<scalar_t>(dy, x, w, b, scale, shift, as_opmath(mean, opmath), as_opmath(rstd, opmath), s, act, dx,
                              dweight, dbias, dscale, dshift);
  });
  return {dx, dweight.to(weight.scalar_type()), dbias.to(bias.scalar_type()),
          scale.has_value() ? dscale.to(scale->scalar_type()) : at::empty({0}, x.options()),
          shift.has_value() ? dshift.to(shift->scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace dreambooth_fast::cpu

TORCH_LIBRARY_IMPL(dreambooth_fast, CPU, m) {
  m.impl("group_norm_act", &dreambooth_fast::cpu::group_norm_act_cpu);
  m.impl("group_norm_act_backward", &dreambooth_fast::cpu::group_norm_act_backward_cpu);
}
