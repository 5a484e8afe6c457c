// Helpers shared by the GPU tests (tests/cuda/*_test.cc).
//
// STRATA_REQUIRE_GPU() skips the calling test, loudly, when no CUDA device is visible: GPU tests
// never pass vacuously; argument checks that need no device run everywhere.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <utility>
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

// The fp32 values of a T vector.
template <typename T>
std::vector<float> ToFloats(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = ToFloat(v[i]);
  return out;
}

template <typename T>
bool SameBits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// A device copy of a vector placed `offset` elements into its allocation (offset 1 defeats the
// 16-byte vector paths); ptr() is the vector's first element.
template <typename T>
struct ShiftedBuffer {
  DeviceBuffer buf;
  size_t offset = 0;
  T* ptr() const { return buf.as<T>() + offset; }
};

// Host vector -> ShiftedBuffer (synchronous); a failure is a test failure and an empty buffer.
template <typename T>
ShiftedBuffer<T> ToDeviceShifted(const std::vector<T>& v, size_t offset) {
  std::vector<T> padded(offset, T{});
  padded.insert(padded.end(), v.begin(), v.end());
  auto dev = ToDevice(padded);
  EXPECT_TRUE(dev.ok()) << dev.status().ToString();
  return ShiftedBuffer<T>{dev.ok() ? std::move(*dev) : DeviceBuffer(), offset};
}

// The n elements of a ShiftedBuffer, after the default stream; a failure is a test failure and
// an empty vector.
template <typename T>
std::vector<T> ToHostShifted(const ShiftedBuffer<T>& s, size_t n) {
  auto host = ToHost<T>(s.buf, s.offset + n);
  EXPECT_TRUE(host.ok()) << host.status().ToString();
  if (!host.ok()) return {};
  return std::vector<T>(host->begin() + s.offset, host->end());
}

}  // namespace strata::model::testing
