// CUDA softmax + cross-entropy, whole-vocabulary and vocabulary-parallel; contract in
// softmax_xent_cuda.h, CPU references model/kernels/softmax_xent.cc and vocab_parallel.cc.
//
// One block per row (rows in a grid-stride loop). A row is read in packs of 16 bytes (4 fp32 or 8
// bf16/fp16 values) when the logits are 16-byte aligned and a row is a whole number of packs,
// else one element at a time; the pack width and the block size depend only on (v, dtype, the
// pointer's alignment), so a given call always sums in the same order (deterministic).
//
// Statistics are fp32. The whole-vocabulary kernel keeps a running (max, sum of exp(x - max)) per
// thread ("online softmax"), merges them across the block, and then rereads the row for the
// gradient. The CPU takes the max first and sums exp(x - max) in a second pass with FastExp
// (~2 ulp); here expf (~1 ulp, no --use_fast_math) and a different summation order, so the
// results agree to float rounding, not bitwise (tolerances in tests/cuda/softmax_xent_test.cc).
//
// Columns j >= valid are padding: never part of the statistics, gradient 0. Targets: the CPU
// whole-vocabulary kernel reads logits[i, targets[i]] unchecked; here a target outside [0, valid)
// reads nothing, gives loss NaN (so that a bad token id shows up in the loss instead of passing
// silently) and a gradient without the one-hot term. The vocabulary-parallel phases treat a target
// outside the shard as the CPU does (contributes 0 on this shard), never indexing outside it.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "model/cuda/softmax_xent_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

constexpr int kMaxThreads = 512;
constexpr int64_t kMaxGrid = 1 << 20;  // more rows loop in the grid stride
constexpr unsigned kFullMask = 0xffffffffu;

// Element types: typed_access.cuh's conversions bit-exact with model/dtype.h.
using cuda_util::DevFromFloat;
using cuda_util::DevToFloat;
using cuda_util::LaunchStatus;

// N consecutive elements loaded / stored as one access (N * sizeof(T) is 16 or sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// ---- block reductions (blockDim.x a multiple of 32, at most 1024) ----

// Folds x into the running (m, s): m = max, s = sum of exp(value - m). -inf values add nothing;
// NaN propagates into s (the CPU's sum turns NaN too); +inf twice gives NaN like the CPU's.
__device__ __forceinline__ void OnlineAdd(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // m == -inf: s == 0 and expf(-inf) == 0
    m = x;
  } else if (x != -INFINITY) {
    s += expf(x - m);
  }
}

__device__ __forceinline__ void OnlineMerge(float& m, float& s, float m2, float s2) {
  const float mm = fmaxf(m, m2);  // neither is NaN: only values > m are taken
  const float a = m == -INFINITY ? 0.f : s * expf(m - mm);
  const float b = m2 == -INFINITY ? 0.f : s2 * expf(m2 - mm);
  m = mm;
  s = a + b;
}

// Every thread returns the block's (max, sum) merged in a fixed tree order.
__device__ void BlockReduceOnline(float& m, float& s) {
  __shared__ float sh_m[32], sh_s[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_down_sync(kFullMask, m, off);
    const float s2 = __shfl_down_sync(kFullMask, s, off);
    OnlineMerge(m, s, m2, s2);
  }
  __syncthreads();  // readers of the previous call's result are done
  if (lane == 0) {
    sh_m[warp] = m;
    sh_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? sh_m[lane] : -INFINITY;
    s = lane < nwarps ? sh_s[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_down_sync(kFullMask, m, off);
      const float s2 = __shfl_down_sync(kFullMask, s, off);
      OnlineMerge(m, s, m2, s2);
    }
    if (lane == 0) {
      sh_m[0] = m;
      sh_s[0] = s;
    }
  }
  __syncthreads();
  m = sh_m[0];
  s = sh_s[0];
}

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ float BlockReduce(float x, Op op, float identity) {
  __shared__ float sh[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_down_sync(kFullMask, x, off));
  __syncthreads();
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < nwarps ? sh[lane] : identity;
    for (int off = 16; off > 0; off >>= 1) x = op(x, __shfl_down_sync(kFullMask, x, off));
    if (lane == 0) sh[0] = x;
  }
  __syncthreads();
  return sh[0];
}

