// CUDA causal self-attention, flash-style (FlashAttention-2 algorithm); contract in
// attention_cuda.h, semantics of model/kernels/attention.cc.
//
// Arithmetic: fp32 FMA on fp32 copies of the tiles in shared memory, for every dtype (bf16/fp16
// are converted on load and rounded once on store, as the CPU reference does). No tensor cores:
// a correct, simple kernel first; WMMA/mma is the obvious next step for bf16/fp16.
//
// Thread layout shared by all three tiled kernels: 256 threads, kRows rows per block, kTpr =
// 256 / kRows consecutive lanes per row (a "row group", always inside one warp). The key tile
// has as many rows as the query tile (kRows), so the diagonal tile always holds key i for query
// row i: no valid query row ever sees a fully masked tile. Each thread of a row group owns
// kRows / kTpr of the tile's columns (column = sub + kTpr * n) and HS / kTpr of the head
// dimensions (dim = 4 * sub + 4 * kTpr * n + e, e < 4, read as float4), so the score tile is
// split across the row group and its probabilities are passed round with warp shuffles.
// Shared memory rows read by different threads at the same time are padded by 4 floats, which
// keeps the float4 reads free of bank conflicts.
//
// Forward   (block per (b, h, query tile)): online softmax over the key tiles 0..diagonal; the
//           output accumulates in registers; writes out and lse.
// Backward  1) D_i = dO_i . O_i (warp per row) into the workspace.
//           2) dK, dV: block per (b, h, key tile), looping over query tiles diagonal..end.
//           3) dQ: block per (b, h, query tile), looping over key tiles 0..diagonal.
//           P is recomputed from q, k and lse in both 2) and 3); every output element is summed
//           by one thread in a fixed order, so results are bitwise reproducible (no atomics).
//
// Exponentials are exp2f of scores pre-multiplied by log2(e) / sqrt(hs) (one MUFU op, ~2 ulp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>

#include "common/status.h"
#include "model/cuda/attention_cuda.h"
#include "model/cuda/typed_access.cuh"

