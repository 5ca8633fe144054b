// Batch normalisation's training pass on channels-last CPU tensors: forward (batch statistics, normalised output)
// and backward (input, weight and bias gradients). torch's kernels run this layout at 2-4x their memory floor on
// small images; these make two passes over the data each way, which is the floor:
// - forward: per-channel sums of x and x^2 (shifted by each channel's first value, so that the variance does not
//   cancel), then y = (x - mean) * gain + bias;
// - backward: per-channel sums of dy and dy * (x - mean), then dx = dy * gain + (x - mean) * slope + offset, with
//   gain, slope and offset per channel.
// Layouts: x, y, dy, dx are (N * H * W) rows of C channels (channels-last N x C x H x W tensors). Rows are split
// across threads; within a thread, sums over a block of rows are kept in scalar_t and added into double.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "thread_sums.h"

namespace {

constexpr int64_t kBlock = 64;  // rows summed in scalar_t before their sums join the double ones
constexpr int64_t kGrain = 256;  // rows per parallel task, at least

// sums[0..C) += sum of first(row)[c] and sums[C..2C) += sum of first(row)[c] * second(row)[c] over rows [begin, end).
template <typename scalar_t, typename First, typename Second>
void add_sums(double* sums, int64_t c, int64_t begin, int64_t end, const First& first, const Second& second) {
  std::vector<scalar_t> block(2 * c);
  for (int64_t start = begin; start < end; start += kBlock) {
    std::fill(block.begin(), block.end(), scalar_t(0));
    scalar_t* s = block.data();
    scalar_t* q = block.data() + c;
    for (int64_t row = start; row < std::min(end, start + kBlock); ++row) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        const scalar_t a = first(row, k);
        s[k] += a;
        q[k] += a * second(row, k);
      }
    }
    for (int64_t k = 0; k < 2 * c; ++k) sums[k] += block[k];
  }
}

// out[row][k] = a[row][k] * p[k] + (b[row][k] - m[k]) * q[k] + r[k] (a may be null: then without its term).
template <typename scalar_t>
void per_channel_affine(scalar_t* out, const scalar_t* a, const scalar_t* b, const std::vector<scalar_t>& p,
                        const std::vector<scalar_t>& m, const std::vector<scalar_t>& q,
                        const std::vector<scalar_t>& r, int64_t rows, int64_t c) {
  const scalar_t *pp = p.data(), *mm = m.data(), *qq = q.data(), *rr = r.data();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* o = out + row * c;
      const scalar_t* br = b + row * c;
      if (a == nullptr) {
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) o[k] = (br[k] - mm[k]) * qq[k] + rr[k];
      } else {
        const scalar_t* ar = a + row * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) o[k] = ar[k] * pp[k] + (br[k] - mm[k]) * qq[k] + rr[k];
      }
    }
  });
}

void check_input(const torch::Tensor& x, const std::optional<torch::Tensor>& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "x: a channels-last 4-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(x.numel() > x.size(1), "more than one value per channel");
  TORCH_CHECK(!weight || (weight->dim() == 1 && weight->size(0) == x.size(1) && weight->is_contiguous() &&
                          weight->scalar_type() == x.scalar_type()), "weight and bias: C values of x's dtype");
}

}  // namespace

