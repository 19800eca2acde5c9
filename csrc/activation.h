// The activation that ends dreambooth_fast::group_norm_act (GELU in its erf form, as IF's UNets use it). A header
// of its own: the CPU inner loops (compiled with AVX2 flags) and the argument checks (with ATen) both need it.
#pragma once
#include <cstdint>

namespace dreambooth_fast {

enum class Activation : int64_t { identity = 0, silu = 1, gelu = 2 };

}  // namespace dreambooth_fast
