// Private to model/cuda: CUDA runtime errors -> Status, shared by the .cc and .cu files here.
// Plain C++ over cuda_runtime_api.h, so it must never be included by a public header (those leak
// no CUDA types, see CMakeLists.txt).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/status.h"

namespace strata::model::cuda_util {

// "what: cudaErrorName (description)", the text of every CUDA error Status in model/cuda.
inline std::string CudaErrorMessage(const std::string& what, cudaError_t err) {
  return what + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// The errors that mean "this machine cannot run CUDA" (reported as UNAVAILABLE).
inline bool IsNoCudaError(cudaError_t err) {
  switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorStubLibrary:
    case cudaErrorDevicesUnavailable:
      return true;
    default:
      return false;
  }
}

// OK for cudaSuccess. Otherwise clears the runtime's last error, so that a later unrelated
// cudaGetLastError() (a launcher checking its launch) does not report this one, and returns
// UNAVAILABLE for "this machine cannot run CUDA", RESOURCE_EXHAUSTED for out of memory, INTERNAL
// for everything else.
inline Status FromCuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return Status::Ok();
  (void)cudaGetLastError();
  const std::string msg = CudaErrorMessage(what, err);
  if (IsNoCudaError(err)) return Status(StatusCode::kUnavailable, msg);
  if (err == cudaErrorMemoryAllocation) return ResourceExhausted(msg);
  return Internal(msg);
}

// Reads (and clears) the launch error of the kernel just queued: OK, or INTERNAL
// "op launch: cudaErrorName (description)".
inline Status LaunchStatus(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return Internal(CudaErrorMessage(std::string(op) + " launch", err));
}

// INTERNAL "op: what: cudaErrorName (description)" (err must not be cudaSuccess).
inline Status CudaError(const char* op, const char* what, cudaError_t err) {
  return Internal(CudaErrorMessage(std::string(op) + ": " + what, err));
}

}  // namespace strata::model::cuda_util
