// CUDA LayerNorm (model/cuda/layernorm_cuda.h) against the CPU kernels (model/kernels/layernorm.h)
// for fp32, bf16 and fp16, on shapes that hit both the 4-wide vector path (c % 4 == 0, aligned)
// and the scalar path (odd c, or every buffer shifted by one element).
//
// Tolerances. Let u = 2^-24 (fp32 unit roundoff) and K = c + c/32 + 16: the CPU may sum a row's c
// terms sequentially (error <= c u of the sum of magnitudes), the GPU sums c/32 per lane and then
// a 5-level tree, plus a handful of roundings in the expressions. Per row, with mabs = mean |x|:
//   mean: |got - want| <= K u mabs;   rstd: relative K u (variance terms are all positive).
//   out:  K u (|w| (rstd mabs + |norm|) + |b| + |out|) — the statistics' errors carried through
//         (x - m) rstd w + b — plus one ulp of T (both sides round a close fp32 value to T; eps_T =
//         2^-7 bf16, 2^-10 fp16 relative, 2^-24 absolute for fp16 subnormals).
//   dinp: K u rstd (|dnorm| + mean|dnorm| + |norm| mean|dnorm norm|) + u |dinp0| for the two
//         row means of the backward.
//   dw, db: against a double-precision sum of the same fp32 terms; the GPU's order (one lane sums
//         ceil(n/32) rows, 32 lanes are then added, then the old value) bounds the error by
//         (ceil(n/32) + 36) u (sum of |terms| + |old|), the 3 covering the terms' own roundings.
// These are worst-case bounds (observed errors are far smaller); any indexing or sync bug gives
// O(1) errors. The residual stream written by the fused kernel is one fp32 addition: bitwise.
#include "model/kernels/layernorm.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/layernorm_cuda.h"
#include "model/dtype.h"
#include "model/kernels/elementwise.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::Round;
using testing::SameBits;
using testing::ShiftedBuffer;
using testing::ToDevice;
using testing::ToDeviceShifted;
using testing::ToFloats;
using testing::ToHost;
using testing::ToHostShifted;
using testing::UniformFloats;

constexpr double kU = 1.0 / (1 << 24);

template <typename T>
double EpsT() {
  if constexpr (std::is_same_v<T, bf16>) return 1.0 / 128;
  if constexpr (std::is_same_v<T, f16>) return 1.0 / 1024;
  return 0.0;
}
template <typename T>
double TinyT() {
  return std::is_same_v<T, f16> ? kU : 0.0;
}
// One ulp of T at magnitude |x| (an upper bound).
template <typename T>
double UlpT(double x) {
  return EpsT<T>() * std::fabs(x) + TinyT<T>();
}

// Counts elements with |got - want| > tol(i) and reports the first few.
::testing::AssertionResult Within(const char* what, const std::vector<float>& got,
                                  const std::vector<float>& want,
                                  const std::function<double(size_t)>& tol) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << " != " << want.size();
  }
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(diff <= tol(i))) {
      if (bad < 5) {
        first << "\n  [" << i << "] got " << got[i] << " want " << want[i] << " tol " << tol(i);
      }
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << got.size() << " out of tolerance:" << first.str();
}

struct Shape {
  int64_t n;
  int c;
  size_t offset;  // elements every device buffer is shifted by (1: forces the scalar path)
};

// Row inputs with a per-row offset, so the mean is not ~0 and the centring matters.
std::vector<float> RowInputs(const Shape& s, uint32_t seed) {
  auto x = UniformFloats(static_cast<size_t>(s.n) * s.c, -2.f, 2.f, seed);
  for (int64_t i = 0; i < s.n; ++i) {
    const float shift = static_cast<float>(i % 5) - 2.f;
    for (int j = 0; j < s.c; ++j) x[i * s.c + j] += shift;
  }
  return x;
}

double K(int c) { return c + c / 32 + 16; }

