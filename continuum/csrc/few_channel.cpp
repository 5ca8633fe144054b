// Grouped 2-D convolutions with few channels per group (K in and out per group) on channels-last CPU tensors, forward
// and kernel gradient, in two kernels. oneDNN's grouped kernels run such convolutions 3-8x above their memory floor,
// slower than a depthwise conv of the same width although the work per pixel is only K times a depthwise conv's.
//
// `rotated` (K = MIN_GROUP to MAX_GROUP, macros the build defines: continuum/compiled.py): the channels of a pixel sit
// in a row; a group is K neighbours in it. The kernel entries come prepared as taps
// [i][j][e][c'] = weight[base(c') + (c' % K + e) % K, c' % K, i, j]: the entry from input channel c' to the output
// channel e places further round its group (`rotations(weight)` in continuum/kernels.py). On a block of whole groups
// in one vector register (up to 16 channels with AVX-512, 8 with AVX2), rotating a row by e within each group is one
// in-register permutation (on a block of two or three registers, `forward_registers`, one or two permutations of two
// registers each), so:
// - forward: sums[e] = the taps' products with the loaded input rows, K depthwise multiply-adds per tap; the output
//   is the sum over e of sums[e] rotated back by e (K - 1 rotations per block of outputs, not per tap);
// - the taps' gradient (laid out as the taps): the output gradient's row rotated by e (once per pixel and kernel
//   row) times the input rows, summed in registers over a band of an image's rows (bands.h), J kernel columns at once.
// Its sums take K registers per pixel and block register, too many past K = 7.
//
// `broadcast` (K = MIN_BROADCAST to MAX_BROADCAST): one group per vector register (two where K is wider than a
// register's lanes: AVX2 past 8), its K output channels in the lanes. The taps come as
// [i][j][c][e] = weight[base(c) + e, c % K, i, j] (the K output channels input channel c feeds,
// `broadcast_taps(weight)` in continuum/kernels.py), so:
// - forward: an output pixel's group sums, per tap and input channel c, the tap's row for c times c's input value
//   broadcast to every lane: one register of sums per pixel, P pixels at once, each tap row loaded once for all and
//   held while the pixels take their input values one after the other (one address each, the channels at offsets
//   from it: taken one channel at a time for all P pixels, the address arithmetic between the multiply-adds made the
//   pass 1.05-1.3x slower on Zen 4);
// - the taps' gradient: the row for c collects the output gradient's row (one load per pixel) times c's input value
//   broadcast, summed in registers over a band of an image's rows, J kernel columns and D input channels at once. Where
//   K leaves lanes idle but a few registers hold whole groups, none more than two (`packed_channels`: 8 and 12 with
//   AVX-512, 12 with AVX2), and such blocks fill the channels, the lanes hold a block's input channels instead, and
//   each group's output gradient value goes to the lanes of its own (a broadcast and a masked one per register, or one
//   permutation of its two neighbours): summed as kh x kw x K x C, no lane idle, then laid out as the taps.
//
// Both read ahead into L2 (bands.h): the forward passes, which walk output rows in memory order, the next output
// row's new input row while a row runs; the kernel gradients, which sweep each block of channels over the image, the
// next band of rows while a band runs. On Zen 4 the forward passes ran 1.0-1.8x and the kernel gradients 1.0-1.6x as
// fast for it (in cache the passes had run about twice as fast as from memory: the hardware's own prefetching did not
// keep up).
//
// Both store whole registers where they can: a sum goes to a buffer padded to whole registers, an output block spills
// into the next block's channels, which are written after it (masked stores are microcoded on AMD CPUs with AVX2).
// Where every block is whole registers at aligned addresses (rotated: K = 2 and 4, and 3 in blocks of three
// registers; broadcast: K = 16, and 8 with AVX2), the forward pass writes its output with streaming stores: the
// tensors are larger than the caches, and a plain store first reads each line it writes. The broadcast forward at
// other K stages the sums of the fewest groups that fill whole registers (`staged_channels`) and streams them out
// where such blocks fill the channels.
//
// The input gradient (stride 1) of either is its own forward call: the convolution of the output gradient with the
// kernel flipped and transposed within each group (kernels.py prepares those taps).
//
// Layouts: x, y, grad_y are N x H x W x C in memory (channels-last N x C x H x W tensors), taps kh x kw x K x C
// (rotated) or kh x kw x C x K (broadcast).
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11, at::Tensor casts (torch/extension.h: twice the build)

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "bands.h"
#include "thread_sums.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
namespace {

// A block of channels at once, with the rotation within groups of K of them: floats in one vector register, 16 with
// AVX-512 (32 registers), 8 with AVX2 (16 registers); doubles in a plain array of as many, which the compiler
// vectorises (they serve the float64 equivalence tests, not speed). A block holds kLanes / K whole groups (AVX-512:
// all 16 channels for K = 2 and 4, 15 for K = 3 and 5, 12 for 6, 14 for 7; AVX2: 8 for K = 2 and 4, 6 for 3 and 6,
// 5 for 5, 7 for 7); loads and stores of a block touch its lanes only, and the last block of a row may hold fewer.
#ifdef __AVX512F__
constexpr int kLanes = 16, kRegisters = 32;
#else
constexpr int kLanes = 8, kRegisters = 16;
#endif

// Lane l of a block of `lanes` channels takes lane base(l) + (l % k + d) % k (lanes past the block's whole groups
// keep their own).
constexpr int rotated_lane(int l, int k, int d, int lanes) {
  return l < lanes / k * k ? l / k * k + (l % k + d) % k : l;
}

template <typename scalar_t>
struct Lanes;

#ifdef __AVX512F__
template <>
struct Lanes<float> {
  using Index = __m512i;
  using Mask = __mmask16;
  __m512 v;
  static Mask mask(int64_t lanes) { return static_cast<Mask>((1u << lanes) - 1); }
  static Lanes load(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m, p)}; }
  static Lanes zero() { return {_mm512_setzero_ps()}; }
  static Lanes broadcast(const float* p) { return {_mm512_set1_ps(*p)}; }
  // the lanes in m take *p, the others keep this register's
  Lanes with(Mask m, const float* p) const { return {_mm512_mask_broadcastss_ps(v, m, _mm_load_ss(p))}; }
  void store(float* p, Mask m) const { _mm512_mask_storeu_ps(p, m, v); }
  static Lanes load(const float* p) { return {_mm512_loadu_ps(p)}; }  // every lane
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  void stream(float* p) const { _mm512_stream_ps(p, v); }  // every lane, p aligned to the register; past the caches
  Lanes fma(Lanes a, Lanes b) const { return {_mm512_fmadd_ps(a.v, b.v, v)}; }  // this + a * b
  Lanes operator+(Lanes a) const { return {_mm512_add_ps(v, a.v)}; }
  Lanes rotated(Index index) const { return {_mm512_permutexvar_ps(index, v)}; }
  // lane l takes lane index[l] of this register followed by `next` (index 16 and up: next's lanes)
  Lanes joined(Lanes next, Index index) const { return {_mm512_permutex2var_ps(v, index, next.v)}; }
  static Index indices(const int* lanes) { return _mm512_loadu_si512(lanes); }
};
#else
template <>
struct Lanes<float> {
  using Index = __m256i;
  using Mask = __m256i;  // all ones in the lanes to load and store
  __m256 v;
  static Mask mask(int64_t lanes) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Lanes load(const float* p, Mask m) { return {_mm256_maskload_ps(p, m)}; }
  static Lanes zero() { return {_mm256_setzero_ps()}; }
  static Lanes broadcast(const float* p) { return {_mm256_set1_ps(*p)}; }
  Lanes with(Mask m, const float* p) const {  // the lanes in m take *p
    return {_mm256_blendv_ps(v, _mm256_set1_ps(*p), _mm256_castsi256_ps(m))};
  }
  void store(float* p, Mask m) const { _mm256_maskstore_ps(p, m, v); }  // microcoded on AMD: ~10x a plain store
  static Lanes load(const float* p) { return {_mm256_loadu_ps(p)}; }  // every lane
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void stream(float* p) const { _mm256_stream_ps(p, v); }  // every lane, p aligned to the register; past the caches
  Lanes fma(Lanes a, Lanes b) const { return {_mm256_fmadd_ps(a.v, b.v, v)}; }  // this + a * b
  Lanes operator+(Lanes a) const { return {_mm256_add_ps(v, a.v)}; }
  Lanes rotated(Index index) const { return {_mm256_permutevar8x32_ps(v, index)}; }
  // lane l takes lane index[l] of this register followed by `next` (index 8 and up: next's lanes)
  Lanes joined(Lanes next, Index index) const {
    const __m256 from_next = _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, _mm256_set1_epi32(kLanes - 1)));
    return {_mm256_blendv_ps(rotated(index).v, next.rotated(index).v, from_next)};  // the low 3 bits pick the lane
  }
  static Index indices(const int* lanes) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lanes)); }
};
#endif