namespace strata::model {
namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr size_t kDefaultSmem = 48 * 1024;

// ---- dtype conversion (device): typed_access.cuh's hardware conversions, round to nearest even

using cuda_util::FromF;
using cuda_util::ToF;

// ---- tile geometry -----------------------------------------------------------------------------

// Compile-time layout of one (head size, rows per tile) configuration; see the file comment.
template <int HS, int ROWS>
struct Tile {
  static constexpr int kTpr = kThreads / ROWS;  // threads per row
  static constexpr int kCols = ROWS / kTpr;     // score columns per thread
  static constexpr int kVec = HS / (4 * kTpr);  // float4 chunks of the head dims per thread
  static constexpr int kLd = HS + 4;            // padded row stride in shared memory
  static_assert(kThreads % ROWS == 0 && ROWS % kTpr == 0, "rows must divide the block");
  static_assert(kTpr <= 32 && (kTpr & (kTpr - 1)) == 0, "a row group must fit one warp");
  static_assert(HS % (4 * kTpr) == 0, "head dims must split into float4 chunks");
};

// Shared memory bytes of each kernel (fp32 tiles).
template <int HS, int ROWS>
constexpr size_t ForwardSmem() {
  // q and k padded, v read by whole rows (no padding needed).
  return sizeof(float) * (2 * ROWS * (HS + 4) + ROWS * HS);
}
template <int HS, int ROWS>
constexpr size_t BackwardSmem() {
  // four padded tiles (q, dO, k, v) plus lse and D of the query rows.
  return sizeof(float) * (4 * ROWS * (HS + 4) + 2 * ROWS);
}

// Copies rows [r0, r0 + ROWS) of one head (column offset `col` in a row of `stride` elements) of
// a [T, stride] slab into a [ROWS, ld] fp32 tile; rows at or past t are zero.
template <typename T, int HS, int ROWS>
__device__ __forceinline__ void LoadTile(float* dst, int ld, const T* __restrict__ src,
                                         int64_t stride, int r0, int t) {
  for (int e = threadIdx.x; e < ROWS * HS; e += kThreads) {
    const int r = e / HS, d = e % HS;
    const int row = r0 + r;
    dst[r * ld + d] = row < t ? ToF(src[static_cast<int64_t>(row) * stride + d]) : 0.f;
  }
}

__device__ __forceinline__ float Dot4(float acc, const float4& a, const float4& b) {
  acc = fmaf(a.x, b.x, acc);
  acc = fmaf(a.y, b.y, acc);
  acc = fmaf(a.z, b.z, acc);
  return fmaf(a.w, b.w, acc);
}

// s[n] = a_row . b[(sub + kTpr * n)] over HS dims; a_row and b rows padded to kLd.
template <int HS, int ROWS>
__device__ __forceinline__ void RowDots(float (&s)[Tile<HS, ROWS>::kCols], const float* a_row,
                                        const float* b, int sub) {
  using G = Tile<HS, ROWS>;
#pragma unroll
  for (int n = 0; n < G::kCols; ++n) s[n] = 0.f;
#pragma unroll 4
  for (int d = 0; d < HS; d += 4) {
    const float4 a = *reinterpret_cast<const float4*>(a_row + d);
#pragma unroll
    for (int n = 0; n < G::kCols; ++n) {
      const float4 bv = *reinterpret_cast<const float4*>(b + (sub + G::kTpr * n) * G::kLd + d);
      s[n] = Dot4(s[n], a, bv);
    }
  }
}

// acc[4 * v + e] += sum_j w_j * rows[j][4 * sub + 4 * kTpr * v + e] over the ROWS columns j of
// the tile, where w_j lives in register w[j / kTpr] of lane (group base + j % kTpr). Every lane
// of the warp must call this together (full-mask shuffles). `ld` is the row stride of `rows`.
template <int HS, int ROWS>
__device__ __forceinline__ void AccumulateRows(float (&acc)[4 * Tile<HS, ROWS>::kVec],
                                               const float (&w)[Tile<HS, ROWS>::kCols],
                                               const float* rows, int ld, int sub) {
  using G = Tile<HS, ROWS>;
  const int base = (threadIdx.x & 31) & ~(G::kTpr - 1);
#pragma unroll
  for (int n = 0; n < G::kCols; ++n) {
#pragma unroll
    for (int src = 0; src < G::kTpr; ++src) {
      const float wj = __shfl_sync(0xffffffffu, w[n], base + src);
      const float* row = rows + (src + G::kTpr * n) * ld + 4 * sub;
#pragma unroll
      for (int v = 0; v < G::kVec; ++v) {
        const float4 x = *reinterpret_cast<const float4*>(row + 4 * G::kTpr * v);
        acc[4 * v + 0] = fmaf(wj, x.x, acc[4 * v + 0]);
        acc[4 * v + 1] = fmaf(wj, x.y, acc[4 * v + 1]);
        acc[4 * v + 2] = fmaf(wj, x.z, acc[4 * v + 2]);
        acc[4 * v + 3] = fmaf(wj, x.w, acc[4 * v + 3]);
      }
    }
  }
}

// Reduces over the kTpr lanes of a row group (xor butterfly: every lane gets the same value).
template <int TPR>
__device__ __forceinline__ float GroupMax(float x) {
#pragma unroll
  for (int o = 1; o < TPR; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <int TPR>
__device__ __forceinline__ float GroupSum(float x) {
#pragma unroll
  for (int o = 1; o < TPR; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Writes a thread's slice of one head row (dims 4 * sub + 4 * kTpr * v + e), times `mul`.
template <typename T, int HS, int ROWS>
__device__ __forceinline__ void StoreRow(T* dst, const float (&acc)[4 * Tile<HS, ROWS>::kVec],
                                         float mul, int sub) {
  using G = Tile<HS, ROWS>;
#pragma unroll
  for (int v = 0; v < G::kVec; ++v) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dst[4 * sub + 4 * G::kTpr * v + e] = FromF<T>(acc[4 * v + e] * mul);
  }
}

// Maps blockIdx.x to (bh, tile) with the heaviest tiles (most causal work) first. For the
// forward and dQ kernels that is the last query tile; `reverse` = false keeps tile order for
// the dK/dV kernel, whose first key tile sees every query tile.
__device__ __forceinline__ void BlockCoords(int bhs, int ntiles, bool reverse, int* bh, int* tile) {
  const int step = static_cast<int>(blockIdx.x) / bhs;
  *bh = static_cast<int>(blockIdx.x) % bhs;
  *tile = reverse ? ntiles - 1 - step : step;
}

// ---- forward ------------------------------------------------------------------------------------

template <typename T, int HS, int ROWS>
__global__ void __launch_bounds__(kThreads)
    AttentionForwardKernel(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ qkv,
                           int t, int nh, int bhs, int ntiles, float scale_log2) {
  using G = Tile<HS, ROWS>;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* ks = qs + ROWS * G::kLd;
  float* vs = ks + ROWS * G::kLd;  // [ROWS, HS]

  int bh, qt;
  BlockCoords(bhs, ntiles, /*reverse=*/true, &bh, &qt);
  const int b = bh / nh, h = bh % nh;
  const int c = nh * HS;
  const int64_t stride = 3 * static_cast<int64_t>(c);
  const T* q_src = qkv + static_cast<int64_t>(b) * t * stride + h * HS;
  const T* k_src = q_src + c;
  const T* v_src = q_src + 2 * c;
  const int q0 = qt * ROWS;
  const int row = threadIdx.x / G::kTpr, sub = threadIdx.x % G::kTpr;
  const int qi = q0 + row;

  LoadTile<T, HS, ROWS>(qs, G::kLd, q_src, stride, q0, t);

  float m = -INFINITY, l = 0.f;
  float acc[4 * G::kVec];
#pragma unroll
  for (int i = 0; i < 4 * G::kVec; ++i) acc[i] = 0.f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * ROWS;
    __syncthreads();  // the previous tile's k/v are no longer read
    LoadTile<T, HS, ROWS>(ks, G::kLd, k_src, stride, k0, t);
    LoadTile<T, HS, ROWS>(vs, HS, v_src, stride, k0, t);
    __syncthreads();

    float s[G::kCols];
    RowDots<HS, ROWS>(s, qs + row * G::kLd, ks, sub);
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < G::kCols; ++n) {
      const int j = k0 + sub + G::kTpr * n;
      s[n] = j <= qi ? s[n] * scale_log2 : -INFINITY;
      tile_max = fmaxf(tile_max, s[n]);
    }
    // Finite for every row: key k0 <= q0 <= qi is in every tile up to the diagonal.
    const float m_new = fmaxf(m, GroupMax<G::kTpr>(tile_max));
    const float corr = exp2f(m - m_new);  // 0 on the first tile (m = -inf)
    m = m_new;
    float psum = 0.f;
#pragma unroll
    for (int n = 0; n < G::kCols; ++n) {
      s[n] = exp2f(s[n] - m);  // masked: exp2(-inf) = 0
      psum += s[n];
    }
    l = l * corr + GroupSum<G::kTpr>(psum);
#pragma unroll
    for (int i = 0; i < 4 * G::kVec; ++i) acc[i] *= corr;
    AccumulateRows<HS, ROWS>(acc, s, vs, HS, sub);
  }

  if (qi < t) {
    T* dst = out + (static_cast<int64_t>(b) * t + qi) * c + h * HS;
    StoreRow<T, HS, ROWS>(dst, acc, 1.f / l, sub);
    if (sub == 0) lse[static_cast<int64_t>(bh) * t + qi] = (m + log2f(l)) * kLn2;
  }
}

// ---- backward -----------------------------------------------------------------------------------

// d[bh * t + i] = sum_d dout[b, i, h, d] * out[b, i, h, d]; one warp per (b, i, h) row.
template <typename T, int HS>
__global__ void __launch_bounds__(kThreads)
    AttentionRowDotKernel(float* __restrict__ d, const T* __restrict__ dout,
                          const T* __restrict__ out, int t, int nh, int64_t rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    // r = (b * t + i) * nh + h: the head row starts at r * HS in [B, T, C].
    const T* g = dout + r * HS;
    const T* o = out + r * HS;
    float sum = 0.f;
#pragma unroll
    for (int k = lane; k < HS; k += 32) sum = fmaf(ToF(g[k]), ToF(o[k]), sum);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      const int64_t bt = r / nh;
      const int h = static_cast<int>(r % nh);
      const int64_t b = bt / t, i = bt % t;
      d[(b * nh + h) * t + i] = sum;
    }
  }
}

