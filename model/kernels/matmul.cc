#include "model/kernels/matmul.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "model/dtype.h"
#include "model/kernels/scratch.h"

namespace strata::model {
namespace {

// Rows per conversion tile for low-precision operands.
constexpr int64_t kTileRows = 256;

// y[c] += sum over rows of x[n, c]. Each thread sums a contiguous block of rows (row-major,
// vectorised), then the partial sums are added in thread order: deterministic for a given
// thread count.
template <typename T>
void ColumnSumAccumulate(float* y, const T* x, int64_t n, int c) {
  const int nt = omp_get_max_threads();
  std::vector<float> partial(static_cast<size_t>(nt) * c, 0.f);
#pragma omp parallel
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    float* p = partial.data() + static_cast<size_t>(tid) * c;
    for (int64_t i = n * tid / nth; i < n * (tid + 1) / nth; ++i) {
      const T* row = x + i * c;
#pragma omp simd
      for (int j = 0; j < c; ++j) p[j] += ToFloat(row[j]);
    }
  }
  for (int t = 0; t < nt; ++t) {
    for (int j = 0; j < c; ++j) y[j] += partial[static_cast<size_t>(t) * c + j];
  }
}

void FillRows(float* out, const float* bias, int64_t n, int oc) {
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) std::copy(bias, bias + oc, out + i * oc);
}

}  // namespace

void Sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

template <typename T>
void MatmulForward(T* out, const T* inp, const T* w, const T* bias, int64_t n, int c, int oc) {
  if constexpr (std::is_same_v<T, float>) {
    float beta = 0.f;
    if (bias != nullptr) {
      FillRows(out, bias, n, oc);
      beta = 1.f;
    }
    Sgemm(false, true, static_cast<int>(n), oc, c, 1.f, inp, c, w, c, beta, out, oc);
  } else {
    float* wf = ThreadScratch(0, static_cast<size_t>(oc) * c);
    ConvertToFloat(wf, w, static_cast<size_t>(oc) * c);
    float* bf = nullptr;
    if (bias != nullptr) {
      bf = ThreadScratch(1, oc);
      ConvertToFloat(bf, bias, oc);
    }
    float* xin = ThreadScratch(2, kTileRows * c);
    float* xout = ThreadScratch(3, kTileRows * oc);
    for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
      const int64_t rows = std::min(kTileRows, n - r0);
      ConvertToFloat(xin, inp + r0 * c, rows * c);
      float beta = 0.f;
      if (bf != nullptr) {
        FillRows(xout, bf, rows, oc);
        beta = 1.f;
      }
      Sgemm(false, true, static_cast<int>(rows), oc, c, 1.f, xin, c, wf, c, beta, xout, oc);
      ConvertFromFloat(out + r0 * oc, xout, rows * oc);
    }
  }
}

template <typename T>
void MatmulBackward(T* dinp, float* dw, float* dbias, const T* dout, const T* inp, const T* w,
                    int64_t n, int c, int oc) {
  if constexpr (std::is_same_v<T, float>) {
    if (dinp != nullptr)
      Sgemm(false, false, static_cast<int>(n), c, oc, 1.f, dout, oc, w, c, 0.f, dinp, c);
    Sgemm(true, false, oc, c, static_cast<int>(n), 1.f, dout, oc, inp, c, 1.f, dw, c);
    if (dbias != nullptr) ColumnSumAccumulate(dbias, dout, n, oc);
  } else {
    float* wf = ThreadScratch(0, static_cast<size_t>(oc) * c);
    if (dinp != nullptr) ConvertToFloat(wf, w, static_cast<size_t>(oc) * c);
    float* xin = ThreadScratch(2, kTileRows * c);
    float* dy = ThreadScratch(3, kTileRows * oc);
    float* dx = ThreadScratch(4, kTileRows * c);
    for (int64_t r0 = 0; r0 < n; r0 += kTileRows) {
      const int rows = static_cast<int>(std::min(kTileRows, n - r0));
      ConvertToFloat(dy, dout + r0 * oc, static_cast<size_t>(rows) * oc);
      ConvertToFloat(xin, inp + r0 * c, static_cast<size_t>(rows) * c);
      if (dinp != nullptr) {
        Sgemm(false, false, rows, c, oc, 1.f, dy, oc, wf, c, 0.f, dx, c);
        ConvertFromFloat(dinp + r0 * c, dx, static_cast<size_t>(rows) * c);
      }
      Sgemm(true, false, oc, c, rows, 1.f, dy, oc, xin, c, 1.f, dw, c);
      if (dbias != nullptr) ColumnSumAccumulate(dbias, dy, rows, oc);
    }
  }
}

#define STRATA_INSTANTIATE(T)                                                                     \
  template void MatmulForward<T>(T*, const T*, const T*, const T*, int64_t, int, int);            \
  template void MatmulBackward<T>(T*, float*, float*, const T*, const T*, const T*, int64_t, int, \
                                  int);
STRATA_INSTANTIATE(float)
STRATA_INSTANTIATE(bf16)
STRATA_INSTANTIATE(f16)
#undef STRATA_INSTANTIATE

}  // namespace strata::model
