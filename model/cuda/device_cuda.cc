// Device memory, streams and events; contract in device_cuda.h. The caching policy lives in
// caching_allocator.{h,cc} (tested without a GPU); this file only binds it to cudaMalloc/cudaFree.
#include "model/cuda/device_cuda.h"

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

#include "model/cuda/caching_allocator.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/cuda_status.h"

namespace strata::model {
namespace {

using cuda_util::FromCuda;

Status RequireDevice(const char* what) {
  if (CudaDeviceCount() == 0) {
    return Status(StatusCode::kUnavailable,
                  std::string(what) + ": no CUDA driver or device visible");
  }
  return Status::Ok();
}

Status CheckDeviceIndex(const char* what, int device) {
  RETURN_IF_ERROR(RequireDevice(what));
  const int count = CudaDeviceCount();
  if (device < 0 || device >= count) {
    return InvalidArgument(std::string(what) + ": device " + std::to_string(device) +
                           " out of range (" + std::to_string(count) + " visible)");
  }
  return Status::Ok();
}

// Makes `device` current for the scope and restores the previous device after, so the raw
// allocator does not change the calling thread's device behind its back.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      (void)cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) {
      status_ = FromCuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
    }
  }
  ~ScopedDevice() {
    if (status_.ok() && previous_ >= 0) {
      int now = -1;
      if (cudaGetDevice(&now) == cudaSuccess && now != previous_) (void)cudaSetDevice(previous_);
      (void)cudaGetLastError();
    }
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;
  const Status& status() const { return status_; }

 private:
  int previous_ = -1;
  Status status_;
};

class CudaCachingAllocator final : public CudaAllocator {
 public:
  explicit CudaCachingAllocator(int device)
      : cache_(
            "CudaAllocator(device " + std::to_string(device) + ")",
            [device](size_t bytes) -> Result<void*> {
              ScopedDevice scoped(device);
              RETURN_IF_ERROR(scoped.status());
              void* ptr = nullptr;
              RETURN_IF_ERROR(
                  FromCuda(cudaMalloc(&ptr, bytes), "cudaMalloc(" + std::to_string(bytes) + ")"));
              return ptr;
            },
            [device](void* ptr, size_t) -> Status {
              ScopedDevice scoped(device);
              RETURN_IF_ERROR(scoped.status());
              return FromCuda(cudaFree(ptr), "cudaFree");
            }) {}

  Result<void*> Allocate(size_t bytes) override { return cache_.Allocate(bytes); }

  void Free(void* ptr) override {
    // A pointer this allocator did not hand out (or a double free) is a caller bug that would
    // otherwise corrupt the cache silently.
    const Status st = cache_.Free(ptr);
    CHECK_MSG(st.ok(), st.ToString());
  }

  Status ReleaseCached() override { return cache_.ReleaseCached(); }

  CudaAllocatorStats stats() const override {
    const CachingAllocatorStats s = cache_.stats();
    CudaAllocatorStats out;
    out.device_mallocs = s.raw_allocs;
    out.reserved_bytes = s.reserved_bytes;
    out.in_use_bytes = s.in_use_bytes;
    out.peak_in_use_bytes = s.peak_in_use_bytes;
    return out;
  }

 private:
  CachingAllocator cache_;
};

}  // namespace

Result<std::unique_ptr<CudaAllocator>> CudaAllocator::Create(int device) {
  RETURN_IF_ERROR(CheckDeviceIndex("CudaAllocator::Create", device));
  return std::unique_ptr<CudaAllocator>(new CudaCachingAllocator(device));
}

// ---- CudaStream ---------------------------------------------------------------------------------

Result<CudaStream> CudaStream::Create() {
  RETURN_IF_ERROR(RequireDevice("CudaStream::Create"));
  cudaStream_t s = nullptr;
  RETURN_IF_ERROR(
      FromCuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"));
  CudaStream stream;
  stream.stream_ = s;
  return stream;
}

CudaStream::CudaStream(CudaStream&& o) noexcept : stream_(std::exchange(o.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& o) noexcept {
  if (this != &o) {
    if (stream_ != nullptr) (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
    stream_ = std::exchange(o.stream_, nullptr);
  }
  return *this;
}

CudaStream::~CudaStream() {
  // cudaStreamDestroy returns at once; work still queued on the stream completes first.
  if (stream_ != nullptr) (void)cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

Status CudaStream::Synchronize() const {
  if (stream_ == nullptr) return FailedPrecondition("CudaStream::Synchronize: no stream");
  return FromCuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)),
                  "cudaStreamSynchronize");
}

// ---- CudaEvent ----------------------------------------------------------------------------------

Result<CudaEvent> CudaEvent::Create(bool timing) {
  RETURN_IF_ERROR(RequireDevice("CudaEvent::Create"));
  cudaEvent_t e = nullptr;
  RETURN_IF_ERROR(
      FromCuda(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming),
               "cudaEventCreateWithFlags"));
  CudaEvent event;
  event.event_ = e;
  return event;
}

