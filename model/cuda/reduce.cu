// CUDA reductions and small vector ops; contract in reduce_cuda.h.
//
// Every kernel walks the input in chunks of 4 elements (one float4 when the pointers are aligned
// for it, else 4 scalar accesses; the arithmetic per chunk is the same either way, so the result
// does not depend on alignment).
//
// Sums (CudaSumOfSquares, CudaSum) are deterministic: a grid whose size depends only on n
// (ReduceBlocks, never on the device), thread t of block b takes chunks b*256 + t, then every
// grid-size-th chunk after it, accumulating in double; each block folds its threads in a fixed
// shuffle tree and writes one partial to the workspace; a second kernel (one block) sums the
// partials in the same fixed order. A float square is exact in double, so even FMA contraction
// cannot change the result. The CPU SumOfSquares sums in another order (per OpenMP thread), so
// the two agree to double rounding, not bitwise.
//
// Conversions to bf16 / fp16 are typed_access.cuh's DevFromFloat / DevToFloat: round to nearest
// even, bit-identical with model/dtype.h for every non-NaN value (NaN handling described there).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "model/cuda/reduce_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 4;
// Partial sums: at most this many blocks (and workspace doubles), whatever the device. 1024
// blocks x 256 threads keep an H100's 132 SMs full; more would only grow the second pass.
constexpr int64_t kMaxReduceBlocks = 1024;
// Elementwise kernels: a grid-stride loop over at most this many blocks.
constexpr int64_t kMaxMapBlocks = 1 << 14;
constexpr unsigned kFullMask = 0xffffffffu;

__host__ __device__ __forceinline__ int64_t Chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Blocks of the partial-sum pass for n > 0 elements: a pure function of n.
int64_t ReduceBlocks(int64_t n) {
  return std::clamp<int64_t>((Chunks(n) + kThreads - 1) / kThreads, 1, kMaxReduceBlocks);
}

unsigned MapBlocks(int64_t n) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((Chunks(n) + kThreads - 1) / kThreads, 1, kMaxMapBlocks));
}

using cuda_util::Aligned;
using cuda_util::DevFromFloat;
using cuda_util::DevToFloat;

template <typename T>
struct alignas(sizeof(T) * kChunk) Pack4 {
  T v[kChunk];
};

// Loads chunk c (elements 4c .. 4c+3) of x[n]; elements past n read as 0.
__device__ __forceinline__ void LoadChunk(float (&a)[kChunk], const float* x, int64_t c, int64_t n,
                                          bool aligned) {
  const int64_t i = c * kChunk;
  if (aligned && i + kChunk <= n) {
    const float4 f = reinterpret_cast<const float4*>(x)[c];
    a[0] = f.x;
    a[1] = f.y;
    a[2] = f.z;
    a[3] = f.w;
  } else {
#pragma unroll
    for (int e = 0; e < kChunk; ++e) a[e] = i + e < n ? x[i + e] : 0.f;
  }
}

// Block-wide double sum in a fixed order; the result is valid in thread 0.
__device__ double BlockSum(double x) {
  __shared__ double sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < nwarps ? sh[lane] : 0.0;
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(kFullMask, x, off);
  }
  return x;
}

template <bool kSquare>
__global__ void PartialSumKernel(double* __restrict__ partials, const float* __restrict__ x,
                                 int64_t n, bool aligned) {
  const int64_t chunks = Chunks(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double s = 0.0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += stride) {
    float a[kChunk];
    LoadChunk(a, x, c, n, aligned);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      const double d = a[e];
      s += kSquare ? d * d : d;
    }
  }
  s = BlockSum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// One block: *out (+)= the sum of partials[0, blocks) in a fixed order.
__global__ void FinishSumKernel(double* out, const double* __restrict__ partials, int blocks,
                                bool accumulate) {
  double s = 0.0;
  for (int b = threadIdx.x; b < blocks; b += blockDim.x) s += partials[b];
  s = BlockSum(s);
  if (threadIdx.x == 0) *out = accumulate ? *out + s : s;
}

