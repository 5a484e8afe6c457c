#include "model/cuda/gemm_layout.h"

#include <algorithm>
#include <string>

namespace strata::model {
namespace {

std::string Dims(int64_t n, int64_t c, int64_t oc) {
  return "n = " + std::to_string(n) + ", c = " + std::to_string(c) + ", oc = " + std::to_string(oc);
}

bool KnownDType(DType dtype) {
  return dtype == DType::kF32 || dtype == DType::kBF16 || dtype == DType::kF16;
}

Status CheckDType(const char* op, DType dtype) {
  if (!KnownDType(dtype)) {
    return InvalidArgument(std::string(op) + ": unknown dtype " +
                           std::to_string(static_cast<int>(dtype)));
  }
  return Status::Ok();
}

}  // namespace

Result<ColumnMajorGemm> MapRowMajorGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                        int64_t lda, int64_t ldb, int64_t ldc) {
  if (m < 0 || n < 0 || k < 0) {
    return InvalidArgument("GEMM: negative size (m = " + std::to_string(m) +
                           ", n = " + std::to_string(n) + ", k = " + std::to_string(k) + ")");
  }
  // Stored row lengths of the row-major operands.
  const int64_t a_row = trans_a ? m : k;  // A stored [k, m] when transposed, else [m, k]
  const int64_t b_row = trans_b ? k : n;  // B stored [n, k] when transposed, else [k, n]
  if (lda < std::max<int64_t>(1, a_row) || ldb < std::max<int64_t>(1, b_row) ||
      ldc < std::max<int64_t>(1, n)) {
    return InvalidArgument("GEMM: row stride shorter than the row (lda = " + std::to_string(lda) +
                           " for rows of " + std::to_string(a_row) +
                           ", ldb = " + std::to_string(ldb) + " for rows of " +
                           std::to_string(b_row) + ", ldc = " + std::to_string(ldc) +
                           " for rows of " + std::to_string(n) + ")");
  }
  ColumnMajorGemm g;
  g.m = n;
  g.n = m;
  g.k = k;
  // A (column-major) is the row-major B read column-major: stored B[k, n] reads as [n, k] (op N
  // gives the wanted [n, k]); stored B[n, k] reads as [k, n] and needs op T.
  g.trans_a = trans_b;
  g.a_rows = b_row;
  g.a_cols = trans_b ? n : k;
  g.lda = ldb;
  // B (column-major) is the row-major A: stored A[m, k] reads as [k, m] (op N); stored A[k, m]
  // reads as [m, k] (op T).
  g.trans_b = trans_a;
  g.b_rows = a_row;
  g.b_cols = trans_a ? k : m;
  g.ldb = lda;
  // D is C^T: [n, m] with leading dimension ldc.
  g.d_rows = n;
  g.d_cols = m;
  g.ldd = ldc;
  return g;
}

Result<ColumnMajorGemm> MapRowMajorGemm(const RowMajorGemm& g) {
  return MapRowMajorGemm(g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc);
}

RowMajorGemm LinearForwardGemm(int64_t n, int c, int oc) {
  return RowMajorGemm{false, true, n, oc, c, c, c, oc};
}

RowMajorGemm LinearDinpGemm(int64_t n, int c, int oc) {
  return RowMajorGemm{false, false, n, c, oc, oc, c, c};
}

RowMajorGemm LinearDwGemm(int64_t n, int c, int oc) {
  return RowMajorGemm{true, false, oc, c, n, oc, c, c};
}

bool CanFuseGeluEpilogue(int oc) { return oc > 0 && oc % 8 == 0; }

Status CheckLinearForwardArgs(const void* out, const void* gelu_out, const void* inp, const void* w,
                              int64_t n, int c, int oc, DType dtype) {
  const char* op = "CudaBlas::Forward";
  RETURN_IF_ERROR(CheckDType(op, dtype));
  if (n < 0 || c < 0 || oc < 0) {
    return InvalidArgument(std::string(op) + ": negative size (" + Dims(n, c, oc) + ")");
  }
  if (n == 0 || oc == 0) return Status::Ok();
  if (out == nullptr || (c > 0 && (inp == nullptr || w == nullptr))) {
    return InvalidArgument(std::string(op) + ": null device pointer (" + Dims(n, c, oc) + ")");
  }
  if (gelu_out != nullptr && gelu_out == out) {
    return InvalidArgument(std::string(op) +
                           ": gelu_out must not alias out (out keeps the pre-activation)");
  }
  if (c == 0) {
    return Unimplemented(std::string(op) + ": c == 0 (the output would be the bias alone)");
  }
  return Status::Ok();
}

Status CheckLinearBackwardArgs(const void* dinp, const float* dw, const void* dout, const void* inp,
                               const void* w, int64_t n, int c, int oc, DType dtype) {
  const char* op = "CudaBlas::Backward";
  RETURN_IF_ERROR(CheckDType(op, dtype));
  if (n < 0 || c < 0 || oc < 0) {
    return InvalidArgument(std::string(op) + ": negative size (" + Dims(n, c, oc) + ")");
  }
  if (n == 0) return Status::Ok();
  const bool gemms = c > 0 && oc > 0;
  if ((oc > 0 && dout == nullptr) || (gemms && (dw == nullptr || inp == nullptr)) ||
      (gemms && dinp != nullptr && w == nullptr)) {
    return InvalidArgument(std::string(op) + ": null device pointer (" + Dims(n, c, oc) + ")");
  }
  return Status::Ok();
}

Status CheckGemmArgs(bool trans_a, bool trans_b, int m, int n, int k, const void* a, int lda,
                     const void* b, int ldb, float beta, const void* c, int ldc, DType dtype) {
  const char* op = "CudaBlas::Gemm";
  RETURN_IF_ERROR(CheckDType(op, dtype));
  if (m < 0 || n < 0 || k < 0) {
    return InvalidArgument(std::string(op) + ": negative size (m = " + std::to_string(m) +
                           ", n = " + std::to_string(n) + ", k = " + std::to_string(k) + ")");
  }
  if (m == 0 || n == 0) return Status::Ok();
  Result<ColumnMajorGemm> mapped = MapRowMajorGemm(trans_a, trans_b, m, n, k, lda, ldb, ldc);
  if (!mapped.ok()) return mapped.status().WithContext(op);
  if (c == nullptr || (k > 0 && (a == nullptr || b == nullptr))) {
    return InvalidArgument(std::string(op) + ": null device pointer");
  }
  if (k == 0 && beta != 0.f && beta != 1.f) {
    return Unimplemented(std::string(op) + ": k == 0 with beta = " + std::to_string(beta) +
                         " (only 0 and 1 are supported without a product)");
  }
  return Status::Ok();
}

}  // namespace strata::model
