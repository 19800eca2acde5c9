// Argument checks shared by the CPU and CUDA kernels: every bad argument fails here with a message that
// names the argument, before any kernel runs.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <optional>
#include <string_view>
#include <utility>

#include "activation.h"

namespace dreambooth_fast {

enum class PredictionType { epsilon = 0, v_prediction = 1, sample = 2 };

inline PredictionType parse_prediction_type(std::string_view name) {
  if (name == "epsilon") return PredictionType::epsilon;
  if (name == "v_prediction") return PredictionType::v_prediction;
  if (name == "sample") return PredictionType::sample;
  TORCH_CHECK(false, "add_noise: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got '",
              std::string(name), "'");
}

inline Activation parse_activation(std::string_view name) {
  if (name == "gelu") return Activation::gelu;
  if (name == "silu") return Activation::silu;
  if (name == "identity") return Activation::identity;
  TORCH_CHECK(false, "group_norm_act: act must be 'gelu', 'silu' or 'identity', got '", std::string(name), "'");
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                              const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device());
}

// Shapes, dtypes and devices. Timestep values are range-checked by the kernels (on the CPU before the
// pass, on the GPU with a device-side assert) since reading them here would synchronise the device. A failed
// device-side assert leaves the process's CUDA context unusable: ops.add_noise checks CPU timesteps on the host
// before they are moved to the GPU.
inline void check_add_noise_args(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& timesteps,
                                 const at::Tensor& alphas_cumprod) {
  constexpr const char* op = "add_noise";
  TORCH_CHECK(is_supported_float(x0.scalar_type()), op, ": x0 must be float32, float64, float16 or bfloat16, got ",
              x0.scalar_type());
  TORCH_CHECK(eps.scalar_type() == x0.scalar_type(), op, ": eps has dtype ", eps.scalar_type(),
              " but x0 has ", x0.scalar_type());
  TORCH_CHECK(eps.sizes() == x0.sizes(), op, ": eps has shape ", eps.sizes(), " but x0 has ", x0.sizes());
  TORCH_CHECK(x0.dim() >= 1 && x0.size(0) > 0, op, ": x0 must have a non-empty batch dimension, got shape ",
              x0.sizes());
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == x0.size(0), op,
              ": timesteps must have shape [batch] = [", x0.size(0), "], got ", timesteps.sizes());
  TORCH_CHECK(timesteps.scalar_type() == at::kLong || timesteps.scalar_type() == at::kInt, op,
              ": timesteps must be int64 or int32, got ", timesteps.scalar_type());
  TORCH_CHECK(alphas_cumprod.dim() == 1 && alphas_cumprod.size(0) > 0, op,
              ": alphas_cumprod must be a non-empty 1-D table, got shape ", alphas_cumprod.sizes());
  TORCH_CHECK(alphas_cumprod.scalar_type() == at::kFloat || alphas_cumprod.scalar_type() == at::kDouble, op,
              ": alphas_cumprod must be float32 or float64, got ", alphas_cumprod.scalar_type());
  check_same_device(op, x0, "x0", eps, "eps");
  check_same_device(op, x0, "x0", timesteps, "timesteps");
  check_same_device(op, x0, "x0", alphas_cumprod, "alphas_cumprod");
}

inline void check_dreambooth_loss_args(const at::Tensor& pred, const at::Tensor& target,
                                       const std::optional<at::Tensor>& weights, int64_t n_instance) {
  constexpr const char* op = "dreambooth_loss";
  TORCH_CHECK(is_supported_float(pred.scalar_type()), op,
              ": pred must be float32, float64, float16 or bfloat16, got ", pred.scalar_type());
  TORCH_CHECK(target.scalar_type() == pred.scalar_type(), op, ": target has dtype ", target.scalar_type(),
              " but pred has ", pred.scalar_type());
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target has shape ", target.sizes(), " but pred has ",
              pred.sizes());
  TORCH_CHECK(pred.dim() >= 1 && pred.size(0) > 0, op, ": pred must have a non-empty batch dimension, got shape ",
              pred.sizes());
  TORCH_CHECK(n_instance >= 1 && n_instance <= pred.size(0), op, ": n_instance must be in [1, batch = ",
              pred.size(0), "], got ", n_instance);
  check_same_device(op, pred, "pred", target, "target");
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n_instance, op,
                ": weights must have shape [n_instance] = [", n_instance, "], got ", w.sizes());
    TORCH_CHECK(is_supported_float(w.scalar_type()), op, ": weights must be a float tensor, got ", w.scalar_type());
    check_same_device(op, pred, "pred", w, "weights");
  }
}

// x is [N, C, *] with C divisible by groups; weight and bias [C]; scale and shift, when given, [N, C]: one value
// per (sample, channel), as diffusers' time embedding chunks are.
inline void check_group_norm_act_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                      int64_t groups) {
  constexpr const char* op = "group_norm_act";
  TORCH_CHECK(is_supported_float(x.scalar_type()), op, ": x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, op, ": x must be a non-empty [N, C, *] tensor, got shape ", x.sizes());
  const int64_t channels = x.size(1);
  TORCH_CHECK(groups > 0 && channels % groups == 0, op, ": groups must divide the channels C = ", channels, ", got ",
              groups);
  for (const auto& [t, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, op, ": ", name, " must have shape [C] = [", channels,
                "], got ", t->sizes());
    TORCH_CHECK(is_supported_float(t->scalar_type()), op, ": ", name, " must be a float tensor, got ",
                t->scalar_type());
    check_same_device(op, x, "x", *t, name);
  }
  for (const auto& [t, name] : {std::pair{&scale, "scale"}, std::pair{&shift, "shift"}}) {
    if (!t->has_value()) continue;
    const at::Tensor& v = **t;
    TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == channels, op, ": ", name,
                " must have shape [N, C] = [", x.size(0), ", ", channels, "], got ", v.sizes());
    TORCH_CHECK(is_supported_float(v.scalar_type()), op, ": ", name, " must be a float tensor, got ", v.scalar_type());
    check_same_device(op, x, "x", v, name);
  }
}

}  // namespace dreambooth_fast