__global__ void FlagNonFiniteKernel(int* flag, const float* __restrict__ x, int64_t n,
                                    bool aligned) {
  const int64_t chunks = Chunks(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  int bad = 0;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += stride) {
    float a[kChunk];
    LoadChunk(a, x, c, n, aligned);
#pragma unroll
    for (int e = 0; e < kChunk; ++e) {
      bad |= (__float_as_uint(a[e]) & 0x7f800000u) == 0x7f800000u;  // exponent all ones
    }
  }
  // Every writer stores the same 1: no race on the value, no read-modify-write.
  if (__syncthreads_or(bad) && threadIdx.x == 0) *flag = 1;
}

__global__ void ScaleKernel(float* x, int64_t n, float s, bool aligned) {
  const int64_t chunks = Chunks(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += stride) {
    const int64_t i = c * kChunk;
    if (aligned && i + kChunk <= n) {
      float4 f = reinterpret_cast<float4*>(x)[c];
      f.x *= s;
      f.y *= s;
      f.z *= s;
      f.w *= s;
      reinterpret_cast<float4*>(x)[c] = f;
    } else {
      for (int64_t j = i; j < n && j < i + kChunk; ++j) x[j] *= s;
    }
  }
}

template <typename T>
__global__ void CastFromFloatKernel(T* __restrict__ dst, const float* __restrict__ src, int64_t n,
                                    bool aligned) {
  const int64_t chunks = Chunks(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += stride) {
    const int64_t i = c * kChunk;
    if (aligned && i + kChunk <= n) {
      const float4 f = reinterpret_cast<const float4*>(src)[c];
      Pack4<T> p;
      p.v[0] = DevFromFloat<T>(f.x);
      p.v[1] = DevFromFloat<T>(f.y);
      p.v[2] = DevFromFloat<T>(f.z);
      p.v[3] = DevFromFloat<T>(f.w);
      reinterpret_cast<Pack4<T>*>(dst)[c] = p;
    } else {
      for (int64_t j = i; j < n && j < i + kChunk; ++j) dst[j] = DevFromFloat<T>(src[j]);
    }
  }
}

template <typename T>
__global__ void CastToFloatKernel(float* __restrict__ dst, const T* __restrict__ src, int64_t n,
                                  bool aligned) {
  const int64_t chunks = Chunks(n);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < chunks;
       c += stride) {
    const int64_t i = c * kChunk;
    if (aligned && i + kChunk <= n) {
      const Pack4<T> p = reinterpret_cast<const Pack4<T>*>(src)[c];
      reinterpret_cast<float4*>(dst)[c] = make_float4(DevToFloat(p.v[0]), DevToFloat(p.v[1]),
                                                      DevToFloat(p.v[2]), DevToFloat(p.v[3]));
    } else {
      for (int64_t j = i; j < n && j < i + kChunk; ++j) dst[j] = DevToFloat(src[j]);
    }
  }
}

// ---- launch helpers ----

// INTERNAL "op: cudaErrorName (description)"; this file's launch errors too (no " launch" in the
// text, unlike cuda_util::LaunchStatus).
Status CudaStatus(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return Status::Ok();
  return Internal(cuda_util::CudaErrorMessage(op, err));
}

Status LaunchStatus(const char* op) { return CudaStatus(op, cudaGetLastError()); }

Status CheckWorkspace(const char* op, int64_t n, const void* workspace, size_t workspace_bytes) {
  const size_t need = CudaReduceWorkspace(n);
  if (workspace_bytes < need || (need > 0 && workspace == nullptr)) {
    return InvalidArgument(std::string(op) + ": workspace of " + std::to_string(workspace_bytes) +
                           " bytes at " + (workspace ? "non-null" : "null") + ", need " +
                           std::to_string(need) + " (CudaReduceWorkspace)");
  }
  if (!Aligned(workspace, alignof(double))) {
    return InvalidArgument(std::string(op) + ": workspace not 8-byte aligned");
  }
  return Status::Ok();
}

