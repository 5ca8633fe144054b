// Sums over a range split across threads: each thread of at::parallel_for adds into its own buffer, and the buffers
// are added up at the end (for a given thread count, always in the same order).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

// The `size` sums that `body(sums, begin, end)` adds into `sums` for the part [begin, end) of [0, range).
template <typename acc_t, typename Body>
std::vector<acc_t> thread_sums(int64_t size, int64_t range, int64_t grain, const Body& body) {
  const int64_t threads = at::get_num_threads();
  std::vector<acc_t> partial(threads * size, acc_t(0));
  at::parallel_for(0, range, grain, [&](int64_t begin, int64_t end) {
    body(partial.data() + at::get_thread_num() * size, begin, end);
  });
  std::vector<acc_t> total(size, acc_t(0));
  for (int64_t thread = 0; thread < threads; ++thread)
    for (int64_t k = 0; k < size; ++k) total[k] += partial[thread * size + k];
  return total;
}
