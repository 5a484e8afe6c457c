#include "model/cuda/cuda_runtime_info.h"

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

#include "model/cuda/cuda_status.h"

namespace strata::model {
namespace {

// UNAVAILABLE for "this machine cannot run CUDA" errors, INTERNAL for everything else (out of
// memory included). Unlike cuda_util::FromCuda it leaves the runtime's last error alone.
Status FromCuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::Ok();
  const std::string msg = cuda_util::CudaErrorMessage(what, err);
  if (cuda_util::IsNoCudaError(err)) return Status(StatusCode::kUnavailable, msg);
  return Internal(msg);
}

}  // namespace

int CudaDeviceCount() {
  int count = 0;
  // Without a driver this returns cudaErrorInsufficientDriver (or cudaErrorNoDevice); it never
  // aborts. The error is sticky for cudaGetLastError, so clear it.
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return count;
}

std::string CudaDeviceName(int device) {
  if (device < 0 || device >= CudaDeviceCount()) return "";
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return "";
  }
  return prop.name;
}

Status CudaStreamSynchronize(void* stream) {
  return FromCuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)),
                  "cudaStreamSynchronize");
}

Result<DeviceBuffer> DeviceBuffer::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer();
  void* ptr = nullptr;
  const cudaError_t err = cudaMalloc(&ptr, bytes);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    return FromCuda(err, ("cudaMalloc(" + std::to_string(bytes) + " bytes)").c_str());
  }
  return DeviceBuffer(ptr, bytes);
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Release();
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() { Release(); }

void DeviceBuffer::Release() {
  // A failing cudaFree (a device already in an error state) leaves nothing we could do better
  // in a destructor; the error is reported by the next checked call.
  if (ptr_ != nullptr) (void)cudaFree(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
}

Status DeviceBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > bytes_) {
    return OutOfRange("DeviceBuffer::CopyFromHost: " + std::to_string(bytes) +
                      " bytes into a buffer of " + std::to_string(bytes_));
  }
  if (bytes == 0) return Status::Ok();
  return FromCuda(cudaMemcpy(ptr_, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy to device");
}

Status DeviceBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > bytes_) {
    return OutOfRange("DeviceBuffer::CopyToHost: " + std::to_string(bytes) +
                      " bytes from a buffer of " + std::to_string(bytes_));
  }
  if (bytes == 0) return Status::Ok();
  return FromCuda(cudaMemcpy(dst, ptr_, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy to host");
}

}  // namespace strata::model
