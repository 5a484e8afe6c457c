// CUDA kernels against their CPU counterparts (model/kernels), on odd sizes so that partial
// blocks and the grid-stride tail are exercised.
//
// Tests that need a GPU skip, loudly, when CudaDeviceCount() == 0 (no driver or no device); the
// argument checks and the no-device behaviour of the runtime helpers run everywhere.
//
// Tolerance: 1e-6 relative. GELU is compared relative to the size of the terms that cancel
// (0.5·|x|·(1 + |tanh u|) forward; |dout|·(0.5(1 + |tanh u|) + 0.5|x|·k(1 + 3c·x²)) backward),
// not to the result itself: for x ≲ -3 the result is a small difference of O(|x|) terms, so a
// 1-2 ulp difference between the CPU's and the GPU's tanhf becomes a large relative error of
// the result although both are equally right. Simulating the GPU's tanhf at ±2 ulp against the
// CPU's tanh (glibc tanhf at 2 ulp, or FastTanh at < 2e-7 absolute) puts the worst case of this
// measure at about 5.3e-7 for |x| <= 10, on 4M samples.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/elementwise_cuda.h"
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

constexpr double kRelTol = 1e-6;
constexpr double kGeluScale = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;

// |got[i] - want[i]| <= kRelTol * scale(i) for every i; reports the count and the first few
// offenders.
::testing::AssertionResult AllClose(const std::vector<float>& got, const std::vector<float>& want,
                                    const std::function<double(size_t)>& scale) {
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << "size " << got.size() << " != " << want.size();
  }
  size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    const double s = scale(i);
    if (s > 0) worst = std::max(worst, diff / s);
    if (diff > kRelTol * s || std::isnan(got[i]) != std::isnan(want[i])) {
      if (bad < 5) first << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess() << "worst relative error " << worst;
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " elements differ by more than " << kRelTol
         << " relative (worst " << worst << "):" << first.str();
}

double TanhU(float x) {
  const double xd = x;
  return std::tanh(kGeluScale * (xd + kGeluCubic * xd * xd * xd));
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaRuntimeTest, NoDeviceIsAnAnswerNotACrash) {
  const int count = CudaDeviceCount();
  ASSERT_GE(count, 0);
  EXPECT_EQ(CudaDeviceName(-1), "");
  EXPECT_EQ(CudaDeviceName(count), "");
  auto empty = DeviceBuffer::Allocate(0);
  ASSERT_TRUE(empty.ok()) << empty.status().ToString();
  EXPECT_EQ(empty->data(), nullptr);
  if (count == 0) {
    auto buf = DeviceBuffer::Allocate(64);
    EXPECT_FALSE(buf.ok());
    std::printf("no CUDA device: DeviceBuffer::Allocate says %s\n",
                buf.status().ToString().c_str());
  } else {
    std::printf("CUDA devices: %d, device 0: %s\n", count, CudaDeviceName(0).c_str());
    EXPECT_NE(CudaDeviceName(0), "");
  }
}

