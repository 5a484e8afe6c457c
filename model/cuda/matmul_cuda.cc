// Linear layers and GEMMs through cuBLASLt; contract in matmul_cuda.h, the row-major ->
// column-major mapping and argument checks in gemm_layout.h.
//
// Every row-major product is run as its column-major transpose (gemm_layout.h):
// - forward out[N, OC] = inp[N, C] · w[OC, C]^T is out^T = op_T(w) · inp^T (m = OC, n = N, k = C);
// - dinp[N, C] = dout[N, OC] · w[OC, C] is dinp^T = w^T · dout^T (m = C, n = N, k = OC);
// - dw[OC, C] += dout^T · inp[N, C] is dw^T += inp^T · op_T(dout^T) (m = C, n = OC, k = N).
//
// Types: bf16/fp16 GEMMs use CUBLAS_COMPUTE_32F (fp32 accumulate, tensor cores) with A, B, C, D
// in T; fp32 GEMMs use CUBLAS_COMPUTE_32F (no TF32) unless the handle was made with allow_tf32,
// then CUBLAS_COMPUTE_32F_FAST_TF32. The weight gradient runs with A, B in T and C = D = dw in
// fp32, beta = 1 (a mixed-precision combination cuBLASLt lists for CUBLAS_COMPUTE_32F), so it
// accumulates in place without a temporary.
//
// Epilogues: the bias is added by CUBLASLT_EPILOGUE_BIAS (bias in T, broadcast over the N
// columns of out^T). With gelu_out, CUBLASLT_EPILOGUE_GELU_AUX_BIAS writes D = gelu(x + bias) and
// stores its input x + bias through the aux pointer, so D is `gelu_out` and the aux matrix is
// `out` (ld = OC, which cuBLASLt wants a multiple of 8; other OC, and shapes for which the
// heuristic offers no fused algorithm, run the bias GEMM and then CudaGeluForwardT). cuBLASLt's
// documentation names the epilogue only "GELU"; the transformer libraries built on it use it as the
// tanh approximation, which is what our CPU kernels compute, and tests/cuda/matmul_test.cc checks
// on the GPU that the result is closer to the tanh form than to the erf form. The bias gradient is
// not taken from CUBLASLT_EPILOGUE_BGRADB: that epilogue overwrites instead of accumulating, so
// CudaBiasBackward (elementwise_cuda.h, fixed summation order) adds the column sums to dbias.
//
// Plans: descriptors, layouts and the heuristic's first algorithm are cached per (shape, strides,
// types, compute type, epilogue, pointer alignments), so a training step queries the heuristic
// only the first time it meets a GEMM. The algorithm is fixed per plan, so results are bitwise
// repeatable on the same GPU. One workspace serves every call: calls must not run concurrently on
// different streams (one CudaBlas per stream); the host-side state is guarded by a mutex.
#include "model/cuda/matmul_cuda.h"

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/cuda_status.h"
#include "model/cuda/elementwise_cuda.h"
#include "model/cuda/gemm_layout.h"

