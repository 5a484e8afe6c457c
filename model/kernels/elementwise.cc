#include "model/kernels/elementwise.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "model/dtype.h"
#include "model/kernels/fast_math.h"
#include "model/kernels/vocab_parallel.h"

namespace strata::model {
namespace {
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluCubic = 0.044715f;
}  // namespace

// The unsharded embedding is the vocabulary-parallel one over the whole vocabulary.
template <typename T>
void EmbeddingForward(float* out, const int32_t* tokens, const T* wte, const T* wpe, int b, int t,
                      int c) {
  const int64_t n = static_cast<int64_t>(b) * t;
  VocabShardEmbeddingForward(out, tokens, wte, 0, std::numeric_limits<int>::max(), n, c);
  AddPositionEmbedding(out, wpe, b, t, c);
}

void EmbeddingBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int b,
                       int t, int c, int vocab) {
  VocabShardEmbeddingBackward(dwte, dwpe, dout, tokens, 0, vocab, b, t, c);
}

template <typename T>
void GeluForward(T* out, const T* inp, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float x = ToFloat(inp[i]);
    const float u = kGeluScale * (x + kGeluCubic * x * x * x);
    out[i] = FromFloat<T>(0.5f * x * (1.f + FastTanh(u)));
  }
}

template <typename T>
void GeluBackward(T* dinp, const T* inp, const T* dout, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float x = ToFloat(inp[i]);
    const float u = kGeluScale * (x + kGeluCubic * x * x * x);
    const float th = FastTanh(u);
    const float sech2 = 1.f - th * th;
    const float local =
        0.5f * (1.f + th) + 0.5f * x * sech2 * kGeluScale * (1.f + 3.f * kGeluCubic * x * x);
    dinp[i] = FromFloat<T>(local * ToFloat(dout[i]));
  }
}

template <typename T>
void ResidualForward(float* out, const float* a, const T* b, int64_t n) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] + ToFloat(b[i]);
}

template <typename T>
void CastFromFloat(T* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (dst != src) std::copy(src, src + n, dst);
  } else {
    constexpr int64_t kChunk = 1 << 14;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i += kChunk) {
      ConvertFromFloat(dst + i, src + i, static_cast<size_t>(std::min(kChunk, n - i)));
    }
  }
}

template <typename T>
void AddBias(T* x, const T* bias, int64_t n, int c) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    for (int j = 0; j < c; ++j)
      x[i * c + j] = FromFloat<T>(ToFloat(x[i * c + j]) + ToFloat(bias[j]));
  }
}

#define STRATA_INSTANTIATE(T)                                                                   \
  template void EmbeddingForward<T>(float*, const int32_t*, const T*, const T*, int, int, int); \
  template void GeluForward<T>(T*, const T*, int64_t);                                          \
  template void GeluBackward<T>(T*, const T*, const T*, int64_t);                               \
  template void ResidualForward<T>(float*, const float*, const T*, int64_t);                    \
  template void CastFromFloat<T>(T*, const float*, int64_t);                                    \
  template void AddBias<T>(T*, const T*, int64_t, int);
STRATA_INSTANTIATE(float)
STRATA_INSTANTIATE(bf16)
STRATA_INSTANTIATE(f16)
#undef STRATA_INSTANTIATE

}  // namespace strata::model
