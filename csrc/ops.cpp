// Op schemas of the dreambooth_fast native extension and the Python module entry.
// Kernels register themselves per device in csrc/cpu/*.cpp and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

extern "C" {
// Importing dreambooth_fast._C runs the static TORCH_LIBRARY registrations below. The module's one attribute,
// cpu_kernels, names the instruction set the CPU kernels use here ("AVX2" or "DEFAULT").
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "cpu_kernels", dreambooth_fast::cpu::cpu_kernels_capability()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(dreambooth_fast, m) {
  // x_t = sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * eps, and for prediction_type == "v_prediction" also
  // v = sqrt(ac[t]) * eps - sqrt(1 - ac[t]) * x0 (an empty tensor for "epsilon" and "sample", whose targets
  // are eps and x0 themselves and need no pass of their own).
  m.def("add_noise(Tensor x0, Tensor eps, Tensor timesteps, Tensor alphas_cumprod, str prediction_type) -> (Tensor, Tensor)");
  // Returns (loss, dloss_dpred, parts): the gradient is written in the same pass as the loss, in pred's opmath dtype
  // (float32 for float16 and bfloat16 pred, else pred's dtype); the loss is in pred's dtype, and so are parts,
  // its two terms [subject, prior] (prior_weight included; 0 without prior rows) from the same reduction.
  m.def("dreambooth_loss(Tensor pred, Tensor target, Tensor? weights, int n_instance, float prior_weight) -> (Tensor, Tensor, Tensor)");
  // y = act(GroupNorm(x; groups, eps, weight, bias) * (1 + scale) + shift) for a channels-first x [N, C, *], act
  // "gelu" (erf), "silu" or "identity"; scale and shift are optional [N, C]. Returns (y, mean, rstd): mean and
  // rstd per (sample, group) in x's opmath dtype, all the backward needs besides the inputs.
  m.def("group_norm_act(Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, int groups, float eps, str act) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_x, grad_weight, grad_bias, grad_scale, grad_shift), each in its input's dtype; grad_scale and
  // grad_shift are empty where scale and shift were not given.
  m.def("group_norm_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, int groups, str act) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