// ---- kernels: one block per row; v % N == 0 (N > 1 only for 16-byte aligned rows) ----

// The gradient pass over one row x[0, packs * N), read and overwritten in place by the block:
// (softmax - onehot(tgt)) * dloss for the real columns j < valid, 0 for the padding. `tgt` is
// the target's column in this row (outside [0, valid): no one-hot term).
template <typename T, int N>
__device__ __forceinline__ void WriteGradient(T* x, int packs, int valid, float m, float inv,
                                              int64_t tgt, float dloss) {
  for (int k = threadIdx.x; k < packs; k += blockDim.x) {
    Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[k];
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const int j = k * N + e;
      float g = 0.f;
      if (j < valid) g = (expf(DevToFloat(p.v[e]) - m) * inv - (j == tgt ? 1.f : 0.f)) * dloss;
      p.v[e] = DevFromFloat<T>(g);
    }
    reinterpret_cast<Pack<T, N>*>(x)[k] = p;
  }
}

template <typename T, int N>
__global__ void SoftmaxXentKernel(T* logits, float* losses, const int32_t* __restrict__ targets,
                                  int64_t n, int v, int valid, float dloss) {
  const int packs = v / N;  // the gradient pass covers the padding too (writes 0 there)
  const int valid_packs = (valid + N - 1) / N;  // the statistics read only real columns
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    T* x = logits + row * v;
    float m = -INFINITY, s = 0.f;
    for (int k = threadIdx.x; k < valid_packs; k += blockDim.x) {
      const Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (k * N + e < valid) OnlineAdd(m, s, DevToFloat(p.v[e]));
      }
    }
    const int tgt = targets[row];
    const bool tgt_ok = tgt >= 0 && tgt < valid;
    // Read before the barrier in BlockReduceOnline: the gradient pass overwrites the row.
    const float xt = threadIdx.x == 0 && tgt_ok ? DevToFloat(x[tgt]) : 0.f;
    BlockReduceOnline(m, s);
    if (threadIdx.x == 0) losses[row] = tgt_ok ? logf(s) - (xt - m) : NAN;
    if (dloss == 0.f) continue;
    WriteGradient<T, N>(x, packs, valid, m, 1.f / s, tgt, dloss);
  }
}

template <typename T, int N>
__global__ void ShardRowMaxKernel(float* mx, const T* __restrict__ logits, int64_t n, int v,
                                  int valid) {
  // Only the packs holding real columns (a shard with valid == 0 reads nothing).
  const int valid_packs = (valid + N - 1) / N;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* x = logits + row * v;
    float m = -INFINITY;
    for (int k = threadIdx.x; k < valid_packs; k += blockDim.x) {
      const Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        // fmaxf skips NaN like the CPU's `x > m ? x : m`.
        if (k * N + e < valid) m = fmaxf(m, DevToFloat(p.v[e]));
      }
    }
    m = BlockReduce(m, MaxOp(), -INFINITY);
    if (threadIdx.x == 0) mx[row] = m;
  }
}

template <typename T, int N>
__global__ void ShardSumExpKernel(float* sum_exp, float* target, const T* __restrict__ logits,
                                  const float* __restrict__ mx, const int32_t* __restrict__ targets,
                                  int64_t lo, int64_t n, int v, int valid) {
  // Only the packs holding real columns (a shard with valid == 0 reads nothing).
  const int valid_packs = (valid + N - 1) / N;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    const T* x = logits + row * v;
    const float m = mx[row];
    float s = 0.f;
    for (int k = threadIdx.x; k < valid_packs; k += blockDim.x) {
      const Pack<T, N> p = reinterpret_cast<const Pack<T, N>*>(x)[k];
#pragma unroll
      for (int e = 0; e < N; ++e) {
        if (k * N + e < valid) s += expf(DevToFloat(p.v[e]) - m);
      }
    }
    s = BlockReduce(s, SumOp(), 0.f);
    if (threadIdx.x == 0) {
      sum_exp[row] = s;
      const int64_t col = static_cast<int64_t>(targets[row]) - lo;
      target[row] = col >= 0 && col < valid ? DevToFloat(x[col]) - m : 0.f;
    }
  }
}

