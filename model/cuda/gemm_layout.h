// Host-side planning for CudaBlas (matmul_cuda.h), kept free of CUDA types so that it is tested on
// machines without a GPU (tests/cuda/matmul_test.cc): the row-major -> column-major mapping of a
// GEMM and the argument checks of the linear-layer launchers.
//
// cuBLASLt is column-major. A row-major matrix X[r, c] with row stride ld is, read column-major,
// the matrix X^T[c, r] with leading dimension ld, so the row-major product C = op(A) op(B) is
// computed as the column-major product C^T = op(B)^T op(A)^T: the operands swap places, each keeps
// its transpose flag, and m and n swap.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "model/dtype.h"

namespace strata::model {

// A column-major GEMM D[m, n] = op(A)[m, k] · op(B)[k, n] as cuBLASLt takes it. *_rows, *_cols and
// ld* describe each matrix as stored (before op), the way cublasLtMatrixLayoutCreate wants them.
// A is the row-major call's B and B is its A; D is its C.
struct ColumnMajorGemm {
  bool trans_a = false;  // op on A (the row-major B)
  bool trans_b = false;  // op on B (the row-major A)
  int64_t m = 0, n = 0, k = 0;
  int64_t a_rows = 0, a_cols = 0, lda = 0;
  int64_t b_rows = 0, b_cols = 0, ldb = 0;
  int64_t d_rows = 0, d_cols = 0, ldd = 0;
};

// Maps the row-major C[m, n] = op(A)[m, k] · op(B)[k, n] (A stored [m, k], or [k, m] when trans_a,
// with row stride lda; likewise B; C with row stride ldc) onto ColumnMajorGemm. INVALID_ARGUMENT
// for a negative size or a row stride shorter than the stored row (or < 1).
Result<ColumnMajorGemm> MapRowMajorGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                        int64_t lda, int64_t ldb, int64_t ldc);

// A row-major GEMM's shape, the arguments of MapRowMajorGemm.
struct RowMajorGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
};
Result<ColumnMajorGemm> MapRowMajorGemm(const RowMajorGemm& g);

// The GEMMs of a linear layer (w[oc, c] stored like nn.Linear), as CudaBlas runs them:
//   forward  out[n, oc]  = inp[n, c] · w^T     A = inp,  B = w,   C = out
//   dinp     dinp[n, c]  = dout[n, oc] · w     A = dout, B = w,   C = dinp
//   dw       dw[oc, c]  += dout^T · inp        A = dout, B = inp, C = dw
RowMajorGemm LinearForwardGemm(int64_t n, int c, int oc);
RowMajorGemm LinearDinpGemm(int64_t n, int c, int oc);
RowMajorGemm LinearDwGemm(int64_t n, int c, int oc);

// True when the forward pass can fuse GELU into the GEMM (cuBLASLt's GELU_AUX epilogues need the
// pre-activation's leading dimension, here oc, to be a multiple of 8); otherwise CudaBlas runs
// the GEMM with the bias epilogue and then the GELU kernel (CudaGeluForwardT).
bool CanFuseGeluEpilogue(int oc);

// Argument checks of CudaBlas::Forward / Backward / Gemm (same arguments; the stream is not
// looked at). INVALID_ARGUMENT for negative sizes, a null pointer that the call would read or
// write, gelu_out == out, or an unknown dtype; UNIMPLEMENTED for a contraction over zero elements
// (c == 0 / k == 0) with a non-empty output, except where the result is trivial (documented in
// matmul_cuda.cc). OK says only that the arguments are acceptable (including empty work).
Status CheckLinearForwardArgs(const void* out, const void* gelu_out, const void* inp, const void* w,
                              int64_t n, int c, int oc, DType dtype);
Status CheckLinearBackwardArgs(const void* dinp, const float* dw, const void* dout, const void* inp,
                               const void* w, int64_t n, int c, int oc, DType dtype);
Status CheckGemmArgs(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda,
                     const void* b, int ldb, float beta, const void* c, int ldc, DType dtype);

}  // namespace strata::model
