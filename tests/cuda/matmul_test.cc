// CudaBlas (model/cuda/matmul_cuda.h) against the CPU kernels of model/kernels/matmul.h.
//
// Without a GPU: the row-major -> column-major mapping (gemm_layout.h) is checked numerically by
// running the column-major GEMM it describes with a naive loop and comparing it with the CPU's
// row-major results, for the linear layer's three GEMMs and for Gemm with every transpose; plus
// the argument checks and Create's UNAVAILABLE.
//
// On a GPU, tolerances (|got - want| <= rel * |want| + abs * scale, where scale is the sum of the
// absolute values of the terms, |bias| included):
// - fp32 (TF32 off): rel 0, abs 1e-5. Both sides accumulate in fp32 in different orders; TF32
//   would miss this by far on the small shapes.
// - bf16 / fp16 outputs: rel = one ulp of the type (2^-7 / 2^-10; the two sides round slightly
//   different fp32 sums), abs 1e-5 (the products of T values are exact in fp32).
// - GELU output: the pre-activation's rounding passes through gelu' (<= 1.13), and cuBLASLt's
//   GELU has its own tanh: rel one ulp on |want| + 1.13 |x|, plus 1e-3 of the terms of the GELU
//   formula (0.5 |x| (1 + |tanh u|)). To tell the tanh form from the erf form (they differ by up
//   to 4.7e-4), the fused fp32 case also requires the result to be closer, in total, to the tanh
//   form than to the erf form of the GPU's own pre-activation.
// - Weight / bias gradients (fp32, accumulated onto a non-zero start): rel 0, abs 1e-5.
#include "model/kernels/matmul.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "model/cuda/device_cuda.h"
#include "model/cuda/gemm_layout.h"
#include "model/cuda/matmul_cuda.h"
#include "model/kernels/elementwise.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::Round;
using testing::ToDevice;
using testing::ToFloats;
using testing::ToHost;
using testing::UniformFloats;

// ---- a column-major GEMM by hand --------------------------------------------------------------

