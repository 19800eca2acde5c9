// C++ test of the native ops, called through the dispatcher as Python calls them: values worked out by hand,
// and bad arguments failing with a c10::Error that names the argument. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const std::string& what) {
  const bool ok = got.sizes() == want.sizes() && at::allclose(got.to(at::kDouble), want.to(at::kDouble), tol, tol);
  expect(ok, what + ": got " + got.toString() + " " + std::to_string(got.to(at::kDouble).sum().item<double>()));
}

void expect_error(const std::function<void()>& call, const std::string& needle, const std::string& what) {
  try {
    call();
    expect(false, what + ": no error");
  } catch (const c10::Error& err) {
    const std::string message = err.what_without_backtrace();
    expect(message.find(needle) != std::string::npos, what + ": message was: " + message);
  }
}

using AddNoise = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, std::string_view);
using Loss = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                int64_t, double);

using Norm = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&,
                                                             const std::optional<at::Tensor>&, int64_t, double,
                                                             std::string_view);
using NormBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, int64_t, std::string_view);

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                    const std::optional<at::Tensor>& scale,
                                                    const std::optional<at::Tensor>& shift, int64_t groups, double eps,
                                                    std::string_view act) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dreambooth_fast::group_norm_act", "").typed<Norm>();
  return op.call(x, w, b, scale, shift, groups, eps, act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_backward(
    const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& mean,
    const at::Tensor& rstd, int64_t groups, std::string_view act) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dreambooth_fast::group_norm_act_backward", "")
                       .typed<NormBackward>();
  return op.call(dy, x, w, b, scale, shift, mean, rstd, groups, act);
}

std::tuple<at::Tensor, at::Tensor> add_noise(const at::Tensor& x0, const at::Tensor& eps, const at::Tensor& t,
                                             const at::Tensor& ac, std::string_view prediction_type) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dreambooth_fast::add_noise", "").typed<AddNoise>();
  return op.call(x0, eps, t, ac, prediction_type);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss(const at::Tensor& pred, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weights, int64_t n_instance,
                                        double prior_weight) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("dreambooth_fast::dreambooth_loss", "").typed<Loss>();
  return op.call(pred, target, weights, n_instance, prior_weight);
}

at::Tensor tensor2d(std::initializer_list<double> values, int64_t rows) {
  return at::tensor(std::vector<double>(values), at::kFloat).reshape({rows, -1});
}

void test_add_noise_values() {
  // alphas_cumprod[1] = 0.64 -> a = 0.8, s = 0.6; alphas_cumprod[0] = 0.25 -> a = 0.5, s = sqrt(0.75).
  const at::Tensor ac = at::tensor({0.25f, 0.64f, 0.36f});
  const at::Tensor t = at::tensor({int64_t{1}, int64_t{0}});
  const at::Tensor x0 = tensor2d({1, 2, 3, 4}, 2);
  const at::Tensor eps = tensor2d({0.5, -1, 2, 0}, 2);
  const double s1 = std::sqrt(0.75);
  auto [xt, v] = add_noise(x0, eps, t, ac, "v_prediction");
  expect_close(xt, tensor2d({1.1, 1.0, 1.5 + 2 * s1, 2.0}, 2), 1e-6, "add_noise x_t");
  expect_close(v, tensor2d({-0.2, -2.0, 1.0 - 3 * s1, -4 * s1}, 2), 1e-6, "add_noise v");
  auto [xt_eps, v_eps] = add_noise(x0, eps, t, ac, "epsilon");
  expect_close(xt_eps, xt, 0, "add_noise x_t does not depend on the prediction type");
  expect(v_eps.numel() == 0, "add_noise returns an empty v for epsilon");
}

void test_add_noise_long_rows() {
  // Long rows go through the vector loop and several parallel tasks: x_t = a per row when x0 = 1, eps = 0.
  const at::Tensor ac = at::tensor({0.25f, 0.64f, 0.36f});
  const at::Tensor t = at::tensor({int64_t{0}, int64_t{1}, int64_t{2}});
  const at::Tensor want = at::tensor({0.5f, 0.8f, 0.6f}).reshape({3, 1}).expand({3, 50001});
  for (const auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    const at::Tensor x0 = at::ones({3, 50001}, dtype);
    auto [xt, v] = add_noise(x0, at::zeros_like(x0), t, ac, "sample");
    expect(xt.scalar_type() == dtype, "add_noise keeps the dtype");
    expect_close(xt, want, dtype == at::kFloat || dtype == at::kDouble ? 1e-6 : 4e-3,
                 std::string("add_noise long rows ") + c10::toString(dtype));
  }
}

