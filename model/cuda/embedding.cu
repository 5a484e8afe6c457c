// CUDA token + position embedding; contract in embedding_cuda.h, CPU references
// model/kernels/vocab_parallel.cc (VocabShardEmbeddingForward/Backward, AddPositionEmbedding).
//
// Forward: one block per row (grid-stride over rows), threads over channels, 8 channels per
// access (16-byte loads of T, two 16-byte fp32 stores) when c % 8 == 0 and the pointers allow it.
// out = float(wte) + float(wpe), one fp32 addition as on the CPU: bitwise equal to it.
//
// Backward, deterministic, bitwise equal to the CPU's sequential order:
//  1. keys[r] = tokens[r] - lo for tokens of this shard, `valid` (a sentinel that sorts last)
//     otherwise; idx[r] = r.
//  2. cub::DeviceRadixSort::SortPairs over the key bits that `valid` needs. Radix sort is stable,
//     so within one token the rows stay in increasing r.
//  3. One block per sorted position; only the first position of each token's run works (the
//     others return at once): it finds the run's end (__syncthreads_count over the sorted keys),
//     then each thread owns channels j and computes dwte[tok, j] = (((dwte[tok, j] + g[r0, j]) +
//     g[r1, j]) + ...) in increasing r — exactly the CPU's order of additions.
//  4. dwpe: a thread owns (ti, j) and adds dout[bi * t + ti, j] for bi = 0, 1, ... in order, as
//     the CPU does (every row counts, whatever its token).
// A token repeated k times costs one block k dependent-add steps over its row; acceptable for
// natural-text batches (the loads are independent and unrolled), a known limit for degenerate
// batches of one repeated token.
//
// Workspace: keys in/out (uint32), idx in/out (int32), each rounded up to 256 bytes, then CUB's
// temporary storage. CUB sizes its storage per device (SM count, architecture), so the size is
// asked of the runtime on the current device; with no usable device
// CudaEmbeddingBackwardWorkspace returns 0 (nothing could be allocated or launched anyway).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cub/device/device_radix_sort.cuh>
#include <limits>
#include <string>

#include "common/status.h"
#include "model/cuda/embedding_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

using cuda_util::Aligned;
using cuda_util::ChunkBytes;
using cuda_util::LoadVec;
using cuda_util::StoreVec;

constexpr int kRowThreads = 128;
constexpr int kVec = 8;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr int kSegThreads = 256;
constexpr int kPosThreads = 256;
constexpr size_t kArrayAlign = 256;

template <typename T, int N, bool kPos>
__global__ void __launch_bounds__(kRowThreads)
    EmbeddingForwardKernel(float* __restrict__ out, const int32_t* __restrict__ tokens,
                           const T* __restrict__ wte, const T* __restrict__ wpe, int64_t lo,
                           int valid, int64_t rows, int t, int c) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t row = static_cast<int64_t>(tokens[r]) - lo;
    const bool in_shard = row >= 0 && row < valid;
    // Only dereferenced when in_shard: tokens outside the shard read nothing from wte.
    const T* we = wte + (in_shard ? row : 0) * c;
    const T* pe = kPos ? wpe + (r % t) * c : nullptr;
    float* o = out + r * c;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * N; j < c; j += kRowThreads * N) {
      float v[N];
      if (in_shard) {
        LoadVec<N>(we + j, v);
      } else {
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] = 0.f;
      }
      if constexpr (kPos) {
        float p[N];
        LoadVec<N>(pe + j, p);
#pragma unroll
        for (int k = 0; k < N; ++k) v[k] += p[k];
      }
      StoreVec<N>(o + j, v);
    }
  }
}

__global__ void ShardKeysKernel(uint32_t* __restrict__ keys, int32_t* __restrict__ idx,
                                const int32_t* __restrict__ tokens, int64_t lo, int valid,
                                int rows) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += stride) {
    const int64_t row = static_cast<int64_t>(tokens[r]) - lo;
    keys[r] = row >= 0 && row < valid ? static_cast<uint32_t>(row) : static_cast<uint32_t>(valid);
    idx[r] = static_cast<int32_t>(r);
  }
}

