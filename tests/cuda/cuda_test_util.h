// Helpers shared by the GPU tests (tests/cuda/*_test.cc).
//
// STRATA_REQUIRE_GPU() skips the calling test, loudly, when no CUDA device is visible: GPU tests
// never pass vacuously; argument checks that need no device run everywhere.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/dtype.h"

#define STRATA_REQUIRE_GPU()                                                                 \
  do {                                                                                       \
    if (::strata::model::CudaDeviceCount() == 0) {                                           \
      GTEST_SKIP() << "no CUDA driver or device visible (CudaDeviceCount() == 0): this GPU " \
                      "test did not run";                                                    \
    }                                                                                        \
  } while (0)

namespace strata::model::testing {

inline std::vector<float> UniformFloats(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Host vector -> new device buffer (synchronous).
template <typename T>
Result<DeviceBuffer> ToDevice(const std::vector<T>& host) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(host.size() * sizeof(T)));
  RETURN_IF_ERROR(buf.CopyFromHost(host.data(), host.size() * sizeof(T)));
  return buf;
}

// Waits for the default stream (kernel faults surface here), then copies n elements back.
template <typename T>
Result<std::vector<T>> ToHost(const DeviceBuffer& buf, size_t n, void* stream = nullptr) {
  RETURN_IF_ERROR(CudaStreamSynchronize(stream));
  std::vector<T> host(n);
  RETURN_IF_ERROR(buf.CopyToHost(host.data(), n * sizeof(T)));
  return host;
}

// fp32 values rounded to T and back (what a T tensor holding them represents).
template <typename T>
std::vector<T> Round(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = FromFloat<T>(x[i]);
  return out;
}

}  // namespace strata::model::testing