template <typename T, int N>
__global__ void ShardFinishKernel(T* logits, float* losses, const float* __restrict__ mx,
                                  const float* __restrict__ sum_exp,
                                  const float* __restrict__ target,
                                  const int32_t* __restrict__ targets, int64_t lo, int64_t n, int v,
                                  int valid, float dloss) {
  const int packs = v / N;
  for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
    T* x = logits + row * v;
    if (threadIdx.x == 0) losses[row] = logf(sum_exp[row]) - target[row];
    const float m = mx[row];
    const int64_t tgt = static_cast<int64_t>(targets[row]) - lo;
    WriteGradient<T, N>(x, packs, valid, m, 1.f / sum_exp[row], tgt, dloss);
  }
}

// dloss == 0: only the losses, one thread per row.
__global__ void ShardLossKernel(float* losses, const float* __restrict__ sum_exp,
                                const float* __restrict__ target, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    losses[i] = logf(sum_exp[i]) - target[i];
  }
}

// ---- launch helpers ----

Status CheckShape(const char* op, int64_t n, int v, int valid, bool need_valid) {
  if (n < 0 || v < 0) {
    return InvalidArgument(std::string(op) + ": negative size (n = " + std::to_string(n) +
                           ", v = " + std::to_string(v) + ")");
  }
  // The whole-vocabulary loss needs at least one real column; a vocabulary shard may have none.
  const int min_valid = need_valid && n > 0 ? 1 : 0;
  if (valid < min_valid || valid > v) {
    return InvalidArgument(std::string(op) + ": valid = " + std::to_string(valid) + " not in [" +
                           std::to_string(min_valid) + ", v = " + std::to_string(v) + "]");
  }
  return Status::Ok();
}

Status CheckDType(const char* op, DType dtype) {
  if (dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16) return Status::Ok();
  return InvalidArgument(std::string(op) + ": unsupported dtype " +
                         std::to_string(static_cast<int>(dtype)));
}

// Calls f(T{}) with T the storage type of dtype (checked by CheckDType beforehand).
template <typename F>
void WithType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      f(float{});
      break;
    case DType::kBF16:
      f(bf16{});
      break;
    case DType::kF16:
      f(f16{});
      break;
  }
}

// 16-byte packs when every row starts 16-byte aligned.
template <typename T>
bool UsePacks(const void* logits, int v) {
  return reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
         (static_cast<int64_t>(v) * sizeof(T)) % 16 == 0;
}

// Enough warps to give each thread a few packs of a row, at most kMaxThreads.
unsigned ThreadsFor(int v, int pack) {
  const int64_t packs = (static_cast<int64_t>(v) + pack - 1) / pack;
  const int64_t warps = std::clamp<int64_t>((packs + 31) / 32, 1, kMaxThreads / 32);
  return static_cast<unsigned>(warps * 32);
}

unsigned GridFor(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxGrid)); }

// Launches Kernel<T, 16 / sizeof(T)> or Kernel<T, 1> (by alignment) over n rows of v columns.
#define STRATA_LAUNCH_ROWS(KERNEL, T, ptr, n, v, stream, ...)                     \
  do {                                                                            \
    constexpr int kPack = static_cast<int>(16 / sizeof(T));                       \
    cudaStream_t s_ = static_cast<cudaStream_t>(stream);                          \
    if (UsePacks<T>(ptr, v)) {                                                    \
      KERNEL<T, kPack><<<GridFor(n), ThreadsFor(v, kPack), 0, s_>>>(__VA_ARGS__); \
    } else {                                                                      \
      KERNEL<T, 1><<<GridFor(n), ThreadsFor(v, 1), 0, s_>>>(__VA_ARGS__);         \
    }                                                                             \
  } while (0)

}  // namespace