// grid.x = rows (one block per sorted position), grid.y strides over channel chunks.
__global__ void __launch_bounds__(kSegThreads)
    SegmentSumKernel(float* __restrict__ dwte, const float* __restrict__ dout,
                     const uint32_t* __restrict__ keys, const int32_t* __restrict__ idx, int rows,
                     uint32_t sentinel, int c) {
  const int i = static_cast<int>(blockIdx.x);
  const uint32_t key = keys[i];
  // Uniform over the block (depends on blockIdx only), so no thread misses the barriers below.
  if (key == sentinel || (i > 0 && keys[i - 1] == key)) return;
  // The run of `key` is [i, end). Keys are sorted, so the positions equal to `key` in each
  // window of blockDim.x are a prefix of it; a window not full of them ends the run.
  int end = i + 1;
  for (;;) {
    const int64_t pos = static_cast<int64_t>(end) + threadIdx.x;
    const int cnt = __syncthreads_count(pos < rows && keys[pos] == key);
    end += cnt;
    if (cnt < static_cast<int>(blockDim.x)) break;
  }
  float* dst = dwte + static_cast<int64_t>(key) * c;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; j < c;
       j += stride) {
    float acc = dst[j];
#pragma unroll 8
    for (int k = i; k < end; ++k) acc += dout[static_cast<int64_t>(idx[k]) * c + j];
    dst[j] = acc;
  }
}

__global__ void PositionGradKernel(float* __restrict__ dwpe, const float* __restrict__ dout, int b,
                                   int64_t tc) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < tc;
       i += stride) {
    float acc = dwpe[i];
#pragma unroll 4
    for (int bi = 0; bi < b; ++bi) acc += dout[bi * tc + i];
    dwpe[i] = acc;
  }
}

size_t AlignUp(size_t x) { return (x + kArrayAlign - 1) / kArrayAlign * kArrayAlign; }

// Bytes of the four key/index arrays (keys in, keys out, idx in, idx out).
size_t ArrayBytes(int64_t rows) { return 4 * AlignUp(static_cast<size_t>(rows) * 4); }

// Bits the keys [0, valid] need (valid >= 1).
int KeyBits(int valid) {
  int bits = 0;
  for (uint32_t v = static_cast<uint32_t>(valid); v != 0; v >>= 1) ++bits;
  return bits;
}

// CUB's temporary storage for sorting `rows` pairs on key bits [0, end_bit), on the current device.
cudaError_t SortTempBytes(int rows, int end_bit, size_t* bytes) {
  *bytes = 0;
  return cub::DeviceRadixSort::SortPairs(
      nullptr, *bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), rows, 0, end_bit);
}

unsigned Blocks(int64_t work, int threads) {
  return static_cast<unsigned>(std::min((work + threads - 1) / threads, kMaxBlocks));
}

// The size checks shared by the forward and the backward launcher.
Status CheckSizes(const char* op, int b, int t, int c, int valid) {
  if (b < 0) return cuda_util::NegativeSize(op, "b", b);
  if (t < 0) return cuda_util::NegativeSize(op, "t", t);
  if (c < 0) return cuda_util::NegativeSize(op, "c", c);
  if (valid < 0) return cuda_util::NegativeSize(op, "valid", valid);
  return Status::Ok();
}

}  // namespace

Status CudaEmbeddingForward(float* out, const int32_t* tokens, const void* wte_shard,
                            const void* wpe, int64_t lo, int valid, int b, int t, int c,
                            DType dtype, void* stream) {
  constexpr const char* kOp = "CudaEmbeddingForward";
  RETURN_IF_ERROR(CheckSizes(kOp, b, t, c, valid));
  const int64_t rows = static_cast<int64_t>(b) * t;
  if (rows == 0 || c == 0) return Status::Ok();
  if (!out || !tokens || (valid > 0 && !wte_shard)) return cuda_util::NullPointer(kOp);
  return cuda_util::DispatchDType(dtype, kOp, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr size_t kTBytes = ChunkBytes<kVec, T>();
    const bool vec =
        c % kVec == 0 && Aligned(out, 16) && Aligned(wte_shard, kTBytes) && Aligned(wpe, kTBytes);
    const T* we = static_cast<const T*>(wte_shard);
    const T* pe = static_cast<const T*>(wpe);
    const unsigned grid = static_cast<unsigned>(std::min(rows, kMaxBlocks));
    const auto s = static_cast<cudaStream_t>(stream);
    if (pe && vec) {
      EmbeddingForwardKernel<T, kVec, true>
          <<<grid, kRowThreads, 0, s>>>(out, tokens, we, pe, lo, valid, rows, t, c);
    } else if (pe) {
      EmbeddingForwardKernel<T, 1, true>
          <<<grid, kRowThreads, 0, s>>>(out, tokens, we, pe, lo, valid, rows, t, c);
    } else if (vec) {
      EmbeddingForwardKernel<T, kVec, false>
          <<<grid, kRowThreads, 0, s>>>(out, tokens, we, pe, lo, valid, rows, t, c);
    } else {
      EmbeddingForwardKernel<T, 1, false>
          <<<grid, kRowThreads, 0, s>>>(out, tokens, we, pe, lo, valid, rows, t, c);
    }
    return cuda_util::LaunchStatus(kOp);
  });
}

