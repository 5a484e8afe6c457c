// The CUDA runtime seen from plain C++: device discovery, device memory for tests and tools, and
// stream synchronisation. No CUDA type appears here; streams travel as `void*` (a cudaStream_t,
// nullptr for the default stream).
//
// Nothing in this header aborts when there is no GPU or no driver: discovery answers 0 / "", and
// everything else returns a non-OK Status (UNAVAILABLE for a missing device or driver, INTERNAL
// for any other CUDA error), with the CUDA error name in the message.
#pragma once

#include <cstddef>
#include <string>

#include "common/status.h"

namespace strata::model {

// Number of CUDA devices this process can use. 0 when there is no driver, no device, or the
// runtime reports any error (the error is cleared so later calls do not see it).
int CudaDeviceCount();

// The device's name ("NVIDIA H100 80GB HBM3"), or "" when `device` is out of range or the
// runtime fails.
std::string CudaDeviceName(int device);

// Waits for all work queued on `stream` and returns the first error it raised (kernel faults
// surface here, not at launch).
Status CudaStreamSynchronize(void* stream);

// Owns one block of device memory (cudaMalloc); frees it on destruction. Move-only.
// Copies are synchronous with the host (cudaMemcpy): meant for tests and set-up, not the step loop.
class DeviceBuffer {
 public:
  // An empty buffer (data() == nullptr); bytes == 0 allocates nothing and succeeds.
  static Result<DeviceBuffer> Allocate(size_t bytes);

  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return bytes_; }

  // Copy `bytes` from host `src` into the start of this buffer / from the start of this buffer
  // into host `dst`. OUT_OF_RANGE when bytes > size(); nothing is copied then.
  Status CopyFromHost(const void* src, size_t bytes);
  Status CopyToHost(void* dst, size_t bytes) const;

 private:
  DeviceBuffer(void* ptr, size_t bytes) : ptr_(ptr), bytes_(bytes) {}
  void Release();

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace strata::model
