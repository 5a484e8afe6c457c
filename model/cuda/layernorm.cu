// CUDA LayerNorm; contract in layernorm_cuda.h, CPU reference model/kernels/layernorm.cc.
//
// Forward (and the fused residual + LayerNorm): one warp per row, 8 rows per block. Two-pass
// statistics in fp32 as the CPU does (mean, then the mean of squared deviations), each reduced by
// a warp butterfly; the row is read again from L1/L2 for each pass rather than held in registers,
// so any c works. Lanes move 4 consecutive columns at a time (16-byte fp32 loads, 8-byte loads of
// a 16-bit T) when c % 4 == 0 and the pointers allow it, one column otherwise.
//
// Backward, two kernels on the stream, neither with atomics or workspace:
//  1. dinp (+=): one warp per row, the same two reductions as the CPU (mean of dnorm and of
//     dnorm * norm), then the update.
//  2. dw, db (+=): a block owns 32 consecutive columns and 32 row lanes; lane y sums rows y,
//     y + 32, ... in increasing order, and lane 0 adds the 32 partials in increasing y. The order
//     depends only on (n, c), so the result is bitwise reproducible (it is not the CPU's order:
//     the CPU sums per OpenMP thread; the two agree to fp32 rounding).
//
// Outputs are computed with the CPU's expressions in the same order; nvcc may contract a * b + c
// into an FMA, which is one of the reasons the GPU agrees with the CPU to rounding, not bitwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/status.h"
#include "model/cuda/layernorm_cuda.h"
#include "model/cuda/typed_access.cuh"
#include "model/kernels/layernorm.h"

namespace strata::model {
namespace {

using cuda_util::Aligned;
using cuda_util::ChunkBytes;
using cuda_util::LoadVec;
using cuda_util::StoreVec;
using cuda_util::ToF;
using cuda_util::WarpSum;

constexpr int kWarpsPerBlock = 8;
constexpr int kRowThreads = 32 * kWarpsPerBlock;
// Grid cap; larger n loops in the grid stride (2^20 blocks fill any current GPU many times).
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;
// Columns moved per lane access on the vector path.
constexpr int kVec = 4;

unsigned RowGrid(int64_t n) {
  return static_cast<unsigned>(std::min((n + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxRowBlocks));
}

// Forward. With kResidual, the row is first formed as resid_in + branch and written to resid_out
// (which may alias resid_in: each lane reads, then writes, the same columns, and the later passes
// read back what this lane wrote). Without it, `src` is inp and resid_out/branch are unused.
template <typename T, int N, bool kResidual>
__global__ void __launch_bounds__(kRowThreads)
    LayerNormForwardKernel(float* resid_out, T* __restrict__ out, float* __restrict__ mean,
                           float* __restrict__ rstd, const float* src, const T* branch,
                           const T* __restrict__ w, const T* __restrict__ b, int64_t n, int c) {
  const int lane = threadIdx.x % 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < n;
       row += warp_stride) {
    const int64_t base = row * c;
    const float* x = src + base;
    float sum = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * N; j < c; j += 32 * N) {
      float v[N];
      LoadVec<N>(x + j, v);
      if constexpr (kResidual) {
        float br[N];
        LoadVec<N>(branch + base + j, br);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] += br[k];
        StoreVec<N>(resid_out + base + j, v);
      }
#pragma unroll
      for (int k = 0; k < N; ++k) sum += v[k];
    }
    if constexpr (kResidual) x = resid_out + base;
    // Divisions, not multiplications by 1/c: the CPU divides.
    const float m = WarpSum(sum) / static_cast<float>(c);
    float var = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * N; j < c; j += 32 * N) {
      float v[N];
      LoadVec<N>(x + j, v);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float d = v[k] - m;
        var += d * d;
      }
    }
    const float s = 1.f / sqrtf(WarpSum(var) / static_cast<float>(c) + kLayerNormEps);
    for (int64_t j = static_cast<int64_t>(lane) * N; j < c; j += 32 * N) {
      float v[N], wv[N], bv[N];
      LoadVec<N>(x + j, v);
      LoadVec<N>(w + j, wv);
      LoadVec<N>(b + j, bv);
#pragma unroll
      for (int k = 0; k < N; ++k) v[k] = (v[k] - m) * s * wv[k] + bv[k];
      StoreVec<N>(out + base + j, v);
    }
    if (lane == 0) {
      mean[row] = m;
      rstd[row] = s;
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kRowThreads)
    LayerNormBackwardInputKernel(float* __restrict__ dinp, const T* __restrict__ dout,
                                 const float* __restrict__ inp, const T* __restrict__ w,
                                 const float* __restrict__ mean, const float* __restrict__ rstd,
                                 int64_t n, int c) {
  const int lane = threadIdx.x % 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; row < n;
       row += warp_stride) {
    const int64_t base = row * c;
    const float m = mean[row], s = rstd[row];
    float dnorm_mean = 0.f, dnorm_norm_mean = 0.f;
    for (int64_t j = static_cast<int64_t>(lane) * N; j < c; j += 32 * N) {
      float x[N], g[N], wv[N];
      LoadVec<N>(inp + base + j, x);
      LoadVec<N>(dout + base + j, g);
      LoadVec<N>(w + j, wv);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float norm = (x[k] - m) * s;
        const float dnorm = wv[k] * g[k];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
      }
    }
    dnorm_mean = WarpSum(dnorm_mean) / static_cast<float>(c);
    dnorm_norm_mean = WarpSum(dnorm_norm_mean) / static_cast<float>(c);
    for (int64_t j = static_cast<int64_t>(lane) * N; j < c; j += 32 * N) {
      float x[N], g[N], wv[N], dx[N];
      LoadVec<N>(inp + base + j, x);
      LoadVec<N>(dout + base + j, g);
      LoadVec<N>(w + j, wv);
      LoadVec<N>(dinp + base + j, dx);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        const float norm = (x[k] - m) * s;
        const float dnorm = wv[k] * g[k];
        dx[k] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
      }
      StoreVec<N>(dinp + base + j, dx);
    }
  }
}