template <typename T>
void CheckForward(const Shape& s, DType dtype, bool residual) {
  const size_t nc = static_cast<size_t>(s.n) * s.c;
  const auto w = Round<T>(UniformFloats(s.c, 0.5f, 1.5f, 11));
  const auto b = Round<T>(UniformFloats(s.c, -0.5f, 0.5f, 12));
  auto inp = RowInputs(s, 13);
  const auto branch = Round<T>(UniformFloats(nc, -1.f, 1.f, 14));

  // CPU reference.
  std::vector<float> resid = inp;
  if (residual) ResidualForward<T>(resid.data(), inp.data(), branch.data(), nc);
  std::vector<T> want(nc);
  std::vector<float> want_mean(s.n), want_rstd(s.n);
  LayerNormForward<T>(want.data(), want_mean.data(), want_rstd.data(), resid.data(), w.data(),
                      b.data(), s.n, s.c);

  auto d_inp = ToDeviceShifted(inp, s.offset);
  auto d_branch = ToDeviceShifted(branch, s.offset);
  auto d_w = ToDeviceShifted(w, s.offset);
  auto d_b = ToDeviceShifted(b, s.offset);
  auto d_out = ToDeviceShifted(std::vector<T>(nc), s.offset);
  auto d_mean = ToDeviceShifted(std::vector<float>(s.n), s.offset);
  auto d_rstd = ToDeviceShifted(std::vector<float>(s.n), s.offset);
  Status st;
  if (residual) {
    // In place (resid_out aliases resid_in), as the trainer calls it.
    st = CudaResidualLayerNormForward(d_inp.ptr(), d_out.ptr(), d_mean.ptr(), d_rstd.ptr(),
                                      d_inp.ptr(), d_branch.ptr(), d_w.ptr(), d_b.ptr(), s.n, s.c,
                                      dtype, nullptr);
  } else {
    st = CudaLayerNormForward(d_out.ptr(), d_mean.ptr(), d_rstd.ptr(), d_inp.ptr(), d_w.ptr(),
                              d_b.ptr(), s.n, s.c, dtype, nullptr);
  }
  ASSERT_TRUE(st.ok()) << st.ToString();
  const auto got = ToFloats(ToHostShifted(d_out, nc));
  const auto got_mean = ToHostShifted(d_mean, s.n);
  const auto got_rstd = ToHostShifted(d_rstd, s.n);
  if (residual) {
    EXPECT_TRUE(SameBits(ToHostShifted(d_inp, nc), resid)) << "residual stream";
  }

  std::vector<double> mabs(s.n, 0.0);
  for (int64_t i = 0; i < s.n; ++i) {
    for (int j = 0; j < s.c; ++j) mabs[i] += std::fabs(resid[i * s.c + j]);
    mabs[i] /= s.c;
  }
  const double ku = K(s.c) * kU;
  EXPECT_TRUE(Within("mean", got_mean, want_mean, [&](size_t i) { return ku * mabs[i]; }));
  EXPECT_TRUE(
      Within("rstd", got_rstd, want_rstd, [&](size_t i) { return ku * std::fabs(want_rstd[i]); }));
  const auto want_f = ToFloats(want);
  EXPECT_TRUE(Within("out", got, want_f, [&](size_t e) {
    const size_t i = e / s.c, j = e % s.c;
    const double norm = (resid[e] - want_mean[i]) * static_cast<double>(want_rstd[i]);
    const double wj = std::fabs(ToFloat(w[j])), bj = std::fabs(ToFloat(b[j]));
    const double scale =
        wj * (want_rstd[i] * mabs[i] + std::fabs(norm)) + bj + std::fabs(want_f[e]);
    return ku * scale + UlpT<T>(std::max(std::fabs(want_f[e]), std::fabs(got[e])));
  }));

  if (residual) {
    // Not aliased: the same results into a separate residual buffer.
    auto d_in2 = ToDeviceShifted(inp, s.offset);
    auto d_res2 = ToDeviceShifted(std::vector<float>(nc), s.offset);
    auto d_out2 = ToDeviceShifted(std::vector<T>(nc), s.offset);
    st = CudaResidualLayerNormForward(d_res2.ptr(), d_out2.ptr(), d_mean.ptr(), d_rstd.ptr(),
                                      d_in2.ptr(), d_branch.ptr(), d_w.ptr(), d_b.ptr(), s.n, s.c,
                                      dtype, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    EXPECT_TRUE(SameBits(ToHostShifted(d_res2, nc), resid)) << "residual stream (not aliased)";
    EXPECT_TRUE(SameBits(ToFloats(ToHostShifted(d_out2, nc)), got)) << "aliased vs not aliased";
    EXPECT_TRUE(SameBits(ToHostShifted(d_in2, nc), inp)) << "resid_in must be left alone";
  }
}

template <typename T>
void CheckBackward(const Shape& s, DType dtype) {
  const size_t nc = static_cast<size_t>(s.n) * s.c;
  const auto w = Round<T>(UniformFloats(s.c, 0.5f, 1.5f, 21));
  const auto b = Round<T>(UniformFloats(s.c, -0.5f, 0.5f, 22));
  const auto inp = RowInputs(s, 23);
  const auto dout = Round<T>(UniformFloats(nc, -1.f, 1.f, 24));
  // Non-zero starting gradients: every output accumulates.
  const auto dinp0 = UniformFloats(nc, -0.1f, 0.1f, 25);
  const auto dw0 = UniformFloats(s.c, -0.1f, 0.1f, 26);
  const auto db0 = UniformFloats(s.c, -0.1f, 0.1f, 27);

  std::vector<T> ln(nc);
  std::vector<float> mean(s.n), rstd(s.n);
  LayerNormForward<T>(ln.data(), mean.data(), rstd.data(), inp.data(), w.data(), b.data(), s.n,
                      s.c);
  std::vector<float> want_dinp = dinp0, cpu_dw = dw0, cpu_db = db0;
  LayerNormBackward<T>(want_dinp.data(), cpu_dw.data(), cpu_db.data(), dout.data(), inp.data(),
                       w.data(), mean.data(), rstd.data(), s.n, s.c);

  auto d_inp = ToDeviceShifted(inp, s.offset);
  auto d_dout = ToDeviceShifted(dout, s.offset);
  auto d_w = ToDeviceShifted(w, s.offset);
  auto d_mean = ToDeviceShifted(mean, s.offset);
  auto d_rstd = ToDeviceShifted(rstd, s.offset);
  std::vector<float> got_dinp, got_dw, got_db;
  for (int run = 0; run < 2; ++run) {
    auto d_dinp = ToDeviceShifted(dinp0, s.offset);
    auto d_dw = ToDeviceShifted(dw0, s.offset);
    auto d_db = ToDeviceShifted(db0, s.offset);
    const Status st =
        CudaLayerNormBackward(d_dinp.ptr(), d_dw.ptr(), d_db.ptr(), d_dout.ptr(), d_inp.ptr(),
                              d_w.ptr(), d_mean.ptr(), d_rstd.ptr(), s.n, s.c, dtype, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto dinp = ToHostShifted(d_dinp, nc);
    auto dw = ToHostShifted(d_dw, s.c);
    auto db = ToHostShifted(d_db, s.c);
    if (run == 0) {
      got_dinp = std::move(dinp), got_dw = std::move(dw), got_db = std::move(db);
    } else {
      EXPECT_TRUE(SameBits(dinp, got_dinp)) << "dinp differs between two runs";
      EXPECT_TRUE(SameBits(dw, got_dw)) << "dw differs between two runs";
      EXPECT_TRUE(SameBits(db, got_db)) << "db differs between two runs";
    }
  }

  // dinp against the CPU.
  std::vector<double> dnorm_mabs(s.n, 0.0), dnn_mabs(s.n, 0.0);
  for (int64_t i = 0; i < s.n; ++i) {
    for (int j = 0; j < s.c; ++j) {
      const size_t e = i * s.c + j;
      const double norm = (inp[e] - mean[i]) * static_cast<double>(rstd[i]);
      const double dnorm = ToFloat(w[j]) * static_cast<double>(ToFloat(dout[e]));
      dnorm_mabs[i] += std::fabs(dnorm) / s.c;
      dnn_mabs[i] += std::fabs(dnorm * norm) / s.c;
    }
  }
  const double ku = K(s.c) * kU;
  EXPECT_TRUE(Within("dinp", got_dinp, want_dinp, [&](size_t e) {
    const size_t i = e / s.c, j = e % s.c;
    const double norm = (inp[e] - mean[i]) * static_cast<double>(rstd[i]);
    const double dnorm = ToFloat(w[j]) * static_cast<double>(ToFloat(dout[e]));
    return ku * rstd[i] * (std::fabs(dnorm) + dnorm_mabs[i] + std::fabs(norm) * dnn_mabs[i]) +
           kU * std::fabs(dinp0[e]) + kU * std::fabs(want_dinp[e]);
  }));

  // dw, db against double sums of the same terms.
  std::vector<double> ref_dw(s.c), ref_db(s.c), mag_dw(s.c), mag_db(s.c);
  for (int j = 0; j < s.c; ++j) {
    ref_dw[j] = dw0[j], ref_db[j] = db0[j];
    mag_dw[j] = std::fabs(dw0[j]), mag_db[j] = std::fabs(db0[j]);
  }
  for (int64_t i = 0; i < s.n; ++i) {
    for (int j = 0; j < s.c; ++j) {
      const size_t e = i * s.c + j;
      const double norm = (inp[e] - mean[i]) * static_cast<double>(rstd[i]);
      const double dy = ToFloat(dout[e]);
      ref_dw[j] += norm * dy, ref_db[j] += dy;
      mag_dw[j] += std::fabs(norm * dy), mag_db[j] += std::fabs(dy);
    }
  }
  const double kcol = ((s.n + 31) / 32 + 36) * kU;
  std::vector<float> ref_dw_f(ref_dw.begin(), ref_dw.end()), ref_db_f(ref_db.begin(), ref_db.end());
  // The float conversion of the reference adds half an ulp of the result.
  EXPECT_TRUE(Within("dw", got_dw, ref_dw_f,
                     [&](size_t j) { return kcol * mag_dw[j] + kU * std::fabs(ref_dw[j]); }));
  EXPECT_TRUE(Within("db", got_db, ref_db_f,
                     [&](size_t j) { return kcol * mag_db[j] + kU * std::fabs(ref_db[j]); }));
  // The reference itself: the CPU's sums (sequential per OpenMP thread, then over at most a few
  // hundred threads) agree with it.
  EXPECT_TRUE(Within("cpu dw", cpu_dw, ref_dw_f, [&](size_t j) {
    return (s.n + 300) * kU * mag_dw[j] + kU * std::fabs(ref_dw[j]);
  }));
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaLayerNormTest, RejectsBadArgumentsBeforeLaunching) {
  float f = 0.f;
  void* p = &f;
  const auto kBad = StatusCode::kInvalidArgument;
  EXPECT_EQ(CudaLayerNormForward(p, &f, &f, &f, p, p, -1, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaLayerNormForward(p, &f, &f, &f, p, p, 4, -1, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaLayerNormForward(p, nullptr, &f, &f, p, p, 4, 4, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaLayerNormForward(p, &f, &f, &f, p, nullptr, 4, 4, DType::kBF16, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaLayerNormForward(p, &f, &f, &f, p, p, 4, 4, static_cast<DType>(99), nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaResidualLayerNormForward(&f, p, &f, &f, &f, nullptr, p, p, 4, 4, DType::kF16, nullptr)
          .code(),
      kBad);
  EXPECT_EQ(
      CudaResidualLayerNormForward(&f, p, &f, &f, &f, p, p, p, -3, 4, DType::kF16, nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaLayerNormBackward(&f, &f, nullptr, p, &f, p, &f, &f, 4, 4, DType::kF32, nullptr).code(),
      kBad);
  EXPECT_EQ(CudaLayerNormBackward(&f, &f, &f, p, &f, p, &f, &f, 4, -4, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaLayerNormBackward(&f, &f, &f, p, &f, p, &f, &f, 4, 4, static_cast<DType>(99), nullptr)
          .code(),
      kBad);
  // Empty work touches no device, even with null pointers.
  EXPECT_TRUE(CudaLayerNormForward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 768,
                                   DType::kF32, nullptr)
                  .ok());
  EXPECT_TRUE(CudaResidualLayerNormForward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                           nullptr, nullptr, 5, 0, DType::kBF16, nullptr)
                  .ok());
  EXPECT_TRUE(CudaLayerNormBackward(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                    nullptr, 0, 0, DType::kF16, nullptr)
                  .ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

class CudaLayerNormVsCpuTest : public ::testing::TestWithParam<std::tuple<DType, Shape>> {
 protected:
  void SetUp() override { STRATA_REQUIRE_GPU(); }
  DType dtype() const { return std::get<0>(GetParam()); }
  const Shape& shape() const { return std::get<1>(GetParam()); }
};

TEST_P(CudaLayerNormVsCpuTest, Forward) {
  switch (dtype()) {
    case DType::kF32:
      return CheckForward<float>(shape(), dtype(), false);
    case DType::kBF16:
      return CheckForward<bf16>(shape(), dtype(), false);
    case DType::kF16:
      return CheckForward<f16>(shape(), dtype(), false);
  }
}

TEST_P(CudaLayerNormVsCpuTest, ResidualForward) {
  switch (dtype()) {
    case DType::kF32:
      return CheckForward<float>(shape(), dtype(), true);
    case DType::kBF16:
      return CheckForward<bf16>(shape(), dtype(), true);
    case DType::kF16:
      return CheckForward<f16>(shape(), dtype(), true);
  }
}

TEST_P(CudaLayerNormVsCpuTest, Backward) {
  switch (dtype()) {
    case DType::kF32:
      return CheckBackward<float>(shape(), dtype());
    case DType::kBF16:
      return CheckBackward<bf16>(shape(), dtype());
    case DType::kF16:
      return CheckBackward<f16>(shape(), dtype());
  }
}

std::string ParamName(const ::testing::TestParamInfo<std::tuple<DType, Shape>>& info) {
  const Shape& s = std::get<1>(info.param);
  return std::string(DTypeName(std::get<0>(info.param))) + "_n" + std::to_string(s.n) + "_c" +
         std::to_string(s.c) + (s.offset ? "_shifted" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaLayerNormVsCpuTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                       ::testing::Values(Shape{1, 1, 0}, Shape{3, 7, 0}, Shape{5, 33, 0},
                                         Shape{37, 768, 0}, Shape{37, 768, 1}, Shape{9, 1600, 0},
                                         Shape{3, 4099, 0}, Shape{1000, 64, 0})),
    ParamName);

}  // namespace
}  // namespace strata::model