void test_loss_values() {
  // D = 2; subject rows 0, 1 with weights 1, 0.5 (c = 1/4, 1/8), one prior row with weight 2 (c = 1):
  // L = 5/4 + 25/8 + 2 = 6.375 (subject part 4.375, prior part 2), dL/dpred = 2 c (pred - target).
  const at::Tensor pred = tensor2d({1, 2, 3, 4, 1, -1}, 3);
  const at::Tensor target = at::zeros({3, 2});
  const at::Tensor weights = at::tensor({1.0f, 0.5f});
  auto [value, grad, parts] = loss(pred, target, weights, 2, 2.0);
  expect(value.dim() == 0 && value.scalar_type() == at::kFloat, "loss is a 0-dim float tensor");
  expect_close(value, at::scalar_tensor(6.375), 1e-6, "loss value");
  expect_close(parts, at::tensor({4.375f, 2.0f}), 1e-6, "loss parts: subject, prior");
  expect_close(grad, tensor2d({0.5, 1.0, 0.75, 1.0, 2.0, -2.0}, 3), 1e-6, "loss gradient");
  // The same rows as the first two columns of a wider tensor: a strided batch dimension.
  const at::Tensor wide = at::cat({pred, at::full({3, 2}, 7.0f)}, 1).narrow(1, 0, 2);
  expect(!wide.is_contiguous(), "strided pred");
  auto [wide_value, wide_grad, wide_parts] = loss(wide, target, weights, 2, 2.0);
  expect_close(wide_value, value, 0, "loss of a strided pred");
  expect_close(wide_grad, grad, 0, "gradient of a strided pred");
  expect_close(wide_parts, parts, 0, "parts of a strided pred");
}

void test_loss_long_rows() {
  const at::Tensor pred = at::ones({4, 30001});
  auto [value, grad, parts] = loss(pred, at::zeros_like(pred), std::nullopt, 4, 1.0);
  expect_close(value, at::scalar_tensor(1.0), 1e-6, "mean of ones");
  expect_close(parts, at::tensor({1.0f, 0.0f}), 1e-6, "no prior rows: all of the loss is the subject part");
  expect_close(grad, at::full({4, 30001}, 2.0 / (4 * 30001)), 1e-6, "gradient of the mean");
}

void test_loss_gradient_of_half_pred_is_float32() {
  // 2c = 2 / (4 * 30001) ~ 1.7e-5 is below float16's smallest normal number (6.1e-5): stored in float16 it would
  // keep 8 significant bits before the backward pass applies the loss scale. The buffer is float32 instead.
  for (const auto dtype : {at::kHalf, at::kBFloat16}) {
    const at::Tensor pred = at::ones({4, 30001}, dtype);
    auto [value, grad, parts] = loss(pred, at::zeros_like(pred), std::nullopt, 4, 1.0);
    expect(value.scalar_type() == dtype && parts.scalar_type() == dtype, "the loss and its parts keep pred's dtype");
    expect(grad.scalar_type() == at::kFloat, "the gradient of a half pred is float32");
    expect_close(grad, at::full({4, 30001}, 2.0 / (4 * 30001)), 1e-9, "float32 gradient of the mean");
  }
}