size_t CudaEmbeddingBackwardWorkspace(int64_t rows) {
  if (rows <= 0 || rows > std::numeric_limits<int32_t>::max()) return 0;
  // The largest CUB needs for any key width the launcher may use (it sorts only the bits that
  // `valid` needs, and its storage may depend on the number of passes).
  size_t temp = 0;
  for (int end_bit = 1; end_bit <= 32; ++end_bit) {
    size_t bytes = 0;
    if (SortTempBytes(static_cast<int>(rows), end_bit, &bytes) != cudaSuccess) {
      (void)cudaGetLastError();  // do not leave the failure for the next launch to report
      return 0;
    }
    temp = std::max(temp, bytes);
  }
  return ArrayBytes(rows) + temp;
}

Status CudaEmbeddingBackward(float* dwte_shard, float* dwpe, const float* dout,
                             const int32_t* tokens, int64_t lo, int valid, int b, int t, int c,
                             void* workspace, size_t workspace_bytes, void* stream) {
  constexpr const char* kOp = "CudaEmbeddingBackward";
  RETURN_IF_ERROR(CheckSizes(kOp, b, t, c, valid));
  const int64_t rows = static_cast<int64_t>(b) * t;
  if (rows > std::numeric_limits<int32_t>::max()) {
    return InvalidArgument(std::string(kOp) + ": b * t = " + std::to_string(rows) +
                           " rows exceed 2^31 - 1");
  }
  if (rows == 0 || c == 0) return Status::Ok();
  const bool token_grad = valid > 0;
  if (!dout || (token_grad && (!dwte_shard || !tokens))) return cuda_util::NullPointer(kOp);
  const auto s = static_cast<cudaStream_t>(stream);

  if (token_grad) {
    const size_t arrays = ArrayBytes(rows);
    if (!workspace || !Aligned(workspace, 4) || workspace_bytes < arrays) {
      return InvalidArgument(std::string(kOp) + ": workspace of " +
                             std::to_string(workspace_bytes) +
                             " bytes is null, misaligned or smaller than the " +
                             std::to_string(arrays) + " bytes of its key arrays");
    }
    const int n = static_cast<int>(rows);
    const int end_bit = KeyBits(valid);
    size_t temp = 0;
    const cudaError_t qerr = SortTempBytes(n, end_bit, &temp);
    if (qerr != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_util::CudaError(kOp, "radix sort size query", qerr);
    }
    if (workspace_bytes < arrays + temp) {
      return InvalidArgument(
          std::string(kOp) + ": workspace of " + std::to_string(workspace_bytes) + " bytes < " +
          std::to_string(arrays + temp) + " needed (CudaEmbeddingBackwardWorkspace)");
    }
    char* base = static_cast<char*>(workspace);
    const size_t one = AlignUp(static_cast<size_t>(rows) * 4);
    auto* keys_in = reinterpret_cast<uint32_t*>(base);
    auto* keys_out = reinterpret_cast<uint32_t*>(base + one);
    auto* idx_in = reinterpret_cast<int32_t*>(base + 2 * one);
    auto* idx_out = reinterpret_cast<int32_t*>(base + 3 * one);
    void* temp_storage = base + arrays;

    ShardKeysKernel<<<Blocks(rows, kPosThreads), kPosThreads, 0, s>>>(keys_in, idx_in, tokens, lo,
                                                                      valid, n);
    RETURN_IF_ERROR(cuda_util::LaunchStatus(kOp));
    const cudaError_t serr = cub::DeviceRadixSort::SortPairs(temp_storage, temp, keys_in, keys_out,
                                                             idx_in, idx_out, n, 0, end_bit, s);
    if (serr != cudaSuccess) {
      (void)cudaGetLastError();
      return cuda_util::CudaError(kOp, "radix sort", serr);
    }
    const int threads = static_cast<int>(std::min<int64_t>(kSegThreads, (c + 31) / 32 * 32));
    const unsigned chunks =
        static_cast<unsigned>(std::min<int64_t>((c + threads - 1) / threads, 65535));
    SegmentSumKernel<<<dim3(static_cast<unsigned>(n), chunks), threads, 0, s>>>(
        dwte_shard, dout, keys_out, idx_out, n, static_cast<uint32_t>(valid), c);
    RETURN_IF_ERROR(cuda_util::LaunchStatus(kOp));
  }

  if (dwpe) {
    const int64_t tc = static_cast<int64_t>(t) * c;
    PositionGradKernel<<<Blocks(tc, kPosThreads), kPosThreads, 0, s>>>(dwpe, dout, b, tc);
    RETURN_IF_ERROR(cuda_util::LaunchStatus(kOp));
  }
  return Status::Ok();
}

}  // namespace strata::model
