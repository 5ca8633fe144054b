// Batch normalisation's training pass on channels-last CPU tensors: forward (batch statistics, normalised output)
// and backward (input, weight and bias gradients). torch's kernels run this layout at 2-4x their memory floor on
// small images; these make two passes over the data each way, which is the floor:
// - forward: per-channel sums of x and x^2 (shifted by each channel's first value, so that the variance does not
//   cancel), then y = (x - mean) * gain + bias;
// - backward: per-channel sums of dy and dy * (x - mean), then dx = dy * gain + (x - mean) * slope + offset, with
//   gain, slope and offset per channel.
// Layouts: x, y, dy, dx are (N * H * W) rows of C channels (channels-last N x C x H x W tensors), float32, float64
// or bfloat16 (then computed in float32); the weight and bias are of any floating dtype. Rows are split across
// threads; within a thread, sums over a block of rows are kept in acc_t (float32, or float64 for float64 data) and
// added into float64.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11, at::Tensor casts (torch/extension.h: twice the build)

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "thread_sums.h"

namespace {

// Element loads and stores in acc_t, written so that the compiler vectorises them: a bfloat16 is the top half of a
// float32 (c10's own conversions, with their calls and branches, left these loops scalar and 2.4x slower than torch).
template <typename T>
T widened(T value) { return value; }
inline float widened(c10::BFloat16 value) {
  const uint32_t bits = uint32_t(value.x) << 16;
  float wide;
  std::memcpy(&wide, &bits, sizeof wide);
  return wide;
}
template <typename T>
void store(T& out, T value) { out = value; }
inline void store(c10::BFloat16& out, float value) {  // rounded to nearest, ties to even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  out.x = value != value ? uint16_t(0x7FC0) : uint16_t(rounded);
}

constexpr int64_t kBlock = 64;  // rows summed in acc_t before their sums join the float64 ones
constexpr int64_t kGrain = 256;  // rows per parallel task, at least

// sums[0..C) += sum of first(row)[c] and sums[C..2C) += sum of first(row)[c] * second(row)[c] over rows [begin, end).
template <typename acc_t, typename First, typename Second>
void add_sums(double* sums, int64_t c, int64_t begin, int64_t end, const First& first, const Second& second) {
  std::vector<acc_t> block(2 * c);
  for (int64_t start = begin; start < end; start += kBlock) {
    std::fill(block.begin(), block.end(), acc_t(0));
    acc_t* s = block.data();
    acc_t* q = block.data() + c;
    for (int64_t row = start; row < std::min(end, start + kBlock); ++row) {
#pragma omp simd
      for (int64_t k = 0; k < c; ++k) {
        const acc_t a = first(row, k);
        s[k] += a;
        q[k] += a * second(row, k);
      }
    }
    for (int64_t k = 0; k < 2 * c; ++k) sums[k] += block[k];
  }
}

// out[row][k] = a[row][k] * p[k] + (b[row][k] - m[k]) * q[k] + r[k], computed in acc_t (a may be null: then
// without its term).
template <typename scalar_t, typename acc_t>
void per_channel_affine(scalar_t* out, const scalar_t* a, const scalar_t* b, const std::vector<acc_t>& p,
                        const std::vector<acc_t>& m, const std::vector<acc_t>& q, const std::vector<acc_t>& r,
                        int64_t rows, int64_t c) {
  const acc_t *pp = p.data(), *mm = m.data(), *qq = q.data(), *rr = r.data();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* o = out + row * c;
      const scalar_t* br = b + row * c;
      if (a == nullptr) {
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) store(o[k], (widened(br[k]) - mm[k]) * qq[k] + rr[k]);
      } else {
        const scalar_t* ar = a + row * c;
#pragma omp simd
        for (int64_t k = 0; k < c; ++k) store(o[k], widened(ar[k]) * pp[k] + (widened(br[k]) - mm[k]) * qq[k] + rr[k]);
      }
    }
  });
}

void check_input(const at::Tensor& x, const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "x: a channels-last 4-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kBFloat16,
              "float32, float64 or bfloat16 only");
  TORCH_CHECK(x.numel() > x.size(1), "more than one value per channel");
  TORCH_CHECK(!weight || (weight->dim() == 1 && weight->size(0) == x.size(1) && weight->is_floating_point()),
              "weight and bias: C floating-point values");
}

// The C values of an optional per-channel tensor as float64 (`otherwise` where it is absent).
std::vector<double> as_doubles(const std::optional<at::Tensor>& values, int64_t c, double otherwise) {
  if (!values) return std::vector<double>(c, otherwise);
  const at::Tensor doubles = values->detach().to(at::kDouble).contiguous();
  return std::vector<double>(doubles.data_ptr<double>(), doubles.data_ptr<double>() + c);
}

}  // namespace