// dK and dV of one key tile: loops over the query tiles from the diagonal to the end.
template <typename T, int HS, int ROWS>
__global__ void __launch_bounds__(kThreads)
    AttentionBackwardKvKernel(T* __restrict__ dqkv, const T* __restrict__ dout,
                              const T* __restrict__ qkv, const float* __restrict__ lse,
                              const float* __restrict__ dsum, int t, int nh, int bhs, int ntiles,
                              float scale_log2, float scale) {
  using G = Tile<HS, ROWS>;
  extern __shared__ float4 smem4[];
  float* ks = reinterpret_cast<float*>(smem4);
  float* vs = ks + ROWS * G::kLd;
  float* qs = vs + ROWS * G::kLd;
  float* dos = qs + ROWS * G::kLd;
  float* lse_s = dos + ROWS * G::kLd;  // lse * log2(e) of the query rows
  float* d_s = lse_s + ROWS;           // D of the query rows

  int bh, kt;
  BlockCoords(bhs, ntiles, /*reverse=*/false, &bh, &kt);
  const int b = bh / nh, h = bh % nh;
  const int c = nh * HS;
  const int64_t stride = 3 * static_cast<int64_t>(c);
  const T* q_src = qkv + static_cast<int64_t>(b) * t * stride + h * HS;
  const T* do_src = dout + static_cast<int64_t>(b) * t * c + h * HS;
  const float* lse_bh = lse + static_cast<int64_t>(bh) * t;
  const float* d_bh = dsum + static_cast<int64_t>(bh) * t;
  const int k0 = kt * ROWS;
  const int row = threadIdx.x / G::kTpr, sub = threadIdx.x % G::kTpr;
  const int kj = k0 + row;  // this row group's key

  LoadTile<T, HS, ROWS>(ks, G::kLd, q_src + c, stride, k0, t);
  LoadTile<T, HS, ROWS>(vs, G::kLd, q_src + 2 * c, stride, k0, t);

  float dk[4 * G::kVec], dv[4 * G::kVec];
#pragma unroll
  for (int i = 0; i < 4 * G::kVec; ++i) dk[i] = dv[i] = 0.f;

  for (int qt = kt; qt < ntiles; ++qt) {
    const int q0 = qt * ROWS;
    __syncthreads();  // k/v loaded; the previous query tile is no longer read
    LoadTile<T, HS, ROWS>(qs, G::kLd, q_src, stride, q0, t);
    LoadTile<T, HS, ROWS>(dos, G::kLd, do_src, c, q0, t);
    for (int r = threadIdx.x; r < ROWS; r += kThreads) {
      const bool valid = q0 + r < t;
      lse_s[r] = valid ? lse_bh[q0 + r] * kLog2e : 0.f;
      d_s[r] = valid ? d_bh[q0 + r] : 0.f;
    }
    __syncthreads();

    float p[G::kCols], ds[G::kCols];
    RowDots<HS, ROWS>(p, ks + row * G::kLd, qs, sub);    // s = k_j . q_i
    RowDots<HS, ROWS>(ds, vs + row * G::kLd, dos, sub);  // dp = v_j . dO_i
#pragma unroll
    for (int n = 0; n < G::kCols; ++n) {
      const int li = sub + G::kTpr * n;
      const int qi = q0 + li;
      p[n] = (qi < t && kj <= qi) ? exp2f(p[n] * scale_log2 - lse_s[li]) : 0.f;
      ds[n] = p[n] * (ds[n] - d_s[li]);
    }
    AccumulateRows<HS, ROWS>(dv, p, dos, G::kLd, sub);  // dV_j += sum_i P_ij dO_i
    AccumulateRows<HS, ROWS>(dk, ds, qs, G::kLd, sub);  // dK_j += sum_i dS_ij q_i (x scale)
  }

  if (kj < t) {
    T* dst = dqkv + (static_cast<int64_t>(b) * t + kj) * stride + h * HS;
    StoreRow<T, HS, ROWS>(dst + c, dk, scale, sub);
    StoreRow<T, HS, ROWS>(dst + 2 * c, dv, 1.f, sub);
  }
}

