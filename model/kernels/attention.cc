#include "model/kernels/attention.h"

#include <cmath>
#include <limits>

#include "model/dtype.h"
#include "model/kernels/fast_math.h"
#include "model/kernels/matmul.h"
#include "model/kernels/scratch.h"

namespace strata::model {
namespace {

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
    Sgemm(false, true, t, t, hs, scale, q, hs, k, hs, 0.f, s, t);
    float* row_lse = lse + static_cast<int64_t>(bh) * t;
    for (int i = 0; i < t; ++i) {
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
      for (int j = i + 1; j < t; ++j) row[j] = 0.f;
      row_lse[i] = mx + std::log(sum);
    }
    Sgemm(false, false, t, hs, t, 1.f, s, t, v, hs, 0.f, o, hs);
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
    // Recompute probabilities from the stored log-sum-exp.
    Sgemm(false, true, t, t, hs, scale, q, hs, k, hs, 0.f, p, t);
    const float* row_lse = lse + static_cast<int64_t>(bh) * t;
    for (int i = 0; i < t; ++i) {
      float* row = p + static_cast<int64_t>(i) * t;
      const float li = row_lse[i];
#pragma omp simd
      for (int j = 0; j <= i; ++j) row[j] = FastExp(row[j] - li);
      for (int j = i + 1; j < t; ++j) row[j] = 0.f;
    }
    Sgemm(true, false, t, hs, t, 1.f, p, t, dout_h, hs, 0.f, dv, hs);  // dV = P^T dO
    Sgemm(false, true, t, t, hs, 1.f, dout_h, hs, v, hs, 0.f, dp, t);  // dP = dO V^T
    for (int i = 0; i < t; ++i) {                                      // dS = P (dP - D)
      float* drow = dp + static_cast<int64_t>(i) * t;
      const float* prow = p + static_cast<int64_t>(i) * t;
      const float di = rowdot[i];
#pragma omp simd
      for (int j = 0; j <= i; ++j) drow[j] = prow[j] * (drow[j] - di);
      for (int j = i + 1; j < t; ++j) drow[j] = 0.f;
    }
    Sgemm(false, false, t, hs, t, scale, dp, t, k, hs, 0.f, dq, hs);  // dQ = s dS K
    Sgemm(true, false, t, hs, t, scale, dp, t, q, hs, 0.f, dk, hs);   // dK = s dS^T Q
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