// (y, mean, invstd, var): the batch's mean and biased variance per channel (float64), invstd = 1 / sqrt(var + eps).
std::vector<torch::Tensor> batch_norm_forward(torch::Tensor x, std::optional<torch::Tensor> weight,
                                              std::optional<torch::Tensor> bias, double eps) {
  check_input(x, weight);
  TORCH_CHECK(weight.has_value() == bias.has_value(), "weight and bias: both or neither");
  const int64_t c = x.size(1), rows = x.numel() / c;
  auto y = torch::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto stats = torch::empty({3, c}, x.options().dtype(at::kDouble));  // mean, invstd, var
  double* mean = stats[0].data_ptr<double>();
  double* invstd = stats[1].data_ptr<double>();
  double* var = stats[2].data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_forward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const std::vector<scalar_t> origin(xp, xp + c);  // the first row: values near the mean, so sums do not cancel
    const scalar_t* o = origin.data();
    auto centred = [=](int64_t row, int64_t k) { return xp[row * c + k] - o[k]; };
    const std::vector<double> sums = thread_sums<double>(2 * c, rows, kGrain, [&](double* s, int64_t b, int64_t e) {
      add_sums<scalar_t>(s, c, b, e, centred, centred);
    });
    std::vector<scalar_t> centre(c), gain(c), offset(c);  // y = (x - mean) * weight * invstd + bias
    for (int64_t k = 0; k < c; ++k) {
      const double shift = sums[k] / rows;
      var[k] = std::max(0.0, sums[c + k] / rows - shift * shift);
      mean[k] = origin[k] + shift;
      invstd[k] = 1.0 / std::sqrt(var[k] + eps);
      centre[k] = scalar_t(mean[k]);
      gain[k] = scalar_t(weight ? double(weight->data_ptr<scalar_t>()[k]) * invstd[k] : invstd[k]);
      offset[k] = bias ? bias->data_ptr<scalar_t>()[k] : scalar_t(0);
    }
    per_channel_affine<scalar_t>(y.data_ptr<scalar_t>(), nullptr, xp, {}, centre, gain, offset, rows, c);
  });
  return {y, stats[0], stats[1], stats[2]};
}

// (grad_x, grad_weight, grad_bias) of batch_norm_forward, each only where asked for (else an undefined tensor).
std::vector<torch::Tensor> batch_norm_backward(torch::Tensor grad_y, torch::Tensor x,
                                               std::optional<torch::Tensor> weight, torch::Tensor mean,
                                               torch::Tensor invstd, bool input_grad, bool weight_grad) {
  check_input(x, weight);
  TORCH_CHECK(grad_y.sizes() == x.sizes() && grad_y.scalar_type() == x.scalar_type(), "grad_y: x's shape and dtype");
  const int64_t c = x.size(1), rows = x.numel() / c;
  TORCH_CHECK(mean.scalar_type() == at::kDouble && invstd.scalar_type() == at::kDouble && mean.numel() == c &&
                  invstd.numel() == c, "mean, invstd: C float64 values");
  grad_y = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  mean = mean.contiguous();
  invstd = invstd.contiguous();
  const double* mu = mean.data_ptr<double>();
  const double* inv = invstd.data_ptr<double>();
  torch::Tensor grad_x, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_norm_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dy = grad_y.data_ptr<scalar_t>();
    const std::vector<scalar_t> centre(mu, mu + c);
    const scalar_t* m = centre.data();
    auto gradient = [=](int64_t row, int64_t k) { return dy[row * c + k]; };
    auto centred = [=](int64_t row, int64_t k) { return xp[row * c + k] - m[k]; };
    const std::vector<double> sums = thread_sums<double>(2 * c, rows, kGrain, [&](double* s, int64_t b, int64_t e) {
      add_sums<scalar_t>(s, c, b, e, gradient, centred);  // sum dy, sum dy * (x - mean)
    });
    if (weight_grad) {
      grad_weight = torch::empty({c}, x.options());
      grad_bias = torch::empty({c}, x.options());
      for (int64_t k = 0; k < c; ++k) {
        grad_weight.data_ptr<scalar_t>()[k] = scalar_t(sums[c + k] * inv[k]);
        grad_bias.data_ptr<scalar_t>()[k] = scalar_t(sums[k]);
      }
    }
    if (input_grad) {  // dx = gain * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n)
      std::vector<scalar_t> gain(c), slope(c), offset(c);
      for (int64_t k = 0; k < c; ++k) {
        const double g = weight ? double(weight->data_ptr<scalar_t>()[k]) * inv[k] : inv[k];
        gain[k] = scalar_t(g);
        slope[k] = scalar_t(-g * inv[k] * inv[k] * sums[c + k] / rows);
        offset[k] = scalar_t(-g * sums[k] / rows);
      }
      grad_x = torch::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
      per_channel_affine<scalar_t>(grad_x.data_ptr<scalar_t>(), dy, xp, gain, centre, slope, offset, rows, c);
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &batch_norm_forward, "batch norm training forward, channels-last: (y, mean, invstd, var)");
  m.def("backward", &batch_norm_backward, "its backward: (grad_x, grad_weight, grad_bias)");
}
