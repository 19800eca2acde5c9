// The inner loops for AVX2 CPUs. Built only on x86-64, and only with -mavx2 -mfma -mf16c (setup.py and
// CMakeLists.txt add them for this file alone); used when the CPU has AVX2 (see cpu_kernels()).
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernels_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/kernels_impl.h"