template <>
struct Lanes<double> {
  struct Index { int at[kLanes]; };
  using Mask = int64_t;
  double v[kLanes];
  static Mask mask(int64_t lanes) { return lanes; }
  static Lanes load(const double* p, Mask m) {
    Lanes r = zero();
    for (int l = 0; l < m; ++l) r.v[l] = p[l];
    return r;
  }
  static Lanes zero() { return Lanes{}; }
  static Lanes broadcast(const double* p) {
    Lanes r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = *p;
    return r;
  }
  Lanes with(Mask m, const double* p) const {  // the lanes in m take *p
    Lanes r = *this;
    for (int l = 0; l < m; ++l) r.v[l] = *p;
    return r;
  }
  void store(double* p, Mask m) const { for (int l = 0; l < m; ++l) p[l] = v[l]; }
  static Lanes load(const double* p) { return load(p, kLanes); }  // every lane
  void store(double* p) const { store(p, kLanes); }
  void stream(double* p) const { store(p); }
  Lanes fma(Lanes a, Lanes b) const {
    Lanes r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = v[l] + a.v[l] * b.v[l];
    return r;
  }
  Lanes operator+(Lanes a) const {
    Lanes r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = v[l] + a.v[l];
    return r;
  }
  Lanes rotated(const Index& index) const {
    Lanes r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = v[index.at[l]];
    return r;
  }
  Lanes joined(const Lanes& next, const Index& index) const {
    Lanes r;
    for (int l = 0; l < kLanes; ++l) r.v[l] = index.at[l] < kLanes ? v[index.at[l]] : next.v[index.at[l] - kLanes];
    return r;
  }
  static Index indices(const int* lanes) {
    Index index;
    std::copy(lanes, lanes + kLanes, index.at);
    return index;
  }
};

constexpr int kMinGroup = MIN_GROUP, kMaxGroup = MAX_GROUP;  // channels per group, rotated (from the build)
constexpr int kMinBroadcast = MIN_BROADCAST, kMaxBroadcast = MAX_BROADCAST;  // channels per group, broadcast

struct Geometry {
  int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
  int64_t in_y(int64_t oy, int64_t i) const { return oy * sh - ph + i * dh; }
  int64_t in_x(int64_t ox, int64_t j) const { return ox * sw - pw + j * dw; }
  // [first, last): the output columns whose taps in kernel columns j_first .. j_last all fall inside the input row,
  // 0 <= in_x(ox, j_first) and in_x(ox, j_last) <= w - 1
  std::pair<int64_t, int64_t> columns_inside(int64_t j_first, int64_t j_last) const {
    const int64_t lead = pw - j_first * dw, tail = w - 1 + pw - j_last * dw;
    const int64_t first = std::min(ow, lead > 0 ? (lead + sw - 1) / sw : int64_t(0));
    return {first, std::max(first, std::min(ow, tail < 0 ? int64_t(0) : tail / sw + 1))};
  }
};

// Runs block(b, oy, ox, pixels, inside) over every output pixel, output rows in parallel, each row in blocks of P
// neighbouring pixels, then of P / 2, P / 4 and 1 for what is left: `pixels` an integral_constant (the block's
// width), `inside` a bool_constant, true where every tap of the block falls inside the input row (no checks per
// pixel). The walk over the taps inside a block stays written out in each kernel's pixels function: shared as a
// function taking the tap's work, it made GCC's code 7-28 % slower in one kernel or the other (AVX2, Zen 3).
template <int P, typename scalar_t, typename Block>
void for_pixel_blocks(const Geometry& g, const scalar_t* x, const Block& block) {
  const auto [inside_first, inside_last] = g.columns_inside(0, g.kw - 1);
  const int64_t x_row = g.w * g.c;
  at::parallel_for(0, g.n * g.oh, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / g.oh, oy = row % g.oh;
      // the last input row of the next output row, fetched into L2 while this one runs
      const int64_t next_b = (row + 1) / g.oh, next_y = g.in_y((row + 1) % g.oh, g.kh - 1);
      const bool fetch = row + 1 < end && next_y >= 0 && next_y < g.h;  // else nothing (and no pointer outside x)
      Ahead ahead(fetch ? x + (next_b * g.h + next_y) * x_row : x, fetch ? x_row * int64_t(sizeof(scalar_t)) : 0,
                  g.ow / P);
      int64_t ox = 0;
      auto blocks = [&](auto pixels) {
        constexpr int Q = decltype(pixels)::value;
        for (; ox + Q <= g.ow; ox += Q) {
          ahead.step();
          if (ox >= inside_first && ox + Q <= inside_last)
            block(b, oy, ox, pixels, std::true_type());
          else
            block(b, oy, ox, pixels, std::false_type());
        }
      };
      blocks(std::integral_constant<int, P>());
      if constexpr (P >= 4) blocks(std::integral_constant<int, P / 2>());
      if constexpr (P >= 8) blocks(std::integral_constant<int, P / 4>());
      if constexpr (P >= 2) blocks(std::integral_constant<int, 1>());
    }
  });
}

