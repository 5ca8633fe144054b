// The passes of a depthwise 2-D convolution on channels-last CPU tensors. The backward pass: the input and kernel
// gradients in one sweep over the output gradient (oneDNN computes them in two, and its kernel gradient alone takes
// as long as the forward pass and the input gradient together).
//
// Layouts: x and grad_y are N x H x W x C in memory (channels-last N x C x H x W tensors), the kernels C x 1 x kh x
// kw (used as kh x kw x C). For each output pixel and each tap, two loops over the contiguous channels (which the
// compiler vectorises) scatter the output gradient into the input gradient and multiply it into the tap's
// kernel-gradient sums. Images are split across threads (an image's input gradient is written by one thread); each
// thread sums kernel gradients in its own buffer, and the buffers are added at the end.
//
// float32 3 x 3 convs of stride 1, padding 1 and dilation 1 on an AVX-512 CPU take a register-blocked path instead:
// for each band of an image's rows and each 16 channels, one sweep over the band's pixels, two output rows at a time,
// gathers each input-gradient vector from its 9 neighbours' output gradients (a forward conv with the kernel turned
// by 180 degrees) and adds each kernel tap's products into one of 9 registers, so every pixel's input gradient is
// written once and the sums go to memory once per band; each vector loaded serves both rows (12 loads per pixel pair
// where one row at a time takes 18 per pixel). The forward pass of the same convs takes the same sweep six output
// rows at a time (`kForwardRows`; other convs and dtypes go to torch's conv2d). Both sweep an image in bands of rows
// (bands.h), fetching the next band into L2 while one is swept: where each 16 channels' sweep over a whole image
// waited for memory a line per pixel (in cache the backward ran about 3x as fast), the backward ran 1.2-1.6x and the
// forward 1.0-1.3x as fast on Zen 4.
// Where the channels fill whole 16-float vectors, both write their output with streaming stores: the tensors are
// larger than the caches, and a plain store first reads each line it writes.
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11, at::Tensor casts (torch/extension.h: twice the build)

#include <ATen/Parallel.h>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bands.h"
#include "thread_sums.h"

