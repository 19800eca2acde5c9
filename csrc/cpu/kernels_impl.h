// Definitions of the inner loops declared in kernels.h, for the capability named by CPU_CAPABILITY (DEFAULT
// or AVX2, with CPU_CAPABILITY_AVX2 defined for the latter): included once by each kernels_<capability>.cpp.
// Raw pointers and at::vec only, so that little besides these loops is compiled with the wider instruction set.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>

#include "cpu/kernels.h"

namespace dreambooth_fast::cpu::CPU_CAPABILITY {
namespace {

template <typename scalar_t>
using OpVec = at::vec::Vectorized<opmath_t<scalar_t>>;

// Elements per vector step: two opmath vectors (for half/bfloat16 exactly one Vectorized<scalar_t>).
template <typename scalar_t>
constexpr int64_t kStep = 2 * OpVec<scalar_t>::size();

template <typename scalar_t>
inline void load2(const scalar_t* p, OpVec<scalar_t>& lo, OpVec<scalar_t>& hi) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
  } else {
    lo = OpVec<scalar_t>::loadu(p);
    hi = OpVec<scalar_t>::loadu(p + OpVec<scalar_t>::size());
  }
}

template <typename scalar_t>
inline void store2(scalar_t* p, const OpVec<scalar_t>& lo, const OpVec<scalar_t>& hi) {
  if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  } else {
    lo.store(p);
    hi.store(p + OpVec<scalar_t>::size());
  }
}

template <typename Vec>
inline double lane_sum(const Vec& v) {
  typename Vec::value_type lanes[Vec::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

template <bool kVelocity, typename scalar_t>
void noise_loop(const scalar_t* x0, const scalar_t* eps, scalar_t* xt, scalar_t* v, int64_t len,
                opmath_t<scalar_t> a, opmath_t<scalar_t> s) {
  using Vec = OpVec<scalar_t>;
  const Vec va(a);
  const Vec vs(s);
  int64_t j = 0;
  for (; j + kStep<scalar_t> <= len; j += kStep<scalar_t>) {
    Vec x_lo, x_hi, e_lo, e_hi;
    load2(x0 + j, x_lo, x_hi);
    load2(eps + j, e_lo, e_hi);
    store2(xt + j, at::vec::fmadd(va, x_lo, vs * e_lo), at::vec::fmadd(va, x_hi, vs * e_hi));
    if constexpr (kVelocity) {
      store2(v + j, at::vec::fmsub(va, e_lo, vs * x_lo), at::vec::fmsub(va, e_hi, vs * x_hi));
    }
  }
  for (; j < len; ++j) {
    const opmath_t<scalar_t> x = x0[j];
    const opmath_t<scalar_t> e = eps[j];
    xt[j] = static_cast<scalar_t>(a * x + s * e);
    if constexpr (kVelocity) v[j] = static_cast<scalar_t>(a * e - s * x);
  }
}

template <typename scalar_t>
void noise(const scalar_t* x0, const scalar_t* eps, scalar_t* xt, scalar_t* v, int64_t len, opmath_t<scalar_t> a,
           opmath_t<scalar_t> s) {
  if (v != nullptr) {
    noise_loop<true>(x0, eps, xt, v, len, a, s);
  } else {
    noise_loop<false>(x0, eps, xt, v, len, a, s);
  }
}

// Squares are summed in opmath vector lanes (at most len / kStep terms per lane), the lanes in double.
template <typename scalar_t>
double sq_err(const scalar_t* p, const scalar_t* y, opmath_t<scalar_t>* g, int64_t len, opmath_t<scalar_t> scale) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const Vec vscale(scale);
  Vec acc_lo(opmath(0));
  Vec acc_hi(opmath(0));
  int64_t j = 0;
  for (; j + kStep<scalar_t> <= len; j += kStep<scalar_t>) {
    Vec p_lo, p_hi, y_lo, y_hi;
    load2(p + j, p_lo, p_hi);
    load2(y + j, y_lo, y_hi);
    const Vec d_lo = p_lo - y_lo;
    const Vec d_hi = p_hi - y_hi;
    acc_lo = at::vec::fmadd(d_lo, d_lo, acc_lo);
    acc_hi = at::vec::fmadd(d_hi, d_hi, acc_hi);
    store2<opmath>(g + j, vscale * d_lo, vscale * d_hi);
  }
  double sum = lane_sum(acc_lo + acc_hi);
  for (; j < len; ++j) {
    const opmath diff = opmath(p[j]) - opmath(y[j]);
    sum += diff * diff;
    g[j] = scale * diff;
  }
  return sum;
}

// Sum of x over a run: opmath vector lanes (at most len / kStep terms each), the lanes and the tail in double.
template <typename scalar_t>
double sum(const scalar_t* x, int64_t len) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  Vec acc_lo(opmath(0));
  Vec acc_hi(opmath(0));
  int64_t j = 0;
  for (; j + kStep<scalar_t> <= len; j += kStep<scalar_t>) {
    Vec lo, hi;
    load2(x + j, lo, hi);
    acc_lo = acc_lo + lo;
    acc_hi = acc_hi + hi;
  }
  double total = lane_sum(acc_lo + acc_hi);
  for (; j < len; ++j) total += static_cast<opmath>(x[j]);
  return total;
}