// A band of an image's output rows, [first, last), that each of the kernel gradient's sweeps walks before the next
// band (bands.h), and the next band's rows of x and grad_y, fetched into L2 a share at each output row walked.
struct Band {
  int64_t first, last;
  Ahead x, grad_y;
  void step() {
    x.step();
    grad_y.step();
  }
};

// The kernel gradient's work on images begin to end - 1 of x and grad_y: columns(b, channel, i, j, width, band) for
// each image b, band of its output rows, block of `step` channels from `channel`, kernel row i and kernel columns j
// to j + width - 1, J columns at once and singly where fewer are left (`width` an integral_constant).
template <int J, typename scalar_t, typename Columns>
void for_gradient_columns(const Geometry& g, const scalar_t* x, const scalar_t* grad_y, int64_t begin, int64_t end,
                          int64_t step, const Columns& columns) {
  const int64_t x_row = g.w * g.c, y_row = g.ow * g.c, size = sizeof(scalar_t);  // floats, bytes
  const int64_t band = band_rows((g.sh * x_row + y_row) * size, 1);  // output rows
  const int64_t sweeps = (g.c + step - 1) / step * g.kh * (g.kw / J + g.kw % J);  // calls of columns per band
  for (int64_t b = begin; b < end; ++b)
    for (int64_t first = 0; first < g.oh; first += band) {
      const int64_t last = std::min(first + band, g.oh);  // the next band: the next image's first after the last
      const int64_t x_next = (b * g.h + (last < g.oh ? std::clamp(g.in_y(last, 0), int64_t(0), g.h) : g.h)) * x_row;
      const int64_t y_next = (b * g.oh + last) * y_row;
      Band rows{first, last, Ahead(x + x_next, std::min(band * g.sh * x_row, end * g.h * x_row - x_next) * size,
                                   sweeps * (last - first)),
                Ahead(grad_y + y_next, std::min(band * y_row, end * g.oh * y_row - y_next) * size,
                      sweeps * (last - first))};
      for (int64_t channel = 0; channel < g.c; channel += step)
        for (int64_t i = 0; i < g.kh; ++i) {
          int64_t j = 0;
          for (; j + J <= g.kw; j += J) columns(b, channel, i, j, std::integral_constant<int, J>(), rows);
          for (; j < g.kw; ++j) columns(b, channel, i, j, std::integral_constant<int, 1>(), rows);
        }
    }
}

// The kernel gradient's walk over a band of an image's output rows for kernel row i and kernel columns j_first to
// j_last: for every output row of the band whose kernel row i falls inside the input, pixel = row(oy, iy) prepares
// the row, then pixel(ox, checked) runs for each of its output pixels; `checked` a bool_constant, true where some of
// the columns fall outside the input row.
template <typename Row>
void for_gradient_pixels(const Geometry& g, Band& band, int64_t i, int64_t j_first, int64_t j_last, const Row& row) {
  const auto [begin, end] = g.columns_inside(j_first, j_last);
  for (int64_t oy = band.first; oy < band.last; ++oy) {
    band.step();
    const int64_t iy = g.in_y(oy, i);
    if (iy < 0 || iy >= g.h) continue;
    const auto pixel = row(oy, iy);
    for (int64_t ox = 0; ox < begin; ++ox) pixel(ox, std::true_type());
    for (int64_t ox = begin; ox < end; ++ox) pixel(ox, std::false_type());
    for (int64_t ox = end; ox < g.ow; ++ox) pixel(ox, std::true_type());
  }
}

// The kernel gradient's columns j0 .. j0 + J - 1 at output column ox: column(j, in) for each whose input pixel lies
// inside the row (`checked` a bool_constant: false, all of them), `in` that pixel in the input row `in_row` (always
// inlined, like add_sums)
template <int J, typename scalar_t, typename Checked, typename Column>
[[gnu::always_inline]] inline void for_gradient_inputs(const Geometry& g, const scalar_t* in_row, int64_t ox,
                                                       int64_t j0, Checked checked, const Column& column) {
  const int64_t first = g.in_x(ox, j0), c = g.c, w = g.w, dw = g.dw;
  #pragma GCC unroll 16
  for (int j = 0; j < J; ++j) {
    if constexpr (decltype(checked)::value) {
      if (first + j * dw < 0 || first + j * dw >= w) continue;
    }
    column(j, in_row + (first + j * dw) * c);
  }
}

// Adds a kernel gradient's J x X x R sums in registers to memory, at(j, x, r) the address of each (always inlined:
// called, it takes the sums' address, and they live in memory through the whole pass, 1.1-1.7x slower on Zen 4)
template <typename V, int J, int X, int R, typename At>
[[gnu::always_inline]] inline void add_sums(const V (&acc)[J][X][R], const At& at) {
  #pragma GCC unroll 16
  for (int j = 0; j < J; ++j)
    #pragma GCC unroll 16
    for (int x = 0; x < X; ++x)
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        auto* sum = at(j, x, r);
        (V::load(sum) + acc[j][x][r]).store(sum);
      }
}

// Whether a forward pass whose blocks are whole registers (`Block` channels, a multiple of kLanes) writes y with
// streaming stores: the channels fill whole blocks, which then sit at addresses aligned to registers (y aligned).
// Blocks of other widths never stream (their kernels are compiled without the branch).
template <int Block, typename scalar_t>
bool streams(const scalar_t* y, const Geometry& g) {
  return Block % kLanes == 0 && g.c % Block == 0 && reinterpret_cast<uintptr_t>(y) % (kLanes * sizeof(scalar_t)) == 0;
}

// Registers in a block of the rotated kernel's forward pass and of its kernel gradient, where the channels fill whole
// blocks of them (elsewhere one), with AVX-512. At 3 channels per group three: 48 channels (16 groups, two of them
// crossing from one register into the next) fill them, so that every load and store is a whole register at an
// aligned address and the output can stream (blocks of 15 channels start mid-line, most of their loads spanning two
// cache lines, and the last of 96 channels holds 6). At 2 and 4 two: a pixel's channels taken two registers at a
// time for fewer pixels at once ran the forward pass 1.2-1.4x as fast on Zen 4 (96 channels), but the kernel
// gradient at 4 1.2-1.3x slower (it then sums 2 kernel columns at once, not 3). On fewer channels, or where a last
// block would be partly filled, three registers did up to a third more work than needed and ran 1.1-1.7x slower than
// one.
constexpr int forward_registers(int k) { return kRegisters < 32 ? 1 : k == 3 ? 3 : k == 2 || k == 4 ? 2 : 1; }
constexpr int gradient_registers(int k) { return k == 4 ? 1 : forward_registers(k); }
constexpr int block_channels(int k, int r) { return r * kLanes / k * k; }