// (y, mean, invstd, var): the batch's mean and biased variance per channel (float64), invstd = 1 / sqrt(var + eps).
std::vector<at::Tensor> batch_norm_forward(at::Tensor x, std::optional<at::Tensor> weight,
                                              std::optional<at::Tensor> bias, double eps) {
  check_input(x, weight);
  TORCH_CHECK(weight.has_value() == bias.has_value(), "weight and bias: both or neither");
  const int64_t c = x.size(1), rows = x.numel() / c;
  auto y = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto stats = at::empty({3, c}, x.options().dtype(at::kDouble));  // mean, invstd, var
  double* mean = stats[0].data_ptr<double>();
  double* invstd = stats[1].data_ptr<double>();
  double* var = stats[2].data_ptr<double>();
  const std::vector<double> w = as_doubles(weight, c, 1.0), b = as_doubles(bias, c, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batch_norm_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    std::vector<acc_t> origin(c);  // the first row: values near the mean, so sums do not cancel
    for (int64_t k = 0; k < c; ++k) origin[k] = widened(xp[k]);
    const acc_t* o = origin.data();
    auto centred = [=](int64_t row, int64_t k) { return widened(xp[row * c + k]) - o[k]; };
    const std::vector<double> sums = thread_sums<double>(2 * c, rows, kGrain, [&](double* s, int64_t b, int64_t e) {
      add_sums<acc_t>(s, c, b, e, centred, centred);
    });
    std::vector<acc_t> centre(c), gain(c), offset(c);  // y = (x - mean) * weight * invstd + bias
    for (int64_t k = 0; k < c; ++k) {
      const double shift = sums[k] / rows;
      var[k] = std::max(0.0, sums[c + k] / rows - shift * shift);
      mean[k] = origin[k] + shift;
      invstd[k] = 1.0 / std::sqrt(var[k] + eps);
      centre[k] = acc_t(mean[k]);
      gain[k] = acc_t(w[k] * invstd[k]);
      // (x - centre) * gain stands for (x - mean) * gain (the centre is the mean rounded): the offset takes the rest
      offset[k] = acc_t(b[k] - (mean[k] - double(centre[k])) * double(gain[k]));
    }
    per_channel_affine<scalar_t, acc_t>(y.data_ptr<scalar_t>(), nullptr, xp, {}, centre, gain, offset, rows, c);
  });
  return {y, stats[0], stats[1], stats[2]};
}

// (grad_x, grad_weight, grad_bias) of batch_norm_forward, each only where asked for (else an undefined tensor); the
// weight's and bias's gradients in the weight's dtype.
std::vector<at::Tensor> batch_norm_backward(at::Tensor grad_y, at::Tensor x,
                                               std::optional<at::Tensor> weight, at::Tensor mean,
                                               at::Tensor invstd, bool input_grad, bool weight_grad) {
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
  const std::vector<double> w = as_doubles(weight, c, 1.0);
  at::Tensor grad_x, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* dy = grad_y.data_ptr<scalar_t>();
    const std::vector<acc_t> centre(mu, mu + c);
    const acc_t* m = centre.data();
    auto gradient = [=](int64_t row, int64_t k) { return widened(dy[row * c + k]); };
    auto centred = [=](int64_t row, int64_t k) { return widened(xp[row * c + k]) - m[k]; };
    const std::vector<double> sums = thread_sums<double>(2 * c, rows, kGrain, [&](double* s, int64_t b, int64_t e) {
      add_sums<acc_t>(s, c, b, e, gradient, centred);  // sum dy, sum dy * (x - centre)
    });
    std::vector<double> dy_sum(c), dy_xmu_sum(c);  // sum dy * (x - mean): the centre is the mean rounded to acc_t
    for (int64_t k = 0; k < c; ++k) {
      dy_sum[k] = sums[k];
      dy_xmu_sum[k] = sums[c + k] - (mu[k] - double(centre[k])) * sums[k];
    }
    if (weight_grad) {
      const auto options = weight ? weight->options() : x.options();
      auto per_channel = [&](const std::vector<double>& values) {  // copied: the vector is gone after the call
        return at::tensor(values, at::TensorOptions().dtype(at::kDouble)).to(options);
      };
      std::vector<double> scaled(c);
      for (int64_t k = 0; k < c; ++k) scaled[k] = dy_xmu_sum[k] * inv[k];
      grad_weight = per_channel(scaled);
      grad_bias = per_channel(dy_sum);
    }
    if (input_grad) {  // dx = gain * (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n)
      std::vector<acc_t> gain(c), slope(c), offset(c);
      for (int64_t k = 0; k < c; ++k) {
        const double g = w[k] * inv[k];
        gain[k] = acc_t(g);
        slope[k] = acc_t(-g * inv[k] * inv[k] * dy_xmu_sum[k] / rows);
        // (x - centre) * slope stands for (x - mean) * slope: the offset takes the difference
        offset[k] = acc_t(-g * dy_sum[k] / rows - (mu[k] - double(centre[k])) * double(slope[k]));
      }
      grad_x = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
      per_channel_affine<scalar_t, acc_t>(grad_x.data_ptr<scalar_t>(), dy, xp, gain, centre, slope, offset, rows, c);
    }
  });
  return {grad_x, grad_weight, grad_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &batch_norm_forward, "batch norm training forward, channels-last: (y, mean, invstd, var)");
  m.def("backward", &batch_norm_backward, "its backward: (grad_x, grad_weight, grad_bias)");
}