constexpr int kParamCols = 32;
constexpr int kParamRowLanes = 32;

template <typename T>
__global__ void __launch_bounds__(kParamCols* kParamRowLanes)
    LayerNormBackwardParamsKernel(float* __restrict__ dw, float* __restrict__ db,
                                  const T* __restrict__ dout, const float* __restrict__ inp,
                                  const float* __restrict__ mean, const float* __restrict__ rstd,
                                  int64_t n, int c) {
  __shared__ float part_w[kParamRowLanes][kParamCols];
  __shared__ float part_b[kParamRowLanes][kParamCols];
  const int j = blockIdx.x * kParamCols + threadIdx.x;
  float acc_w = 0.f, acc_b = 0.f;
  if (j < c) {
#pragma unroll 4
    for (int64_t r = threadIdx.y; r < n; r += kParamRowLanes) {
      const int64_t i = r * c + j;
      const float dy = ToF(dout[i]);
      const float norm = (inp[i] - mean[r]) * rstd[r];
      acc_w += norm * dy;
      acc_b += dy;
    }
  }
  part_w[threadIdx.y][threadIdx.x] = acc_w;
  part_b[threadIdx.y][threadIdx.x] = acc_b;
  __syncthreads();
  if (threadIdx.y == 0 && j < c) {
    float sw = 0.f, sb = 0.f;
#pragma unroll
    for (int y = 0; y < kParamRowLanes; ++y) {
      sw += part_w[y][threadIdx.x];
      sb += part_b[y][threadIdx.x];
    }
    dw[j] += sw;
    db[j] += sb;
  }
}

Status CheckSizes(const char* op, int64_t n, int c) {
  if (n < 0) return cuda_util::NegativeSize(op, "n", n);
  if (c < 0) return cuda_util::NegativeSize(op, "c", c);
  return Status::Ok();
}

