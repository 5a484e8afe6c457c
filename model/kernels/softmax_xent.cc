#include "model/kernels/softmax_xent.h"

#include <cmath>

#include "model/dtype.h"
#include "model/kernels/fast_math.h"
#include "model/kernels/scratch.h"

namespace strata::model {

template <typename T>
double SoftmaxCrossEntropy(T* logits, float* losses, const int32_t* targets, int64_t n, int v,
                           float dloss) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    T* row = logits + i * v;
    float* x = ThreadScratch(0, v);
    float mx = -INFINITY;
    for (int j = 0; j < v; ++j) {
      x[j] = ToFloat(row[j]);
      mx = x[j] > mx ? x[j] : mx;
    }
    const int tgt = targets[i];
    const float shifted_target = x[tgt] - mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < v; ++j) {
      x[j] = FastExp(x[j] - mx);
      sum += x[j];
    }
    losses[i] = std::log(sum) - shifted_target;
    if (dloss != 0.f) {
      const float inv = 1.f / sum;
      for (int j = 0; j < v; ++j) {
        const float g = x[j] * inv - (j == tgt ? 1.f : 0.f);
        row[j] = FromFloat<T>(g * dloss);
      }
    }
  }
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += losses[i];
  return total;
}

template double SoftmaxCrossEntropy<float>(float*, float*, const int32_t*, int64_t, int, float);
template double SoftmaxCrossEntropy<bf16>(bf16*, float*, const int32_t*, int64_t, int, float);
template double SoftmaxCrossEntropy<f16>(f16*, float*, const int32_t*, int64_t, int, float);

}  // namespace strata::model