template <typename scalar_t>
double sum_sq_dev(const scalar_t* x, int64_t len, opmath_t<scalar_t> m) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  const Vec vm(m);
  Vec acc_lo(opmath(0));
  Vec acc_hi(opmath(0));
  int64_t j = 0;
  for (; j + kStep<scalar_t> <= len; j += kStep<scalar_t>) {
    Vec lo, hi;
    load2(x + j, lo, hi);
    lo = lo - vm;
    hi = hi - vm;
    acc_lo = at::vec::fmadd(lo, lo, acc_lo);
    acc_hi = at::vec::fmadd(hi, hi, acc_hi);
  }
  double total = lane_sum(acc_lo + acc_hi);
  for (; j < len; ++j) {
    const opmath d = static_cast<opmath>(x[j]) - m;
    total += d * d;
  }
  return total;
}

// exp for the activations: float uses ATen's inline polynomial exp_u20 (20 ulp, clamped; the Sleef exp behind
// Vectorized::exp is an out-of-line call, and GELU's exp is most of this op's arithmetic); double keeps exp.
template <typename Vec>
inline Vec act_exp(const Vec& v) {
  if constexpr (std::is_same_v<typename Vec::value_type, float>) {
    return v.exp_u20();
  } else {
    return v.exp();
  }
}

// The standard normal CDF Phi(z) and, where pdf is not null, its density phi(z), sharing one exp(-z^2 / 2).
// float: erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), the formula of ATen's Vectorized<float>::erf, which
// torch's GELU uses; double: the exact erf, for float64 checks.
template <typename Vec>
inline Vec normal_cdf(const Vec& z, Vec* pdf) {
  using T = typename Vec::value_type;
  const Vec u = z * Vec(T(M_SQRT1_2));
  const Vec e = act_exp(Vec(T(0)) - u * u);  // exp(-z^2 / 2)
  if (pdf != nullptr) *pdf = e * Vec(T(M_2_SQRTPI * M_SQRT1_2 * 0.5));
  if constexpr (std::is_same_v<T, float>) {
    const Vec t = Vec(T(1)) / at::vec::fmadd(Vec(T(0.3275911)), u.abs(), Vec(T(1)));
    Vec poly = at::vec::fmadd(Vec(T(1.061405429)), t, Vec(T(-1.453152027)));
    poly = at::vec::fmadd(poly, t, Vec(T(1.421413741)));
    poly = at::vec::fmadd(poly, t, Vec(T(-0.284496736)));
    poly = at::vec::fmadd(poly, t, Vec(T(0.254829592)));
    const Vec tail = Vec(T(0.5)) * poly * t * e;  // Phi(-|z|) = (1 - erf(|u|)) / 2
    return Vec::blendv(Vec(T(1)) - tail, tail, z < Vec(T(0)));
  } else {
    return Vec(T(0.5)) * (Vec(T(1)) + u.erf());
  }
}

