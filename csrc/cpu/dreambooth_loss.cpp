// CPU kernel of dreambooth_fast::dreambooth_loss: one pass over pred and target that returns the weighted
// subject-plus-prior loss and its two parts, and writes its gradient dL/dpred.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu/kernels.h"

namespace dreambooth_fast::cpu {
namespace {

// Rows are reduced in fixed chunks of kChunk elements, each chunk's partial sum kept apart and the partials
// added in a fixed order, so the loss is bitwise the same for any number of threads.
constexpr int64_t kChunk = 1024;
// Chunks per parallel task (32768 elements, ATen's grain size); smaller problems run on one thread.
constexpr int64_t kGrainChunks = 32;

// True when every row t[i] is contiguous (the batch dimension itself may be strided, as in pred[:, :3]).
bool rows_contiguous(const at::Tensor& t) {
  int64_t expected = 1;
  for (int64_t dim = t.dim() - 1; dim >= 1; --dim) {
    if (t.size(dim) != 1 && t.stride(dim) != expected) return false;
    expected *= t.size(dim);
  }
  return true;
}

at::Tensor with_contiguous_rows(const at::Tensor& t) { return rows_contiguous(t) ? t : t.contiguous(); }

// Loss coefficient c_i of every row: w_i / (n_instance * D) for subject rows, prior_weight / (n_prior * D) for
// prior rows.
std::vector<double> row_coefficients(int64_t n, int64_t d, const std::optional<at::Tensor>& weights, int64_t n_instance,
                                     double prior_weight) {
  std::vector<double> c(n);
  const double instance_scale = 1.0 / (static_cast<double>(n_instance) * static_cast<double>(d));
  if (weights.has_value()) {
    const at::Tensor w = weights->to(at::kDouble).contiguous();
    const double* w_data = w.const_data_ptr<double>();
    for (int64_t i = 0; i < n_instance; ++i) c[i] = w_data[i] * instance_scale;
  } else {
    std::fill(c.begin(), c.begin() + n_instance, instance_scale);
  }
  if (n_instance < n) {
    const double prior_scale = prior_weight / (static_cast<double>(n - n_instance) * static_cast<double>(d));
    std::fill(c.begin() + n_instance, c.end(), prior_scale);
  }
  return c;
}

// {loss, subject part, prior part}. Subject rows come first, so the subject part is the loss summed so far
// when the prior rows begin: the same additions, the loss bit for bit as without the parts.
template <typename scalar_t>
std::array<double, 3> loss_kernel(const at::Tensor& pred, const at::Tensor& target, const std::vector<double>& coef,
                                  int64_t n_instance, at::Tensor& grad) {
  const auto sq_err = cpu_kernels<scalar_t>().sq_err;
  const int64_t n = pred.size(0);
  const int64_t d = pred.numel() / n;
  const int64_t chunks_per_row = std::max<int64_t>(1, (d + kChunk - 1) / kChunk);
  const int64_t p_stride = pred.stride(0);
  const int64_t y_stride = target.stride(0);
  const scalar_t* p_data = pred.const_data_ptr<scalar_t>();
  const scalar_t* y_data = target.const_data_ptr<scalar_t>();
  opmath_t<scalar_t>* g_data = grad.mutable_data_ptr<opmath_t<scalar_t>>();
  std::vector<double> partial(n * chunks_per_row);
  at::parallel_for(0, n * chunks_per_row, kGrainChunks, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / chunks_per_row;
      const int64_t start = (item % chunks_per_row) * kChunk;
      const int64_t len = std::min(kChunk, d - start);
      const auto scale = static_cast<opmath_t<scalar_t>>(2.0 * coef[row]);
      partial[item] = sq_err(p_data + row * p_stride + start, y_data + row * y_stride + start,
                             g_data + row * d + start, len, scale);
    }
  });
  double loss = 0.0;
  double subject = 0.0;
  double prior = 0.0;
  for (int64_t row = 0; row < n; ++row) {
    double row_sum = 0.0;
    for (int64_t k = 0; k < chunks_per_row; ++k) row_sum += partial[row * chunks_per_row + k];
    loss += coef[row] * row_sum;
    if (row < n_instance) {
      subject = loss;
    } else {
      prior += coef[row] * row_sum;
    }
  }
  return {loss, subject, prior};
}

// pred and target may have a strided batch dimension as long as each row is contiguous; other layouts are
// copied to contiguous first. The gradient is a contiguous tensor of pred's shape in pred's opmath dtype (float32
// for float16 and bfloat16): the backward pass scales it and rounds once to pred's dtype. The parts are
// [subject, prior] in pred's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dreambooth_loss_cpu(const at::Tensor& pred_in, const at::Tensor& target_in,
                                                       const std::optional<at::Tensor>& weights, int64_t n_instance,
                                                       double prior_weight) {
  check_dreambooth_loss_args(pred_in, target_in, weights, n_instance);
  const at::Tensor pred = with_contiguous_rows(pred_in);
  const at::Tensor target = with_contiguous_rows(target_in);
  const int64_t n = pred.size(0);
  const std::vector<double> coef = row_coefficients(n, pred.numel() / n, weights, n_instance, prior_weight);
  at::Tensor grad = at::empty(pred.sizes(), pred.options().dtype(at::toOpMathType(pred.scalar_type())));
  std::array<double, 3> sums{};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "dreambooth_loss_cpu", [&] {
    sums = loss_kernel<scalar_t>(pred, target, coef, n_instance, grad);
  });
  const at::Tensor parts = at::tensor({sums[1], sums[2]}, at::kDouble).to(pred.scalar_type());
  return {at::scalar_tensor(sums[0], pred.options()), grad, parts};
}

}  // namespace
}  // namespace dreambooth_fast::cpu

TORCH_LIBRARY_IMPL(dreambooth_fast, CPU, m) {
  m.impl("dreambooth_loss", &dreambooth_fast::cpu::dreambooth_loss_cpu);
}