namespace strata::model {
namespace {

using cuda_util::FromCuda;

Status FromCublas(cublasStatus_t st, const std::string& what) {
  if (st == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  const std::string msg =
      what + ": " + cublasLtGetStatusName(st) + " (" + cublasLtGetStatusString(st) + ")";
  switch (st) {
    case CUBLAS_STATUS_ALLOC_FAILED:
      return ResourceExhausted(msg);
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return Unimplemented(msg);
    default:
      return Internal(msg);
  }
}

cudaDataType_t CudaDataType(DType t) {
  switch (t) {
    case DType::kBF16:
      return CUDA_R_16BF;
    case DType::kF16:
      return CUDA_R_16F;
    case DType::kF32:
      break;
  }
  return CUDA_R_32F;
}

enum class Epilogue : int { kDefault, kBias, kGeluAux, kGeluAuxBias };

cublasLtEpilogue_t ToCublas(Epilogue e) {
  switch (e) {
    case Epilogue::kBias:
      return CUBLASLT_EPILOGUE_BIAS;
    case Epilogue::kGeluAux:
      return CUBLASLT_EPILOGUE_GELU_AUX;
    case Epilogue::kGeluAuxBias:
      return CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    case Epilogue::kDefault:
      break;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

const char* EpilogueName(Epilogue e) {
  switch (e) {
    case Epilogue::kBias:
      return "bias";
    case Epilogue::kGeluAux:
      return "gelu_aux";
    case Epilogue::kGeluAuxBias:
      return "gelu_aux_bias";
    case Epilogue::kDefault:
      break;
  }
  return "default";
}

bool UsesBias(Epilogue e) { return e == Epilogue::kBias || e == Epilogue::kGeluAuxBias; }
bool UsesAux(Epilogue e) { return e == Epilogue::kGeluAux || e == Epilogue::kGeluAuxBias; }

// The largest power of two, up to 256, that divides the address (256 for nullptr). Algorithms
// are chosen for the operands' alignment, so it is part of the plan key.
uint32_t AlignmentOf(const void* p) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && addr % align != 0) align /= 2;
  return align;
}

// One cublasLtMatmul: D = alpha op(A) op(B) + beta C with C = D (in place), column-major.
struct GemmCall {
  ColumnMajorGemm g;
  const void* a = nullptr;
  const void* b = nullptr;
  void* d = nullptr;
  DType ab_type = DType::kF32;
  DType cd_type = DType::kF32;
  float alpha = 1.f;
  float beta = 0.f;
  Epilogue epilogue = Epilogue::kDefault;
  const void* bias = nullptr;  // T, length g.d_rows (kBias, kGeluAuxBias)
  void* aux = nullptr;         // T, like D with leading dimension aux_ld (kGeluAux*)
  int64_t aux_ld = 0;
};

std::string Describe(const GemmCall& call) {
  const ColumnMajorGemm& g = call.g;
  return std::string("column-major m = ") + std::to_string(g.m) + ", n = " + std::to_string(g.n) +
         ", k = " + std::to_string(g.k) + (g.trans_a ? ", A^T" : "") + (g.trans_b ? ", B^T" : "") +
         ", A/B " + DTypeName(call.ab_type) + ", C/D " + DTypeName(call.cd_type) + ", epilogue " +
         EpilogueName(call.epilogue);
}

using PlanKey = std::array<int64_t, 25>;

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    uint64_t h = 1469598103934665603ull;  // FNV-1a over the 64-bit fields
    for (int64_t v : key) {
      h ^= static_cast<uint64_t>(v);
      h *= 1099511628211ull;
    }
    return static_cast<size_t>(h);
  }
};

// Descriptors and the chosen algorithm for one GEMM configuration. C and D share a layout.
struct Plan {
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (desc != nullptr) (void)cublasLtMatmulDescDestroy(desc);
    if (a != nullptr) (void)cublasLtMatrixLayoutDestroy(a);
    if (b != nullptr) (void)cublasLtMatrixLayoutDestroy(b);
    if (cd != nullptr) (void)cublasLtMatrixLayoutDestroy(cd);
  }

  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr;
  cublasLtMatrixLayout_t b = nullptr;
  cublasLtMatrixLayout_t cd = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
    (void)cublasLtMatmulPreferenceDestroy(p);
  }
};

template <typename V>
Status SetDescAttr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const V& v,
                   const char* name) {
  return FromCublas(cublasLtMatmulDescSetAttribute(desc, attr, &v, sizeof(v)),
                    std::string("cublasLtMatmulDescSetAttribute(") + name + ")");
}

template <typename V>
Status SetPrefAttr(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                   const V& v, const char* name) {
  return FromCublas(cublasLtMatmulPreferenceSetAttribute(pref, attr, &v, sizeof(v)),
                    std::string("cublasLtMatmulPreferenceSetAttribute(") + name + ")");
}

class CudaBlasLt final : public CudaBlas {
 public:
  CudaBlasLt(cublasLtHandle_t handle, void* workspace, size_t workspace_bytes, bool allow_tf32)
      : handle_(handle),
        workspace_(workspace),
        workspace_bytes_(workspace_bytes),
        allow_tf32_(allow_tf32) {}

  ~CudaBlasLt() override {
    plans_.clear();
    if (workspace_ != nullptr) (void)cudaFree(workspace_);
    (void)cublasLtDestroy(handle_);
    (void)cudaGetLastError();
  }

