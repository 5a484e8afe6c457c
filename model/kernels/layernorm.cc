#include "model/kernels/layernorm.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "model/dtype.h"
#include "model/kernels/scratch.h"

namespace strata::model {

template <typename T>
void LayerNormForward(T* out, float* mean, float* rstd, const float* inp, const T* w, const T* b,
                      int64_t n, int c) {
  float* wf = ThreadScratch(0, 2 * static_cast<size_t>(c));
  float* bf = wf + c;
  ConvertToFloat(wf, w, c);
  ConvertToFloat(bf, b, c);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const float* x = inp + i * c;
    float m = 0.f;
#pragma omp simd reduction(+ : m)
    for (int j = 0; j < c; ++j) m += x[j];
    m /= static_cast<float>(c);
    float v = 0.f;
#pragma omp simd reduction(+ : v)
    for (int j = 0; j < c; ++j) {
      const float d = x[j] - m;
      v += d * d;
    }
    v /= static_cast<float>(c);
    const float s = 1.f / std::sqrt(v + kLayerNormEps);
    T* y = out + i * c;
#pragma omp simd
    for (int j = 0; j < c; ++j) y[j] = FromFloat<T>((x[j] - m) * s * wf[j] + bf[j]);
    mean[i] = m;
    rstd[i] = s;
  }
}

template <typename T>
void LayerNormBackward(float* dinp, float* dw, float* db, const T* dout, const float* inp,
                       const T* w, const float* mean, const float* rstd, int64_t n, int c) {
  float* wf = ThreadScratch(0, c);
  ConvertToFloat(wf, w, c);
  const int nthreads = omp_get_max_threads();
  // Per-thread partial sums of dw and db, reduced in thread order: deterministic for a given
  // thread count.
  std::vector<float> partial(static_cast<size_t>(nthreads) * 2 * c, 0.f);
#pragma omp parallel
  {
    const int tid = omp_get_thread_num();
    float* pdw = partial.data() + static_cast<size_t>(tid) * 2 * c;
    float* pdb = pdw + c;
    float* dy = ThreadScratch(5, c);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float* x = inp + i * c;
      const T* g = dout + i * c;
      const float m = mean[i], s = rstd[i];
      float dnorm_mean = 0.f, dnorm_norm_mean = 0.f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
      for (int j = 0; j < c; ++j) {
        dy[j] = ToFloat(g[j]);
        const float norm = (x[j] - m) * s;
        const float dnorm = wf[j] * dy[j];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * norm;
      }
      dnorm_mean /= static_cast<float>(c);
      dnorm_norm_mean /= static_cast<float>(c);
      float* dx = dinp + i * c;
#pragma omp simd
      for (int j = 0; j < c; ++j) {
        const float norm = (x[j] - m) * s;
        const float dnorm = wf[j] * dy[j];
        pdb[j] += dy[j];
        pdw[j] += norm * dy[j];
        dx[j] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
      }
    }
  }
  for (int t = 0; t < nthreads; ++t) {
    const float* pdw = partial.data() + static_cast<size_t>(t) * 2 * c;
    const float* pdb = pdw + c;
    for (int j = 0; j < c; ++j) {
      dw[j] += pdw[j];
      db[j] += pdb[j];
    }
  }
}

#define STRATA_INSTANTIATE(T)                                                                      \
  template void LayerNormForward<T>(T*, float*, float*, const float*, const T*, const T*, int64_t, \
                                    int);                                                          \
  template void LayerNormBackward<T>(float*, float*, float*, const T*, const float*, const T*,     \
                                     const float*, const float*, int64_t, int);
STRATA_INSTANTIATE(float)
STRATA_INSTANTIATE(bf16)
STRATA_INSTANTIATE(f16)
#undef STRATA_INSTANTIATE

}  // namespace strata::model