// act(z) and act'(z) on opmath vectors: GELU z Phi(z), its derivative Phi(z) + z phi(z); SiLU z sigmoid(z), its
// derivative s (1 + z (1 - s)).
template <Activation kAct, typename Vec>
inline Vec act_value(const Vec& z) {
  using T = typename Vec::value_type;
  if constexpr (kAct == Activation::gelu) {
    return z * normal_cdf(z, static_cast<Vec*>(nullptr));
  } else if constexpr (kAct == Activation::silu) {
    return z / (Vec(T(1)) + act_exp(Vec(T(0)) - z));
  } else {
    return z;
  }
}

template <Activation kAct, typename Vec>
inline Vec act_slope(const Vec& z) {
  using T = typename Vec::value_type;
  if constexpr (kAct == Activation::gelu) {
    Vec pdf;
    const Vec cdf = normal_cdf(z, &pdf);
    return at::vec::fmadd(z, pdf, cdf);
  } else if constexpr (kAct == Activation::silu) {
    const Vec s = Vec(T(1)) / (Vec(T(1)) + act_exp(Vec(T(0)) - z));
    return s * at::vec::fmadd(z, Vec(T(1)) - s, Vec(T(1)));
  } else {
    return Vec(T(1));
  }
}

// The loops below run their tail (len % kStep elements) through the same vector code on a zero-padded copy, so
// that every element sees the same arithmetic.
template <typename T, int64_t N>
struct Tail {
  T data[N] = {};
  Tail(const T* p, int64_t n) { std::copy(p, p + n, data); }
  explicit Tail() = default;
};

template <Activation kAct, typename scalar_t>
void norm_act_loop(const scalar_t* x, scalar_t* y, int64_t len, opmath_t<scalar_t> m, opmath_t<scalar_t> a,
                   opmath_t<scalar_t> b) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const Vec vm(m), va(a), vb(b);
  auto step = [&](const scalar_t* xs, scalar_t* ys) {
    Vec lo, hi;
    load2(xs, lo, hi);
    store2(ys, act_value<kAct>(at::vec::fmadd(va, lo - vm, vb)), act_value<kAct>(at::vec::fmadd(va, hi - vm, vb)));
  };
  int64_t j = 0;
  for (; j + kS <= len; j += kS) step(x + j, y + j);
  if (j < len) {
    Tail<scalar_t, kS> xs(x + j, len - j), ys;
    step(xs.data, ys.data);
    std::copy(ys.data, ys.data + (len - j), y + j);
  }
}

template <Activation kAct, typename scalar_t>
void norm_act_grad_loop(const scalar_t* x, const scalar_t* dy, opmath_t<scalar_t>* dz, int64_t len,
                        opmath_t<scalar_t> m, opmath_t<scalar_t> a, opmath_t<scalar_t> b, double* sums) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const Vec vm(m), va(a), vb(b);
  Vec s1(opmath(0)), s2(opmath(0));
  // Padded tail elements have dy = 0, so dz = 0 there and they add nothing to the sums.
  auto step = [&](const scalar_t* xs, const scalar_t* dys, opmath* dzs) {
    Vec x_lo, x_hi, g_lo, g_hi;
    load2(xs, x_lo, x_hi);
    load2(dys, g_lo, g_hi);
    x_lo = x_lo - vm;
    x_hi = x_hi - vm;
    const Vec d_lo = g_lo * act_slope<kAct>(at::vec::fmadd(va, x_lo, vb));
    const Vec d_hi = g_hi * act_slope<kAct>(at::vec::fmadd(va, x_hi, vb));
    store2<opmath>(dzs, d_lo, d_hi);
    s1 = s1 + d_lo + d_hi;
    s2 = at::vec::fmadd(d_lo, x_lo, at::vec::fmadd(d_hi, x_hi, s2));
  };
  int64_t j = 0;
  for (; j + kS <= len; j += kS) step(x + j, dy + j, dz + j);
  if (j < len) {
    Tail<scalar_t, kS> xs(x + j, len - j), dys(dy + j, len - j);
    Tail<opmath, kS> dzs;
    step(xs.data, dys.data, dzs.data);
    std::copy(dzs.data, dzs.data + (len - j), dz + j);
  }
  sums[0] = lane_sum(s1);
  sums[1] = lane_sum(s2);
}

