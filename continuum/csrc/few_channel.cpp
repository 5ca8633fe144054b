// A grouped 2-D convolution with few channels per group (K = 2, 3 or 4 in and out per group) on channels-last CPU
// tensors, forward and backward. oneDNN's grouped kernels run such convolutions 3-8x above their memory floor,
// slower than a depthwise conv of the same width although the work per pixel is only K times a depthwise conv's.
//
// The channels of a pixel sit in a row; a group is K neighbours in it. The kernel entries come prepared as taps
// [i][j][e][c'] = weight[base(c') + (c' % K + e) % K, c' % K, i, j]: the entry from input channel c' to the output
// channel e places further round its group (`rotations(weight)` in continuum/kernels.py). On a block of up to 16
// channels (whole groups), rotating a row by e within each group is one in-register permutation, so:
// - forward: sums[e] = the taps' products with the loaded input rows, K depthwise multiply-adds per tap; the output
//   is the sum over e of sums[e] rotated back by e (K - 1 rotations per 16 outputs, not per tap);
// - backward, one sweep over the output gradient: its row rotated by e (once per pixel) times taps[e] adds into the
//   input gradient, and times the input row into the taps' gradient (laid out as the taps).
//
// Layouts: x, y, grad_y are N x H x W x C in memory (channels-last N x C x H x W tensors), taps kh x kw x K x C.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#ifdef __AVX512F__
namespace {

// Sixteen channels at once, with the rotation within groups of K of them: floats in one AVX-512 register; doubles
// in a plain array the compiler vectorises (they serve the float64 equivalence tests, not speed). A block holds
// 16 / K whole groups (lanes = 16 / K * K channels: all 16 for K = 2 and 4, 15 for K = 3);
// loads and stores of a block touch its lanes only, and the last block of a row may hold fewer groups.
template <typename scalar_t>
struct Lanes;

template <>
struct Lanes<float> {
  using Index = __m512i;
  using Mask = __mmask16;
  __m512 v;
  static Mask mask(int64_t lanes) { return static_cast<Mask>((1u << lanes) - 1); }
  static Lanes load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m, p)}; }
  static Lanes zero() { return {_mm512_setzero_ps()}; }
  void store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, m, v); }
  void store(float* p) const { _mm512_storeu_ps(p, v); }  // all 16 (scratch)
  static Lanes load(const float* p) { return {_mm512_loadu_ps(p)}; }
  Lanes fma(Lanes a, Lanes b) const { return {_mm512_fmadd_ps(a.v, b.v, v)}; }  // this + a * b
  Lanes operator+(Lanes a) const { return {_mm512_add_ps(v, a.v)}; }
  static Index rotation(int k, int d) {  // lane l takes lane base(l) + (l % k + d) % k (lanes past the groups: l)
    alignas(64) int index[16];
    for (int l = 0; l < 16; ++l) index[l] = l < 16 / k * k ? l / k * k + (l % k + d) % k : l;
    return _mm512_load_si512(index);
  }
  Lanes rotated(Index index) const { return {_mm512_permutexvar_ps(index, v)}; }
};

template <>
struct Lanes<double> {
  struct Index { int at[16]; };
  using Mask = int64_t;
  double v[16];
  static Mask mask(int64_t lanes) { return lanes; }
  static Lanes load(const double* p, Mask m) {
    Lanes r = zero();
    for (int l = 0; l < m; ++l) r.v[l] = p[l];
    return r;
  }
  static Lanes zero() { return Lanes{}; }
  void store(double* p, Mask m) const { for (int l = 0; l < m; ++l) p[l] = v[l]; }
  void store(double* p) const { store(p, 16); }
  static Lanes load(const double* p) { return load(p, 16); }
  Lanes fma(Lanes a, Lanes b) const {
    Lanes r;
    for (int l = 0; l < 16; ++l) r.v[l] = v[l] + a.v[l] * b.v[l];
    return r;
  }
  Lanes operator+(Lanes a) const {
    Lanes r;
    for (int l = 0; l < 16; ++l) r.v[l] = v[l] + a.v[l];
    return r;
  }
  static Index rotation(int k, int d) {
    Index index;
    for (int l = 0; l < 16; ++l) index.at[l] = l < 16 / k * k ? l / k * k + (l % k + d) % k : l;
    return index;
  }
  Lanes rotated(const Index& index) const {
    Lanes r;
    for (int l = 0; l < 16; ++l) r.v[l] = v[index.at[l]];
    return r;
  }
};

struct Geometry {
  int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
  int64_t in_y(int64_t oy, int64_t i) const { return oy * sh - ph + i * dh; }
  int64_t in_x(int64_t ox, int64_t j) const { return ox * sw - pw + j * dw; }
};