// call(integral_constant<int, R>) with R = Wanted where the channels c fill whole blocks of Wanted registers, else 1
template <int K, int Wanted, typename Call>
void by_block_registers(int64_t c, const Call& call) {
  if constexpr (Wanted > 1) {
    if (c % block_channels(K, Wanted) == 0) return call(std::integral_constant<int, Wanted>());
  }
  call(std::integral_constant<int, 1>());
}

// The rotation by d within groups of K of a block of R registers: lane l of register r takes the block's lane
// rotated_lane(r * kLanes + l), which lies in register r - 1, r or r + 1. One register: a permutation within it;
// more: a permutation of two neighbours (`near`), and for a register between two others a second one that brings
// in the lanes from the next (`far`).
template <typename scalar_t, int K, int R>
struct Rotation {
  using V = Lanes<scalar_t>;
  typename V::Index near[R], far[R];
  static constexpr int low(int r) { return R == 1 ? 0 : std::max(0, std::min(r - 1, R - 2)); }  // near's first
  Rotation() = default;
  explicit Rotation(int d) {
    for (int r = 0; r < R; ++r) {
      int near_lanes[kLanes], far_lanes[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        const int from = rotated_lane(r * kLanes + l, K, d, block_channels(K, R)) - low(r) * kLanes;
        const bool next = from >= 2 * kLanes;  // in register r + 1
        near_lanes[l] = next ? 0 : from;
        far_lanes[l] = next ? from - kLanes : l;
      }
      near[r] = V::indices(near_lanes);
      far[r] = V::indices(far_lanes);
    }
  }
  void apply(const V* in, V* out) const {  // out: in rotated
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if constexpr (R == 1) {
        out[r] = in[r].rotated(near[r]);
      } else {
        out[r] = in[low(r)].joined(in[low(r) + 1], near[r]);
        if (r > 0 && r < R - 1) out[r] = out[r].joined(in[r + 1], far[r]);
      }
    }
  }
};

// The lanes of each of a block's R registers that hold channels (`left` of them from the block's first on; S
// channels per block)
template <typename scalar_t, int R>
void block_masks(int64_t left, int64_t S, typename Lanes<scalar_t>::Mask* m) {
  #pragma GCC unroll 4
  for (int r = 0; r < R; ++r) m[r] = Lanes<scalar_t>::mask(std::clamp(left - r * kLanes, int64_t(0), S / R));
}

// Output pixels the forward pass computes at once: P * K * R sums, K * R kernel entries and R inputs in registers.
constexpr int pixels_at_once(int k, int r) {
  if (kRegisters == 32 && r == 1) return k == 2 ? 8 : k == 3 ? 5 : k == 4 ? 4 : std::max(1, (31 - k) / k);
  return std::max(1, (kRegisters - 1 - (k + 1) * r) / (k * r));
}

// Kernel columns the taps' gradient sums at once: J * K * R sums, K * R rotated gradients and R inputs in registers.
constexpr int columns_at_once(int k, int r) {
  return std::min(3, std::max(1, (kRegisters - 1 - (k + 1) * r) / (k * r)));
}

template <typename scalar_t, int K, int R, int P, bool Inside>
void forward_pixels(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g,
                    const Rotation<scalar_t, K, R>* back, bool stream, int64_t b, int64_t oy, int64_t ox) {
  // P neighbouring output pixels at once, blocks of R registers: each tap's K entries are loaded once for all P.
  // Inside: every tap of the P pixels falls inside the input row (no checks per pixel). Stream: streaming stores
  // (streams()).
  using V = Lanes<scalar_t>;
  constexpr int64_t S = block_channels(K, R);
  const int64_t c = g.c, h = g.h, w = g.w, kh = g.kh, kw = g.kw, sw = g.sw, step = sw * c;  // in registers
  scalar_t* out = y + ((b * g.oh + oy) * g.ow + ox) * c;
  for (int64_t cb = 0; cb < c; cb += S) {
    typename V::Mask m[R];
    block_masks<scalar_t, R>(c - cb, S, m);
    V sums[P][K][R];  // sums[p][e][c']: input channel c' times its entries to output channel base + (c' % K + e) % K
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
      #pragma GCC unroll 16
      for (int e = 0; e < K; ++e)
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) sums[p][e][r] = V::zero();
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t iy = g.in_y(oy, i);
      if (iy < 0 || iy >= h) continue;
      const scalar_t* in_row = x + (b * h + iy) * w * c + cb;
      for (int64_t j = 0; j < kw; ++j) {
        const scalar_t* tap = taps + (i * kw + j) * K * c + cb;
        const int64_t first = g.in_x(ox, j);  // the input column of pixel 0's tap
        V entry[K][R];
        #pragma GCC unroll 16
        for (int e = 0; e < K; ++e)
          #pragma GCC unroll 4
          for (int r = 0; r < R; ++r) entry[e][r] = V::load(tap + e * c + r * kLanes, m[r]);
        #pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          if (!Inside && (first + p * sw < 0 || first + p * sw >= w)) continue;
          V in[R];
          #pragma GCC unroll 4
          for (int r = 0; r < R; ++r) in[r] = V::load(in_row + first * c + p * step + r * kLanes, m[r]);
          #pragma GCC unroll 16
          for (int e = 0; e < K; ++e)
            #pragma GCC unroll 4
            for (int r = 0; r < R; ++r) sums[p][e][r] = sums[p][e][r].fma(entry[e][r], in[r]);
        }
      }
    }
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {  // output channel c collects sums[e] of input channel base + (c % K - e) % K
      V acc[R], turned[R];
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r] = sums[p][0][r];
      #pragma GCC unroll 16
      for (int e = 1; e < K; ++e) {
        back[e].apply(sums[p][e], turned);
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) acc[r] = acc[r] + turned[r];
      }
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        scalar_t* to = out + p * c + cb + r * kLanes;
        if (S % kLanes == 0 && stream)
          acc[r].stream(to);
        else if (cb + (r + 1) * kLanes <= c)  // whole: lanes past the block land in later ones, written after it
          acc[r].store(to);
        else if (cb + r * kLanes < c)
          acc[r].store(to, m[r]);
      }
    }
  }
}

