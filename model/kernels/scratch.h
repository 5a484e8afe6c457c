// Per-thread scratch buffers for kernels (grown on demand, never shrunk).
#pragma once

#include <cstddef>
#include <vector>

namespace strata::model {

// Returns a buffer of at least n floats, private to the calling thread; `slot` selects one of
// several independent buffers. Contents are unspecified.
inline float* ThreadScratch(int slot, size_t n) {
  thread_local std::vector<float> buffers[8];
  std::vector<float>& b = buffers[slot];
  if (b.size() < n) b.resize(n);
  return b.data();
}

}  // namespace strata::model