// dQ of one query tile: loops over the key tiles up to the diagonal.
template <typename T, int HS, int ROWS>
__global__ void __launch_bounds__(kThreads)
    AttentionBackwardQKernel(T* __restrict__ dqkv, const T* __restrict__ dout,
                             const T* __restrict__ qkv, const float* __restrict__ lse,
                             const float* __restrict__ dsum, int t, int nh, int bhs, int ntiles,
                             float scale_log2, float scale) {
  using G = Tile<HS, ROWS>;
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* dos = qs + ROWS * G::kLd;
  float* ks = dos + ROWS * G::kLd;
  float* vs = ks + ROWS * G::kLd;

  int bh, qt;
  BlockCoords(bhs, ntiles, /*reverse=*/true, &bh, &qt);
  const int b = bh / nh, h = bh % nh;
  const int c = nh * HS;
  const int64_t stride = 3 * static_cast<int64_t>(c);
  const T* q_src = qkv + static_cast<int64_t>(b) * t * stride + h * HS;
  const T* do_src = dout + static_cast<int64_t>(b) * t * c + h * HS;
  const int q0 = qt * ROWS;
  const int row = threadIdx.x / G::kTpr, sub = threadIdx.x % G::kTpr;
  const int qi = q0 + row;
  const bool valid = qi < t;
  const float lse2 = valid ? lse[static_cast<int64_t>(bh) * t + qi] * kLog2e : 0.f;
  const float di = valid ? dsum[static_cast<int64_t>(bh) * t + qi] : 0.f;

  LoadTile<T, HS, ROWS>(qs, G::kLd, q_src, stride, q0, t);
  LoadTile<T, HS, ROWS>(dos, G::kLd, do_src, c, q0, t);

  float dq[4 * G::kVec];
#pragma unroll
  for (int i = 0; i < 4 * G::kVec; ++i) dq[i] = 0.f;

  for (int kt = 0; kt <= qt; ++kt) {
    const int k0 = kt * ROWS;
    __syncthreads();  // q/dO loaded; the previous key tile is no longer read
    LoadTile<T, HS, ROWS>(ks, G::kLd, q_src + c, stride, k0, t);
    LoadTile<T, HS, ROWS>(vs, G::kLd, q_src + 2 * c, stride, k0, t);
    __syncthreads();

    float p[G::kCols], ds[G::kCols];
    RowDots<HS, ROWS>(p, qs + row * G::kLd, ks, sub);    // s = q_i . k_j
    RowDots<HS, ROWS>(ds, dos + row * G::kLd, vs, sub);  // dp = dO_i . v_j
#pragma unroll
    for (int n = 0; n < G::kCols; ++n) {
      const int kj = k0 + sub + G::kTpr * n;
      const float pn = (valid && kj <= qi) ? exp2f(p[n] * scale_log2 - lse2) : 0.f;
      ds[n] = pn * (ds[n] - di);
    }
    AccumulateRows<HS, ROWS>(dq, ds, ks, G::kLd, sub);  // dQ_i += sum_j dS_ij k_j (x scale)
  }

  if (valid) {
    T* dst = dqkv + (static_cast<int64_t>(b) * t + qi) * stride + h * HS;
    StoreRow<T, HS, ROWS>(dst, dq, scale, sub);
  }
}