  Status Forward(void* out, void* gelu_out, const void* inp, const void* w, const void* bias,
                 int64_t n, int c, int oc, DType dtype, void* stream) override {
    RETURN_IF_ERROR(CheckLinearForwardArgs(out, gelu_out, inp, w, n, c, oc, dtype));
    if (n == 0 || oc == 0) return Status::Ok();
    // Row-major out[n, oc] = inp[n, c] · w[oc, c]^T.
    ASSIGN_OR_RETURN(ColumnMajorGemm g, MapRowMajorGemm(LinearForwardGemm(n, c, oc)));
    GemmCall call;
    call.g = g;
    call.a = w;  // column-major A is the row-major B
    call.b = inp;
    call.ab_type = call.cd_type = dtype;
    call.bias = bias;
    if (gelu_out != nullptr && CanFuseGeluEpilogue(oc)) {
      GemmCall fused = call;
      fused.d = gelu_out;  // D = gelu(pre-activation) ...
      fused.aux = out;     // ... and the aux output is the pre-activation itself
      fused.aux_ld = oc;
      fused.epilogue = bias != nullptr ? Epilogue::kGeluAuxBias : Epilogue::kGeluAux;
      const Status st = Run(fused, stream);
      // UNIMPLEMENTED: cuBLASLt has no algorithm for the fused epilogue here (the answer is
      // cached); fall through to the GEMM + GELU kernel.
      if (st.code() != StatusCode::kUnimplemented) return st.WithContext("CudaBlas::Forward");
    }
    call.d = out;
    call.epilogue = bias != nullptr ? Epilogue::kBias : Epilogue::kDefault;
    RETURN_IF_ERROR(Run(call, stream).WithContext("CudaBlas::Forward"));
    if (gelu_out != nullptr) return CudaGeluForwardT(gelu_out, out, n * oc, dtype, stream);
    return Status::Ok();
  }

  Status Backward(void* dinp, float* dw, float* dbias, const void* dout, const void* inp,
                  const void* w, int64_t n, int c, int oc, DType dtype, void* stream) override {
    RETURN_IF_ERROR(CheckLinearBackwardArgs(dinp, dw, dout, inp, w, n, c, oc, dtype));
    if (n == 0) return Status::Ok();
    if (c > 0 && oc > 0) {
      if (dinp != nullptr) {
        // Row-major dinp[n, c] = dout[n, oc] · w[oc, c] (overwrite).
        ASSIGN_OR_RETURN(ColumnMajorGemm g, MapRowMajorGemm(LinearDinpGemm(n, c, oc)));
        GemmCall call;
        call.g = g;
        call.a = w;
        call.b = dout;
        call.d = dinp;
        call.ab_type = call.cd_type = dtype;
        RETURN_IF_ERROR(Run(call, stream).WithContext("CudaBlas::Backward (dinp)"));
      }
      // Row-major dw[oc, c] += dout^T[oc, n] · inp[n, c], in fp32.
      ASSIGN_OR_RETURN(ColumnMajorGemm g, MapRowMajorGemm(LinearDwGemm(n, c, oc)));
      GemmCall call;
      call.g = g;
      call.a = inp;
      call.b = dout;
      call.d = dw;
      call.ab_type = dtype;
      call.cd_type = DType::kF32;
      call.beta = 1.f;
      RETURN_IF_ERROR(Run(call, stream).WithContext("CudaBlas::Backward (dw)"));
    } else if (dinp != nullptr && c > 0) {
      // oc == 0: dinp is a product over nothing.
      RETURN_IF_ERROR(
          FromCuda(cudaMemsetAsync(dinp, 0, static_cast<size_t>(n) * c * DTypeSize(dtype),
                                   static_cast<cudaStream_t>(stream)),
                   "CudaBlas::Backward: zeroing dinp"));
    }
    if (dbias != nullptr && oc > 0) {
      RETURN_IF_ERROR(CudaBiasBackward(dbias, dout, n, oc, dtype, stream));
    }
    return Status::Ok();
  }