CudaEvent::CudaEvent(CudaEvent&& o) noexcept : event_(std::exchange(o.event_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& o) noexcept {
  if (this != &o) {
    if (event_ != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event_));
    event_ = std::exchange(o.event_, nullptr);
  }
  return *this;
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) (void)cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

Status CudaEvent::Record(void* stream) {
  if (event_ == nullptr) return FailedPrecondition("CudaEvent::Record: no event");
  return FromCuda(
      cudaEventRecord(static_cast<cudaEvent_t>(event_), static_cast<cudaStream_t>(stream)),
      "cudaEventRecord");
}

Status CudaEvent::WaitOn(void* stream) const {
  if (event_ == nullptr) return FailedPrecondition("CudaEvent::WaitOn: no event");
  return FromCuda(
      cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0),
      "cudaStreamWaitEvent");
}

Status CudaEvent::Synchronize() const {
  if (event_ == nullptr) return FailedPrecondition("CudaEvent::Synchronize: no event");
  return FromCuda(cudaEventSynchronize(static_cast<cudaEvent_t>(event_)), "cudaEventSynchronize");
}

Result<bool> CudaEvent::Query() const {
  if (event_ == nullptr) return FailedPrecondition("CudaEvent::Query: no event");
  const cudaError_t err = cudaEventQuery(static_cast<cudaEvent_t>(event_));
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) {
    (void)cudaGetLastError();  // "not ready" is an answer, not an error to leave behind
    return false;
  }
  return FromCuda(err, "cudaEventQuery");
}

Result<float> CudaEvent::ElapsedMs(const CudaEvent& start, const CudaEvent& end) {
  if (start.event_ == nullptr || end.event_ == nullptr) {
    return FailedPrecondition("CudaEvent::ElapsedMs: no event");
  }
  float ms = 0.f;
  RETURN_IF_ERROR(FromCuda(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.event_),
                                                static_cast<cudaEvent_t>(end.event_)),
                           "cudaEventElapsedTime"));
  return ms;
}

// ---- copies -------------------------------------------------------------------------------------

namespace {

Status CheckCopy(const char* what, const void* dst, const void* src, size_t bytes) {
  if (bytes > 0 && (dst == nullptr || src == nullptr)) {
    return InvalidArgument(std::string(what) + ": null pointer with " + std::to_string(bytes) +
                           " bytes");
  }
  return Status::Ok();
}

Status Copy(const char* what, void* dst, const void* src, size_t bytes, cudaMemcpyKind kind,
            void* stream) {
  RETURN_IF_ERROR(CheckCopy(what, dst, src, bytes));
  if (bytes == 0) return Status::Ok();
  return FromCuda(cudaMemcpyAsync(dst, src, bytes, kind, static_cast<cudaStream_t>(stream)),
                  std::string(what) + "(" + std::to_string(bytes) + " bytes)");
}

}  // namespace

Status CudaCopyHostToDevice(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy("CudaCopyHostToDevice", dst, src, bytes, cudaMemcpyHostToDevice, stream);
}

Status CudaCopyDeviceToHost(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy("CudaCopyDeviceToHost", dst, src, bytes, cudaMemcpyDeviceToHost, stream);
}

Status CudaCopyDeviceToDevice(void* dst, const void* src, size_t bytes, void* stream) {
  return Copy("CudaCopyDeviceToDevice", dst, src, bytes, cudaMemcpyDeviceToDevice, stream);
}

Status CudaMemsetZero(void* dst, size_t bytes, void* stream) {
  if (bytes == 0) return Status::Ok();
  if (dst == nullptr) {
    return InvalidArgument("CudaMemsetZero: null pointer with " + std::to_string(bytes) + " bytes");
  }
  return FromCuda(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(stream)),
                  "CudaMemsetZero(" + std::to_string(bytes) + " bytes)");
}

Result<std::shared_ptr<void>> CudaAllocPinnedHost(size_t bytes) {
  if (bytes == 0) return std::shared_ptr<void>();
  RETURN_IF_ERROR(RequireDevice("CudaAllocPinnedHost"));
  void* ptr = nullptr;
  RETURN_IF_ERROR(
      FromCuda(cudaMallocHost(&ptr, bytes), "cudaMallocHost(" + std::to_string(bytes) + ")"));
  return std::shared_ptr<void>(ptr, [](void* p) { (void)cudaFreeHost(p); });
}

Status CudaSetDevice(int device) {
  RETURN_IF_ERROR(CheckDeviceIndex("CudaSetDevice", device));
  return FromCuda(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
}

}  // namespace strata::model
