// CUDA elementwise kernels; contract in elementwise_cuda.h.
//
// One thread per element in a grid-stride loop (64-bit indices, so n may exceed 2^31). GELU uses
// the same formula, term for term, as model/kernels/elementwise.cc, so the two differ only by
// their tanh (CUDA's tanhf here, 2 ulp; the CPU's own) — see tests/cuda/cuda_kernels_test.cc
// for what that means for the comparison. Built without --use_fast_math for that reason.
//
// Typed versions (T = fp32, bf16, fp16): each thread moves kPack = 8 consecutive elements with
// 16-byte loads/stores when every pointer is 16-byte aligned (one element at a time otherwise,
// and for the n % 8 tail); arithmetic is fp32 and the result is rounded to T once, as the CPU
// templates do. The bias gradient is a column sum in a fixed order (see BiasBackwardKernel).
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "common/status.h"
#include "model/cuda/elementwise_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;
constexpr int kBlock = 256;
// Enough blocks to fill any current GPU several times over; larger n loops in the grid stride.
constexpr int64_t kMaxBlocks = 1 << 16;

// tanh-approximation GELU and its derivative (the CPU kernels' formulas), shared by the fp32 and
// the typed kernels.
__device__ __forceinline__ float GeluValue(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}

__device__ __forceinline__ float GeluGrad(float x) {
  const float u = kGeluScale * (x + kGeluCubic * x * x * x);
  const float th = tanhf(u);
  const float sech2 = 1.f - th * th;
  return 0.5f * (1.f + th) + 0.5f * x * sech2 * kGeluScale * (1.f + 3.f * kGeluCubic * x * x);
}

__global__ void GeluForwardKernel(float* out, const float* __restrict__ inp, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = GeluValue(inp[i]);
  }
}

// No __restrict__ on dinp/dout: they may alias.
__global__ void GeluBackwardKernel(float* dinp, const float* __restrict__ inp, const float* dout,
                                   int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dinp[i] = GeluGrad(inp[i]) * dout[i];
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

using cuda_util::CheckCount;
using cuda_util::LaunchStatus;

}  // namespace

Status CudaGeluForward(float* out, const float* inp, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckCount("CudaGeluForward", n, out && inp));
  if (n == 0) return Status::Ok();
  GeluForwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(out, inp, n);
  return LaunchStatus("CudaGeluForward");
}

Status CudaGeluBackward(float* dinp, const float* inp, const float* dout, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckCount("CudaGeluBackward", n, dinp && inp && dout));
  if (n == 0) return Status::Ok();
  GeluBackwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(dinp, inp, dout,
                                                                                   n);
  return LaunchStatus("CudaGeluBackward");
}

Status CudaResidualForward(float* out, const float* a, const float* b, int64_t n, void* stream) {
  RETURN_IF_ERROR(CheckCount("CudaResidualForward", n, out && a && b));
  if (n == 0) return Status::Ok();
  ResidualForwardKernel<<<GridFor(n), kBlock, 0, static_cast<cudaStream_t>(stream)>>>(out, a, b, n);
  return LaunchStatus("CudaResidualForward");
}

// ---- typed versions ---------------------------------------------------------------------------

namespace {

using cuda_util::Aligned;
using cuda_util::LoadVec;
using cuda_util::StoreVec;
using cuda_util::ToF;

// Elements per thread on the vector path: 16 bytes of a 16-bit T, 32 bytes of fp32.
constexpr int kPack = 8;

// Each op handles N consecutive elements starting at i (N == kPack: i is a multiple of kPack and
// the pointers are 16-byte aligned; N == 1: any i). Pointers that may alias are not __restrict__.
template <typename T>
struct GeluForwardOp {
  T* out;
  const T* inp;
  template <int N>
  __device__ void Apply(int64_t i) const {
    float x[N];
    LoadVec<N>(inp + i, x);
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] = GeluValue(x[k]);
    StoreVec<N>(out + i, x);
  }
};

template <typename T>
struct GeluBackwardOp {
  T* dinp;
  const T* inp;
  const T* dout;
  template <int N>
  __device__ void Apply(int64_t i) const {
    float x[N], g[N];
    LoadVec<N>(inp + i, x);
    LoadVec<N>(dout + i, g);
#pragma unroll
    for (int k = 0; k < N; ++k) g[k] = GeluGrad(x[k]) * g[k];
    StoreVec<N>(dinp + i, g);
  }
};

template <typename T>
struct ResidualOp {
  float* out;
  const float* a;
  const T* b;
  template <int N>
  __device__ void Apply(int64_t i) const {
    float x[N], y[N];
    LoadVec<N>(a + i, x);
    LoadVec<N>(b + i, y);
#pragma unroll
    for (int k = 0; k < N; ++k) x[k] += y[k];
    StoreVec<N>(out + i, x);
  }
};

// x is [n, c] flattened; on the vector path c % kPack == 0, so a pack never straddles two rows.
template <typename T>
struct AddBiasOp {
  T* x;
  const T* bias;
  int64_t c;
  template <int N>
  __device__ void Apply(int64_t i) const {
    float v[N], bv[N];
    LoadVec<N>(x + i, v);
    LoadVec<N>(bias + i % c, bv);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] += bv[k];
    StoreVec<N>(x + i, v);
  }
};

