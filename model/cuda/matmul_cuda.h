// Linear layers on the GPU through cuBLASLt (tensor cores for bf16/fp16, fp32 accumulate);
// CPU reference model/kernels/matmul.h: out[N, OC] = inp[N, C] · w[OC, C]^T + bias[OC], w stored
// like nn.Linear, row-major. Conventions: ops_common.h. fp32 operands use TF32 only when
// `allow_tf32` (default off, so fp32 runs compare tightly with the CPU).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "model/cuda/ops_common.h"

namespace strata::model {

class CudaBlas {
 public:
  // Creates a cuBLASLt handle and a workspace of `workspace_bytes` device memory.
  // UNAVAILABLE when there is no device.
  static Result<std::unique_ptr<CudaBlas>> Create(size_t workspace_bytes = 32u << 20,
                                                  bool allow_tf32 = false);
  virtual ~CudaBlas() = default;

  // out (T) = inp (T) · w^T (T) + bias (T, may be null). When gelu_out != nullptr the GELU
  // epilogue is fused: `out` receives the pre-activation and gelu_out = gelu(out) (both T).
  virtual Status Forward(void* out, void* gelu_out, const void* inp, const void* w,
                         const void* bias, int64_t n, int c, int oc, DType dtype, void* stream) = 0;

  // dinp (T, overwritten; null: skip) = dout · w; dw (fp32, += ) = dout^T · inp; dbias (fp32,
  // +=, null: no bias) = column sums of dout. dout, inp, w are T.
  virtual Status Backward(void* dinp, float* dw, float* dbias, const void* dout, const void* inp,
                          const void* w, int64_t n, int c, int oc, DType dtype, void* stream) = 0;

  // Plain row-major GEMM for benchmarks and tests: C[m, n] (T) = alpha op(A) op(B) + beta C,
  // op = transpose when trans_*; A, B, C in `dtype`, fp32 accumulate.
  virtual Status Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const void* a,
                      int lda, const void* b, int ldb, float beta, void* c, int ldc, DType dtype,
                      void* stream) = 0;
};

// Counters of a CudaBlas made by CudaBlas::Create (all zero for any other implementation).
// A plan (descriptors, layouts and the heuristic's algorithm) is cached per GEMM shape, dtype,
// epilogue and operand alignment, so after the first training step heuristic_queries stops
// growing.
struct CudaBlasStats {
  int64_t heuristic_queries = 0;  // cublasLtMatmulAlgoGetHeuristic calls (plan cache misses)
  int64_t cached_plans = 0;
  int64_t matmuls = 0;  // cublasLtMatmul calls queued
};
CudaBlasStats GetCudaBlasStats(const CudaBlas& blas);

}  // namespace strata::model