void test_group_norm_act_values() {
  // One sample, two channels of two values, one group: mean 2.5, variance 1.25, rstd = 1/sqrt(1.25) (eps 0), so
  // xhat = [-1.3416, -0.4472 | 0.4472, 1.3416]. weight [1, 2], bias [0, 1], scale [0.5, -0.5], shift [1, 0]:
  // y = (xhat w + b)(1 + scale) + shift = [1.5 xhat + 1 | xhat + 0.5] with the identity activation.
  const at::Tensor x = at::tensor({1.0f, 2.0f, 3.0f, 4.0f}).reshape({1, 2, 2});
  const at::Tensor w = at::tensor({1.0f, 2.0f}), b = at::tensor({0.0f, 1.0f});
  const at::Tensor scale = at::tensor({0.5f, -0.5f}).reshape({1, 2}), shift = at::tensor({1.0f, 0.0f}).reshape({1, 2});
  const double r = 1.0 / std::sqrt(1.25);
  auto [y, mean, rstd] = norm(x, w, b, scale, shift, 1, 0.0, "identity");
  expect_close(y, at::tensor({-1.5 * 1.5 * r + 1, -0.5 * 1.5 * r + 1, 0.5 * r + 0.5, 1.5 * r + 0.5}, at::kFloat)
                      .reshape({1, 2, 2}), 1e-6, "group_norm_act identity values");
  expect_close(mean, at::full({1, 1}, 2.5), 1e-6, "group_norm_act mean");
  expect_close(rstd, at::full({1, 1}, r), 1e-6, "group_norm_act rstd");
  // With dy = 1: dshift = S1 = [2, 2], S2 = sum xhat per channel = [-2r, 2r]; dbias = (1 + scale) S1 = [3, 1],
  // dweight = (1 + scale) S2, dscale = w S2 + b S1; the input gradient sums to 0 over the group.
  auto [dx, dw, db, dscale, dshift] = norm_backward(at::ones_like(x), x, w, b, scale, shift, mean, rstd, 1, "identity");
  expect_close(dshift, at::tensor({2.0f, 2.0f}).reshape({1, 2}), 1e-6, "group_norm_act dshift");
  expect_close(db, at::tensor({3.0f, 1.0f}), 1e-6, "group_norm_act dbias");
  expect_close(dw, at::tensor({-3.0 * r, r}, at::kFloat), 1e-6, "group_norm_act dweight");
  expect_close(dscale, at::tensor({-2.0 * r, 4.0 * r + 2.0}, at::kFloat).reshape({1, 2}), 1e-6,
               "group_norm_act dscale");
  expect_close(dx.sum(), at::scalar_tensor(0.0), 1e-6, "group_norm_act dx sums to 0 over the group");
  // A constant x normalises to 0: y = act(bias), GELU(1) = 0.8413447, SiLU(1) = 0.7310586; no scale or shift.
  const at::Tensor zeros = at::zeros({1, 1, 37});
  for (const auto& [act, want] : {std::pair{"gelu", 0.8413447461}, std::pair{"silu", 0.7310585786}}) {
    auto [y_act, m, s] = norm(zeros, at::ones({1}), at::ones({1}), std::nullopt, std::nullopt, 1, 1e-5, act);
    expect_close(y_act, at::full({1, 1, 37}, want), 1e-6, std::string("group_norm_act ") + act + " of the bias");
  }
}

void test_bad_arguments() {
  const at::Tensor ac = at::tensor({0.25f, 0.64f, 0.36f});
  const at::Tensor x0 = at::zeros({2, 3});
  const at::Tensor t = at::tensor({int64_t{0}, int64_t{1}});
  expect_error([&] { add_noise(x0, at::zeros({2, 4}), t, ac, "epsilon"); }, "eps has shape", "eps shape");
  expect_error([&] { add_noise(x0, x0, at::tensor({int64_t{0}, int64_t{3}}), ac, "epsilon"); },
               "timesteps[1] = 3 is outside the alphas_cumprod table [0, 3)", "timestep range");
  expect_error([&] { add_noise(x0, x0, t, ac, "flow"); }, "prediction_type must be", "prediction type");
  expect_error([&] { add_noise(x0.to(at::kInt), x0, t, ac, "epsilon"); }, "x0 must be float32", "x0 dtype");
  expect_error([&] { loss(x0, x0, std::nullopt, 0, 1.0); }, "n_instance must be in [1, batch = 2], got 0",
               "n_instance range");
  expect_error([&] { loss(x0, at::zeros({2, 4}), std::nullopt, 2, 1.0); }, "target has shape", "target shape");
  expect_error([&] { loss(x0, x0, at::ones({2}), 1, 1.0); }, "weights must have shape [n_instance] = [1]",
               "weights shape");
  const at::Tensor x = at::zeros({2, 6, 3});
  expect_error([&] { norm(x, at::ones({6}), at::ones({6}), std::nullopt, std::nullopt, 4, 1e-5, "gelu"); },
               "groups must divide the channels C = 6, got 4", "groups");
  expect_error([&] { norm(x, at::ones({6}), at::ones({6}), at::ones({2, 5}), std::nullopt, 3, 1e-5, "gelu"); },
               "scale must have shape [N, C] = [2, 6], got [2, 5]", "scale shape");
  expect_error([&] { norm(x, at::ones({6}), at::ones({6}), std::nullopt, std::nullopt, 3, 1e-5, "relu"); },
               "act must be 'gelu', 'silu' or 'identity', got 'relu'", "activation");
}

}  // namespace

int main() {
  test_add_noise_values();
  test_add_noise_long_rows();
  test_loss_values();
  test_loss_long_rows();
  test_loss_gradient_of_half_pred_is_float32();
  test_group_norm_act_values();
  test_bad_arguments();
  if (failures > 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