// D = alpha op(A) op(B) + beta D exactly as cuBLASLt would read ColumnMajorGemm: element (i, j)
// of a stored matrix X is X[i + j * ld]. Checks that the layouts agree with m, n, k first.
::testing::AssertionResult ColumnMajorReference(const ColumnMajorGemm& g, float alpha,
                                                const float* a, const float* b, float beta,
                                                float* d) {
  const int64_t op_a_rows = g.trans_a ? g.a_cols : g.a_rows;
  const int64_t op_a_cols = g.trans_a ? g.a_rows : g.a_cols;
  const int64_t op_b_rows = g.trans_b ? g.b_cols : g.b_rows;
  const int64_t op_b_cols = g.trans_b ? g.b_rows : g.b_cols;
  if (op_a_rows != g.m || op_a_cols != g.k || op_b_rows != g.k || op_b_cols != g.n ||
      g.d_rows != g.m || g.d_cols != g.n) {
    return ::testing::AssertionFailure() << "layouts disagree with m, n, k";
  }
  if (g.lda < std::max<int64_t>(1, g.a_rows) || g.ldb < std::max<int64_t>(1, g.b_rows) ||
      g.ldd < std::max<int64_t>(1, g.d_rows)) {
    return ::testing::AssertionFailure() << "leading dimension shorter than a column";
  }
  auto at = [&](int64_t i, int64_t p) { return g.trans_a ? a[p + i * g.lda] : a[i + p * g.lda]; };
  auto bt = [&](int64_t p, int64_t j) { return g.trans_b ? b[j + p * g.ldb] : b[p + j * g.ldb]; };
  for (int64_t j = 0; j < g.n; ++j) {
    for (int64_t i = 0; i < g.m; ++i) {
      double sum = 0;
      for (int64_t p = 0; p < g.k; ++p) sum += static_cast<double>(at(i, p)) * bt(p, j);
      float& out = d[i + j * g.ldd];
      out = static_cast<float>(alpha * sum + (beta == 0.f ? 0.0 : beta * out));
    }
  }
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult AllNear(const std::vector<float>& got, const std::vector<float>& want,
                                   double tol) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (size_t i = 0; i < got.size(); ++i) {
    if (!(std::fabs(got[i] - want[i]) <= tol * (1.0 + std::fabs(want[i])))) {
      return ::testing::AssertionFailure() << "[" << i << "] got " << got[i] << " want " << want[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(GemmLayoutTest, LinearForwardMapsOntoTheColumnMajorTranspose) {
  auto g = MapRowMajorGemm(LinearForwardGemm(7, 13, 9));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  // out^T[9, 7] = op_T(w stored col-major [13, 9]) · inp stored col-major [13, 7].
  EXPECT_TRUE(g->trans_a);
  EXPECT_FALSE(g->trans_b);
  EXPECT_EQ(g->m, 9);
  EXPECT_EQ(g->n, 7);
  EXPECT_EQ(g->k, 13);
  EXPECT_EQ(g->a_rows, 13);
  EXPECT_EQ(g->a_cols, 9);
  EXPECT_EQ(g->lda, 13);
  EXPECT_EQ(g->b_rows, 13);
  EXPECT_EQ(g->b_cols, 7);
  EXPECT_EQ(g->ldb, 13);
  EXPECT_EQ(g->d_rows, 9);
  EXPECT_EQ(g->d_cols, 7);
  EXPECT_EQ(g->ldd, 9);
}

class LinearLayoutTest : public ::testing::TestWithParam<std::tuple<int, int, int>> {};

// The exact mappings CudaBlas uses for the linear layer, run by hand in column-major order, agree
// with the CPU's MatmulForward / MatmulBackward.
TEST_P(LinearLayoutTest, ColumnMajorPlansReproduceTheCpuLinearLayer) {
  const auto [n, c, oc] = GetParam();
  const auto inp = UniformFloats(static_cast<size_t>(n) * c, -1.f, 1.f, 1);
  const auto w = UniformFloats(static_cast<size_t>(oc) * c, -1.f, 1.f, 2);
  const auto dout = UniformFloats(static_cast<size_t>(n) * oc, -1.f, 1.f, 3);
  std::vector<float> zero_bias(oc, 0.f);

  std::vector<float> out_cpu(static_cast<size_t>(n) * oc), out_cm(out_cpu.size());
  MatmulForward<float>(out_cpu.data(), inp.data(), w.data(), zero_bias.data(), n, c, oc);
  auto fwd = MapRowMajorGemm(LinearForwardGemm(n, c, oc));
  ASSERT_TRUE(fwd.ok());
  // Column-major A is the row-major B (w), column-major B the row-major A (inp).
  ASSERT_TRUE(ColumnMajorReference(*fwd, 1.f, w.data(), inp.data(), 0.f, out_cm.data()));
  EXPECT_TRUE(AllNear(out_cm, out_cpu, 1e-5));

  std::vector<float> dinp_cpu(static_cast<size_t>(n) * c), dinp_cm(dinp_cpu.size());
  std::vector<float> dw_cpu = UniformFloats(static_cast<size_t>(oc) * c, -1.f, 1.f, 4);
  std::vector<float> dw_cm = dw_cpu;
  MatmulBackward<float>(dinp_cpu.data(), dw_cpu.data(), nullptr, dout.data(), inp.data(), w.data(),
                        n, c, oc);
  auto dinp_g = MapRowMajorGemm(LinearDinpGemm(n, c, oc));
  auto dw_g = MapRowMajorGemm(LinearDwGemm(n, c, oc));
  ASSERT_TRUE(dinp_g.ok() && dw_g.ok());
  ASSERT_TRUE(ColumnMajorReference(*dinp_g, 1.f, w.data(), dout.data(), 0.f, dinp_cm.data()));
  ASSERT_TRUE(ColumnMajorReference(*dw_g, 1.f, inp.data(), dout.data(), 1.f, dw_cm.data()));
  EXPECT_TRUE(AllNear(dinp_cm, dinp_cpu, 1e-5));
  EXPECT_TRUE(AllNear(dw_cm, dw_cpu, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(Shapes, LinearLayoutTest,
                         ::testing::Values(std::make_tuple(7, 13, 9), std::make_tuple(1, 1, 1),
                                           std::make_tuple(8, 64, 24), std::make_tuple(5, 3, 40)));

// Gemm's mapping for every transpose combination with padded row strides, against Sgemm.
TEST(GemmLayoutTest, EveryTransposeWithPaddedStridesMatchesSgemm) {
  const int m = 7, n = 9, k = 13;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
      const auto a = UniformFloats(static_cast<size_t>(ta ? k : m) * lda, -1.f, 1.f, 5);
      const auto b = UniformFloats(static_cast<size_t>(tb ? n : k) * ldb, -1.f, 1.f, 6);
      std::vector<float> c_cpu = UniformFloats(static_cast<size_t>(m) * ldc, -1.f, 1.f, 7);
      std::vector<float> c_cm = c_cpu;
      Sgemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, c_cpu.data(), ldc);
      auto g = MapRowMajorGemm(ta, tb, m, n, k, lda, ldb, ldc);
      ASSERT_TRUE(g.ok()) << g.status().ToString();
      ASSERT_TRUE(ColumnMajorReference(*g, 0.7f, b.data(), a.data(), 0.3f, c_cm.data()));
      EXPECT_TRUE(AllNear(c_cm, c_cpu, 1e-5)) << "trans_a " << ta << " trans_b " << tb;
    }
  }
}

TEST(GemmLayoutTest, RejectsNegativeSizesAndShortStrides) {
  EXPECT_EQ(MapRowMajorGemm(false, false, -1, 2, 3, 3, 2, 2).status().code(),
            StatusCode::kInvalidArgument);
  // A stored [m, k] = [4, 5] needs lda >= 5; transposed ([5, 4]) needs lda >= 4.
  EXPECT_EQ(MapRowMajorGemm(false, false, 4, 6, 5, 4, 6, 6).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(MapRowMajorGemm(true, false, 4, 6, 5, 4, 6, 6).ok());
  // B stored [k, n] = [5, 6] needs ldb >= 6; transposed ([6, 5]) needs ldb >= 5.
  EXPECT_EQ(MapRowMajorGemm(false, false, 4, 6, 5, 5, 5, 6).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(MapRowMajorGemm(false, true, 4, 6, 5, 5, 5, 6).ok());
  // C needs ldc >= n; strides are at least 1 even for empty rows.
  EXPECT_EQ(MapRowMajorGemm(false, false, 4, 6, 5, 5, 6, 5).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(MapRowMajorGemm(false, false, 4, 6, 0, 0, 6, 6).status().code(),
            StatusCode::kInvalidArgument);
}

TEST(GemmLayoutTest, GeluFusesOnlyWhenTheAuxStrideIsAMultipleOf8) {
  EXPECT_TRUE(CanFuseGeluEpilogue(8));
  EXPECT_TRUE(CanFuseGeluEpilogue(3072));
  EXPECT_FALSE(CanFuseGeluEpilogue(9));
  EXPECT_FALSE(CanFuseGeluEpilogue(12));
  EXPECT_FALSE(CanFuseGeluEpilogue(0));
}

TEST(CudaBlasArgsTest, ForwardChecks) {
  int x = 0;
  void* p = &x;
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, p, p, -1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, p, p, 1, -2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(nullptr, nullptr, p, p, 1, 2, 3, DType::kBF16).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, nullptr, p, 1, 2, 3, DType::kBF16).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, p, nullptr, 1, 2, 3, DType::kF16).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(p, p, p, p, 1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument)
      << "gelu_out aliasing out";
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, p, p, 1, 2, 3, static_cast<DType>(42)).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearForwardArgs(p, nullptr, p, p, 1, 0, 3, DType::kF32).code(),
            StatusCode::kUnimplemented);
  // Empty outputs need no pointers.
  EXPECT_TRUE(
      CheckLinearForwardArgs(nullptr, nullptr, nullptr, nullptr, 0, 2, 3, DType::kF32).ok());
  EXPECT_TRUE(
      CheckLinearForwardArgs(nullptr, nullptr, nullptr, nullptr, 4, 2, 0, DType::kF32).ok());
  EXPECT_TRUE(CheckLinearForwardArgs(p, &x + 1, p, p, 1, 2, 3, DType::kBF16).ok());
}

TEST(CudaBlasArgsTest, BackwardChecks) {
  int x = 0;
  void* p = &x;
  float f = 0.f;
  EXPECT_EQ(CheckLinearBackwardArgs(p, &f, p, p, p, 1, 2, -3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearBackwardArgs(p, nullptr, p, p, p, 1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearBackwardArgs(p, &f, nullptr, p, p, 1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearBackwardArgs(p, &f, p, nullptr, p, 1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckLinearBackwardArgs(p, &f, p, p, nullptr, 1, 2, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument)
      << "w is needed for dinp";
  EXPECT_TRUE(CheckLinearBackwardArgs(nullptr, &f, p, p, nullptr, 1, 2, 3, DType::kF32).ok())
      << "w is not needed without dinp";
  EXPECT_TRUE(
      CheckLinearBackwardArgs(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 2, 3, DType::kBF16)
          .ok());
  // c == 0: only the bias gradient, which needs dout.
  EXPECT_TRUE(
      CheckLinearBackwardArgs(nullptr, nullptr, p, nullptr, nullptr, 4, 0, 3, DType::kF16).ok());
}

TEST(CudaBlasArgsTest, GemmChecks) {
  int x = 0;
  void* p = &x;
  EXPECT_EQ(CheckGemmArgs(false, false, 2, 3, 4, p, 4, p, 3, 0.f, p, 3, DType::kF32).code(),
            StatusCode::kOk);
  EXPECT_EQ(CheckGemmArgs(false, false, 2, 3, 4, p, 3, p, 3, 0.f, p, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CheckGemmArgs(false, false, 2, 3, 4, nullptr, 4, p, 3, 0.f, p, 3, DType::kF32).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(
      CheckGemmArgs(false, false, 2, 3, 0, nullptr, 1, nullptr, 3, 0.f, p, 3, DType::kF32).code(),
      StatusCode::kOk)
      << "k == 0, beta == 0: C is zeroed";
  EXPECT_EQ(
      CheckGemmArgs(false, false, 2, 3, 0, nullptr, 1, nullptr, 3, 0.5f, p, 3, DType::kF32).code(),
      StatusCode::kUnimplemented);
  EXPECT_EQ(
      CheckGemmArgs(false, false, 0, 3, 4, nullptr, 0, nullptr, 0, 0.f, nullptr, 0, DType::kF32)
          .code(),
      StatusCode::kOk);
}

TEST(CudaBlasTest, CreateIsUnavailableWithoutADevice) {
  auto blas = CudaBlas::Create();
  if (CudaDeviceCount() == 0) {
    EXPECT_EQ(blas.status().code(), StatusCode::kUnavailable) << blas.status().ToString();
  } else {
    ASSERT_TRUE(blas.ok()) << blas.status().ToString();
    EXPECT_EQ(GetCudaBlasStats(**blas).heuristic_queries, 0);
  }
}

// ---- needs a GPU ----------------------------------------------------------------------------

double UlpOf(DType t) {
  switch (t) {
    case DType::kBF16:
      return std::ldexp(1.0, -7);
    case DType::kF16:
      return std::ldexp(1.0, -10);
    case DType::kF32:
      break;
  }
  return 0.0;
}

// |got[i] - want[i]| <= bound(i) for every i, reporting the worst offenders.
::testing::AssertionResult Within(const std::vector<float>& got, const std::vector<float>& want,
                                  const std::function<double(size_t)>& bound) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  size_t bad = 0;
  double worst = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double b = bound(i);
    if (b > 0) worst = std::max(worst, diff / b);
    if (!(diff <= b)) {
      if (bad < 5) first << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess() << "worst / bound " << worst;
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " out of tolerance"
                                       << " (worst / bound " << worst << "):" << first.str();
}

// |got - want| <= rel * |want| + abs * scale[i].
::testing::AssertionResult Close(const std::vector<float>& got, const std::vector<float>& want,
                                 const std::vector<double>& scale, double rel, double abs) {
  if (scale.size() != want.size()) return ::testing::AssertionFailure() << "scale size mismatch";
  return Within(got, want, [&](size_t i) { return rel * std::fabs(want[i]) + abs * scale[i]; });
}

struct Shape {
  int64_t n;
  int c;
  int oc;
};

class CudaBlasGpuTest : public ::testing::TestWithParam<std::tuple<Shape, DType>> {
 protected:
  void SetUp() override {
    STRATA_REQUIRE_GPU();
    auto blas = CudaBlas::Create();
    ASSERT_TRUE(blas.ok()) << blas.status().ToString();
    blas_ = std::move(*blas);
  }

  template <typename T>
  void Forward(bool with_bias, bool with_gelu);
  template <typename T>
  void Backward(bool with_dinp, bool with_dbias);

  std::unique_ptr<CudaBlas> blas_;
};

double GeluTanh(double x) {
  return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)));
}
double GeluErf(double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }

template <typename T>
void CudaBlasGpuTest::Forward(bool with_bias, bool with_gelu) {
  const auto [shape, dtype] = GetParam();
  const auto [n, c, oc] = shape;
  const size_t nc = static_cast<size_t>(n) * c, noc = static_cast<size_t>(n) * oc;
  const auto inp = Round<T>(UniformFloats(nc, -1.f, 1.f, 11));
  const auto w = Round<T>(UniformFloats(static_cast<size_t>(oc) * c, -1.f, 1.f, 12));
  const auto bias = Round<T>(UniformFloats(oc, -1.f, 1.f, 13));

  std::vector<T> want_t(noc);
  MatmulForward<T>(want_t.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, n, c,
                   oc);
  const std::vector<float> want = ToFloats(want_t);
  std::vector<double> scale(noc);
  for (int64_t i = 0; i < n; ++i) {
    for (int o = 0; o < oc; ++o) {
      double s = with_bias ? std::fabs(ToFloat(bias[o])) : 0.0;
      for (int k = 0; k < c; ++k) s += std::fabs(ToFloat(inp[i * c + k]) * ToFloat(w[o * c + k]));
      scale[i * oc + o] = s;
    }
  }

  auto inp_d = ToDevice(inp);
  auto w_d = ToDevice(w);
  auto bias_d = ToDevice(bias);
  auto out_d = DeviceBuffer::Allocate(noc * sizeof(T));
  auto gelu_d = DeviceBuffer::Allocate(noc * sizeof(T));
  ASSERT_TRUE(inp_d.ok() && w_d.ok() && bias_d.ok() && out_d.ok() && gelu_d.ok());
  const Status st =
      blas_->Forward(out_d->data(), with_gelu ? gelu_d->data() : nullptr, inp_d->data(),
                     w_d->data(), with_bias ? bias_d->data() : nullptr, n, c, oc, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got_t = ToHost<T>(*out_d, noc);
  ASSERT_TRUE(got_t.ok()) << got_t.status().ToString();
  const std::vector<float> got = ToFloats(*got_t);
  const double ulp = UlpOf(dtype);
  EXPECT_TRUE(Close(got, want, scale, ulp, 1e-5)) << "pre-activation";

  // Bitwise repeatable.
  ASSERT_TRUE(blas_
                  ->Forward(out_d->data(), with_gelu ? gelu_d->data() : nullptr, inp_d->data(),
                            w_d->data(), with_bias ? bias_d->data() : nullptr, n, c, oc, dtype,
                            nullptr)
                  .ok());
  auto again = ToHost<T>(*out_d, noc);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(std::memcmp(again->data(), got_t->data(), noc * sizeof(T)), 0);

  if (!with_gelu) return;
  std::vector<T> gelu_want_t(noc);
  GeluForward<T>(gelu_want_t.data(), want_t.data(), static_cast<int64_t>(noc));
  const std::vector<float> gelu_want = ToFloats(gelu_want_t);
  auto gelu_got_t = ToHost<T>(*gelu_d, noc);
  ASSERT_TRUE(gelu_got_t.ok());
  const std::vector<float> gelu_got = ToFloats(*gelu_got_t);
  // The pre-activation's tolerance passed through gelu' (<= 1.13), one ulp of the
  // pre-activation through gelu', one ulp of the result, and 1e-3 of the GELU formula's terms.
  EXPECT_TRUE(Within(gelu_got, gelu_want, [&](size_t i) {
    const double x = want[i];
    const double th = std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x));
    return 1.13 * (ulp * std::fabs(x) + 1e-5 * scale[i]) + ulp * std::fabs(gelu_want[i]) +
           1e-3 * 0.5 * std::fabs(x) * (1.0 + std::fabs(th));
  })) << "gelu_out";

  if (dtype == DType::kF32 && CanFuseGeluEpilogue(oc)) {
    // Which GELU did the epilogue compute? Compare with both forms of the GPU's own
    // pre-activation, where they differ (|x| in [0.5, 4]).
    double err_tanh = 0, err_erf = 0;
    int counted = 0;
    for (size_t i = 0; i < noc; ++i) {
      const double x = got[i];
      if (std::fabs(x) < 0.5 || std::fabs(x) > 4) continue;
      err_tanh += std::pow(gelu_got[i] - GeluTanh(x), 2);
      err_erf += std::pow(gelu_got[i] - GeluErf(x), 2);
      ++counted;
    }
    std::printf(
        "cuBLASLt GELU epilogue over %d values: rms error vs tanh form %.3g, vs erf form "
        "%.3g\n",
        counted, std::sqrt(err_tanh / std::max(counted, 1)),
        std::sqrt(err_erf / std::max(counted, 1)));
    if (counted > 100) {
      EXPECT_LT(err_tanh, err_erf);
    }
  }
}

template <typename T>
void CudaBlasGpuTest::Backward(bool with_dinp, bool with_dbias) {
  const auto [shape, dtype] = GetParam();
  const auto [n, c, oc] = shape;
  const size_t nc = static_cast<size_t>(n) * c, noc = static_cast<size_t>(n) * oc,
               occ = static_cast<size_t>(oc) * c;
  const auto inp = Round<T>(UniformFloats(nc, -1.f, 1.f, 21));
  const auto w = Round<T>(UniformFloats(occ, -1.f, 1.f, 22));
  const auto dout = Round<T>(UniformFloats(noc, -1.f, 1.f, 23));
  const auto dw0 = UniformFloats(occ, -1.f, 1.f, 24);
  const auto dbias0 = UniformFloats(oc, -1.f, 1.f, 25);

  std::vector<T> dinp_want_t(nc);
  std::vector<float> dw_want = dw0, dbias_want = dbias0;
  MatmulBackward<T>(with_dinp ? dinp_want_t.data() : nullptr, dw_want.data(),
                    with_dbias ? dbias_want.data() : nullptr, dout.data(), inp.data(), w.data(), n,
                    c, oc);

  auto inp_d = ToDevice(inp);
  auto w_d = ToDevice(w);
  auto dout_d = ToDevice(dout);
  auto dw_d = ToDevice(dw0);
  auto dbias_d = ToDevice(dbias0);
  // dinp starts as garbage: it must be overwritten, not accumulated.
  auto dinp_d = ToDevice(Round<T>(std::vector<float>(nc, 1e4f)));
  ASSERT_TRUE(inp_d.ok() && w_d.ok() && dout_d.ok() && dw_d.ok() && dbias_d.ok() && dinp_d.ok());
  const Status st =
      blas_->Backward(with_dinp ? dinp_d->data() : nullptr, dw_d->template as<float>(),
                      with_dbias ? dbias_d->template as<float>() : nullptr, dout_d->data(),
                      inp_d->data(), w_d->data(), n, c, oc, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();

  if (with_dinp) {
    std::vector<double> scale(nc);
    for (int64_t i = 0; i < n; ++i) {
      for (int k = 0; k < c; ++k) {
        double s = 0;
        for (int o = 0; o < oc; ++o) {
          s += std::fabs(ToFloat(dout[i * oc + o]) * ToFloat(w[o * c + k]));
        }
        scale[i * c + k] = s;
      }
    }
    auto got = ToHost<T>(*dinp_d, nc);
    ASSERT_TRUE(got.ok());
    EXPECT_TRUE(Close(ToFloats(*got), ToFloats(dinp_want_t), scale, UlpOf(dtype), 1e-5)) << "dinp";
  }
  std::vector<double> dw_scale(occ);
  for (int o = 0; o < oc; ++o) {
    for (int k = 0; k < c; ++k) {
      double s = std::fabs(dw0[o * c + k]);
      for (int64_t i = 0; i < n; ++i) {
        s += std::fabs(ToFloat(dout[i * oc + o]) * ToFloat(inp[i * c + k]));
      }
      dw_scale[o * c + k] = s;
    }
  }
  auto dw_got = ToHost<float>(*dw_d, occ);
  ASSERT_TRUE(dw_got.ok());
  EXPECT_TRUE(Close(*dw_got, dw_want, dw_scale, 0.0, 1e-5)) << "dw";

  auto dbias_got = ToHost<float>(*dbias_d, oc);
  ASSERT_TRUE(dbias_got.ok());
  if (with_dbias) {
    std::vector<double> scale(oc);
    for (int o = 0; o < oc; ++o) {
      double s = std::fabs(dbias0[o]);
      for (int64_t i = 0; i < n; ++i) s += std::fabs(ToFloat(dout[i * oc + o]));
      scale[o] = s;
    }
    EXPECT_TRUE(Close(*dbias_got, dbias_want, scale, 0.0, 1e-5)) << "dbias";
  } else {
    EXPECT_EQ(*dbias_got, dbias0) << "dbias untouched when null";
  }
}

#define STRATA_DISPATCH(dtype, CALL) \
  switch (dtype) {                   \
    case DType::kF32:                \
      CALL(float);                   \
      break;                         \
    case DType::kBF16:               \
      CALL(bf16);                    \
      break;                         \
    case DType::kF16:                \
      CALL(f16);                     \
      break;                         \
  }

TEST_P(CudaBlasGpuTest, ForwardNoBias){
#define CALL(T) Forward<T>(false, false)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

TEST_P(CudaBlasGpuTest, ForwardBias){
#define CALL(T) Forward<T>(true, false)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

TEST_P(CudaBlasGpuTest, ForwardBiasGelu){
#define CALL(T) Forward<T>(true, true)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

TEST_P(CudaBlasGpuTest, ForwardGeluNoBias){
#define CALL(T) Forward<T>(false, true)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

TEST_P(CudaBlasGpuTest, Backward){
#define CALL(T) Backward<T>(true, true)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

TEST_P(CudaBlasGpuTest, BackwardWithoutDinpOrBias){
#define CALL(T) Backward<T>(false, false)
    STRATA_DISPATCH(std::get<1>(GetParam()), CALL)
#undef CALL
}

std::string ParamName(const ::testing::TestParamInfo<std::tuple<Shape, DType>>& info) {
  const Shape s = std::get<0>(info.param);
  return std::string(DTypeName(std::get<1>(info.param))) + "_" + std::to_string(s.n) + "x" +
         std::to_string(s.c) + "x" + std::to_string(s.oc);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaBlasGpuTest,
    ::testing::Combine(::testing::Values(Shape{7, 13, 9}, Shape{33, 64, 40}, Shape{8, 768, 2304},
                                         Shape{64, 3072, 768}),
                       ::testing::Values(DType::kF32, DType::kBF16, DType::kF16)),
    ParamName);

class CudaBlasGpuMiscTest : public ::testing::Test {
 protected:
  void SetUp() override { STRATA_REQUIRE_GPU(); }
};

TEST_F(CudaBlasGpuMiscTest, GemmEveryTransposeMatchesSgemm) {
  auto blas = CudaBlas::Create();
  ASSERT_TRUE(blas.ok()) << blas.status().ToString();
  const int m = 7, n = 9, k = 13;
  for (bool ta : {false, true}) {
    for (bool tb : {false, true}) {
      const int lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 5;
      const auto a = UniformFloats(static_cast<size_t>(ta ? k : m) * lda, -1.f, 1.f, 31);
      const auto b = UniformFloats(static_cast<size_t>(tb ? n : k) * ldb, -1.f, 1.f, 32);
      std::vector<float> c = UniformFloats(static_cast<size_t>(m) * ldc, -1.f, 1.f, 33);
      std::vector<float> want = c;
      Sgemm(ta, tb, m, n, k, 0.7f, a.data(), lda, b.data(), ldb, 0.3f, want.data(), ldc);
      auto a_d = ToDevice(a);
      auto b_d = ToDevice(b);
      auto c_d = ToDevice(c);
      ASSERT_TRUE(a_d.ok() && b_d.ok() && c_d.ok());
      const Status st = (*blas)->Gemm(ta, tb, m, n, k, 0.7f, a_d->data(), lda, b_d->data(), ldb,
                                      0.3f, c_d->data(), ldc, DType::kF32, nullptr);
      ASSERT_TRUE(st.ok()) << st.ToString();
      auto got = ToHost<float>(*c_d, c.size());
      ASSERT_TRUE(got.ok());
      // Padding columns (j >= n) must be untouched: they are compared too (want keeps them).
      std::vector<double> scale(c.size(), 0.0);
      for (int i = 0; i < m; ++i) {
        for (int j = 0; j < n; ++j) {
          double s = 0.3 * std::fabs(c[i * ldc + j]);
          for (int p = 0; p < k; ++p) {
            const float av = ta ? a[p * lda + i] : a[i * lda + p];
            const float bv = tb ? b[j * ldb + p] : b[p * ldb + j];
            s += 0.7 * std::fabs(av * bv);
          }
          scale[i * ldc + j] = s;
        }
      }
      EXPECT_TRUE(Close(*got, want, scale, 0.0, 1e-5)) << "trans_a " << ta << " trans_b " << tb;
    }
  }
}

TEST_F(CudaBlasGpuMiscTest, GemmWithKZeroScalesC) {
  auto blas = CudaBlas::Create();
  ASSERT_TRUE(blas.ok());
  const int m = 3, n = 4, ldc = 6;
  std::vector<float> c(m * ldc, 5.f);
  auto c_d = ToDevice(c);
  ASSERT_TRUE(c_d.ok());
  ASSERT_TRUE((*blas)
                  ->Gemm(false, false, m, n, 0, 1.f, nullptr, 1, nullptr, n, 1.f, c_d->data(), ldc,
                         DType::kF32, nullptr)
                  .ok());
  ASSERT_TRUE((*blas)
                  ->Gemm(false, false, m, n, 0, 1.f, nullptr, 1, nullptr, n, 0.f, c_d->data(), ldc,
                         DType::kF32, nullptr)
                  .ok());
  auto got = ToHost<float>(*c_d, c.size());
  ASSERT_TRUE(got.ok());
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < ldc; ++j)
      EXPECT_EQ((*got)[i * ldc + j], j < n ? 0.f : 5.f) << i << "," << j;
  }
}

TEST_F(CudaBlasGpuMiscTest, Tf32IsUsedOnlyWhenAllowed) {
  auto tf32 = CudaBlas::Create(32u << 20, /*allow_tf32=*/true);
  ASSERT_TRUE(tf32.ok());
  const int n = 8, c = 768, oc = 2304;
  const auto inp = UniformFloats(static_cast<size_t>(n) * c, -1.f, 1.f, 41);
  const auto w = UniformFloats(static_cast<size_t>(oc) * c, -1.f, 1.f, 42);
  std::vector<float> want(static_cast<size_t>(n) * oc);
  MatmulForward<float>(want.data(), inp.data(), w.data(), nullptr, n, c, oc);
  auto inp_d = ToDevice(inp);
  auto w_d = ToDevice(w);
  auto out_d = DeviceBuffer::Allocate(want.size() * sizeof(float));
  ASSERT_TRUE(inp_d.ok() && w_d.ok() && out_d.ok());
  ASSERT_TRUE((*tf32)
                  ->Forward(out_d->data(), nullptr, inp_d->data(), w_d->data(), nullptr, n, c, oc,
                            DType::kF32, nullptr)
                  .ok());
  auto got = ToHost<float>(*out_d, want.size());
  ASSERT_TRUE(got.ok());
  std::vector<double> scale(want.size());
  for (int i = 0; i < n; ++i) {
    for (int o = 0; o < oc; ++o) {
      double s = 0;
      for (int k = 0; k < c; ++k) s += std::fabs(inp[i * c + k] * w[o * c + k]);
      scale[i * oc + o] = s;
    }
  }
  // TF32 keeps 10 mantissa bits of each input: ~2^-10 of the terms at worst.
  EXPECT_TRUE(Close(*got, want, scale, 0.0, 2e-3)) << "TF32 result";
}

TEST_F(CudaBlasGpuMiscTest, PlansAreCachedAcrossSteps) {
  auto blas = CudaBlas::Create();
  ASSERT_TRUE(blas.ok());
  const int64_t n = 64;
  const int c = 128, oc = 384;
  auto make = [](size_t bytes) {
    auto b = DeviceBuffer::Allocate(bytes);
    EXPECT_TRUE(b.ok());
    EXPECT_TRUE(CudaMemsetZero(b->data(), bytes, nullptr).ok());
    return std::move(*b);
  };
  const size_t e = sizeof(uint16_t);
  DeviceBuffer inp = make(n * c * e), w = make(oc * c * e), bias = make(oc * e),
               out = make(n * oc * e), gelu = make(n * oc * e), dout = make(n * oc * e),
               dinp = make(n * c * e), dw = make(oc * c * 4), dbias = make(oc * 4);
  auto step = [&](const DeviceBuffer& x) {
    EXPECT_TRUE((*blas)
                    ->Forward(out.data(), gelu.data(), x.data(), w.data(), bias.data(), n, c, oc,
                              DType::kBF16, nullptr)
                    .ok());
    EXPECT_TRUE((*blas)
                    ->Backward(dinp.data(), dw.as<float>(), dbias.as<float>(), dout.data(),
                               x.data(), w.data(), n, c, oc, DType::kBF16, nullptr)
                    .ok());
  };
  step(inp);
  const CudaBlasStats first = GetCudaBlasStats(**blas);
  // forward (fused GELU), dinp, dw; one more if the fused epilogue had no algorithm and the
  // forward fell back to the bias GEMM + GELU kernel.
  std::printf("first step: %lld heuristic queries, %lld plans\n",
              static_cast<long long>(first.heuristic_queries),
              static_cast<long long>(first.cached_plans));
  EXPECT_GE(first.heuristic_queries, 3);
  EXPECT_LE(first.heuristic_queries, 4);
  EXPECT_EQ(first.cached_plans, 3);
  for (int i = 0; i < 5; ++i) step(inp);
  // Another input buffer with the same alignment: the same plans.
  DeviceBuffer inp2 = make(n * c * e);
  step(inp2);
  ASSERT_TRUE(CudaStreamSynchronize(nullptr).ok());
  const CudaBlasStats later = GetCudaBlasStats(**blas);
  EXPECT_EQ(later.heuristic_queries, first.heuristic_queries);
  EXPECT_EQ(later.cached_plans, first.cached_plans);
  EXPECT_EQ(later.matmuls, first.matmuls * 7);
}

}  // namespace
}  // namespace strata::model