namespace {

// The geometry of the register-blocked float32 paths: a 3 x 3 kernel, stride 1, padding 1, dilation 1.
[[maybe_unused]] bool register_blocked(int64_t kh, int64_t kw, const std::vector<int64_t>& stride,
                                       const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  const std::vector<int64_t> one{1, 1};
  return kh == 3 && kw == 3 && stride == one && padding == one && dilation == one;
}

#ifdef __AVX512F__
// Stores 16 lanes of `v` at `p`: a streaming store (`p` 64-byte aligned, all lanes) or a masked plain one.
template <bool Stream>
inline void store(float* p, __mmask16 m, __m512 v) {
  if constexpr (Stream) _mm512_stream_ps(p, v);
  else _mm512_mask_storeu_ps(p, m, v);
}

// Two output rows (y, y + 1) of the 3 x 3 backward path at one column: `rows[r]`, `grad_rows[r]` (r = 0..3) point at
// pixel 0 of rows y-1+r of x and grad_y at the 16-channel slice (nullptr outside the image, and for r >= 2 when row
// y + 1 is outside: `grad_x_row1` is then nullptr). Adds x(y'+i-1, col+j-1) * grad_y(y', col) into taps_sum[3i+j]
// and writes grad_x(y', col) = sum over i, j of grad_y(y'+1-i, col+1-j) * taps[3i+j] for y' = y, y + 1, each vector
// loaded once. `Edge`: the column has a neighbour outside the image.
template <bool Edge, bool Stream>
inline void pixel_pair_3x3(const float* const rows[4], const float* const grad_rows[4], float* grad_x_row0,
                           float* grad_x_row1, int64_t col, int64_t width, int64_t c, __mmask16 m,
                           const __m512 taps[9], __m512 taps_sum[9]) {
  const bool second = grad_x_row1 != nullptr;
  const __m512 g0 = _mm512_maskz_loadu_ps(m, grad_rows[1] + col * c);
  const __m512 g1 = second ? _mm512_maskz_loadu_ps(m, grad_rows[2] + col * c) : _mm512_setzero_ps();
  __m512 gx0 = _mm512_setzero_ps(), gx1 = _mm512_setzero_ps();
#pragma GCC unroll 3
  for (int j = 0; j < 3; ++j) {
    const int64_t at = col + j - 1, from = col + 1 - j;  // this tap's input column, and its gradient's source
    const bool at_inside = !Edge || (at >= 0 && at < width), from_inside = !Edge || (from >= 0 && from < width);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {  // row y-1+r: tap row r of output row y, r-1 of row y+1
      if (rows[r] != nullptr && at_inside) {
        const __m512 in = _mm512_maskz_loadu_ps(m, rows[r] + at * c);
        if (r <= 2) taps_sum[3 * r + j] = _mm512_fmadd_ps(in, g0, taps_sum[3 * r + j]);
        if (r >= 1 && second) taps_sum[3 * (r - 1) + j] = _mm512_fmadd_ps(in, g1, taps_sum[3 * (r - 1) + j]);
      }
      if (grad_rows[r] != nullptr && from_inside) {
        const __m512 g = _mm512_maskz_loadu_ps(m, grad_rows[r] + from * c);
        if (r <= 2) gx0 = _mm512_fmadd_ps(g, taps[3 * (2 - r) + j], gx0);
        if (r >= 1) gx1 = _mm512_fmadd_ps(g, taps[3 * (3 - r) + j], gx1);
      }
    }
  }
  store<Stream>(grad_x_row0 + col * c, m, gx0);
  if (second) store<Stream>(grad_x_row1 + col * c, m, gx1);
}

// Pointers to pixel 0 of rows first .. first + count - 1 of an image's 16-channel slice (`image` at it), nullptr for
// rows outside the image's h rows.
template <typename T, int count>
inline void row_pointers(T* image, int64_t first, int64_t h, int64_t row, T* (&rows)[count]) {
  for (int r = 0; r < count; ++r) rows[r] = first + r >= 0 && first + r < h ? image + (first + r) * row : nullptr;
}

// The 3 x 3 path for images [begin, end): x, grad_y and grad_x are N x H x W x C, taps 3 x 3 x C; adds the kernel
// gradient into `sums` (3 x 3 x C).
template <bool Stream>
void backward_3x3(const float* x, const float* taps, const float* grad_y, float* grad_x, float* sums, int64_t begin,
                  int64_t end, int64_t c, int64_t h, int64_t width) {
  const int64_t row = width * c, image = h * row, band = band_rows(2 * row * int64_t(sizeof(float)), 2);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t first = 0; first < h; first += band) {
      const int64_t last = std::min(first + band, h), next = b * image + last * row;  // the next image's after h
      const int64_t bytes = std::min(band * row, end * image - next) * int64_t(sizeof(float));
      const int64_t steps = (c + 15) / 16 * ((last - first + 1) / 2);  // row pairs swept in the band
      Ahead x_ahead(x + next, bytes, steps), grad_ahead(grad_y + next, bytes, steps);
      for (int64_t k = 0; k < c; k += 16) {
        const __mmask16 m = c - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (c - k)) - 1);
        __m512 tap[9], taps_sum[9];
        for (int t = 0; t < 9; ++t) {
          tap[t] = _mm512_maskz_loadu_ps(m, taps + t * c + k);
          taps_sum[t] = _mm512_maskz_loadu_ps(m, sums + t * c + k);
        }
        for (int64_t y = first; y < last; y += 2) {
          x_ahead.step();
          grad_ahead.step();
          const float *rows[4], *grad_rows[4];
          row_pointers(x + b * image + k, y - 1, h, row, rows);
          row_pointers(grad_y + b * image + k, y - 1, h, row, grad_rows);
          float* row0 = grad_x + b * image + y * row + k;
          float* row1 = y + 1 < h ? row0 + row : nullptr;  // rows[2, 3] and grad_rows[2, 3] are nullptr too then
          pixel_pair_3x3<true, Stream>(rows, grad_rows, row0, row1, 0, width, c, m, tap, taps_sum);
          for (int64_t col = 1; col < width - 1; ++col)
            pixel_pair_3x3<false, Stream>(rows, grad_rows, row0, row1, col, width, c, m, tap, taps_sum);
          if (width > 1)
            pixel_pair_3x3<true, Stream>(rows, grad_rows, row0, row1, width - 1, width, c, m, tap, taps_sum);
        }
        for (int t = 0; t < 9; ++t) _mm512_mask_storeu_ps(sums + t * c + k, m, taps_sum[t]);
      }
    }
  }
}
#endif

#ifdef __AVX512F__
// Output rows the forward 3 x 3 path computes in one sweep: each input vector loaded serves up to three of them (4
// loads per output vector where two rows take 6 and one 9). Six ran 1.09-1.24x as fast as two on Zen 4 (four
// 0.99-1.15x; eight 0.48-0.65x: the compiler no longer kept the sums in registers).
constexpr int kForwardRows = 6;

