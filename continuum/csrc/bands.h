// Sweeping images in bands of rows, with the next band fetched into L2 while one is swept. A kernel that sweeps each
// block of channels over a whole image reads each pixel's block (a cache line or a few) 4 C bytes after the last: the
// sweep waits for memory a line at a time, and where the image outgrows L2 the next block's sweep waits again. Swept
// a band of rows at a time (every block of the band before the next band), a band stays in L2 between its blocks,
// and the next band, fetched in memory order meanwhile, is there when its first block's sweep starts.
#pragma once

#include <algorithm>
#include <cstdint>

// The bytes of the tensors a pass reads that one band of rows spans: the band being swept and the next, being
// fetched, fill half of a 1 MiB L2 (on Zen 4 128 KiB ran as fast, 512 KiB up to 20 % slower).
constexpr int64_t kBandBytes = 256 * 1024;

// Rows per band where each row of the tensors read spans `row_bytes`: a multiple of `rows_per_sweep`, one sweep at
// least.
inline int64_t band_rows(int64_t row_bytes, int64_t rows_per_sweep) {
  return std::max<int64_t>(1, kBandBytes / row_bytes / rows_per_sweep) * rows_per_sweep;
}

// Fetches `bytes` from `from` into L2 in memory order, a share at each of `steps` calls of step() (more calls fetch
// nothing more). Into L2 only (prefetcht1): fetching into L1 as well did not help the depthwise passes.
class Ahead {
 public:
  Ahead(const void* from, int64_t bytes, int64_t steps)
      : from_(static_cast<const char*>(from)), lines_(std::max<int64_t>(0, bytes) / 64),
        per_step_((lines_ + steps - 1) / std::max<int64_t>(1, steps)) {}

  // Fetches the next share of the lines.
  void step() {
    for (const int64_t stop = std::min(lines_, done_ + per_step_); done_ < stop; ++done_)
      __builtin_prefetch(from_ + done_ * 64, 0, 2);
  }

 private:
  const char* from_;
  int64_t lines_, per_step_, done_ = 0;
};