// Grid-stride over packs of kPack elements, then the n % kPack tail, one element per thread
// (the tail is < kPack <= the number of threads of any grid).
template <typename Op, bool kVec>
__global__ void MapKernel(Op op, int64_t n) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (kVec) {
    const int64_t packs = n / kPack;
    for (int64_t p = tid; p < packs; p += stride) op.template Apply<kPack>(p * kPack);
    const int64_t i = packs * kPack + tid;
    if (i < n) op.template Apply<1>(i);
  } else {
    for (int64_t i = tid; i < n; i += stride) op.template Apply<1>(i);
  }
}

template <typename Op>
Status LaunchMap(const char* name, const Op& op, int64_t n, bool vec, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (vec) {
    MapKernel<Op, true><<<GridFor((n + kPack - 1) / kPack), kBlock, 0, s>>>(op, n);
  } else {
    MapKernel<Op, false><<<GridFor(n), kBlock, 0, s>>>(op, n);
  }
  return LaunchStatus(name);
}

// Column sums of dout [n, c]: a block owns kBiasCols consecutive columns (threadIdx.x, so a warp
// reads one contiguous row segment) and kBiasRowLanes row lanes (threadIdx.y); lane y sums rows
// y, y + kBiasRowLanes, ... in increasing order, then lane 0 adds the lanes' partials in
// increasing y. The order depends only on (n, c): deterministic, no atomics, no workspace.
constexpr int kBiasCols = 32;
constexpr int kBiasRowLanes = 32;

template <typename T>
__global__ void BiasBackwardKernel(float* __restrict__ dbias, const T* __restrict__ dout, int64_t n,
                                   int c) {
  __shared__ float partial[kBiasRowLanes][kBiasCols];
  const int j = blockIdx.x * kBiasCols + threadIdx.x;
  float acc = 0.f;
  if (j < c) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n; r += kBiasRowLanes) acc += ToF(dout[r * c + j]);
  }
  partial[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < c) {
    float sum = 0.f;
#pragma unroll
    for (int y = 0; y < kBiasRowLanes; ++y) sum += partial[y][threadIdx.x];
    dbias[j] += sum;
  }
}

Status CheckRowsCols(const char* op, int64_t n, int c, bool ptrs_ok) {
  if (n < 0) return cuda_util::NegativeSize(op, "n", n);
  if (c < 0) return cuda_util::NegativeSize(op, "c", c);
  if (n > 0 && c > 0 && !ptrs_ok) return cuda_util::NullPointer(op);
  return Status::Ok();
}

}  // namespace

Status CudaGeluForwardT(void* out, const void* inp, int64_t n, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaGeluForwardT";
  RETURN_IF_ERROR(CheckCount(kOp, n, out && inp));
  if (n == 0) return Status::Ok();
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const GeluForwardOp<T> op{static_cast<T*>(out), static_cast<const T*>(inp)};
    return LaunchMap(kOp, op, n, Aligned(out, 16) && Aligned(inp, 16), stream);
  });
}

Status CudaGeluBackwardT(void* dinp, const void* inp, const void* dout, int64_t n, DType dtype,
                         void* stream) {
  constexpr const char* kOp = "CudaGeluBackwardT";
  RETURN_IF_ERROR(CheckCount(kOp, n, dinp && inp && dout));
  if (n == 0) return Status::Ok();
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const GeluBackwardOp<T> op{static_cast<T*>(dinp), static_cast<const T*>(inp),
                               static_cast<const T*>(dout)};
    const bool vec = Aligned(dinp, 16) && Aligned(inp, 16) && Aligned(dout, 16);
    return LaunchMap(kOp, op, n, vec, stream);
  });
}

Status CudaResidualForwardT(float* out, const float* a, const void* b, int64_t n, DType dtype,
                            void* stream) {
  constexpr const char* kOp = "CudaResidualForwardT";
  RETURN_IF_ERROR(CheckCount(kOp, n, out && a && b));
  if (n == 0) return Status::Ok();
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const ResidualOp<T> op{out, a, static_cast<const T*>(b)};
    const bool vec = Aligned(out, 16) && Aligned(a, 16) && Aligned(b, 16);
    return LaunchMap(kOp, op, n, vec, stream);
  });
}

Status CudaAddBias(void* x, const void* bias, int64_t n, int c, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaAddBias";
  RETURN_IF_ERROR(CheckRowsCols(kOp, n, c, x && bias));
  if (n == 0 || c == 0) return Status::Ok();
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const AddBiasOp<T> op{static_cast<T*>(x), static_cast<const T*>(bias), c};
    const bool vec = c % kPack == 0 && Aligned(x, 16) && Aligned(bias, 16);
    return LaunchMap(kOp, op, n * c, vec, stream);
  });
}

Status CudaBiasBackward(float* dbias, const void* dout, int64_t n, int c, DType dtype,
                        void* stream) {
  constexpr const char* kOp = "CudaBiasBackward";
  RETURN_IF_ERROR(CheckRowsCols(kOp, n, c, dbias && dout));
  if (n == 0 || c == 0) return Status::Ok();
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const unsigned grid =
        static_cast<unsigned>((static_cast<int64_t>(c) + kBiasCols - 1) / kBiasCols);
    BiasBackwardKernel<T>
        <<<grid, dim3(kBiasCols, kBiasRowLanes), 0, static_cast<cudaStream_t>(stream)>>>(
            dbias, static_cast<const T*>(dout), n, c);
    return LaunchStatus(kOp);
  });
}

}  // namespace strata::model