// Shared by the plain and the fused forward (resid_out == nullptr, branch == nullptr: plain).
Status LaunchForward(const char* op, float* resid_out, void* out, float* mean, float* rstd,
                     const float* src, const void* branch, const void* w, const void* b, int64_t n,
                     int c, DType dtype, void* stream) {
  return cuda_util::DispatchDType(dtype, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr size_t kTBytes = ChunkBytes<kVec, T>();
    const bool residual = resid_out != nullptr;
    const bool vec = c % kVec == 0 && Aligned(src, 16) && Aligned(out, kTBytes) &&
                     Aligned(w, kTBytes) && Aligned(b, kTBytes) &&
                     (!residual || (Aligned(resid_out, 16) && Aligned(branch, kTBytes)));
    const auto s = static_cast<cudaStream_t>(stream);
    T* o = static_cast<T*>(out);
    const T* br = static_cast<const T*>(branch);
    const T* wt = static_cast<const T*>(w);
    const T* bt = static_cast<const T*>(b);
    const unsigned grid = RowGrid(n);
    if (residual && vec) {
      LayerNormForwardKernel<T, kVec, true>
          <<<grid, kRowThreads, 0, s>>>(resid_out, o, mean, rstd, src, br, wt, bt, n, c);
    } else if (residual) {
      LayerNormForwardKernel<T, 1, true>
          <<<grid, kRowThreads, 0, s>>>(resid_out, o, mean, rstd, src, br, wt, bt, n, c);
    } else if (vec) {
      LayerNormForwardKernel<T, kVec, false>
          <<<grid, kRowThreads, 0, s>>>(nullptr, o, mean, rstd, src, nullptr, wt, bt, n, c);
    } else {
      LayerNormForwardKernel<T, 1, false>
          <<<grid, kRowThreads, 0, s>>>(nullptr, o, mean, rstd, src, nullptr, wt, bt, n, c);
    }
    return cuda_util::LaunchStatus(op);
  });
}

}  // namespace

Status CudaLayerNormForward(void* out, float* mean, float* rstd, const float* inp, const void* w,
                            const void* b, int64_t n, int c, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaLayerNormForward";
  RETURN_IF_ERROR(CheckSizes(kOp, n, c));
  if (n == 0 || c == 0) return Status::Ok();
  if (!(out && mean && rstd && inp && w && b)) return cuda_util::NullPointer(kOp);
  return LaunchForward(kOp, nullptr, out, mean, rstd, inp, nullptr, w, b, n, c, dtype, stream);
}

Status CudaResidualLayerNormForward(float* resid_out, void* out, float* mean, float* rstd,
                                    const float* resid_in, const void* branch, const void* w,
                                    const void* b, int64_t n, int c, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaResidualLayerNormForward";
  RETURN_IF_ERROR(CheckSizes(kOp, n, c));
  if (n == 0 || c == 0) return Status::Ok();
  if (!(resid_out && out && mean && rstd && resid_in && branch && w && b)) {
    return cuda_util::NullPointer(kOp);
  }
  return LaunchForward(kOp, resid_out, out, mean, rstd, resid_in, branch, w, b, n, c, dtype,
                       stream);
}

Status CudaLayerNormBackward(float* dinp, float* dw, float* db, const void* dout, const float* inp,
                             const void* w, const float* mean, const float* rstd, int64_t n, int c,
                             DType dtype, void* stream) {
  constexpr const char* kOp = "CudaLayerNormBackward";
  RETURN_IF_ERROR(CheckSizes(kOp, n, c));
  if (n == 0 || c == 0) return Status::Ok();
  if (!(dinp && dw && db && dout && inp && w && mean && rstd)) return cuda_util::NullPointer(kOp);
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) -> Status {
    using T = typename decltype(tag)::type;
    constexpr size_t kTBytes = ChunkBytes<kVec, T>();
    const auto s = static_cast<cudaStream_t>(stream);
    const T* g = static_cast<const T*>(dout);
    const T* wt = static_cast<const T*>(w);
    const bool vec = c % kVec == 0 && Aligned(dinp, 16) && Aligned(inp, 16) &&
                     Aligned(dout, kTBytes) && Aligned(w, kTBytes);
    if (vec) {
      LayerNormBackwardInputKernel<T, kVec>
          <<<RowGrid(n), kRowThreads, 0, s>>>(dinp, g, inp, wt, mean, rstd, n, c);
    } else {
      LayerNormBackwardInputKernel<T, 1>
          <<<RowGrid(n), kRowThreads, 0, s>>>(dinp, g, inp, wt, mean, rstd, n, c);
    }
    RETURN_IF_ERROR(cuda_util::LaunchStatus(kOp));
    const unsigned grid =
        static_cast<unsigned>((static_cast<int64_t>(c) + kParamCols - 1) / kParamCols);
    LayerNormBackwardParamsKernel<T>
        <<<grid, dim3(kParamCols, kParamRowLanes), 0, s>>>(dw, db, g, inp, mean, rstd, n, c);
    return cuda_util::LaunchStatus(kOp);
  });
}

}  // namespace strata::model