template <typename scalar_t, int K, int R, int J>
void taps_gradient_columns(const scalar_t* x, const scalar_t* grad_y, scalar_t* sums, const Geometry& g,
                           const Rotation<scalar_t, K, R>* rotation, int64_t b, Band& band, int64_t i, int64_t j0,
                           int64_t cb) {
  // kernel columns j0 .. j0 + J - 1 of kernel row i, for the block at channel cb, over a band of image b: J * K * R
  // sums in registers, added to memory once (whole registers: `sums` holds R * kLanes per block)
  using V = Lanes<scalar_t>;
  constexpr int64_t S = block_channels(K, R);
  const int64_t c = g.c, w = g.w;  // in registers, not re-read
  typename V::Mask m[R];
  block_masks<scalar_t, R>(c - cb, S, m);
  V acc[J][K][R] = {};
  for_gradient_pixels(g, band, i, j0, j0 + J - 1, [&](int64_t oy, int64_t iy) {
    const scalar_t* in_row = x + (b * g.h + iy) * w * c + cb;
    const scalar_t* dy_row = grad_y + (b * g.oh + oy) * g.ow * c + cb;
    return [&, in_row, dy_row](int64_t ox, auto checked) {
      V d[K][R];  // d[e][c']: the gradient of output channel base + (c' % K + e) % K
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) d[0][r] = V::load(dy_row + ox * c + r * kLanes, m[r]);
      #pragma GCC unroll 16
      for (int e = 1; e < K; ++e) rotation[e].apply(d[0], d[e]);
      for_gradient_inputs<J>(g, in_row, ox, j0, checked, [&](int j, const scalar_t* pixel) {
        V in[R];
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) in[r] = V::load(pixel + r * kLanes, m[r]);
        #pragma GCC unroll 16
        for (int e = 0; e < K; ++e)
          #pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[j][e][r] = acc[j][e][r].fma(d[e][r], in[r]);
      });
    };
  });
  const int64_t blocks = (c + S - 1) / S;
  add_sums(acc, [&](int j, int e, int r) {
    return sums + ((((i * g.kw + j0 + j) * K + e) * blocks + cb / S) * R + r) * kLanes;
  });
}

// A broadcast group's K channels in R = ceil(K / kLanes) registers: register r holds channels r * kLanes onwards.
// Masked loads and stores keep to the K channels.
template <typename scalar_t, int K>
struct Group {
  using V = Lanes<scalar_t>;
  static constexpr int R = (K + kLanes - 1) / kLanes;
  typename V::Mask mask[R];
  Group() { block_masks<scalar_t, R>(K, R * kLanes, mask); }
  void load(V* into, const scalar_t* p) const {
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) into[r] = V::load(p + r * kLanes, mask[r]);
  }
  void store(const V* from, scalar_t* p) const {
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) from[r].store(p + r * kLanes, mask[r]);
  }
  // every lane of the R registers: the R * kLanes - K past the group's end too (where the next group's channels or
  // padding lie; masked stores are slow on some CPUs)
  static void store_all(const V* from, scalar_t* p) {
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) from[r].store(p + r * kLanes);
  }
};

// Output pixels the broadcast forward computes at once (P * R sums in registers), and input channels whose tap rows
// (D * R registers) it holds while those pixels collect them: the rest of the registers.
constexpr int broadcast_pixels_at_once(int r) {
  int p = 8;
  while (p > 1 && (p + 1) * r + 1 > kRegisters) p /= 2;
  return p;
}
constexpr int broadcast_rows_at_once(int k, int r, int p) {
  return std::max(1, std::min(k, (kRegisters - 1 - p * r) / r));
}

// call(integral_constant<int, first>, integral_constant<int, width>) for the blocks first = First, First + Step, ...
// below Last, each Step wide but the last (a compile-time loop: the kernels keep block sizes in template arguments)
template <int First, int Step, int Last, typename Call>
void for_each_block(const Call& call) {
  if constexpr (First < Last) {
    call(std::integral_constant<int, First>(), std::integral_constant<int, std::min(Step, Last - First)>());
    for_each_block<First + Step, Step, Last>(call);
  }
}

// Channels the broadcast forward stages before it streams them out: the fewest whole groups that fill whole
// registers (K where K fills them itself)
constexpr int staged_channels(int k) {
  int channels = k;
  while (channels % kLanes != 0) channels += k;
  return channels;
}

template <typename scalar_t, int K, int P, bool Inside>
void broadcast_pixels(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g,
                      const Group<scalar_t, K>& group, bool stream, int64_t b, int64_t oy, int64_t ox) {
  // P neighbouring output pixels at once, group by group: each tap row is loaded once for all P, and D rows at a
  // time stay in registers while each pixel takes its D input values (at one address plus offsets, so the
  // multiply-adds need no address arithmetic between them). Inside: every tap of the P pixels falls inside the input
  // row (no checks per pixel). Stream: streaming stores (streams()).
  using V = Lanes<scalar_t>;
  constexpr int R = Group<scalar_t, K>::R, D = broadcast_rows_at_once(K, R, P), S = staged_channels(K);
  const int64_t c = g.c, h = g.h, w = g.w, kh = g.kh, kw = g.kw, sw = g.sw, step = sw * c;  // in registers
  scalar_t* out = y + ((b * g.oh + oy) * g.ow + ox) * c;
  alignas(64) scalar_t staged[P][S + R * kLanes];  // where K % kLanes != 0 and stream: the last S channels' sums
  for (int64_t base = 0; base < c; base += K) {
    V sums[P][R];  // sums[p][e]: output channel base + e of pixel p
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p)
      #pragma GCC unroll 4
      for (int r = 0; r < R; ++r) sums[p][r] = V::zero();
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t iy = g.in_y(oy, i);
      if (iy < 0 || iy >= h) continue;
      const scalar_t* in_row = x + (b * h + iy) * w * c + base;
      for (int64_t j = 0; j < kw; ++j) {
        const scalar_t* tap = taps + ((i * kw + j) * c + base) * K;
        const int64_t first = g.in_x(ox, j);  // the input column of pixel 0's tap
        const scalar_t* in = in_row + first * c;
        for_each_block<0, D, K>([&](auto d0, auto width) {  // input channels base + d0 ..
          constexpr int D0 = decltype(d0)::value, W = decltype(width)::value;
          V row[W][R];  // row[d][e]: the entry from input channel base + D0 + d to output channel base + e
          #pragma GCC unroll 16
          for (int d = 0; d < W; ++d) group.load(row[d], tap + (D0 + d) * K);
          #pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            if (!Inside && (first + p * sw < 0 || first + p * sw >= w)) continue;
            const scalar_t* value = in + p * step + D0;
            #pragma GCC unroll 16
            for (int d = 0; d < W; ++d) {
              const V broadcast = V::broadcast(value + d);
              #pragma GCC unroll 4
              for (int r = 0; r < R; ++r) sums[p][r] = sums[p][r].fma(row[d][r], broadcast);
            }
          }
        });
      }
    }
    #pragma GCC unroll 16
    for (int p = 0; p < P; ++p) {  // a store past the group lands in the next group's channels, which it overwrites
      if (K % kLanes == 0 && stream) {
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) sums[p][r].stream(out + p * c + base + r * kLanes);
      } else if (stream) {
        Group<scalar_t, K>::store_all(sums[p], staged[p] + base % S);
      } else if (base + K < c) {
        Group<scalar_t, K>::store_all(sums[p], out + p * c + base);
      } else {
        group.store(sums[p], out + p * c + base);
      }
    }
    if (K % kLanes != 0 && stream && (base + K) % S == 0) {  // S channels staged: streamed out in whole registers
      #pragma GCC unroll 16
      for (int p = 0; p < P; ++p)
        #pragma GCC unroll 16
        for (int r = 0; r < S / kLanes; ++r)
          V::load(staged[p] + r * kLanes).stream(out + p * c + base + K - S + r * kLanes);
    }
  }
}

