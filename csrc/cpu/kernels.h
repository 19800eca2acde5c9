// The CPU kernels' inner loops over contiguous runs of elements. They are compiled once per CPU capability
// (kernels_default.cpp, and kernels_avx2.cpp with -mavx2 -mfma -mf16c on x86-64: ATen's own scheme) and chosen
// once at run time by cpu_kernels(), so one build runs on any x86-64 CPU and uses AVX2 where it exists.
#pragma once
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "activation.h"

namespace dreambooth_fast::cpu {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;  // float for half/bfloat16, else the type itself

template <typename scalar_t>
struct Kernels {
  // x_t = a*x0 + s*eps over one sample's run, and v = a*eps - s*x0 unless v is null.
  void (*noise)(const scalar_t* x0, const scalar_t* eps, scalar_t* xt, scalar_t* v, int64_t len,
                opmath_t<scalar_t> a, opmath_t<scalar_t> s);
  // Returns sum (p - y)^2 over the run and writes g = scale * (p - y) in opmath precision (float for half and
  // bfloat16: scale is ~1/numel, so these values would be subnormal or zero in half before the backward pass
  // multiplies them by the loss scale).
  double (*sq_err)(const scalar_t* p, const scalar_t* y, opmath_t<scalar_t>* g, int64_t len,
                   opmath_t<scalar_t> scale);
  // Sum of x and sum of (x - m)^2 over a run, in opmath vector lanes added up in double.
  double (*sum)(const scalar_t* x, int64_t len);
  double (*sum_sq_dev)(const scalar_t* x, int64_t len, opmath_t<scalar_t> m);
  // y = act(a (x - m) + b) over one channel's run: GroupNorm, its affine and the scale-shift folded into a and b.
  void (*norm_act)(const scalar_t* x, scalar_t* y, int64_t len, opmath_t<scalar_t> m, opmath_t<scalar_t> a,
                   opmath_t<scalar_t> b, Activation act);
  // Backward of norm_act's activation over one channel's run: writes dz = dy act'(a (x - m) + b) and returns
  // sums[0] = sum dz, sums[1] = sum dz (x - m).
  void (*norm_act_grad)(const scalar_t* x, const scalar_t* dy, opmath_t<scalar_t>* dz, int64_t len,
                        opmath_t<scalar_t> m, opmath_t<scalar_t> a, opmath_t<scalar_t> b, Activation act,
                        double* sums);
  // dx = p dz + q (x - m) + r over one channel's run (the GroupNorm input gradient, its group sums folded in).
  void (*norm_input_grad)(const scalar_t* x, const opmath_t<scalar_t>* dz, scalar_t* dx, int64_t len,
                          opmath_t<scalar_t> m, opmath_t<scalar_t> p, opmath_t<scalar_t> q, opmath_t<scalar_t> r);
};

namespace DEFAULT {
template <typename scalar_t>
Kernels<scalar_t> kernels();
}
namespace AVX2 {
template <typename scalar_t>
Kernels<scalar_t> kernels();
}

// The kernels of the best capability this CPU and build have. Honours ATEN_CPU_CAPABILITY (e.g. "default")
// the way ATen's own kernels do.
template <typename scalar_t>
Kernels<scalar_t> cpu_kernels();

// "AVX2" or "DEFAULT": which of the two cpu_kernels() picks.
const char* cpu_kernels_capability();

}  // namespace dreambooth_fast::cpu
