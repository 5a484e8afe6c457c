// Device memory, streams and events for the CUDA model, seen from plain C++ (no CUDA types).
//
// CudaAllocator is a caching allocator: blocks are rounded up to size classes and returned to a
// free list on Free, so the training step loop never calls cudaMalloc/cudaFree after the first
// step (stats() shows it: `device_mallocs` stops growing). Not thread-safe; one per device user.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "common/status.h"

namespace strata::model {

struct CudaAllocatorStats {
  int64_t device_mallocs = 0;  // cudaMalloc calls so far
  size_t reserved_bytes = 0;   // held from the driver (in use + cached)
  size_t in_use_bytes = 0;
  size_t peak_in_use_bytes = 0;
};

class CudaAllocator {
 public:
  static Result<std::unique_ptr<CudaAllocator>> Create(int device = 0);
  virtual ~CudaAllocator() = default;
  // 256-byte aligned; bytes == 0 returns nullptr. RESOURCE_EXHAUSTED naming the size and the
  // allocator's reserved/in-use bytes when the device is full (after releasing cached blocks).
  virtual Result<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* ptr) = 0;    // ptr from Allocate (or nullptr)
  virtual Status ReleaseCached() = 0;  // gives cached free blocks back to the driver
  virtual CudaAllocatorStats stats() const = 0;
};

// A non-blocking CUDA stream (cudaStreamNonBlocking), destroyed with the object.
class CudaStream {
 public:
  static Result<CudaStream> Create();
  CudaStream() = default;
  CudaStream(CudaStream&& o) noexcept;
  CudaStream& operator=(CudaStream&& o) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream();
  void* get() const { return stream_; }  // a cudaStream_t
  Status Synchronize() const;

 private:
  void* stream_ = nullptr;
};

// A CUDA event without timing (cudaEventDisableTiming) unless `timing`.
class CudaEvent {
 public:
  static Result<CudaEvent> Create(bool timing = false);
  CudaEvent() = default;
  CudaEvent(CudaEvent&& o) noexcept;
  CudaEvent& operator=(CudaEvent&& o) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent();
  Status Record(void* stream);
  Status WaitOn(void* stream) const;  // `stream` waits for this event (no host sync)
  Status Synchronize() const;
  Result<bool> Query() const;  // true when complete
  // Milliseconds between two timing events (both recorded and complete).
  static Result<float> ElapsedMs(const CudaEvent& start, const CudaEvent& end);
  void* get() const { return event_; }

 private:
  void* event_ = nullptr;
};

// Asynchronous copies on `stream` (host memory should be pinned for true overlap).
Status CudaCopyHostToDevice(void* dst, const void* src, size_t bytes, void* stream);
Status CudaCopyDeviceToHost(void* dst, const void* src, size_t bytes, void* stream);
Status CudaCopyDeviceToDevice(void* dst, const void* src, size_t bytes, void* stream);
Status CudaMemsetZero(void* dst, size_t bytes, void* stream);
// Pinned host memory (cudaMallocHost), freed by the returned deleter.
Result<std::shared_ptr<void>> CudaAllocPinnedHost(size_t bytes);
Status CudaSetDevice(int device);

}  // namespace strata::model
