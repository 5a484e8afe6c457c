#include "model/kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "model/dtype.h"
#include "model/kernels/fast_math.h"
#include "model/kernels/matmul.h"
#include "model/kernels/scratch.h"

namespace strata::model {
namespace {

// Query rows per block of the causal computation (keys beyond a block's last row are skipped).
constexpr int kBlockRows = 64;

// Copies head h of q, k or v (which = 0, 1, 2) of batch row b into a dense [t, hs] fp32 matrix.
template <typename T>
void GatherHead(float* dst, const T* qkv, int bi, int h, int which, int t, int c, int hs) {
  for (int i = 0; i < t; ++i) {
    const T* src = qkv + (static_cast<int64_t>(bi) * t + i) * 3 * c + which * c + h * hs;
    for (int d = 0; d < hs; ++d) dst[i * hs + d] = ToFloat(src[d]);
  }
}

// Writes a dense [t, hs] matrix into head h of a [B, T, stride] tensor at column offset `col`.
template <typename T>
void ScatterHead(T* dst, const float* src, int bi, int h, int t, int stride, int col, int hs) {
  for (int i = 0; i < t; ++i) {
    T* d = dst + (static_cast<int64_t>(bi) * t + i) * stride + col + h * hs;
    for (int j = 0; j < hs; ++j) d[j] = FromFloat<T>(src[i * hs + j]);
  }
}

}  // namespace

template <typename T>
void AttentionForward(T* out, float* lse, const T* qkv, int b, int t, int c, int nh) {
  const int hs = c / nh;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < b * nh; ++bh) {
    const int bi = bh / nh, h = bh % nh;
    float* q = ThreadScratch(0, static_cast<size_t>(t) * hs * 4);
    float* k = q + t * hs;
    float* v = k + t * hs;
    float* o = v + t * hs;
    float* s = ThreadScratch(1, static_cast<size_t>(t) * t);
    GatherHead(q, qkv, bi, h, 0, t, c, hs);
    GatherHead(k, qkv, bi, h, 1, t, c, hs);
    GatherHead(v, qkv, bi, h, 2, t, c, hs);
    float* row_lse = lse + static_cast<int64_t>(bh) * t;
    // Query rows in blocks: block [r0, r0 + rows) only needs keys [0, r0 + rows).
    for (int r0 = 0; r0 < t; r0 += kBlockRows) {
      const int rows = std::min(kBlockRows, t - r0), cols = r0 + rows;
      float* sb = s + static_cast<int64_t>(r0) * t;
      Sgemm(false, true, rows, cols, hs, scale, q + r0 * hs, hs, k, hs, 0.f, sb, t);
      for (int i = r0; i < r0 + rows; ++i) {
        float* row = s + static_cast<int64_t>(i) * t;
        float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
        for (int j = 0; j <= i; ++j) mx = row[j] > mx ? row[j] : mx;
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j <= i; ++j) {
          row[j] = FastExp(row[j] - mx);
          sum += row[j];
        }
        const float inv = 1.f / sum;
#pragma omp simd
        for (int j = 0; j <= i; ++j) row[j] *= inv;
        for (int j = i + 1; j < cols; ++j) row[j] = 0.f;
        row_lse[i] = mx + std::log(sum);
      }
      Sgemm(false, false, rows, hs, cols, 1.f, sb, t, v, hs, 0.f, o + r0 * hs, hs);
    }
    ScatterHead(out, o, bi, h, t, c, 0, hs);
  }
}