Status CudaSoftmaxCrossEntropy(void* logits, float* losses, const int32_t* targets, int64_t n,
                               int v, int valid, float dloss, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaSoftmaxCrossEntropy";
  RETURN_IF_ERROR(CheckDType(kOp, dtype));
  RETURN_IF_ERROR(CheckShape(kOp, n, v, valid, /*need_valid=*/true));
  if (n == 0) return Status::Ok();
  if (!logits || !losses || !targets) return InvalidArgument(std::string(kOp) + ": null pointer");
  WithType(dtype, [&](auto tag) {
    using T = decltype(tag);
    STRATA_LAUNCH_ROWS(SoftmaxXentKernel, T, logits, n, v, stream, static_cast<T*>(logits), losses,
                       targets, n, v, valid, dloss);
  });
  return LaunchStatus(kOp);
}

Status CudaShardRowMax(float* mx, const void* logits, int64_t n, int v, int valid, DType dtype,
                       void* stream) {
  constexpr const char* kOp = "CudaShardRowMax";
  RETURN_IF_ERROR(CheckDType(kOp, dtype));
  RETURN_IF_ERROR(CheckShape(kOp, n, v, valid, /*need_valid=*/false));
  if (n == 0) return Status::Ok();
  if (!mx || (valid > 0 && !logits)) return InvalidArgument(std::string(kOp) + ": null pointer");
  WithType(dtype, [&](auto tag) {
    using T = decltype(tag);
    STRATA_LAUNCH_ROWS(ShardRowMaxKernel, T, logits, n, v, stream, mx,
                       static_cast<const T*>(logits), n, v, valid);
  });
  return LaunchStatus(kOp);
}

Status CudaShardSumExpAndTarget(float* sum_exp, float* target, const void* logits, const float* mx,
                                const int32_t* targets, int64_t lo, int64_t n, int v, int valid,
                                DType dtype, void* stream) {
  constexpr const char* kOp = "CudaShardSumExpAndTarget";
  RETURN_IF_ERROR(CheckDType(kOp, dtype));
  RETURN_IF_ERROR(CheckShape(kOp, n, v, valid, /*need_valid=*/false));
  if (n == 0) return Status::Ok();
  if (!sum_exp || !target || !mx || !targets || (valid > 0 && !logits)) {
    return InvalidArgument(std::string(kOp) + ": null pointer");
  }
  WithType(dtype, [&](auto tag) {
    using T = decltype(tag);
    STRATA_LAUNCH_ROWS(ShardSumExpKernel, T, logits, n, v, stream, sum_exp, target,
                       static_cast<const T*>(logits), mx, targets, lo, n, v, valid);
  });
  return LaunchStatus(kOp);
}

Status CudaShardCrossEntropyFinish(void* logits, float* losses, const float* mx,
                                   const float* sum_exp, const float* target,
                                   const int32_t* targets, int64_t lo, int64_t n, int v, int valid,
                                   float dloss, DType dtype, void* stream) {
  constexpr const char* kOp = "CudaShardCrossEntropyFinish";
  RETURN_IF_ERROR(CheckDType(kOp, dtype));
  RETURN_IF_ERROR(CheckShape(kOp, n, v, valid, /*need_valid=*/false));
  if (n == 0) return Status::Ok();
  if (!losses || !sum_exp || !target) return InvalidArgument(std::string(kOp) + ": null pointer");
  if (dloss == 0.f) {
    constexpr int kThreads = 256;
    const unsigned grid = static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, kMaxGrid));
    ShardLossKernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(losses, sum_exp,
                                                                              target, n);
    return LaunchStatus(kOp);
  }
  if (!mx || !targets || (v > 0 && !logits)) {
    return InvalidArgument(std::string(kOp) + ": null pointer");
  }
  WithType(dtype, [&](auto tag) {
    using T = decltype(tag);
    STRATA_LAUNCH_ROWS(ShardFinishKernel, T, logits, n, v, stream, static_cast<T*>(logits), losses,
                       mx, sum_exp, target, targets, lo, n, v, valid, dloss);
  });
  return LaunchStatus(kOp);
}

#undef STRATA_LAUNCH_ROWS

}  // namespace strata::model