template <bool kSquare>
Status LaunchSum(const char* op, double* out, const float* x, int64_t n, bool accumulate,
                 void* workspace, size_t workspace_bytes, void* stream) {
  RETURN_IF_ERROR(cuda_util::CheckCount(op, n, x != nullptr));
  if (out == nullptr) return InvalidArgument(std::string(op) + ": null output");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (n == 0) {
    if (accumulate) return Status::Ok();
    return CudaStatus(op, cudaMemsetAsync(out, 0, sizeof(double), s));
  }
  RETURN_IF_ERROR(CheckWorkspace(op, n, workspace, workspace_bytes));
  const int blocks = static_cast<int>(ReduceBlocks(n));
  double* partials = static_cast<double*>(workspace);
  PartialSumKernel<kSquare><<<blocks, kThreads, 0, s>>>(partials, x, n, Aligned(x, 16));
  RETURN_IF_ERROR(LaunchStatus(op));
  FinishSumKernel<<<1, kThreads, 0, s>>>(out, partials, blocks, accumulate);
  return LaunchStatus(op);
}

// Shared by CudaCastFromFloat / CudaCastToFloat: checks the arguments; fp32 is a device copy
// (nothing when dst == src); bf16 / fp16 call launch(T{}, stream) to queue the cast kernel.
template <typename Launch>
Status LaunchCast(const char* op, void* dst, const void* src, int64_t n, DType dtype, void* stream,
                  Launch&& launch) {
  RETURN_IF_ERROR(cuda_util::CheckCount(op, n, dst && src));
  if (n == 0) return Status::Ok();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32:
      if (dst == src) return Status::Ok();
      return CudaStatus(op, cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                                            cudaMemcpyDeviceToDevice, s));
    case DType::kBF16:
      launch(bf16{}, s);
      return LaunchStatus(op);
    case DType::kF16:
      launch(f16{}, s);
      return LaunchStatus(op);
  }
  return InvalidArgument(std::string(op) + ": unsupported dtype");
}

}  // namespace

size_t CudaReduceWorkspace(int64_t n) {
  return n > 0 ? static_cast<size_t>(ReduceBlocks(n)) * sizeof(double) : 0;
}

Status CudaSumOfSquares(double* out, const float* x, int64_t n, bool accumulate, void* workspace,
                        size_t workspace_bytes, void* stream) {
  return LaunchSum<true>("CudaSumOfSquares", out, x, n, accumulate, workspace, workspace_bytes,
                         stream);
}

Status CudaSum(double* out, const float* x, int64_t n, void* workspace, size_t workspace_bytes,
               void* stream) {
  return LaunchSum<false>("CudaSum", out, x, n, /*accumulate=*/false, workspace, workspace_bytes,
                          stream);
}

Status CudaFlagNonFinite(int* flag, const float* x, int64_t n, void* stream) {
  RETURN_IF_ERROR(cuda_util::CheckCount("CudaFlagNonFinite", n, flag && x));
  if (n == 0) return Status::Ok();
  FlagNonFiniteKernel<<<MapBlocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      flag, x, n, Aligned(x, 16));
  return LaunchStatus("CudaFlagNonFinite");
}

Status CudaScale(float* x, int64_t n, float s, void* stream) {
  RETURN_IF_ERROR(cuda_util::CheckCount("CudaScale", n, x != nullptr));
  if (n == 0) return Status::Ok();
  ScaleKernel<<<MapBlocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, n, s,
                                                                                Aligned(x, 16));
  return LaunchStatus("CudaScale");
}

Status CudaCastFromFloat(void* dst, const float* src, int64_t n, DType dtype, void* stream) {
  return LaunchCast("CudaCastFromFloat", dst, src, n, dtype, stream, [&](auto tag, cudaStream_t s) {
    using T = decltype(tag);
    CastFromFloatKernel<T><<<MapBlocks(n), kThreads, 0, s>>>(
        static_cast<T*>(dst), src, n, Aligned(src, 16) && Aligned(dst, sizeof(Pack4<T>)));
  });
}

Status CudaCastToFloat(float* dst, const void* src, int64_t n, DType dtype, void* stream) {
  return LaunchCast("CudaCastToFloat", dst, src, n, dtype, stream, [&](auto tag, cudaStream_t s) {
    using T = decltype(tag);
    CastToFloatKernel<T><<<MapBlocks(n), kThreads, 0, s>>>(
        dst, static_cast<const T*>(src), n, Aligned(dst, 16) && Aligned(src, sizeof(Pack4<T>)));
  });
}

}  // namespace strata::model