// Kernel columns the broadcast taps' gradient sums at once, and input channels: J * D * R sums, a gradient row and
// a broadcast input in registers.
constexpr int broadcast_columns_at_once() { return 3; }
constexpr int broadcast_channels_at_once(int k, int r) {
  return std::max(1, std::min(k, (kRegisters - 1 - r) / (broadcast_columns_at_once() * r)));
}

template <typename scalar_t, int K, int J, int D>
void broadcast_gradient_columns(const scalar_t* x, const scalar_t* grad_y, scalar_t* sums, const Geometry& g,
                                const Group<scalar_t, K>& group, int64_t b, Band& band, int64_t i, int64_t j0,
                                int64_t base, int d0) {
  // kernel columns j0 .. j0 + J - 1 of kernel row i, input channels base + d0 .. base + d0 + D - 1 of the group at
  // channel base, over a band of image b; sums (R * kLanes per input channel: whole registers) are added to memory
  // once
  using V = Lanes<scalar_t>;
  constexpr int R = Group<scalar_t, K>::R;
  const int64_t c = g.c, w = g.w;  // in registers, not re-read
  V acc[J][D][R] = {};  // acc[j][d][e]: the tap of column j0 + j from input channel base + d0 + d to output base + e
  for_gradient_pixels(g, band, i, j0, j0 + J - 1, [&](int64_t oy, int64_t iy) {
    const scalar_t* in_row = x + (b * g.h + iy) * w * c + base + d0;
    const scalar_t* dy_row = grad_y + (b * g.oh + oy) * g.ow * c + base;
    return [&, in_row, dy_row](int64_t ox, auto checked) {
      V dy[R];
      group.load(dy, dy_row + ox * c);
      for_gradient_inputs<J>(g, in_row, ox, j0, checked, [&](int j, const scalar_t* in) {
        #pragma GCC unroll 16
        for (int d = 0; d < D; ++d) {
          const V value = V::broadcast(in + d);
          #pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[j][d][r] = acc[j][d][r].fma(dy[r], value);
        }
      });
    };
  });
  add_sums(acc, [&](int j, int d, int r) {
    return sums + (((i * g.kw + j0 + j) * c + base + d0 + d) * R + r) * kLanes;
  });
}

template <typename scalar_t, int K, int J>
void broadcast_gradient_channels(const scalar_t* x, const scalar_t* grad_y, scalar_t* sums, const Geometry& g,
                                 const Group<scalar_t, K>& group, int64_t b, Band& band, int64_t i, int64_t j0,
                                 int64_t base) {
  // the group's input channels D at a time, then the rest
  constexpr int D = broadcast_channels_at_once(K, Group<scalar_t, K>::R);
  int d0 = 0;
  for (; d0 + D <= K; d0 += D)
    broadcast_gradient_columns<scalar_t, K, J, D>(x, grad_y, sums, g, group, b, band, i, j0, base, d0);
  if constexpr (K % D != 0)
    broadcast_gradient_columns<scalar_t, K, J, K % D>(x, grad_y, sums, g, group, b, band, i, j0, base, d0);
}

// Channels in a block of the broadcast kernel's packed gradient at K channels per group: the fewest whole groups that
// fill whole registers (at most kMaxPackedRegisters), where no register holds channels of more than two groups and
// the groups alone do not fill whole registers (where they do, no lane idles); else 0. AVX-512: 16 at K = 8 (two
// groups per register), 48 at 12 (four groups in three registers); AVX2: 24 at 12.
constexpr int kMaxPackedRegisters = 3;
constexpr int packed_channels(int k) {
  const int channels = staged_channels(k);
  if (k % kLanes == 0 || channels > kMaxPackedRegisters * kLanes) return 0;
  for (int l = 0; l < channels; l += kLanes)
    if ((l + kLanes - 1) / k - l / k > 1) return 0;
  return channels;
}

// A packed block's R registers: register r's lanes below split(r) hold channels of the block's group low(r), the rest
// (where split(r) < kLanes) of group low(r) + 1.
template <typename scalar_t, int K>
struct Pack {
  using V = Lanes<scalar_t>;
  static constexpr int S = packed_channels(K), R = S / kLanes;
  static constexpr int low(int r) { return r * kLanes / K; }
  static constexpr int split(int r) { return (low(r) + 1) * K - r * kLanes; }
  // whether register r takes its two groups' values from its neighbours' (register r - 1 ends with group low(r),
  // register r + 1 starts with group low(r) + 1): one permutation instead of two broadcasts
  static constexpr bool joined(int r) {
    return r > 0 && r < R - 1 && split(r) < kLanes && (r * kLanes - 1) / K == low(r) && low(r + 1) == low(r) + 1;
  }
  typename V::Mask lower[R];
  typename V::Index ends[R];  // joined(r): register r - 1's last lane below split(r), r + 1's first above it
  Pack() {
    for (int r = 0; r < R; ++r) {
      lower[r] = V::mask(std::min(split(r), kLanes));
      int lanes[kLanes];
      for (int l = 0; l < kLanes; ++l) lanes[l] = l < split(r) ? kLanes - 1 : kLanes;
      ends[r] = V::indices(lanes);
    }
  }
  // into[r]: value d of each group of the block (at p = the block's first channel + d, p[group * K]) in the lanes of
  // that group's channels
  void values(const scalar_t* p, V* into) const {
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      if (joined(r)) continue;
      into[r] = split(r) >= kLanes ? V::broadcast(p + low(r) * K)
                                   : V::broadcast(p + (low(r) + 1) * K).with(lower[r], p + low(r) * K);
    }
    #pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
      if (joined(r)) into[r] = into[r - 1].joined(into[r + 1], ends[r]);
  }
};