template <typename scalar_t>
void norm_act(const scalar_t* x, scalar_t* y, int64_t len, opmath_t<scalar_t> m, opmath_t<scalar_t> a,
              opmath_t<scalar_t> b, Activation act) {
  switch (act) {
    case Activation::gelu: return norm_act_loop<Activation::gelu>(x, y, len, m, a, b);
    case Activation::silu: return norm_act_loop<Activation::silu>(x, y, len, m, a, b);
    case Activation::identity: return norm_act_loop<Activation::identity>(x, y, len, m, a, b);
  }
}

template <typename scalar_t>
void norm_act_grad(const scalar_t* x, const scalar_t* dy, opmath_t<scalar_t>* dz, int64_t len, opmath_t<scalar_t> m,
                   opmath_t<scalar_t> a, opmath_t<scalar_t> b, Activation act, double* sums) {
  switch (act) {
    case Activation::gelu: return norm_act_grad_loop<Activation::gelu>(x, dy, dz, len, m, a, b, sums);
    case Activation::silu: return norm_act_grad_loop<Activation::silu>(x, dy, dz, len, m, a, b, sums);
    case Activation::identity: return norm_act_grad_loop<Activation::identity>(x, dy, dz, len, m, a, b, sums);
  }
}

template <typename scalar_t>
void norm_input_grad(const scalar_t* x, const opmath_t<scalar_t>* dz, scalar_t* dx, int64_t len, opmath_t<scalar_t> m,
                     opmath_t<scalar_t> p, opmath_t<scalar_t> q, opmath_t<scalar_t> r) {
  using Vec = OpVec<scalar_t>;
  using opmath = opmath_t<scalar_t>;
  constexpr int64_t kS = kStep<scalar_t>;
  const Vec vm(m), vp(p), vq(q), vr(r);
  auto step = [&](const scalar_t* xs, const opmath* dzs, scalar_t* dxs) {
    Vec x_lo, x_hi, d_lo, d_hi;
    load2(xs, x_lo, x_hi);
    load2<opmath>(dzs, d_lo, d_hi);
    store2(dxs, at::vec::fmadd(vp, d_lo, at::vec::fmadd(vq, x_lo - vm, vr)),
           at::vec::fmadd(vp, d_hi, at::vec::fmadd(vq, x_hi - vm, vr)));
  };
  int64_t j = 0;
  for (; j + kS <= len; j += kS) step(x + j, dz + j, dx + j);
  if (j < len) {
    Tail<scalar_t, kS> xs(x + j, len - j), dxs;
    Tail<opmath, kS> dzs(dz + j, len - j);
    step(xs.data, dzs.data, dxs.data);
    std::copy(dxs.data, dxs.data + (len - j), dx + j);
  }
}

}  // namespace

template <typename scalar_t>
Kernels<scalar_t> kernels() {
  return {&noise<scalar_t>, &sq_err<scalar_t>, &sum<scalar_t>, &sum_sq_dev<scalar_t>,
          &norm_act<scalar_t>, &norm_act_grad<scalar_t>, &norm_input_grad<scalar_t>};
}

template Kernels<float> kernels<float>();
template Kernels<double> kernels<double>();
template Kernels<c10::Half> kernels<c10::Half>();
template Kernels<c10::BFloat16> kernels<c10::BFloat16>();

}  // namespace dreambooth_fast::cpu::CPU_CAPABILITY
