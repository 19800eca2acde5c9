// CPU kernel of dreambooth_fast::add_noise: one pass over x0 and eps writing x_t (and v for v_prediction).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace dreambooth_fast::cpu {
namespace {

// Elements per parallel task; smaller passes run on one thread (thread start-up would cost more).
constexpr int64_t kGrain = 32768;

template <typename opmath>
struct Coefficients {
  std::vector<opmath> a;  // sqrt(alphas_cumprod[t_i])
  std::vector<opmath> s;  // sqrt(1 - alphas_cumprod[t_i])
};

// Gathers the per-sample coefficients in opmath precision (float for half/bfloat16, else the sample dtype),
// after checking every timestep against the table.
template <typename opmath>
Coefficients<opmath> gather_coefficients(const at::Tensor& timesteps, const at::Tensor& alphas_cumprod) {
  const at::Tensor t = timesteps.to(at::kLong).contiguous();
  const at::Tensor table = alphas_cumprod.to(c10::CppTypeToScalarType<opmath>::value).contiguous();
  const int64_t n = t.numel();
  const int64_t table_size = table.numel();
  const int64_t* t_data = t.const_data_ptr<int64_t>();
  const opmath* ac = table.const_data_ptr<opmath>();
  Coefficients<opmath> c{std::vector<opmath>(n), std::vector<opmath>(n)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t ti = t_data[i];
    TORCH_CHECK(ti >= 0 && ti < table_size, "add_noise: timesteps[", i, "] = ", ti,
                " is outside the alphas_cumprod table [0, ", table_size, ")");
    c.a[i] = std::sqrt(ac[ti]);
    c.s[i] = std::sqrt(opmath(1) - ac[ti]);
  }
  return c;
}

template <typename scalar_t>
void add_noise_kernel(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& timesteps,
                      const at::Tensor& alphas_cumprod, at::Tensor& xt, at::Tensor& v, bool velocity) {
  const auto c = gather_coefficients<opmath_t<scalar_t>>(timesteps, alphas_cumprod);
  const auto noise = cpu_kernels<scalar_t>().noise;
  const int64_t n = x0.size(0);  // > 0 (checked)
  const int64_t d = x0.numel() / n;
  const scalar_t* x0_data = x0.const_data_ptr<scalar_t>();
  const scalar_t* eps_data = eps.const_data_ptr<scalar_t>();
  scalar_t* xt_data = xt.mutable_data_ptr<scalar_t>();
  scalar_t* v_data = velocity ? v.mutable_data_ptr<scalar_t>() : nullptr;
  // Tasks are ranges of the flat index; a range may span the end of one sample and the start of the next.
  at::parallel_for(0, n * d, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end;) {
      const int64_t row = pos / d;
      const int64_t stop = std::min(end, (row + 1) * d);
      noise(x0_data + pos, eps_data + pos, xt_data + pos, velocity ? v_data + pos : nullptr, stop - pos, c.a[row],
            c.s[row]);
      pos = stop;
    }
  });
}

// Non-contiguous x0/eps are made contiguous first; x_t and v are contiguous tensors of x0's shape and dtype.
std::tuple<at::Tensor, at::Tensor> add_noise_cpu(const at::Tensor& x0_in, const at::Tensor& eps_in,
                                                 const at::Tensor& timesteps, const at::Tensor& alphas_cumprod,
                                                 std::string_view prediction_type) {
  check_add_noise_args(x0_in, eps_in, timesteps, alphas_cumprod);
  const bool velocity = parse_prediction_type(prediction_type) == PredictionType::v_prediction;
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor eps = eps_in.contiguous();
  at::Tensor xt = at::empty(x0.sizes(), x0.options());
  at::Tensor v = at::empty(velocity ? x0.sizes() : at::IntArrayRef{0}, x0.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "add_noise_cpu", [&] {
    add_noise_kernel<scalar_t>(x0, eps, timesteps, alphas_cumprod, xt, v, velocity);
  });
  return {xt, v};
}

}  // namespace
}  // namespace dreambooth_fast::cpu

TORCH_LIBRARY_IMPL(dreambooth_fast, CPU, m) { m.impl("add_noise", &dreambooth_fast::cpu::add_noise_cpu); }
