// Linear layer: out[N, OC] = inp[N, C] · w[OC, C]^T + bias[OC]  (w stored like nn.Linear).
//
// fp32 operands go straight to OpenBLAS cblas_sgemm. bf16/f16 operands are converted to fp32 in
// tiles of rows (fp32 accumulate) and the result rounded back to T.
// Gradients: dinp is overwritten (=), dw and dbias accumulate (+=) in fp32.
#pragma once

#include <cstdint>

namespace strata::model {

template <typename T>
void MatmulForward(T* out, const T* inp, const T* w, const T* bias, int64_t n, int c, int oc);

// dinp may be null (skip), dbias may be null (no bias).
template <typename T>
void MatmulBackward(T* dinp, float* dw, float* dbias, const T* dout, const T* inp, const T* w,
                    int64_t n, int c, int oc);

// Plain fp32 GEMM used by attention and benchmarks: C[m,n] = alpha * op(A) op(B) + beta * C,
// row-major, op = transpose when trans_* is true.
void Sgemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, int lda,
           const float* b, int ldb, float beta, float* c, int ldc);

}  // namespace strata::model
