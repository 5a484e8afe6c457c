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
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/elementwise_cuda.h"
#include "model/kernels/elementwise.h"

namespace strata::model {
namespace {

constexpr double kRelTol = 1e-6;
constexpr double kGeluScale = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluCubic = 0.044715;

std::vector<float> Uniform(size_t n, float lo, float hi, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

Result<DeviceBuffer> Upload(const std::vector<float>& host) {
  ASSIGN_OR_RETURN(DeviceBuffer buf, DeviceBuffer::Allocate(host.size() * sizeof(float)));
  RETURN_IF_ERROR(buf.CopyFromHost(host.data(), host.size() * sizeof(float)));
  return buf;
}

// Waits for the default stream, then copies n floats back.
Result<std::vector<float>> Download(const DeviceBuffer& buf, size_t n) {
  RETURN_IF_ERROR(CudaStreamSynchronize(nullptr));
  std::vector<float> host(n);
  RETURN_IF_ERROR(buf.CopyToHost(host.data(), n * sizeof(float)));
  return host;
}

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
  const auto x = Uniform(n(), -6.f, 6.f, 1);
  std::vector<float> want(n());
  GeluForward<float>(want.data(), x.data(), GetParam());

  auto x_dev = Upload(x);
  ASSERT_TRUE(x_dev.ok()) << x_dev.status().ToString();
  auto out_dev = DeviceBuffer::Allocate(n() * sizeof(float));
  ASSERT_TRUE(out_dev.ok()) << out_dev.status().ToString();
  const Status st = CudaGeluForward(out_dev->as<float>(), x_dev->as<float>(), GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = Download(*out_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) {
    return 0.5 * std::fabs(x[i]) * (1.0 + std::fabs(TanhU(x[i])));
  }));
}

TEST_P(CudaVsCpuTest, GeluBackward) {
  const auto x = Uniform(n(), -6.f, 6.f, 2);
  const auto dout = Uniform(n(), -1.f, 1.f, 3);
  std::vector<float> want(n());
  GeluBackward<float>(want.data(), x.data(), dout.data(), GetParam());

  auto x_dev = Upload(x);
  ASSERT_TRUE(x_dev.ok()) << x_dev.status().ToString();
  auto g_dev = Upload(dout);
  ASSERT_TRUE(g_dev.ok()) << g_dev.status().ToString();
  // In place, dinp aliasing dout, as the trainer calls it.
  const Status st = CudaGeluBackward(g_dev->as<float>(), x_dev->as<float>(), g_dev->as<float>(),
                                     GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = Download(*g_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) {
    const double ax = std::fabs(x[i]);
    const double terms = 0.5 * (1.0 + std::fabs(TanhU(x[i]))) +
                         0.5 * ax * kGeluScale * (1.0 + 3.0 * kGeluCubic * ax * ax);
    return std::fabs(dout[i]) * terms;
  }));
}

TEST_P(CudaVsCpuTest, ResidualForward) {
  const auto a = Uniform(n(), -10.f, 10.f, 4);
  const auto b = Uniform(n(), -10.f, 10.f, 5);
  std::vector<float> want(n());
  ResidualForward<float>(want.data(), a.data(), b.data(), GetParam());

  auto a_dev = Upload(a);
  ASSERT_TRUE(a_dev.ok()) << a_dev.status().ToString();
  auto b_dev = Upload(b);
  ASSERT_TRUE(b_dev.ok()) << b_dev.status().ToString();
  // In place, out aliasing a (the residual stream).
  const Status st = CudaResidualForward(a_dev->as<float>(), a_dev->as<float>(), b_dev->as<float>(),
                                        GetParam(), nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = Download(*a_dev, n());
  ASSERT_TRUE(got.ok()) << got.status().ToString();

  // One IEEE addition on both sides: expected bit-equal; the bound is the sum's own rounding.
  EXPECT_TRUE(AllClose(*got, want, [&](size_t i) { return std::fabs(a[i]) + std::fabs(b[i]); }));
}

INSTANTIATE_TEST_SUITE_P(OddSizes, CudaVsCpuTest,
                         ::testing::Values<int64_t>(1, 1000, (int64_t{1} << 20) + 3),
                         ::testing::PrintToStringParamName());

}  // namespace
}  // namespace strata::model