template <typename scalar_t, int K, int P>
void forward_pixels(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g,
                    const typename Lanes<scalar_t>::Index* back, int64_t b, int64_t oy, int64_t ox) {
  // P neighbouring output pixels at once: each tap's K entries are loaded once for all P
  using V = Lanes<scalar_t>;
  constexpr int64_t S = 16 / K * K;  // channels per block
  scalar_t* out = y + ((b * g.oh + oy) * g.ow + ox) * g.c;
  for (int64_t cb = 0; cb < g.c; cb += S) {
    const typename V::Mask m = V::mask(std::min(S, g.c - cb));
    V sums[P][K];  // sums[p][e][c']: input channel c' times its entries to output channel base + (c' % K + e) % K
    for (int p = 0; p < P; ++p)
      for (int e = 0; e < K; ++e) sums[p][e] = V::zero();
    for (int64_t i = 0; i < g.kh; ++i) {
      const int64_t iy = g.in_y(oy, i);
      if (iy < 0 || iy >= g.h) continue;
      const scalar_t* in_row = x + (b * g.h + iy) * g.w * g.c + cb;
      for (int64_t j = 0; j < g.kw; ++j) {
        const scalar_t* tap = taps + (i * g.kw + j) * K * g.c + cb;
        V entry[K];
        for (int e = 0; e < K; ++e) entry[e] = V::load(tap + e * g.c, m);
        for (int p = 0; p < P; ++p) {
          const int64_t ix = g.in_x(ox + p, j);
          if (ix < 0 || ix >= g.w) continue;
          const V in = V::load(in_row + ix * g.c, m);
          for (int e = 0; e < K; ++e) sums[p][e] = sums[p][e].fma(entry[e], in);
        }
      }
    }
    for (int p = 0; p < P; ++p) {  // output channel c collects sums[e] of input channel base + (c % K - e) % K
      V acc = sums[p][0];
      for (int e = 1; e < K; ++e) acc = acc + sums[p][e].rotated(back[e]);
      acc.store(out + p * g.c + cb, m);
    }
  }
}

template <typename scalar_t, int K>
void forward_kernel(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g) {
  using V = Lanes<scalar_t>;
  constexpr int P = 4;  // sums in registers: P * K of the 32
  typename V::Index back[K];  // rotation by -e
  for (int e = 0; e < K; ++e) back[e] = V::rotation(K, (K - e) % K);
  at::parallel_for(0, g.n * g.oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.oh, oy = row % g.oh;
      int64_t ox = 0;
      for (; ox + P <= g.ow; ox += P) forward_pixels<scalar_t, K, P>(x, taps, y, g, back, b, oy, ox);
      for (; ox < g.ow; ++ox) forward_pixels<scalar_t, K, 1>(x, taps, y, g, back, b, oy, ox);
    }
  });
}

template <typename scalar_t, int K>
void backward_kernel(const scalar_t* x, const scalar_t* taps, const scalar_t* grad_y, scalar_t* grad_x,
                     scalar_t* grad_taps, const Geometry& g) {
  using V = Lanes<scalar_t>;
  constexpr int L = 16;  // a scratch slot
  constexpr int64_t S = 16 / K * K;  // channels per block
  typename V::Index rotation[K];
  for (int e = 0; e < K; ++e) rotation[e] = V::rotation(K, e);
  const int64_t tap_size = g.kh * g.kw * K * g.c, image = g.h * g.w * g.c, threads = at::get_num_threads();
  std::vector<scalar_t> partial(threads * tap_size, scalar_t(0));
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    scalar_t* sums = partial.data() + at::get_thread_num() * tap_size;
    std::vector<scalar_t> rotated_row(g.ow * K * L);  // one output row's gradient, rotated by every e, per block
    std::fill(grad_x + begin * image, grad_x + end * image, scalar_t(0));
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t oy = 0; oy < g.oh; ++oy) {
        for (int64_t cb = 0; cb < g.c; cb += S) {
          const typename V::Mask m = V::mask(std::min(S, g.c - cb));
          // rotated_row[ox][e][c']: the gradient of output channel base + (c' % K + e) % K at (oy, ox)
          for (int64_t ox = 0; ox < g.ow; ++ox) {
            const V plain = V::load(grad_y + ((b * g.oh + oy) * g.ow + ox) * g.c + cb, m);
            for (int e = 0; e < K; ++e) plain.rotated(rotation[e]).store(rotated_row.data() + (ox * K + e) * L);
          }
          for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t iy = g.in_y(oy, i);
            if (iy < 0 || iy >= g.h) continue;
            for (int64_t j = 0; j < g.kw; ++j) {
              // the output columns whose tap (i, j) falls inside the input row
              const int64_t lead = g.pw - j * g.dw, room = g.w - 1 + lead;  // 0 <= ox * sw - lead <= w - 1
              const int64_t first = lead > 0 ? (lead + g.sw - 1) / g.sw : 0;
              const int64_t last = room < 0 ? 0 : std::min<int64_t>(g.ow, room / g.sw + 1);
              const int64_t tap = (i * g.kw + j) * K * g.c + cb;
              constexpr int P = 2;  // pixels in flight: P sets of kernel-gradient sums in registers
              V entry[K], acc[P][K];
              for (int e = 0; e < K; ++e) entry[e] = V::load(taps + tap + e * g.c, m);
              for (int p = 0; p < P; ++p)
                for (int e = 0; e < K; ++e) acc[p][e] = V::zero();
              auto pixel = [&](int64_t ox, V* sums_of_pixel) {
                const int64_t at = ((b * g.h + iy) * g.w + g.in_x(ox, j)) * g.c + cb;
                const V in = V::load(x + at, m);
                const scalar_t* dy = rotated_row.data() + ox * K * L;
                V even = V::load(grad_x + at, m), odd = V::zero();  // two chains of multiply-adds, not one
                for (int e = 0; e < K; ++e) {
                  const V d = V::load(dy + e * L);
                  if (e % 2 == 0) even = even.fma(entry[e], d); else odd = odd.fma(entry[e], d);
                  sums_of_pixel[e] = sums_of_pixel[e].fma(d, in);
                }
                (even + odd).store(grad_x + at, m);
              };
              int64_t ox = first;
              for (; ox + P <= last; ox += P)
                for (int p = 0; p < P; ++p) pixel(ox + p, acc[p]);
              for (; ox < last; ++ox) pixel(ox, acc[0]);
              for (int p = 1; p < P; ++p)
                for (int e = 0; e < K; ++e) acc[0][e] = acc[0][e] + acc[p][e];
              for (int e = 0; e < K; ++e) {
                scalar_t* sum = sums + tap + e * g.c;
                (V::load(sum, m) + acc[0][e]).store(sum, m);
              }
            }
          }
        }
      }
    }
  });
  std::fill(grad_taps, grad_taps + tap_size, scalar_t(0));
  for (int64_t thread = 0; thread < threads; ++thread)
    for (int64_t k = 0; k < tap_size; ++k) grad_taps[k] += partial[thread * tap_size + k];
}