// ---- host side ----------------------------------------------------------------------------------

using cuda_util::LaunchStatus;

// Launches `kernel` on `blocks` blocks of kThreads with `smem` bytes of dynamic shared memory,
// opting in above the 48 KB default (every launch: the attribute is per device, and setting it
// costs no synchronisation).
template <typename... KArgs, typename... Args>
Status Launch(const char* op, void (*kernel)(KArgs...), int64_t blocks, size_t smem, void* stream,
              Args... args) {
  if (smem > kDefaultSmem) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // clear it: the caller gets it in the Status
      const std::string what =
          "cannot opt in to " + std::to_string(smem) + " bytes of shared memory";
      return cuda_util::CudaError(op, what.c_str(), err);
    }
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      args...);
  return LaunchStatus(op);
}

// Validated geometry of one call.
struct Shape {
  int b, t, c, nh, hs;
  bool empty() const { return b == 0 || t == 0; }
};

Result<Shape> CheckShape(const char* op, int b, int t, int c, int nh) {
  if (b < 0 || t < 0 || c < 0 || nh < 0) {
    return InvalidArgument(std::string(op) + ": negative size (b = " + std::to_string(b) +
                           ", t = " + std::to_string(t) + ", c = " + std::to_string(c) +
                           ", nh = " + std::to_string(nh) + ")");
  }
  if (nh == 0 || c % nh != 0 || (c / nh != 32 && c / nh != 64 && c / nh != 128)) {
    return InvalidArgument(
        std::string(op) + ": head size model.channels / model.heads = " + std::to_string(c) +
        " / " + std::to_string(nh) + " is not supported on CUDA (needs 32, 64 or 128)");
  }
  return Shape{b, t, c, nh, c / nh};
}