TEST(CudaElementwiseTest, RejectsBadArgumentsBeforeLaunching) {
  float dummy = 0.f;
  EXPECT_EQ(CudaGeluForward(&dummy, &dummy, -1, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaGeluForward(nullptr, &dummy, 4, nullptr).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaGeluBackward(&dummy, &dummy, nullptr, 4, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaResidualForward(&dummy, nullptr, &dummy, 4, nullptr).code(),
            StatusCode::kInvalidArgument);
  // n == 0 is a no-op and touches no device.
  EXPECT_TRUE(CudaGeluForward(nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaGeluBackward(nullptr, nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaResidualForward(nullptr, nullptr, nullptr, 0, nullptr).ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

class CudaVsCpuTest : public ::testing::TestWithParam<int64_t> {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() == 0) {
      GTEST_SKIP() << "no CUDA driver or device visible (CudaDeviceCount() == 0): CUDA kernels "
                      "not compared against the CPU on this machine";
    }
  }
  size_t n() const { return static_cast<size_t>(GetParam()); }
};

TEST_P(CudaVsCpuTest, GeluForward) {
  // [-6, 6] reaches well into the tail where the result is a cancellation of O(|x|) terms.
  const auto x = UniformFloats(n(), -6.f, 6.f, 1);
  std::vector<float> want(n());
  GeluForward<float>(want.data(), x.data(), GetParam());

  auto x_dev = ToDevice(x);
  ASSERT_TRUE(x_dev.ok()) << x_dev.status().ToString();
  auto out_dev = DeviceBuffer::Allocate(n() * sizeof(float));
  ASSERT_TRUE(out_dev.ok()) << out_dev.status().ToString();
  const Status st = CudaGeluForward(out_dev->as<float>(), x_dev->as<float>(), GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = ToHost<float>(*out_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) {
    return 0.5 * std::fabs(x[i]) * (1.0 + std::fabs(TanhU(x[i])));
  }));
}

TEST_P(CudaVsCpuTest, GeluBackward) {
  const auto x = UniformFloats(n(), -6.f, 6.f, 2);
  const auto dout = UniformFloats(n(), -1.f, 1.f, 3);
  std::vector<float> want(n());
  GeluBackward<float>(want.data(), x.data(), dout.data(), GetParam());

  auto x_dev = ToDevice(x);
  ASSERT_TRUE(x_dev.ok()) << x_dev.status().ToString();
  auto g_dev = ToDevice(dout);
  ASSERT_TRUE(g_dev.ok()) << g_dev.status().ToString();
  // In place, dinp aliasing dout, as the trainer calls it.
  const Status st = CudaGeluBackward(g_dev->as<float>(), x_dev->as<float>(), g_dev->as<float>(),
                                     GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = ToHost<float>(*g_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) {
    const double ax = std::fabs(x[i]);
    const double terms = 0.5 * (1.0 + std::fabs(TanhU(x[i]))) +
                         0.5 * ax * kGeluScale * (1.0 + 3.0 * kGeluCubic * ax * ax);
    return std::fabs(dout[i]) * terms;
  }));
}

TEST_P(CudaVsCpuTest, ResidualForward) {
  const auto a = UniformFloats(n(), -10.f, 10.f, 4);
  const auto b = UniformFloats(n(), -10.f, 10.f, 5);
  std::vector<float> want(n());
  ResidualForward<float>(want.data(), a.data(), b.data(), GetParam());

  auto a_dev = ToDevice(a);
  ASSERT_TRUE(a_dev.ok()) << a_dev.status().ToString();
  auto b_dev = ToDevice(b);
  ASSERT_TRUE(b_dev.ok()) << b_dev.status().ToString();
  // In place, out aliasing a (the residual stream).
  const Status st = CudaResidualForward(a_dev->as<float>(), a_dev->as<float>(), b_dev->as<float>(),
                                        GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = ToHost<float>(*a_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  // One IEEE addition on both sides: expected bit-equal; the bound is the sum's own rounding.
  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) { return std::fabs(a[i]) + std::fabs(b[i]); }));
}

INSTANTIATE_TEST_SUITE_P(OddSizes, CudaVsCpuTest,
                         ::testing::Values<int64_t>(1, 1000, (int64_t{1} << 20) + 3),
                         ::testing::PrintToStringParamName());

// ---- typed versions (T = fp32, bf16, fp16) ----------------------------------------------------
//
// Inputs are T values, so both sides start from the same numbers. GELU: the fp32 results differ
// as bounded above (kRelTol of the cancelling terms); rounding two such fp32 values to T can then
// differ by at most one more ulp of T (2^-7 relative for bf16, 2^-10 for fp16, plus 2^-24
// absolute for fp16 subnormals). The residual add and the bias add are one fp32 addition and one
// rounding on both sides: bitwise. The bias gradient is compared with a double-precision sum:
// the GPU adds ceil(n/32) rows per lane, then 32 lanes, then the old value, so its error is at
// most (ceil(n/32) + 34) 2^-24 (sum of |terms| + |old|) (the T inputs are exact in fp32).

template <typename T>
double UlpOfT(double x) {
  if constexpr (std::is_same_v<T, bf16>) return std::fabs(x) / 128;
  if constexpr (std::is_same_v<T, f16>) return std::fabs(x) / 1024 + 1.0 / (1 << 24);
  return 0.0;
}

// |got - want| <= tol(i) everywhere.
::testing::AssertionResult WithinTol(const std::vector<float>& got, const std::vector<float>& want,
                                     const std::function<double(size_t)>& tol) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double diff = std::fabs(static_cast<double>(got[i]) - want[i]);
    if (!(diff <= tol(i))) {
      if (bad < 5) first << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << bad << " of " << got.size() << " out of tolerance" << first.str();
}

TEST(CudaElementwiseTest, TypedRejectBadArgumentsBeforeLaunching) {
  float f = 0.f;
  void* p = &f;
  const auto kBad = StatusCode::kInvalidArgument;
  EXPECT_EQ(CudaGeluForwardT(p, p, -1, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaGeluForwardT(nullptr, p, 4, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaGeluForwardT(p, p, 4, static_cast<DType>(99), nullptr).code(), kBad);
  EXPECT_EQ(CudaGeluBackwardT(p, p, nullptr, 4, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaResidualForwardT(&f, &f, nullptr, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaResidualForwardT(&f, &f, p, 4, static_cast<DType>(99), nullptr).code(), kBad);
  EXPECT_EQ(CudaAddBias(p, p, -1, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaAddBias(p, p, 4, -1, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaAddBias(p, nullptr, 4, 4, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaAddBias(p, p, 4, 4, static_cast<DType>(99), nullptr).code(), kBad);
  EXPECT_EQ(CudaBiasBackward(&f, p, -1, 4, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaBiasBackward(&f, p, 4, -2, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaBiasBackward(nullptr, p, 4, 4, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaBiasBackward(&f, p, 4, 4, static_cast<DType>(99), nullptr).code(), kBad);
  // Empty work is a no-op that touches no device.
  EXPECT_TRUE(CudaGeluForwardT(nullptr, nullptr, 0, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaGeluBackwardT(nullptr, nullptr, nullptr, 0, DType::kF16, nullptr).ok());
  EXPECT_TRUE(CudaResidualForwardT(nullptr, nullptr, nullptr, 0, DType::kF32, nullptr).ok());
  EXPECT_TRUE(CudaAddBias(nullptr, nullptr, 0, 16, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaAddBias(nullptr, nullptr, 16, 0, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaBiasBackward(nullptr, nullptr, 0, 16, DType::kF16, nullptr).ok());
}

template <typename T>
void CheckTypedGelu(int64_t n, size_t offset, DType dtype) {
  const size_t un = static_cast<size_t>(n);
  const auto x = Round<T>(UniformFloats(un, -6.f, 6.f, 11));
  const auto g = Round<T>(UniformFloats(un, -1.f, 1.f, 12));
  const auto xf = ToFloats(x), gf = ToFloats(g);

  std::vector<T> want_fwd(un), want_bwd(un);
  GeluForward<T>(want_fwd.data(), x.data(), n);
  GeluBackward<T>(want_bwd.data(), x.data(), g.data(), n);

  auto d_x = ToDeviceShifted(x, offset);
  auto d_y = ToDeviceShifted(std::vector<T>(un), offset);
  auto d_g = ToDeviceShifted(g, offset);
  Status st = CudaGeluForwardT(d_y.ptr(), d_x.ptr(), n, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  // In place, dinp aliasing dout.
  st = CudaGeluBackwardT(d_g.ptr(), d_x.ptr(), d_g.ptr(), n, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  const auto got_fwd = ToFloats(ToHostShifted(d_y, un));
  const auto got_bwd = ToFloats(ToHostShifted(d_g, un));
  const auto wf = ToFloats(want_fwd), wb = ToFloats(want_bwd);

  EXPECT_TRUE(WithinTol(got_fwd, wf, [&](size_t i) {
    const double scale = 0.5 * std::fabs(xf[i]) * (1.0 + std::fabs(TanhU(xf[i])));
    return kRelTol * scale + UlpOfT<T>(std::max(std::fabs(wf[i]), std::fabs(got_fwd[i])));
  })) << "GeluForwardT";
  EXPECT_TRUE(WithinTol(got_bwd, wb, [&](size_t i) {
    const double ax = std::fabs(xf[i]);
    const double terms = 0.5 * (1.0 + std::fabs(TanhU(xf[i]))) +
                         0.5 * ax * kGeluScale * (1.0 + 3.0 * kGeluCubic * ax * ax);
    return kRelTol * std::fabs(gf[i]) * terms +
           UlpOfT<T>(std::max(std::fabs(wb[i]), std::fabs(got_bwd[i])));
  })) << "GeluBackwardT";
}

template <typename T>
void CheckTypedResidual(int64_t n, size_t offset, DType dtype) {
  const size_t un = static_cast<size_t>(n);
  const auto a = UniformFloats(un, -10.f, 10.f, 13);
  const auto b = Round<T>(UniformFloats(un, -10.f, 10.f, 14));
  std::vector<float> want(un);
  ResidualForward<T>(want.data(), a.data(), b.data(), n);
  auto d_a = ToDeviceShifted(a, offset);
  auto d_b = ToDeviceShifted(b, offset);
  // In place, out aliasing a.
  const Status st = CudaResidualForwardT(d_a.ptr(), d_a.ptr(), d_b.ptr(), n, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(SameBits(ToHostShifted(d_a, un), want)) << "ResidualForwardT";
}

template <typename T>
void CheckBias(int64_t rows, int c, size_t offset, DType dtype) {
  const size_t nc = static_cast<size_t>(rows) * c;
  const auto x = Round<T>(UniformFloats(nc, -4.f, 4.f, 15));
  const auto bias = Round<T>(UniformFloats(c, -1.f, 1.f, 16));
  const auto dbias0 = UniformFloats(c, -1.f, 1.f, 17);

  std::vector<T> want = x;
  AddBias<T>(want.data(), bias.data(), rows, c);
  auto d_x = ToDeviceShifted(x, offset);
  auto d_bias = ToDeviceShifted(bias, offset);
  Status st = CudaAddBias(d_x.ptr(), d_bias.ptr(), rows, c, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  EXPECT_TRUE(SameBits(ToFloats(ToHostShifted(d_x, nc)), ToFloats(want))) << "AddBias";

  // Bias gradient of x (as dout), twice: the runs must agree bitwise.
  const auto xf = ToFloats(x);
  std::vector<double> ref(c), mag(c);
  for (int j = 0; j < c; ++j) ref[j] = dbias0[j], mag[j] = std::fabs(dbias0[j]);
  for (int64_t r = 0; r < rows; ++r) {
    for (int j = 0; j < c; ++j) {
      ref[j] += xf[r * c + j];
      mag[j] += std::fabs(xf[r * c + j]);
    }
  }
  const std::vector<float> ref_f(ref.begin(), ref.end());
  const double k = ((rows + 31) / 32 + 34) / static_cast<double>(1 << 24);
  auto d_dout = ToDeviceShifted(x, offset);
  std::vector<float> first;
  for (int run = 0; run < 2; ++run) {
    auto d_db = ToDeviceShifted(dbias0, offset);
    st = CudaBiasBackward(d_db.ptr(), d_dout.ptr(), rows, c, dtype, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto got = ToHostShifted(d_db, c);
    EXPECT_TRUE(WithinTol(got, ref_f, [&](size_t j) {
      return k * mag[j] + std::fabs(ref[j]) / (1 << 24);
    })) << "BiasBackward";
    if (run == 0) {
      first = got;
    } else {
      EXPECT_TRUE(SameBits(got, first)) << "BiasBackward differs between two runs";
    }
  }
}

struct TypedCase {
  int64_t rows;
  int c;
  size_t offset;
};

class CudaTypedVsCpuTest : public ::testing::TestWithParam<std::tuple<DType, TypedCase>> {
 protected:
  void SetUp() override { STRATA_REQUIRE_GPU(); }
  DType dtype() const { return std::get<0>(GetParam()); }
  const TypedCase& tc() const { return std::get<1>(GetParam()); }
  int64_t n() const { return tc().rows * tc().c; }
};

#define STRATA_DISPATCH_T(dtype, CALL) \
  switch (dtype) {                     \
    case DType::kF32: {                \
      using T = float;                 \
      CALL;                            \
      break;                           \
    }                                  \
    case DType::kBF16: {               \
      using T = bf16;                  \
      CALL;                            \
      break;                           \
    }                                  \
    case DType::kF16: {                \
      using T = f16;                   \
      CALL;                            \
      break;                           \
    }                                  \
  }

TEST_P(CudaTypedVsCpuTest, Gelu) {
  STRATA_DISPATCH_T(dtype(), CheckTypedGelu<T>(n(), tc().offset, dtype()));
}

TEST_P(CudaTypedVsCpuTest, Residual) {
  STRATA_DISPATCH_T(dtype(), CheckTypedResidual<T>(n(), tc().offset, dtype()));
}

TEST_P(CudaTypedVsCpuTest, BiasAddAndGradient) {
  STRATA_DISPATCH_T(dtype(), CheckBias<T>(tc().rows, tc().c, tc().offset, dtype()));
}

#undef STRATA_DISPATCH_T

std::string TypedName(const ::testing::TestParamInfo<std::tuple<DType, TypedCase>>& info) {
  const TypedCase& k = std::get<1>(info.param);
  return std::string(DTypeName(std::get<0>(info.param))) + "_rows" + std::to_string(k.rows) + "_c" +
         std::to_string(k.c) + (k.offset ? "_shifted" : "");
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaTypedVsCpuTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                       ::testing::Values(TypedCase{1, 1, 0}, TypedCase{3, 7, 0},
                                         TypedCase{37, 768, 0}, TypedCase{37, 768, 1},
                                         TypedCase{1000, 1001, 0}, TypedCase{4099, 64, 0})),
    TypedName);

}  // namespace
}  // namespace strata::model
