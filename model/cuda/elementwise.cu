// CUDA elementwise kernels; contract in elementwise_cuda.h.
//
// One thread per element in a grid-stride loop (64-bit indices, so n may exceed 2^31). GELU uses
// the same formula, term for term, as model/kernels/elementwise.cc, so the two differ only by
// their tanh (CUDA's tanhf here, 2 ulp; the CPU's own) — see tests/cuda/cuda_kernels_test.cc
// for what that means for the comparison. Built without --use_fast_math for that reason.
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common/status.h"
#include "model/cuda/elementwise_cuda.h"

namespace strata::model {
namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;
constexpr int kBlock = 256;
// Enough blocks to fill any current GPU several times over; larger n loops in the grid stride.
constexpr int64_t kMaxBlocks = 1 << 16;

__global__ void GeluForwardKernel(float* out, const float* __restrict__ inp, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float x = inp[i];
    const float u = kGeluScale * (x + kGeluCubic * x * x * x);
    out[i] = 0.5f * x * (1.f + tanhf(u));
  }
}

// No __restrict__ on dinp/dout: they may alias.
__global__ void GeluBackwardKernel(float* dinp, const float* __restrict__ inp, const float* dout,
                                   int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float x = inp[i];
    const float u = kGeluScale * (x + kGeluCubic * x * x * x);
    const float th = tanhf(u);
    const float sech2 = 1.f - th * th;
    const float local =
        0.5f * (1.f + th) + 0.5f * x * sech2 * kGeluScale * (1.f + 3.f * kGeluCubic * x * x);
    dinp[i] = local * dout[i];
  }
}

__global__ void ResidualForwardKernel(float* out, const float* a, const float* __restrict__ b,
                                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = a[i] + b[i];
  }
}

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::min((n + kBlock - 1) / kBlock, kMaxBlocks));
}

// Checks arguments shared by every launcher. `ptrs_ok` is false when any pointer is null.
Status CheckArgs(const char* op, int64_t n, bool ptrs_ok) {
  if (n < 0) return InvalidArgument(std::string(op) + ": n = " + std::to_string(n) + " < 0");
  if (n > 0 && !ptrs_ok) return InvalidArgument(std::string(op) + ": null device pointer");
  return Status::Ok();
}

// Reads (and clears) the launch error of the kernel just queued.
Status LaunchStatus(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string(op) + " launch: " + cudaGetErrorName(err) + " (" +
                  cudaGetErrorString(err) + ")");
}

}  // namespace

Status CudaGeluForward(float* out, const float* inp, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckArgs("CudaGeluForward", n, out && inp));
  if (n == 0) return Status::Ok();
  GeluForwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(out, inp, n);
  return LaunchStatus("CudaGeluForward");
}

Status CudaGeluBackward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckArgs("CudaGeluBackward", n, dinp && inp && dout));
  if (n == 0) return Status::Ok();
  GeluBackwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(dinp, inp, dout,
                                                                                   n);
  return LaunchStatus("CudaGeluBackward");
}

Status CudaResidualForward(float* out, const float* a, const float* b, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckArgs("CudaResidualForward", n, out && a && b));
  if (n == 0) return Status::Ok();
  ResidualForwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(out, a, b, n);
  return LaunchStatus("CudaResidualForward");
}

}  // namespace strata::model