// Kernel columns the packed taps' gradient sums at once, and places in the groups' outputs (K in even parts): J * E * R
// sums, E * R gradient values and R inputs in registers.
constexpr int packed_columns_at_once() { return 3; }
constexpr int packed_outputs_at_once(int k, int r) {
  const int most = std::max(1, (kRegisters - 1 - r) / ((packed_columns_at_once() + 1) * r));
  const int parts = (k + most - 1) / most;
  return (k + parts - 1) / parts;
}

template <typename scalar_t, int K, int J, int E>
void packed_gradient_columns(const scalar_t* x, const scalar_t* grad_y, scalar_t* sums, const Geometry& g,
                             const Pack<scalar_t, K>& pack, int64_t b, Band& band, int64_t i, int64_t j0,
                             int64_t base, int e0) {
  // kernel columns j0 .. j0 + J - 1 of kernel row i, places e0 .. e0 + E - 1 of the output channels of the block's
  // groups at channel base, over a band of image b; sums (kh x kw x K x C: the place in the group, the input
  // channel) are added to memory once
  using V = Lanes<scalar_t>;
  constexpr int R = Pack<scalar_t, K>::R;
  const int64_t c = g.c, w = g.w;  // in registers, not re-read
  V acc[J][E][R] = {};  // acc[j][e][r]: the taps of column j0 + j from the input channels in register r to place e0 + e
  for_gradient_pixels(g, band, i, j0, j0 + J - 1, [&](int64_t oy, int64_t iy) {
    const scalar_t* in_row = x + (b * g.h + iy) * w * c + base;
    const scalar_t* dy_row = grad_y + (b * g.oh + oy) * g.ow * c + base + e0;
    return [&, in_row, dy_row](int64_t ox, auto checked) {
      V dy[E][R];  // dy[e][r]: the output gradient at place e0 + e of each group, in the lanes of its inputs
      #pragma GCC unroll 16
      for (int e = 0; e < E; ++e) pack.values(dy_row + ox * c + e, dy[e]);
      for_gradient_inputs<J>(g, in_row, ox, j0, checked, [&](int j, const scalar_t* in) {
        V value[R];
        #pragma GCC unroll 4
        for (int r = 0; r < R; ++r) value[r] = V::load(in + r * kLanes);
        #pragma GCC unroll 16
        for (int e = 0; e < E; ++e)
          #pragma GCC unroll 4
          for (int r = 0; r < R; ++r) acc[j][e][r] = acc[j][e][r].fma(value[r], dy[e][r]);
      });
    };
  });
  add_sums(acc, [&](int j, int e, int r) { return sums + ((i * g.kw + j0 + j) * K + e0 + e) * c + base + r * kLanes; });
}

// The broadcast taps' gradient (kh x kw x C x K) where blocks of packed_channels(K) fill the channels: summed as
// kh x kw x K x C (the input channels in the lanes, each group's output gradient broadcast to its own), then laid out
// as the taps.
template <typename scalar_t, int K>
void packed_taps_gradient(const scalar_t* x, const scalar_t* grad_y, scalar_t* grad_taps, const Geometry& g) {
  constexpr int J = packed_columns_at_once(), E = packed_outputs_at_once(K, Pack<scalar_t, K>::R);
  const Pack<scalar_t, K> pack;
  auto images = [&](scalar_t* sums, int64_t begin, int64_t end) {
    for_gradient_columns<J>(g, x, grad_y, begin, end, Pack<scalar_t, K>::S,
                            [&](int64_t b, int64_t base, int64_t i, int64_t j, auto columns, Band& band) {
      for_each_block<0, E, K>([&](auto e0, auto width) {
        packed_gradient_columns<scalar_t, K, decltype(columns)::value, decltype(width)::value>(
            x, grad_y, sums, g, pack, b, band, i, j, base, decltype(e0)::value);
      });
    });
  };
  const int64_t taps = g.kh * g.kw, c = g.c;
  const std::vector<scalar_t> total = thread_sums<scalar_t>(taps * K * c, g.n, 1, images);
  for (int64_t tap = 0; tap < taps; ++tap)  // kh x kw x K x C -> kh x kw x C x K
    for (int64_t e = 0; e < K; ++e)
      for (int64_t channel = 0; channel < c; ++channel)
        grad_taps[(tap * c + channel) * K + e] = total[(tap * K + e) * c + channel];
}