template <typename T>
void AttentionBackward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, int b,
                       int t, int c, int nh) {
  const int hs = c / nh;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
#pragma omp parallel for schedule(static)
  for (int bh = 0; bh < b * nh; ++bh) {
    const int bi = bh / nh, h = bh % nh;
    float* q = ThreadScratch(0, static_cast<size_t>(t) * hs * 8);
    float* k = q + t * hs;
    float* v = k + t * hs;
    float* dout_h = v + t * hs;
    float* dq = dout_h + t * hs;
    float* dk = dq + t * hs;
    float* dv = dk + t * hs;
    float* rowdot = dv + t * hs;  // t floats (t <= t*hs)
    float* p = ThreadScratch(1, static_cast<size_t>(t) * t);
    float* dp = ThreadScratch(2, static_cast<size_t>(t) * t);
    GatherHead(q, qkv, bi, h, 0, t, c, hs);
    GatherHead(k, qkv, bi, h, 1, t, c, hs);
    GatherHead(v, qkv, bi, h, 2, t, c, hs);
    // dout and out are [B, T, C]; head h occupies columns h*hs..; D_i = dout_i . out_i
    for (int i = 0; i < t; ++i) {
      const T* g = dout + (static_cast<int64_t>(bi) * t + i) * c + h * hs;
      const T* o = out + (static_cast<int64_t>(bi) * t + i) * c + h * hs;
      float dot = 0.f;
      for (int d = 0; d < hs; ++d) {
        dout_h[i * hs + d] = ToFloat(g[d]);
        dot += dout_h[i * hs + d] * ToFloat(o[d]);
      }
      rowdot[i] = dot;
    }
    // Query-row blocks as in the forward pass; dK and dV accumulate over blocks.
    std::fill(dk, dk + t * hs, 0.f);
    std::fill(dv, dv + t * hs, 0.f);
    const float* row_lse = lse + static_cast<int64_t>(bh) * t;
    for (int r0 = 0; r0 < t; r0 += kBlockRows) {
      const int rows = std::min(kBlockRows, t - r0), cols = r0 + rows;
      float* pb = p + static_cast<int64_t>(r0) * t;
      float* dpb = dp + static_cast<int64_t>(r0) * t;
      // Recompute probabilities from the stored log-sum-exp.
      Sgemm(false, true, rows, cols, hs, scale, q + r0 * hs, hs, k, hs, 0.f, pb, t);
      for (int i = r0; i < r0 + rows; ++i) {
        float* row = p + static_cast<int64_t>(i) * t;
        const float li = row_lse[i];
#pragma omp simd
        for (int j = 0; j <= i; ++j) row[j] = FastExp(row[j] - li);
        for (int j = i + 1; j < cols; ++j) row[j] = 0.f;
      }
      // dV += P^T dO ; dP = dO V^T
      Sgemm(true, false, cols, hs, rows, 1.f, pb, t, dout_h + r0 * hs, hs, 1.f, dv, hs);
      Sgemm(false, true, rows, cols, hs, 1.f, dout_h + r0 * hs, hs, v, hs, 0.f, dpb, t);
      for (int i = r0; i < r0 + rows; ++i) {  // dS = P (dP - D)
        float* drow = dp + static_cast<int64_t>(i) * t;
        const float* prow = p + static_cast<int64_t>(i) * t;
        const float di = rowdot[i];
#pragma omp simd
        for (int j = 0; j <= i; ++j) drow[j] = prow[j] * (drow[j] - di);
        for (int j = i + 1; j < cols; ++j) drow[j] = 0.f;
      }
      // dQ = s dS K ; dK += s dS^T Q
      Sgemm(false, false, rows, hs, cols, scale, dpb, t, k, hs, 0.f, dq + r0 * hs, hs);
      Sgemm(true, false, cols, hs, rows, scale, dpb, t, q + r0 * hs, hs, 1.f, dk, hs);
    }
    ScatterHead(dqkv, dq, bi, h, t, 3 * c, 0, hs);
    ScatterHead(dqkv, dk, bi, h, t, 3 * c, c, hs);
    ScatterHead(dqkv, dv, bi, h, t, 3 * c, 2 * c, hs);
  }
}

#define STRATA_INSTANTIATE(T)                                                                  \
  template void AttentionForward<T>(T*, float*, const T*, int, int, int, int);                 \
  template void AttentionBackward<T>(T*, const T*, const T*, const T*, const float*, int, int, \
                                     int, int);
STRATA_INSTANTIATE(float)
STRATA_INSTANTIATE(bf16)
STRATA_INSTANTIATE(f16)
#undef STRATA_INSTANTIATE

}  // namespace strata::model