Status CheckDType(const char* op, DType dtype) {
  if (dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16) return Status::Ok();
  return InvalidArgument(std::string(op) + ": unknown dtype " +
                         std::to_string(static_cast<int>(dtype)));
}

// Rows per tile for a head size: 64 for hs <= 64, 32 for hs = 128 (keeps each thread's
// registers and each block's shared memory moderate; see ForwardSmem / BackwardSmem).
template <int HS>
constexpr int RowsFor() {
  return HS <= 64 ? 64 : 32;
}

// Number of blocks for ntiles tiles of every (b, h); INVALID_ARGUMENT past the grid limit.
Result<int64_t> GridBlocks(const char* op, const Shape& s, int ntiles) {
  const int64_t blocks = static_cast<int64_t>(ntiles) * s.b * s.nh;
  if (static_cast<int64_t>(s.b) * s.nh > INT_MAX || blocks > INT_MAX) {
    return InvalidArgument(std::string(op) + ": b * nh * ceil(t / tile) = " +
                           std::to_string(blocks) + " blocks exceeds the grid limit");
  }
  return blocks;
}

template <typename T, int HS>
Status ForwardFor(void* out, float* lse, const void* qkv, const Shape& s, void* stream) {
  constexpr int kRows = RowsFor<HS>();
  const int ntiles = (s.t + kRows - 1) / kRows;
  ASSIGN_OR_RETURN(const int64_t blocks, GridBlocks("CudaAttentionForward", s, ntiles));
  const float scale_log2 = kLog2e / sqrtf(static_cast<float>(HS));
  return Launch("CudaAttentionForward", AttentionForwardKernel<T, HS, kRows>, blocks,
                ForwardSmem<HS, kRows>(), stream, static_cast<T*>(out), lse,
                static_cast<const T*>(qkv), s.t, s.nh, s.b * s.nh, ntiles, scale_log2);
}

template <typename T, int HS>
Status BackwardFor(void* dqkv, const void* dout, const void* qkv, const void* out, const float* lse,
                   const Shape& s, float* dsum, void* stream) {
  constexpr int kRows = RowsFor<HS>();
  const char* op = "CudaAttentionBackward";
  const int ntiles = (s.t + kRows - 1) / kRows;
  ASSIGN_OR_RETURN(const int64_t blocks, GridBlocks(op, s, ntiles));
  const float scale = 1.f / sqrtf(static_cast<float>(HS));
  const float scale_log2 = kLog2e * scale;
  T* dqkv_t = static_cast<T*>(dqkv);
  const T* dout_t = static_cast<const T*>(dout);
  const T* qkv_t = static_cast<const T*>(qkv);

  const int64_t rows = static_cast<int64_t>(s.b) * s.t * s.nh;
  const int64_t row_blocks = std::min<int64_t>((rows + kThreads / 32 - 1) / (kThreads / 32), 65536);
  RETURN_IF_ERROR(Launch(op, AttentionRowDotKernel<T, HS>, row_blocks, 0, stream, dsum, dout_t,
                         static_cast<const T*>(out), s.t, s.nh, rows));
  RETURN_IF_ERROR(Launch(op, AttentionBackwardKvKernel<T, HS, kRows>, blocks,
                         BackwardSmem<HS, kRows>(), stream, dqkv_t, dout_t, qkv_t, lse,
                         static_cast<const float*>(dsum), s.t, s.nh, s.b * s.nh, ntiles, scale_log2,
                         scale));
  return Launch(op, AttentionBackwardQKernel<T, HS, kRows>, blocks, BackwardSmem<HS, kRows>(),
                stream, dqkv_t, dout_t, qkv_t, lse, static_cast<const float*>(dsum), s.t, s.nh,
                s.b * s.nh, ntiles, scale_log2, scale);
}