  Status Gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const void* a, int lda,
              const void* b, int ldb, float beta, void* c, int ldc, DType dtype,
              void* stream) override {
    RETURN_IF_ERROR(CheckGemmArgs(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc, dtype));
    if (m == 0 || n == 0) return Status::Ok();
    if (k == 0) {
      // C = beta C with beta 0 or 1 (CheckGemmArgs): zero the rows, or nothing to do.
      if (beta == 1.f) return Status::Ok();
      const size_t es = DTypeSize(dtype);
      return FromCuda(
          cudaMemset2DAsync(c, static_cast<size_t>(ldc) * es, 0, static_cast<size_t>(n) * es,
                            static_cast<size_t>(m), static_cast<cudaStream_t>(stream)),
          "CudaBlas::Gemm: zeroing C (k == 0)");
    }
    ASSIGN_OR_RETURN(ColumnMajorGemm g, MapRowMajorGemm(trans_a, trans_b, m, n, k, lda, ldb, ldc));
    GemmCall call;
    call.g = g;
    call.a = b;  // column-major A is the row-major B
    call.b = a;
    call.d = c;
    call.ab_type = call.cd_type = dtype;
    call.alpha = alpha;
    call.beta = beta;
    return Run(call, stream).WithContext("CudaBlas::Gemm");
  }

  CudaBlasStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    CudaBlasStats s;
    s.heuristic_queries = heuristic_queries_;
    for (const auto& [key, plan] : plans_) s.cached_plans += plan != nullptr ? 1 : 0;
    s.matmuls = matmuls_;
    return s;
  }

 private:
  cublasComputeType_t ComputeType(DType ab_type) const {
    if (ab_type == DType::kF32 && allow_tf32_) return CUBLAS_COMPUTE_32F_FAST_TF32;
    return CUBLAS_COMPUTE_32F;
  }

  PlanKey KeyFor(const GemmCall& call) const {
    const ColumnMajorGemm& g = call.g;
    return PlanKey{g.trans_a,
                   g.trans_b,
                   g.m,
                   g.n,
                   g.k,
                   g.a_rows,
                   g.a_cols,
                   g.lda,
                   g.b_rows,
                   g.b_cols,
                   g.ldb,
                   g.d_rows,
                   g.d_cols,
                   g.ldd,
                   static_cast<int64_t>(call.ab_type),
                   static_cast<int64_t>(call.cd_type),
                   static_cast<int64_t>(ComputeType(call.ab_type)),
                   static_cast<int64_t>(call.epilogue),
                   AlignmentOf(call.a),
                   AlignmentOf(call.b),
                   AlignmentOf(call.d),
                   UsesBias(call.epilogue) ? AlignmentOf(call.bias) : 0,
                   UsesAux(call.epilogue) ? AlignmentOf(call.aux) : 0,
                   UsesAux(call.epilogue) ? call.aux_ld : 0,
                   call.beta != 0.f};
  }

  // Builds the descriptors for `call` and asks the heuristic for its best algorithm. mu_ held.
  Result<std::unique_ptr<Plan>> MakePlan(const GemmCall& call) {
    const ColumnMajorGemm& g = call.g;
    auto plan = std::make_unique<Plan>();
    RETURN_IF_ERROR(
        FromCublas(cublasLtMatmulDescCreate(&plan->desc, ComputeType(call.ab_type), CUDA_R_32F),
                   "cublasLtMatmulDescCreate"));
    const cublasOperation_t op_a = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    RETURN_IF_ERROR(SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, op_a, "TRANSA"));
    RETURN_IF_ERROR(SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, op_b, "TRANSB"));
    const cublasLtEpilogue_t epilogue = ToCublas(call.epilogue);
    RETURN_IF_ERROR(SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue, "EPILOGUE"));
    // The heuristic looks at the bias / aux pointers' values for their alignment; Run sets them
    // again on every call.
    if (UsesBias(call.epilogue)) {
      RETURN_IF_ERROR(
          SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, call.bias, "BIAS_POINTER"));
    }
    if (UsesAux(call.epilogue)) {
      RETURN_IF_ERROR(SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, call.aux,
                                  "EPILOGUE_AUX_POINTER"));
      RETURN_IF_ERROR(SetDescAttr(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, call.aux_ld,
                                  "EPILOGUE_AUX_LD"));
    }
    RETURN_IF_ERROR(FromCublas(cublasLtMatrixLayoutCreate(&plan->a, CudaDataType(call.ab_type),
                                                          static_cast<uint64_t>(g.a_rows),
                                                          static_cast<uint64_t>(g.a_cols), g.lda),
                               "cublasLtMatrixLayoutCreate(A)"));
    RETURN_IF_ERROR(FromCublas(cublasLtMatrixLayoutCreate(&plan->b, CudaDataType(call.ab_type),
                                                          static_cast<uint64_t>(g.b_rows),
                                                          static_cast<uint64_t>(g.b_cols), g.ldb),
                               "cublasLtMatrixLayoutCreate(B)"));
    RETURN_IF_ERROR(FromCublas(cublasLtMatrixLayoutCreate(&plan->cd, CudaDataType(call.cd_type),
                                                          static_cast<uint64_t>(g.d_rows),
                                                          static_cast<uint64_t>(g.d_cols), g.ldd),
                               "cublasLtMatrixLayoutCreate(C/D)"));

    cublasLtMatmulPreference_t raw_pref = nullptr;
    RETURN_IF_ERROR(
        FromCublas(cublasLtMatmulPreferenceCreate(&raw_pref), "cublasLtMatmulPreferenceCreate"));
    std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter> pref(raw_pref);
    const uint64_t max_workspace = workspace_bytes_;
    RETURN_IF_ERROR(SetPrefAttr(pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, max_workspace,
                                "MAX_WORKSPACE_BYTES"));
    const uint32_t align_a = AlignmentOf(call.a), align_b = AlignmentOf(call.b),
                   align_d = AlignmentOf(call.d);
    RETURN_IF_ERROR(SetPrefAttr(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a,
                                "MIN_ALIGNMENT_A_BYTES"));
    RETURN_IF_ERROR(SetPrefAttr(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b,
                                "MIN_ALIGNMENT_B_BYTES"));
    RETURN_IF_ERROR(SetPrefAttr(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d,
                                "MIN_ALIGNMENT_C_BYTES"));
    RETURN_IF_ERROR(SetPrefAttr(pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d,
                                "MIN_ALIGNMENT_D_BYTES"));

    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    ++heuristic_queries_;
    RETURN_IF_ERROR(
        FromCublas(cublasLtMatmulAlgoGetHeuristic(handle_, plan->desc, plan->a, plan->b, plan->cd,
                                                  plan->cd, pref.get(), 1, &result, &returned),
                   "cublasLtMatmulAlgoGetHeuristic(" + Describe(call) + ")"));
    if (returned == 0 || result.state != CUBLAS_STATUS_SUCCESS) {
      return Unimplemented("cuBLASLt has no algorithm for " + Describe(call) + " with " +
                           std::to_string(workspace_bytes_) + " bytes of workspace");
    }
    plan->algo = result.algo;
    return plan;
  }

  Status Run(const GemmCall& call, void* stream) {
    std::lock_guard<std::mutex> lock(mu_);
    const PlanKey key = KeyFor(call);
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      Result<std::unique_ptr<Plan>> made = MakePlan(call);
      if (!made.ok()) {
        // "No algorithm" is remembered (a null plan) so that callers with a fallback do not
        // query the heuristic again every step; other errors are not.
        if (made.status().code() == StatusCode::kUnimplemented) plans_.emplace(key, nullptr);
        return made.status();
      }
      it = plans_.emplace(key, std::move(made).value()).first;
    }
    if (it->second == nullptr) {
      return Unimplemented("cuBLASLt has no algorithm for " + Describe(call) + " (cached answer)");
    }
    Plan& plan = *it->second;
    if (UsesBias(call.epilogue)) {
      RETURN_IF_ERROR(
          SetDescAttr(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, call.bias, "BIAS_POINTER"));
    }
    if (UsesAux(call.epilogue)) {
      RETURN_IF_ERROR(SetDescAttr(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, call.aux,
                                  "EPILOGUE_AUX_POINTER"));
    }
    RETURN_IF_ERROR(
        FromCublas(cublasLtMatmul(handle_, plan.desc, &call.alpha, call.a, plan.a, call.b, plan.b,
                                  &call.beta, call.d, plan.cd, call.d, plan.cd, &plan.algo,
                                  workspace_, workspace_bytes_, static_cast<cudaStream_t>(stream)),
                   "cublasLtMatmul(" + Describe(call) + ")"));
    ++matmuls_;
    return Status::Ok();
  }

  const cublasLtHandle_t handle_;
  void* const workspace_;
  const size_t workspace_bytes_;
  const bool allow_tf32_;

  mutable std::mutex mu_;
  // A null plan: the heuristic found no algorithm for that key. Guarded by mu_.
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans_;
  int64_t heuristic_queries_ = 0;  // mu_
  int64_t matmuls_ = 0;            // mu_
};

}  // namespace

Result<std::unique_ptr<CudaBlas>> CudaBlas::Create(size_t workspace_bytes, bool allow_tf32) {
  if (CudaDeviceCount() == 0) {
    return Status(StatusCode::kUnavailable, "CudaBlas::Create: no CUDA driver or device visible");
  }
  cublasLtHandle_t handle = nullptr;
  RETURN_IF_ERROR(FromCublas(cublasLtCreate(&handle), "cublasLtCreate"));
  void* workspace = nullptr;
  if (workspace_bytes > 0) {
    const Status st = FromCuda(
        cudaMalloc(&workspace, workspace_bytes),
        "CudaBlas::Create: cudaMalloc(" + std::to_string(workspace_bytes) + " bytes of workspace)");
    if (!st.ok()) {
      (void)cublasLtDestroy(handle);
      return st;
    }
  }
  return std::unique_ptr<CudaBlas>(new CudaBlasLt(handle, workspace, workspace_bytes, allow_tf32));
}

CudaBlasStats GetCudaBlasStats(const CudaBlas& blas) {
  const auto* lt = dynamic_cast<const CudaBlasLt*>(&blas);
  return lt != nullptr ? lt->stats() : CudaBlasStats{};
}

}  // namespace strata::model