// kForwardRows output rows of the forward 3 x 3 path at one column: `rows[r]` (r = 0 .. kForwardRows + 1) point at
// pixel 0 of rows y-1+r of x at the 16-channel slice, `out[o]` at output row y + o (nullptr outside the image);
// `bias` starts each sum.
template <bool Edge, bool Stream>
inline void forward_rows_3x3(const float* const rows[kForwardRows + 2], float* const out[kForwardRows], int64_t col,
                             int64_t width, int64_t c, __mmask16 m, const __m512 taps[9], __m512 bias) {
  __m512 sums[kForwardRows];
  for (int o = 0; o < kForwardRows; ++o) sums[o] = bias;
#pragma GCC unroll 3
  for (int j = 0; j < 3; ++j) {
    const int64_t at = col + j - 1;
    if (Edge && (at < 0 || at >= width)) continue;
#pragma GCC unroll 8
    for (int r = 0; r < kForwardRows + 2; ++r) {  // input row y-1+r: tap row r - o of output row y + o
      if (rows[r] == nullptr) continue;
      const __m512 in = _mm512_maskz_loadu_ps(m, rows[r] + at * c);
#pragma GCC unroll 8
      for (int o = 0; o < kForwardRows; ++o)  // bounds the compiler sees as constants, or the sums go to memory
        if (r - o >= 0 && r - o <= 2) sums[o] = _mm512_fmadd_ps(in, taps[3 * (r - o) + j], sums[o]);
    }
  }
#pragma GCC unroll 8
  for (int o = 0; o < kForwardRows; ++o)
    if (out[o] != nullptr) store<Stream>(out[o] + col * c, m, sums[o]);
}

// The forward 3 x 3 path for images [begin, end): x and y are N x H x W x C, taps 3 x 3 x C, bias C or nullptr.
template <bool Stream>
void forward_3x3(const float* x, const float* taps, const float* bias, float* y, int64_t begin, int64_t end,
                 int64_t c, int64_t h, int64_t width) {
  const int64_t row = width * c, image = h * row, band = band_rows(row * int64_t(sizeof(float)), kForwardRows);
  for (int64_t b = begin; b < end; ++b) {
    for (int64_t first = 0; first < h; first += band) {
      const int64_t last = std::min(first + band, h), next = b * image + last * row;  // the next image's after h
      Ahead ahead(x + next, std::min(band * row, end * image - next) * int64_t(sizeof(float)),
                  (c + 15) / 16 * ((last - first + kForwardRows - 1) / kForwardRows));  // sweeps in the band
      for (int64_t k = 0; k < c; k += 16) {
        const __mmask16 m = c - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (c - k)) - 1);
        __m512 tap[9];
        for (int t = 0; t < 9; ++t) tap[t] = _mm512_maskz_loadu_ps(m, taps + t * c + k);
        const __m512 start = bias != nullptr ? _mm512_maskz_loadu_ps(m, bias + k) : _mm512_setzero_ps();
        for (int64_t at = first; at < last; at += kForwardRows) {
          ahead.step();
          const float* rows[kForwardRows + 2];
          row_pointers(x + b * image + k, at - 1, h, row, rows);
          float* out[kForwardRows];
          for (int o = 0; o < kForwardRows; ++o) out[o] = at + o < h ? y + b * image + (at + o) * row + k : nullptr;
          forward_rows_3x3<true, Stream>(rows, out, 0, width, c, m, tap, start);
          for (int64_t col = 1; col < width - 1; ++col)
            forward_rows_3x3<false, Stream>(rows, out, col, width, c, m, tap, start);
          if (width > 1) forward_rows_3x3<true, Stream>(rows, out, width - 1, width, c, m, tap, start);
        }
      }
    }
  }
}
#endif

template <typename scalar_t>
void backward_kernel(const scalar_t* x, const scalar_t* taps, const scalar_t* grad_y, scalar_t* grad_x,
                     scalar_t* grad_taps, int64_t n, int64_t c, int64_t h, int64_t w, int64_t kh, int64_t kw,
                     int64_t oh, int64_t ow, const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                     const std::vector<int64_t>& dilation) {
  const int64_t tap_size = kh * kw * c, image = h * w * c;
#ifdef __AVX512F__
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (register_blocked(kh, kw, stride, padding, dilation)) {
      const std::vector<float> total = thread_sums<float>(tap_size, n, 1, [&](float* sums, int64_t begin,
                                                                              int64_t end) {
        if (c % 16 == 0) {
          backward_3x3<true>(x, taps, grad_y, grad_x, sums, begin, end, c, h, w);
          _mm_sfence();  // the streaming stores reach memory before the gradient is handed on
        } else {
          backward_3x3<false>(x, taps, grad_y, grad_x, sums, begin, end, c, h, w);
        }
      });
      std::copy(total.begin(), total.end(), grad_taps);
      return;
    }
  }
