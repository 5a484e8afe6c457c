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
// Conversions to bf16 / fp16 round to nearest even with the bit operations of model/dtype.h
// (FloatToBf16, the software FloatToHalfBits): bit-identical for every non-NaN value. NaN stays
// NaN: bf16 keeps the upper payload bits (as FloatToBf16); fp16 keeps the sign and the top
// payload bits and sets the quiet bit, as F16C (vcvtps2ph / vcvtph2ps, which the CPU build uses
// on x86) — checked against F16C for all 2^32 floats and all 2^16 halves. The CPU's software
// fallback (no F16C) differs only in NaN payloads.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "model/cuda/reduce_cuda.h"

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

bool Aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---- element conversions (bit-exact with model/dtype.h) ----

__device__ __forceinline__ float DevToFloat(bf16 x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float DevToFloat(f16 x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (e == 0x1fu) {  // inf, or NaN made quiet (as F16C's vcvtph2ps)
    return __uint_as_float(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  }
  if (e == 0) {                                                           // zero, subnormal
    const float val = static_cast<float>(mant) * 5.9604644775390625e-8f;  // exact: mant * 2^-24
    return sign ? -val : val;
  }
  return __uint_as_float(sign | ((e + 112u) << 23) | (mant << 13));
}

template <typename T>
__device__ __forceinline__ T DevFromFloat(float f);
template <>
__device__ __forceinline__ bf16 DevFromFloat<bf16>(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}
template <>
__device__ __forceinline__ f16 DevFromFloat<f16>(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN: made quiet, top payload bits kept (as F16C)
    return f16{static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu))};
  }
  if (a >= 0x477ff000u) return f16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: inf
  if (a < 0x38800000u) {
    // fp16 subnormal or zero: value / 2^-24 (exact, < 2^11) rounded to nearest even.
    const float scaled = __uint_as_float(a) * 16777216.0f;
    return f16{static_cast<uint16_t>(sign | static_cast<uint16_t>(__float2uint_rn(scaled)))};
  }
  uint32_t m = a - 0x38000000u;  // rebias the exponent 127 -> 15
  m += 0xfffu + ((m >> 13) & 1u);
  return f16{static_cast<uint16_t>(sign | static_cast<uint16_t>(m >> 13))};
}

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

Status CheckN(const char* op, int64_t n, bool ptrs_ok) {
  if (n < 0) return InvalidArgument(std::string(op) + ": n = " + std::to_string(n) + " < 0");
  if (n > 0 && !ptrs_ok) return InvalidArgument(std::string(op) + ": null device pointer");
  return Status::Ok();
}

Status CudaStatus(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return Status::Ok();
  return Internal(std::string(op) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                  ")");
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
  RETURN_IF_ERROR(CheckN(op, n, x != nullptr));
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
  RETURN_IF_ERROR(CheckN("CudaFlagNonFinite", n, flag && x));
  if (n == 0) return Status::Ok();
  FlagNonFiniteKernel<<<MapBlocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      flag, x, n, Aligned(x, 16));
  return LaunchStatus("CudaFlagNonFinite");
}

Status CudaScale(float* x, int64_t n, float s, void* stream) {
  RETURN_IF_ERROR(CheckN("CudaScale", n, x != nullptr));
  if (n == 0) return Status::Ok();
  ScaleKernel<<<MapBlocks(n), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(x, n, s,
                                                                                Aligned(x, 16));
  return LaunchStatus("CudaScale");
}

Status CudaCastFromFloat(void* dst, const float* src, int64_t n, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaCastFromFloat";
  RETURN_IF_ERROR(CheckN(kOp, n, dst && src));
  if (n == 0) return Status::Ok();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool src_aligned = Aligned(src, 16);
  switch (dtype) {
    case DType::kF32:
      if (dst == src) return Status::Ok();
      return CudaStatus(kOp, cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                                             cudaMemcpyDeviceToDevice, s));
    case DType::kBF16:
      CastFromFloatKernel<bf16><<<MapBlocks(n), kThreads, 0, s>>>(
          static_cast<bf16*>(dst), src, n, src_aligned && Aligned(dst, sizeof(Pack4<bf16>)));
      return LaunchStatus(kOp);
    case DType::kF16:
      CastFromFloatKernel<f16><<<MapBlocks(n), kThreads, 0, s>>>(
          static_cast<f16*>(dst), src, n, src_aligned && Aligned(dst, sizeof(Pack4<f16>)));
      return LaunchStatus(kOp);
  }
  return InvalidArgument(std::string(kOp) + ": unsupported dtype");
}

Status CudaCastToFloat(float* dst, const void* src, int64_t n, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaCastToFloat";
  RETURN_IF_ERROR(CheckN(kOp, n, dst && src));
  if (n == 0) return Status::Ok();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool dst_aligned = Aligned(dst, 16);
  switch (dtype) {
    case DType::kF32:
      if (dst == src) return Status::Ok();
      return CudaStatus(kOp, cudaMemcpyAsync(dst, src, static_cast<size_t>(n) * sizeof(float),
                                             cudaMemcpyDeviceToDevice, s));
    case DType::kBF16:
      CastToFloatKernel<bf16><<<MapBlocks(n), kThreads, 0, s>>>(
          dst, static_cast<const bf16*>(src), n, dst_aligned && Aligned(src, sizeof(Pack4<bf16>)));
      return LaunchStatus(kOp);
    case DType::kF16:
      CastToFloatKernel<f16><<<MapBlocks(n), kThreads, 0, s>>>(
          dst, static_cast<const f16*>(src), n, dst_aligned && Aligned(src, sizeof(Pack4<f16>)));
      return LaunchStatus(kOp);
  }
  return InvalidArgument(std::string(kOp) + ": unsupported dtype");
}

}  // namespace strata::model