template <typename T>
Status ForwardDispatch(void* out, float* lse, const void* qkv, const Shape& s, void* stream) {
  switch (s.hs) {
    case 32:
      return ForwardFor<T, 32>(out, lse, qkv, s, stream);
    case 64:
      return ForwardFor<T, 64>(out, lse, qkv, s, stream);
    default:
      return ForwardFor<T, 128>(out, lse, qkv, s, stream);
  }
}

template <typename T>
Status BackwardDispatch(void* dqkv, const void* dout, const void* qkv, const void* out,
                        const float* lse, const Shape& s, float* dsum, void* stream) {
  switch (s.hs) {
    case 32:
      return BackwardFor<T, 32>(dqkv, dout, qkv, out, lse, s, dsum, stream);
    case 64:
      return BackwardFor<T, 64>(dqkv, dout, qkv, out, lse, s, dsum, stream);
    default:
      return BackwardFor<T, 128>(dqkv, dout, qkv, out, lse, s, dsum, stream);
  }
}

}  // namespace

Status CudaAttentionForward(void* out, float* lse, const void* qkv, int b, int t, int c, int nh,
                            DType dtype, void* stream) {
  const char* op = "CudaAttentionForward";
  ASSIGN_OR_RETURN(const Shape s, CheckShape(op, b, t, c, nh));
  RETURN_IF_ERROR(CheckDType(op, dtype));
  if (s.empty()) return Status::Ok();
  if (!out || !lse || !qkv) return InvalidArgument(std::string(op) + ": null device pointer");
  switch (dtype) {
    case DType::kF32:
      return ForwardDispatch<float>(out, lse, qkv, s, stream);
    case DType::kBF16:
      return ForwardDispatch<__nv_bfloat16>(out, lse, qkv, s, stream);
    default:
      return ForwardDispatch<__half>(out, lse, qkv, s, stream);
  }
}

size_t CudaAttentionBackwardWorkspace(int b, int t, int c, int nh) {
  if (b <= 0 || t <= 0 || c < 0 || nh <= 0) return 0;
  // D = rowsum(dO * O) per (b, h, t); dQ needs no accumulator (one pass owns each row).
  return sizeof(float) * static_cast<size_t>(b) * static_cast<size_t>(nh) * static_cast<size_t>(t);
}

Status CudaAttentionBackward(void* dqkv, const void* dout, const void* qkv, const void* out,
                             const float* lse, int b, int t, int c, int nh, void* workspace,
                             size_t workspace_bytes, DType dtype, void* stream) {
  const char* op = "CudaAttentionBackward";
  ASSIGN_OR_RETURN(const Shape s, CheckShape(op, b, t, c, nh));
  RETURN_IF_ERROR(CheckDType(op, dtype));
  if (s.empty()) return Status::Ok();
  if (!dqkv || !dout || !qkv || !out || !lse || !workspace) {
    return InvalidArgument(std::string(op) + ": null device pointer");
  }
  const size_t need = CudaAttentionBackwardWorkspace(b, t, c, nh);
  if (workspace_bytes < need) {
    return InvalidArgument(std::string(op) + ": workspace of " + std::to_string(workspace_bytes) +
                           " bytes, needs " + std::to_string(need));
  }
  float* dsum = static_cast<float*>(workspace);
  switch (dtype) {
    case DType::kF32:
      return BackwardDispatch<float>(dqkv, dout, qkv, out, lse, s, dsum, stream);
    case DType::kBF16:
      return BackwardDispatch<__nv_bfloat16>(dqkv, dout, qkv, out, lse, s, dsum, stream);
    default:
      return BackwardDispatch<__half>(dqkv, dout, qkv, out, lse, s, dsum, stream);
  }
}

}  // namespace strata::model