#endif
  const std::vector<scalar_t> total = thread_sums<scalar_t>(tap_size, n, 1, [&](scalar_t* sums, int64_t begin,
                                                                                int64_t end) {
    std::fill(grad_x + begin * image, grad_x + end * image, scalar_t(0));
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t oy = 0; oy < oh; ++oy) {
        for (int64_t ox = 0; ox < ow; ++ox) {
          const scalar_t* gy = grad_y + ((b * oh + oy) * ow + ox) * c;
          for (int64_t i = 0; i < kh; ++i) {
            const int64_t iy = oy * stride[0] - padding[0] + i * dilation[0];
            if (iy < 0 || iy >= h) continue;
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t ix = ox * stride[1] - padding[1] + j * dilation[1];
              if (ix < 0 || ix >= w) continue;
              const int64_t at = ((b * h + iy) * w + ix) * c;
              const scalar_t* tap = taps + (i * kw + j) * c;
              const scalar_t* in = x + at;
              scalar_t* gx = grad_x + at;
              scalar_t* acc = sums + (i * kw + j) * c;
#pragma omp simd
              for (int64_t k = 0; k < c; ++k) gx[k] += gy[k] * tap[k];
#pragma omp simd
              for (int64_t k = 0; k < c; ++k) acc[k] += gy[k] * in[k];
            }
          }
        }
      }
    }
  });
  std::copy(total.begin(), total.end(), grad_taps);
}

}  // namespace

// (grad_x, grad_weight) of y = conv2d(x, weight, stride, padding, dilation, groups=C) for a C x 1 x kh x kw weight.
std::vector<at::Tensor> depthwise_backward(at::Tensor grad_y, at::Tensor x, at::Tensor weight,
                                              std::vector<int64_t> stride, std::vector<int64_t> padding,
                                              std::vector<int64_t> dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast), "x: a channels-last 4-d tensor");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "weight: C x 1 x kh x kw for a depthwise conv of C channels");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == weight.scalar_type() &&
                  grad_y.scalar_type() == x.scalar_type(), "grad_y, x and weight: CPU tensors of one dtype");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), kh = weight.size(2), kw = weight.size(3);
  const int64_t oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == n && grad_y.size(1) == c && grad_y.size(2) == oh &&
                  grad_y.size(3) == ow, "grad_y: N x C x H' x W' of the convolution's output");
  grad_y = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  auto taps = weight.select(1, 0).permute({1, 2, 0}).contiguous();  // kh x kw x C
  auto grad_x = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_taps = at::empty_like(taps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_backward", [&] {
    backward_kernel<scalar_t>(x.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(),
                              grad_x.data_ptr<scalar_t>(), grad_taps.data_ptr<scalar_t>(), n, c, h, w, kh, kw, oh,
                              ow, stride, padding, dilation);
  });
  return {grad_x, grad_taps.permute({2, 0, 1}).unsqueeze(1).contiguous()};
}

// y = conv2d(x, weight, bias, stride, padding, dilation, groups=C) for a C x 1 x kh x kw weight: the register-blocked
// float32 path where it applies (AVX-512, 3 x 3, stride 1, padding 1, dilation 1), else torch's conv2d.
at::Tensor depthwise_forward(at::Tensor x, at::Tensor weight, std::optional<at::Tensor> bias,
                             std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation) {
  TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "x: N x C x H x W, weight: C x 1 x kh x kw for a depthwise conv of C channels");
#ifdef __AVX512F__
  if (x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && x.device().is_cpu() &&
      x.is_contiguous(at::MemoryFormat::ChannelsLast) && (!bias || bias->scalar_type() == at::kFloat) &&
      register_blocked(weight.size(2), weight.size(3), stride, padding, dilation)) {
    const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    auto taps = weight.select(1, 0).permute({1, 2, 0}).contiguous();  // 3 x 3 x C
    auto bias_values = bias ? bias->contiguous() : at::Tensor();
    auto y = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    const float* bias_data = bias ? bias_values.data_ptr<float>() : nullptr;
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      if (c % 16 == 0) {
        forward_3x3<true>(x.data_ptr<float>(), taps.data_ptr<float>(), bias_data, y.data_ptr<float>(), begin, end,
                          c, h, w);
        _mm_sfence();
      } else {
        forward_3x3<false>(x.data_ptr<float>(), taps.data_ptr<float>(), bias_data, y.data_ptr<float>(), begin, end,
                           c, h, w);
      }
    });
    return y;
  }
#endif
  return at::conv2d(x, weight, bias, stride, padding, dilation, x.size(1));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &depthwise_forward, "depthwise conv: the forward pass");
  m.def("backward", &depthwise_backward, "depthwise conv: input and kernel gradients in one sweep");
}
