// Definitions of the inner loops declared in kernels.h, for the capability named by CPU_CAPABILITY (DEFAULT
// or AVX2, with CPU_CAPABILITY_AVX2 defined for the latter): included once by each kernels_<capability>.cpp.
// Raw pointers and at::vec only, so that little besides these loops is compiled with the wider instruction set.
#pragma once
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>

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
  opmath lanes[Vec::size()];
  (acc_lo + acc_hi).store(lanes);
  double sum = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) sum += lanes[k];
  for (; j < len; ++j) {
    const opmath diff = opmath(p[j]) - opmath(y[j]);
    sum += diff * diff;
    g[j] = scale * diff;
  }
  return sum;
}

}  // namespace

template <typename scalar_t>
Kernels<scalar_t> kernels() {
  return {&noise<scalar_t>, &sq_err<scalar_t>};
}

template Kernels<float> kernels<float>();
template Kernels<double> kernels<double>();
template Kernels<c10::Half> kernels<c10::Half>();
template Kernels<c10::BFloat16> kernels<c10::BFloat16>();

}  // namespace dreambooth_fast::cpu::CPU_CAPABILITY