Geometry geometry(const torch::Tensor& x, const torch::Tensor& taps, const std::vector<int64_t>& stride,
                  const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "x: a channels-last 4-d CPU tensor");
  TORCH_CHECK(taps.dim() == 4 && taps.size(3) == x.size(1) && taps.is_contiguous() &&
                  taps.scalar_type() == x.scalar_type(), "taps: kh x kw x K x C, contiguous, of x's dtype");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), taps.size(0), taps.size(1), 0, 0,
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(g.c % taps.size(2) == 0, "channels: a multiple of the channels per group");
  return g;
}

template <typename Call>
void by_group_size(int64_t k, const Call& call) {
  switch (k) {
    case 2: call(std::integral_constant<int, 2>()); break;
    case 3: call(std::integral_constant<int, 3>()); break;
    case 4: call(std::integral_constant<int, 4>()); break;
    default: TORCH_CHECK(false, "channels per group: 2, 3 or 4, not ", k);
  }
}

}  // namespace

// y = conv2d(x, weight, stride, padding, dilation, groups=C/K) for kernels prepared as kh x kw x K x C (taps).
torch::Tensor few_channel_forward(torch::Tensor x, torch::Tensor taps, std::vector<int64_t> stride,
                                  std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  const Geometry g = geometry(x, taps, stride, padding, dilation);
  auto y = torch::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_channel_forward", [&] {
    by_group_size(taps.size(2), [&](auto k) {
      forward_kernel<scalar_t, decltype(k)::value>(x.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(),
                                                   y.data_ptr<scalar_t>(), g);
    });
  });
  return y;
}

// (grad_x, grad_taps) of the forward above; grad_taps is laid out as the taps.
std::vector<torch::Tensor> few_channel_backward(torch::Tensor grad_y, torch::Tensor x, torch::Tensor taps,
                                                std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                std::vector<int64_t> dilation) {
  const Geometry g = geometry(x, taps, stride, padding, dilation);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.n && grad_y.size(1) == g.c && grad_y.size(2) == g.oh &&
                  grad_y.size(3) == g.ow && grad_y.scalar_type() == x.scalar_type(),
              "grad_y: N x C x H' x W' of the convolution's output");
  grad_y = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  auto grad_x = torch::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  auto grad_taps = torch::empty_like(taps);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_channel_backward", [&] {
    by_group_size(taps.size(2), [&](auto k) {
      backward_kernel<scalar_t, decltype(k)::value>(x.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(),
                                                    grad_y.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                                    grad_taps.data_ptr<scalar_t>(), g);
    });
  });
  return {grad_x, grad_taps};
}

constexpr bool kAvailable = true;
#else  // without AVX-512 the module only says so, and the strategy is not offered
constexpr bool kAvailable = false;
torch::Tensor few_channel_forward(torch::Tensor, torch::Tensor, std::vector<int64_t>, std::vector<int64_t>,
                                  std::vector<int64_t>) {
  TORCH_CHECK(false, "built without AVX-512");
}
std::vector<torch::Tensor> few_channel_backward(torch::Tensor, torch::Tensor, torch::Tensor, std::vector<int64_t>,
                                                std::vector<int64_t>, std::vector<int64_t>) {
  TORCH_CHECK(false, "built without AVX-512");
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("available") = kAvailable;
  m.def("forward", &few_channel_forward, "grouped conv, 2-4 channels per group, channels-last");
  m.def("backward", &few_channel_backward, "its input and kernel gradients in one sweep");
}
