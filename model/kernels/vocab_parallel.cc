#include "model/kernels/vocab_parallel.h"

#include <omp.h>

#include <algorithm>
#include <cmath>

#include "model/dtype.h"
#include "model/kernels/fast_math.h"

namespace strata::model {

template <typename T>
void VocabShardEmbeddingForward(float* out, const int32_t* tokens, const T* wte_shard, int64_t lo,
                                int valid, int64_t n, int c) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + r * c;
    const int64_t row = static_cast<int64_t>(tokens[r]) - lo;
    if (row < 0 || row >= valid) {
      std::fill(o, o + c, 0.f);
      continue;
    }
    const T* we = wte_shard + row * c;
    for (int j = 0; j < c; ++j) o[j] = ToFloat(we[j]);
  }
}

template <typename T>
void AddPositionEmbedding(float* out, const T* wpe, int b, int t, int c) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < static_cast<int64_t>(b) * t; ++r) {
    const T* pe = wpe + (r % t) * c;
    float* o = out + r * c;
    for (int j = 0; j < c; ++j) o[j] += ToFloat(pe[j]);
  }
}

void VocabShardEmbeddingBackward(float* dwte_shard, float* dwpe, const float* dout,
                                 const int32_t* tokens, int64_t lo, int valid, int b, int t,
                                 int c) {
  // Threads own disjoint channel ranges, so repeated tokens never race and the summation order
  // is fixed (as EmbeddingBackward).
#pragma omp parallel
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int j0 = static_cast<int>(static_cast<int64_t>(c) * tid / nt);
    const int j1 = static_cast<int>(static_cast<int64_t>(c) * (tid + 1) / nt);
    for (int64_t r = 0; r < static_cast<int64_t>(b) * t; ++r) {
      const float* g = dout + r * c;
      float* pe = dwpe + (r % t) * c;
      for (int j = j0; j < j1; ++j) pe[j] += g[j];
      const int64_t row = static_cast<int64_t>(tokens[r]) - lo;
      if (row < 0 || row >= valid) continue;
      float* we = dwte_shard + row * c;
      for (int j = j0; j < j1; ++j) we[j] += g[j];
    }
  }
}

template <typename T>
void ShardRowMax(float* mx, const T* logits, int64_t n, int v, int valid) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* row = logits + i * v;
    float m = -INFINITY;
    for (int j = 0; j < valid; ++j) {
      const float x = ToFloat(row[j]);
      m = x > m ? x : m;
    }
    mx[i] = m;
  }
}

template <typename T>
void ShardSumExpAndTarget(float* sum_exp, float* target, const T* logits, const float* mx,
                          const int32_t* targets, int64_t lo, int64_t n, int v, int valid) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const T* row = logits + i * v;
    const float m = mx[i];
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < valid; ++j) sum += FastExp(ToFloat(row[j]) - m);
    sum_exp[i] = sum;
    const int64_t col = static_cast<int64_t>(targets[i]) - lo;
    target[i] = col >= 0 && col < valid ? ToFloat(row[col]) - m : 0.f;
  }
}

template <typename T>
double ShardCrossEntropyFinish(T* logits, float* losses, const float* mx, const float* sum_exp,
                               const float* target, const int32_t* targets, int64_t lo, int64_t n,
                               int v, int valid, float dloss) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    losses[i] = std::log(sum_exp[i]) - target[i];
    if (dloss == 0.f) continue;
    T* row = logits + i * v;
    const float m = mx[i];
    const float inv = 1.f / sum_exp[i];
    const int64_t tgt = static_cast<int64_t>(targets[i]) - lo;
    for (int j = 0; j < valid; ++j) {
      const float g = FastExp(ToFloat(row[j]) - m) * inv - (j == tgt ? 1.f : 0.f);
      row[j] = FromFloat<T>(g * dloss);
    }
    for (int j = valid; j < v; ++j) row[j] = FromFloat<T>(0.f);
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += losses[i];
  return total;
}

#define STRATA_INSTANTIATE(T)                                                                      \
  template void VocabShardEmbeddingForward<T>(float*, const int32_t*, const T*, int64_t, int,      \
                                              int64_t, int);                                       \
  template void AddPositionEmbedding<T>(float*, const T*, int, int, int);                          \
  template void ShardRowMax<T>(float*, const T*, int64_t, int, int);                               \
  template void ShardSumExpAndTarget<T>(float*, float*, const T*, const float*, const int32_t*,    \
                                        int64_t, int64_t, int, int);                               \
  template double ShardCrossEntropyFinish<T>(T*, float*, const float*, const float*, const float*, \
                                             const int32_t*, int64_t, int64_t, int, int, float);
STRATA_INSTANTIATE(float)
STRATA_INSTANTIATE(bf16)
STRATA_INSTANTIATE(f16)
#undef STRATA_INSTANTIATE

}  // namespace strata::model