// The convolution of x (channels-last N x C x H x W) by kh x kw kernels of k channels per group, k from min_k to max_k.
Geometry geometry(const at::Tensor& x, int64_t kh, int64_t kw, int64_t k, int64_t min_k, int64_t max_k,
                  const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                  const std::vector<int64_t>& dilation) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) && x.device().is_cpu(),
              "x: a channels-last 4-d CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "stride, padding, dilation: pairs");
  TORCH_CHECK(k >= min_k && k <= max_k && x.size(1) % k == 0, "channels per group: ", min_k, " to ", max_k,
              ", dividing the channels");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), kh, kw, 0, 0,
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.oh = (g.h + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.ow = (g.w + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  return g;
}

template <int K, int Max, typename Call>
void by_group_size(int64_t k, const Call& call) {  // call(integral_constant<int, k>) for k in K .. Max
  if constexpr (K < Max) {
    if (k != K) return by_group_size<K + 1, Max>(k, call);
  }
  call(std::integral_constant<int, K>());  // geometry() allows K to Max only
}

// The two kernels: the group sizes each computes, where its taps (kh x kw x K x C or kh x kw x C x K) hold the group
// size and the channels, and its two passes.
struct Rotated {
  static constexpr int kMin = kMinGroup, kMax = kMaxGroup, kGroupDim = 2, kChannelDim = 3;

  template <typename scalar_t, int K>
  static void forward(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g) {
    by_block_registers<K, forward_registers(K)>(g.c, [&](auto registers) {
      constexpr int R = decltype(registers)::value;
      Rotation<scalar_t, K, R> back[K];  // rotation by -e
      for (int e = 1; e < K; ++e) back[e] = Rotation<scalar_t, K, R>((K - e) % K);
      const bool stream = streams<block_channels(K, R)>(y, g);
      for_pixel_blocks<pixels_at_once(K, R)>(g, x, [&](int64_t b, int64_t oy, int64_t ox, auto pixels, auto inside) {
        forward_pixels<scalar_t, K, R, decltype(pixels)::value, decltype(inside)::value>(x, taps, y, g, back, stream,
                                                                                         b, oy, ox);
      });
      if (stream) _mm_sfence();  // the streaming stores reach memory before the output is handed on
    });
  }

  template <typename scalar_t, int K>
  static void taps_gradient(const scalar_t* x, const scalar_t* grad_y, scalar_t* grad_taps, const Geometry& g) {
    by_block_registers<K, gradient_registers(K)>(g.c, [&](auto registers) {
      constexpr int R = decltype(registers)::value, J = columns_at_once(K, R);
      constexpr int64_t S = block_channels(K, R);
      Rotation<scalar_t, K, R> rotation[K];
      for (int e = 1; e < K; ++e) rotation[e] = Rotation<scalar_t, K, R>(e);
      const int64_t rows = g.kh * g.kw * K, blocks = (g.c + S - 1) / S;  // rows of C taps; blocks padded to registers
      auto images = [&](scalar_t* sums, int64_t begin, int64_t end) {
        for_gradient_columns<J>(g, x, grad_y, begin, end, S,
                                [&](int64_t b, int64_t cb, int64_t i, int64_t j, auto columns, Band& band) {
          taps_gradient_columns<scalar_t, K, R, decltype(columns)::value>(x, grad_y, sums, g, rotation, b, band, i, j,
                                                                          cb);
        });
      };
      const std::vector<scalar_t> total = thread_sums<scalar_t>(rows * blocks * R * kLanes, g.n, 1, images);
      for (int64_t row = 0; row < rows; ++row)  // drop the padding
        for (int64_t block = 0; block < blocks; ++block) {
          const auto from = total.begin() + (row * blocks + block) * R * kLanes;
          std::copy(from, from + std::min(S, g.c - block * S), grad_taps + row * g.c + block * S);
        }
    });
  }
};

struct Broadcast {
  static constexpr int kMin = kMinBroadcast, kMax = kMaxBroadcast, kGroupDim = 3, kChannelDim = 2;

  template <typename scalar_t, int K>
  static void forward(const scalar_t* x, const scalar_t* taps, scalar_t* y, const Geometry& g) {
    const Group<scalar_t, K> group;
    constexpr int P = broadcast_pixels_at_once(Group<scalar_t, K>::R);
    const bool stream = streams<staged_channels(K)>(y, g);
    for_pixel_blocks<P>(g, x, [&](int64_t b, int64_t oy, int64_t ox, auto pixels, auto inside) {
      broadcast_pixels<scalar_t, K, decltype(pixels)::value, decltype(inside)::value>(x, taps, y, g, group, stream,
                                                                                      b, oy, ox);
    });
    if (stream) _mm_sfence();  // the streaming stores reach memory before the output is handed on
  }

  template <typename scalar_t, int K>
  static void taps_gradient(const scalar_t* x, const scalar_t* grad_y, scalar_t* grad_taps, const Geometry& g) {
    if constexpr (packed_channels(K) > 0) {
      if (g.c % packed_channels(K) == 0) return packed_taps_gradient<scalar_t, K>(x, grad_y, grad_taps, g);
    }
    constexpr int J = broadcast_columns_at_once(), width = Group<scalar_t, K>::R * kLanes;  // padded to registers
    const Group<scalar_t, K> group;
    const int64_t taps = g.kh * g.kw * g.c;  // rows of K entries
    auto images = [&](scalar_t* sums, int64_t begin, int64_t end) {
      for_gradient_columns<J>(g, x, grad_y, begin, end, K,
                              [&](int64_t b, int64_t base, int64_t i, int64_t j, auto columns, Band& band) {
        broadcast_gradient_channels<scalar_t, K, decltype(columns)::value>(x, grad_y, sums, g, group, b, band, i, j,
                                                                           base);
      });
    };
    const std::vector<scalar_t> total = thread_sums<scalar_t>(taps * width, g.n, 1, images);
    for (int64_t row = 0; row < taps; ++row)  // drop the padding
      std::copy(total.begin() + row * width, total.begin() + row * width + K, grad_taps + row * K);
  }
};

// y = conv2d(x, weight, stride, padding, dilation, groups=C/K) for kernels prepared as the Kernel reads them (taps).
template <typename Kernel>
at::Tensor forward(at::Tensor x, at::Tensor taps, std::vector<int64_t> stride, std::vector<int64_t> padding,
                   std::vector<int64_t> dilation) {
  TORCH_CHECK(taps.dim() == 4 && taps.size(Kernel::kChannelDim) == x.size(1) && taps.is_contiguous() &&
                  taps.scalar_type() == x.scalar_type(), "taps: kh x kw and K and C as the kernel reads them, ",
              "contiguous, of x's dtype");
  const Geometry g = geometry(x, taps.size(0), taps.size(1), taps.size(Kernel::kGroupDim), Kernel::kMin,
                              Kernel::kMax, stride, padding, dilation);
  auto y = at::empty({g.n, g.c, g.oh, g.ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_channel_forward", [&] {
    by_group_size<Kernel::kMin, Kernel::kMax>(taps.size(Kernel::kGroupDim), [&](auto k) {
      Kernel::template forward<scalar_t, decltype(k)::value>(x.data_ptr<scalar_t>(), taps.data_ptr<scalar_t>(),
                                                             y.data_ptr<scalar_t>(), g);
    });
  });
  return y;
}

// The gradient of the forward above with respect to its taps (laid out as the taps).
template <typename Kernel>
at::Tensor taps_gradient(at::Tensor grad_y, at::Tensor x, int64_t kh, int64_t kw, int64_t k,
                         std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation) {
  const Geometry g = geometry(x, kh, kw, k, Kernel::kMin, Kernel::kMax, stride, padding, dilation);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.n && grad_y.size(1) == g.c && grad_y.size(2) == g.oh &&
                  grad_y.size(3) == g.ow && grad_y.scalar_type() == x.scalar_type(),
              "grad_y: N x C x H' x W' of the convolution's output");
  grad_y = grad_y.contiguous(at::MemoryFormat::ChannelsLast);
  std::vector<int64_t> shape{kh, kw, 0, 0};
  shape[Kernel::kGroupDim] = k;
  shape[Kernel::kChannelDim] = g.c;
  auto grad_taps = at::empty(shape, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "few_channel_taps_gradient", [&] {
    by_group_size<Kernel::kMin, Kernel::kMax>(k, [&](auto size) {
      Kernel::template taps_gradient<scalar_t, decltype(size)::value>(
          x.data_ptr<scalar_t>(), grad_y.data_ptr<scalar_t>(), grad_taps.data_ptr<scalar_t>(), g);
    });
  });
  return grad_taps;
}

}  // namespace
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  m.attr("available") = true;
  m.def("forward", &forward<Rotated>, "grouped conv, MIN_GROUP to MAX_GROUP channels per group, channels-last");
  m.def("taps_gradient", &taps_gradient<Rotated>, "its kernel gradient (the input gradient is a forward call)");
  m.def("broadcast_forward", &forward<Broadcast>, "grouped conv, MIN_BROADCAST to MAX_BROADCAST channels per group");
  m.def("broadcast_taps_gradient", &taps_gradient<Broadcast>, "its kernel gradient");
#else  // without AVX-512 or AVX2 the module only says so, and the strategies are not offered
  m.attr("available") = false;
#endif
}
