// The inner loops for any CPU (plain compiler flags), and the run-time choice between them and the AVX2 ones.
#define CPU_CAPABILITY DEFAULT
#include "cpu/kernels_impl.h"

#include <ATen/Version.h>

#include <string>

namespace dreambooth_fast::cpu {
namespace {

// DBFAST_WITH_AVX2 is defined by the build when kernels_avx2.cpp is compiled in (x86-64).
bool use_avx2() {
#ifdef DBFAST_WITH_AVX2
  static const bool avx2 = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX2" || capability == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

}  // namespace

template <typename scalar_t>
Kernels<scalar_t> cpu_kernels() {
#ifdef DBFAST_WITH_AVX2
  if (use_avx2()) return AVX2::kernels<scalar_t>();
#endif
  return DEFAULT::kernels<scalar_t>();
}

template Kernels<float> cpu_kernels<float>();
template Kernels<double> cpu_kernels<double>();
template Kernels<c10::Half> cpu_kernels<c10::Half>();
template Kernels<c10::BFloat16> cpu_kernels<c10::BFloat16>();

const char* cpu_kernels_capability() { return use_avx2() ? "AVX2" : "DEFAULT"; }

}  // namespace dreambooth_fast::cpu
