// CUDA reductions and small vector ops (model/cuda/reduce_cuda.h) against the CPU
// (model/optimizer.h SumOfSquares / Scale, model/dtype.h FromFloat / ToFloat).
//
// Tolerances. Sums: both sides accumulate in double (a float square is exact in double), in
// different orders; each recursive sum of n terms is within (n - 1) * 2^-53 * sum|terms| of the
// exact value, so the two are within 2 (n - 1) 2^-53 sum|terms| of each other — a rigorous bound,
// used as is. Scale (one IEEE multiply) and the dtype conversions (integer rounding of the same
// bits) must be bit-identical.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/reduce_cuda.h"
#include "model/dtype.h"
#include "model/optimizer.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::ToDevice;
using testing::ToHost;
using testing::UniformFloats;

constexpr double kU = 1.1102230246251565e-16;  // 2^-53

double SumBound(const std::vector<float>& x, bool square) {
  double abs_sum = 0.0;
  for (float f : x) abs_sum += square ? static_cast<double>(f) * f : std::fabs(f);
  return 2.0 * static_cast<double>(x.size()) * kU * abs_sum;
}

// Runs CudaSumOfSquares (square) or CudaSum on x placed `offset` floats into its buffer (an
// offset of 1..3 takes the unaligned path). *out starts at `init`.
Result<double> GpuSum(const std::vector<float>& x, bool square, bool accumulate, double init,
                      size_t offset = 0) {
  std::vector<float> padded(offset, 0.f);
  padded.insert(padded.end(), x.begin(), x.end());
  ASSIGN_OR_RETURN(DeviceBuffer x_dev, ToDevice(padded));
  ASSIGN_OR_RETURN(DeviceBuffer out, ToDevice(std::vector<double>{init}));
  const int64_t n = static_cast<int64_t>(x.size());
  const size_t ws_bytes = CudaReduceWorkspace(n);
  ASSIGN_OR_RETURN(DeviceBuffer ws, DeviceBuffer::Allocate(ws_bytes));
  const float* xp = x_dev.as<float>() + offset;
  if (square) {
    RETURN_IF_ERROR(
        CudaSumOfSquares(out.as<double>(), xp, n, accumulate, ws.data(), ws_bytes, nullptr));
  } else {
    RETURN_IF_ERROR(CudaSum(out.as<double>(), xp, n, ws.data(), ws_bytes, nullptr));
  }
  ASSIGN_OR_RETURN(std::vector<double> host, ToHost<double>(out, 1));
  return host[0];
}

template <typename T>
uint16_t Bits(T x) {
  return x.bits;
}

// Values that exercise every rounding case of bf16 and fp16: exact ties (both parities), one ulp
// either side, fp16 subnormals and its overflow threshold, infinities, zeros, a NaN.
std::vector<float> SpecialFloats() {
  std::vector<float> v = {0.f,
                          -0.f,
                          1.f,
                          -1.f,
                          65504.f,
                          65519.99f,
                          65520.f,
                          -65520.f,
                          1e-8f,
                          -3e-8f,
                          5.9604645e-8f,
                          2.9802322e-8f,
                          8.940697e-8f,
                          6.1035156e-5f,
                          6.1e-5f,
                          std::numeric_limits<float>::max(),
                          std::numeric_limits<float>::min(),
                          std::numeric_limits<float>::denorm_min(),
                          std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity(),
                          std::numeric_limits<float>::quiet_NaN(),
                          -std::numeric_limits<float>::quiet_NaN()};
  // Ties and near-ties for bf16 (16 dropped bits) and fp16 (13 dropped bits of normals).
  for (uint32_t base : {0x3f800000u, 0x3f810000u, 0x40490000u, 0xc2c80000u, 0x3c000000u}) {
    for (uint32_t low : {0x8000u, 0x7fffu, 0x8001u, 0x1000u, 0x0fffu, 0x1001u, 0x3000u, 0x2000u}) {
      v.push_back(BitsToFloat(base | low));
      v.push_back(BitsToFloat((base + 0x2000u) | (low & 0x1fffu)));
    }
  }
  return v;
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaReduceArgsTest, WorkspaceIsAFunctionOfN) {
  EXPECT_EQ(CudaReduceWorkspace(-5), 0u);
  EXPECT_EQ(CudaReduceWorkspace(0), 0u);
  EXPECT_EQ(CudaReduceWorkspace(1), sizeof(double));
  EXPECT_EQ(CudaReduceWorkspace(1024), sizeof(double));  // one block: 256 threads x 4
  EXPECT_EQ(CudaReduceWorkspace(1025), 2 * sizeof(double));
  EXPECT_EQ(CudaReduceWorkspace(int64_t{1} << 40), 1024 * sizeof(double));  // capped
  // Never decreasing in n (a buffer sized for the largest tensor serves all).
  size_t prev = 0;
  for (int64_t n = 0; n < (int64_t{1} << 22); n = n * 3 + 1) {
    EXPECT_GE(CudaReduceWorkspace(n), prev);
    prev = CudaReduceWorkspace(n);
  }
}

TEST(CudaReduceArgsTest, RejectsBadArgumentsBeforeLaunching) {
  // Dummy host pointers: every call must fail before touching them or a device.
  float f[4] = {};
  double d[2] = {};
  int flag = 0;
  const auto kBad = StatusCode::kInvalidArgument;
  EXPECT_EQ(CudaSumOfSquares(d, f, -1, false, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSumOfSquares(nullptr, f, 4, false, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSumOfSquares(d, nullptr, 4, false, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSumOfSquares(d, f, 4, false, nullptr, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSumOfSquares(d, f, 4, false, d, 7, nullptr).code(), kBad);  // too small
  EXPECT_EQ(CudaSumOfSquares(d, f, 2000, false, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSumOfSquares(d, f, 4, false, reinterpret_cast<char*>(d) + 1, 8, nullptr).code(),
            kBad);  // misaligned
  EXPECT_EQ(CudaSum(d, f, -1, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaSum(d, f, 4, d, 0, nullptr).code(), kBad);
  EXPECT_EQ(CudaSum(d, nullptr, 4, d, 8, nullptr).code(), kBad);
  EXPECT_EQ(CudaFlagNonFinite(&flag, f, -1, nullptr).code(), kBad);
  EXPECT_EQ(CudaFlagNonFinite(nullptr, f, 4, nullptr).code(), kBad);
  EXPECT_EQ(CudaFlagNonFinite(&flag, nullptr, 4, nullptr).code(), kBad);
  EXPECT_EQ(CudaScale(f, -1, 2.f, nullptr).code(), kBad);
  EXPECT_EQ(CudaScale(nullptr, 4, 2.f, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastFromFloat(nullptr, f, 4, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastFromFloat(f, nullptr, 4, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastFromFloat(f, f, -2, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastToFloat(nullptr, f, 4, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastToFloat(f, nullptr, 4, DType::kF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaCastFromFloat(f, f, 4, static_cast<DType>(42), nullptr).code(), kBad);
  EXPECT_EQ(CudaCastToFloat(f, f, 4, static_cast<DType>(42), nullptr).code(), kBad);
  // The output is needed even for n == 0 (it is written 0 unless accumulating).
  EXPECT_EQ(CudaSumOfSquares(nullptr, nullptr, 0, true, nullptr, 0, nullptr).code(), kBad);
  EXPECT_EQ(CudaSum(nullptr, nullptr, 0, nullptr, 0, nullptr).code(), kBad);
  // Empty work that writes nothing touches no device.
  EXPECT_TRUE(CudaSumOfSquares(d, nullptr, 0, true, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaFlagNonFinite(nullptr, nullptr, 0, nullptr).ok());
  EXPECT_TRUE(CudaScale(nullptr, 0, 2.f, nullptr).ok());
  EXPECT_TRUE(CudaCastFromFloat(nullptr, nullptr, 0, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaCastToFloat(nullptr, nullptr, 0, DType::kF16, nullptr).ok());
  // fp32 "conversion" in place is a no-op.
  EXPECT_TRUE(CudaCastFromFloat(f, f, 4, DType::kF32, nullptr).ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

const int64_t kSizes[] = {1, 3, 4, 5, 1000, 1023, 1024, 1025, 262147, 5000003};

TEST(CudaReduceTest, SumOfSquaresMatchesCpu) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const auto x = UniformFloats(static_cast<size_t>(n), -3.f, 3.f, static_cast<uint32_t>(n));
    const double want = SumOfSquares(x.data(), n);
    auto got = GpuSum(x, true, false, -7.0);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_NEAR(*got, want, SumBound(x, true));
    // accumulate: *out += the sum.
    auto acc = GpuSum(x, true, true, 2.5);
    ASSERT_TRUE(acc.ok()) << acc.status().ToString();
    EXPECT_NEAR(*acc, 2.5 + want, SumBound(x, true) + 2 * kU * (2.5 + want));
  }
}

TEST(CudaReduceTest, SumMatchesCpu) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : kSizes) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const auto x = UniformFloats(static_cast<size_t>(n), -3.f, 3.f, static_cast<uint32_t>(n) + 1);
    double want = 0.0;
    for (float f : x) want += f;
    auto got = GpuSum(x, false, false, 123.0);
    ASSERT_TRUE(got.ok()) << got.status().ToString();
    EXPECT_NEAR(*got, want, SumBound(x, false));
  }
}

TEST(CudaReduceTest, SumsAreDeterministicAndIndependentOfAlignment) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : {int64_t{1023}, int64_t{262147}, int64_t{5000003}}) {
    SCOPED_TRACE("n = " + std::to_string(n));
    const auto x = UniformFloats(static_cast<size_t>(n), -1e3f, 1e3f, 9);
    for (bool square : {true, false}) {
      auto a = GpuSum(x, square, false, 0.0);
      auto b = GpuSum(x, square, false, 0.0);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(std::memcmp(&*a, &*b, sizeof(double)), 0) << *a << " vs " << *b;
      for (size_t offset : {1, 2, 3}) {
        auto c = GpuSum(x, square, false, 0.0, offset);
        ASSERT_TRUE(c.ok());
        EXPECT_EQ(std::memcmp(&*a, &*c, sizeof(double)), 0) << "offset " << offset;
      }
    }
  }
}

TEST(CudaReduceTest, EmptySumsWriteZero) {
  STRATA_REQUIRE_GPU();
  auto sq = GpuSum({}, true, false, 5.0);
  ASSERT_TRUE(sq.ok()) << sq.status().ToString();
  EXPECT_EQ(*sq, 0.0);
  auto acc = GpuSum({}, true, true, 5.0);
  ASSERT_TRUE(acc.ok()) << acc.status().ToString();
  EXPECT_EQ(*acc, 5.0);
  auto sum = GpuSum({}, false, false, 5.0);
  ASSERT_TRUE(sum.ok()) << sum.status().ToString();
  EXPECT_EQ(*sum, 0.0);
}

TEST(CudaReduceTest, InfAndNaNPropagateAndAreFlagged) {
  STRATA_REQUIRE_GPU();
  const int64_t n = 100003;
  const auto clean = UniformFloats(static_cast<size_t>(n), -1.f, 1.f, 4);
  struct Case {
    size_t index;
    float value;
  };
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const Case cases[] = {{0, inf}, {static_cast<size_t>(n) - 1, -inf}, {5001, nan}, {77777, nan}};
  for (const Case& c : cases) {
    SCOPED_TRACE("x[" + std::to_string(c.index) + "] = " + std::to_string(c.value));
    auto x = clean;
    x[c.index] = c.value;
    auto sq = GpuSum(x, true, false, 0.0);
    ASSERT_TRUE(sq.ok());
    if (std::isnan(c.value)) {
      EXPECT_TRUE(std::isnan(*sq));
    } else {
      EXPECT_EQ(*sq, std::numeric_limits<double>::infinity());
    }
    for (size_t offset : {0, 1}) {
      std::vector<float> padded(offset, 0.f);
      padded.insert(padded.end(), x.begin(), x.end());
      auto x_dev = ToDevice(padded);
      auto flag = ToDevice(std::vector<int>{0});
      ASSERT_TRUE(x_dev.ok() && flag.ok());
      ASSERT_TRUE(CudaFlagNonFinite(flag->as<int>(), x_dev->as<float>() + offset, n, nullptr).ok());
      auto f = ToHost<int>(*flag, 1);
      ASSERT_TRUE(f.ok());
      EXPECT_EQ((*f)[0], 1) << "offset " << offset;
    }
  }
  // Clean input leaves the flag as it was: 0 stays 0, 1 stays 1 (never cleared).
  auto x_dev = ToDevice(clean);
  ASSERT_TRUE(x_dev.ok());
  for (int init : {0, 1}) {
    auto flag = ToDevice(std::vector<int>{init});
    ASSERT_TRUE(flag.ok());
    ASSERT_TRUE(CudaFlagNonFinite(flag->as<int>(), x_dev->as<float>(), n, nullptr).ok());
    auto f = ToHost<int>(*flag, 1);
    ASSERT_TRUE(f.ok());
    EXPECT_EQ((*f)[0], init);
  }
  // Large finite values (FLT_MAX) are finite.
  auto big = ToDevice(std::vector<float>(9, std::numeric_limits<float>::max()));
  auto flag = ToDevice(std::vector<int>{0});
  ASSERT_TRUE(big.ok() && flag.ok());
  ASSERT_TRUE(CudaFlagNonFinite(flag->as<int>(), big->as<float>(), 9, nullptr).ok());
  auto f = ToHost<int>(*flag, 1);
  ASSERT_TRUE(f.ok());
  EXPECT_EQ((*f)[0], 0);
}

TEST(CudaReduceTest, ScaleMatchesCpuBitwise) {
  STRATA_REQUIRE_GPU();
  for (int64_t n : kSizes) {
    for (size_t offset : {0, 1}) {
      SCOPED_TRACE("n = " + std::to_string(n) + " offset " + std::to_string(offset));
      auto x = UniformFloats(static_cast<size_t>(n) + offset, -1e4f, 1e4f, 6);
      auto x_dev = ToDevice(x);
      ASSERT_TRUE(x_dev.ok());
      ASSERT_TRUE(CudaScale(x_dev->as<float>() + offset, n, 0.3f, nullptr).ok());
      Scale(x.data() + offset, n, 0.3f);
      auto got = ToHost<float>(*x_dev, x.size());
      ASSERT_TRUE(got.ok());
      EXPECT_EQ(std::memcmp(got->data(), x.data(), x.size() * sizeof(float)), 0);
    }
  }
}

template <typename T>
void CheckCasts() {
  SCOPED_TRACE(DTypeName(DTypeOf<T>::value));
  std::vector<float> src = SpecialFloats();
  const auto random = UniformFloats(100001, -70000.f, 70000.f, 8);
  src.insert(src.end(), random.begin(), random.end());
  const auto tiny = UniformFloats(1001, -1e-4f, 1e-4f, 9);  // fp16 subnormals
  src.insert(src.end(), tiny.begin(), tiny.end());
  const int64_t n = static_cast<int64_t>(src.size());
  for (size_t offset : {0, 1, 3}) {
    SCOPED_TRACE("offset " + std::to_string(offset));
    std::vector<float> padded(offset, 0.f);
    padded.insert(padded.end(), src.begin(), src.end());
    auto src_dev = ToDevice(padded);
    auto dst_dev = DeviceBuffer::Allocate((src.size() + offset) * sizeof(T));
    ASSERT_TRUE(src_dev.ok() && dst_dev.ok());
    T* dst = dst_dev->template as<T>() + offset;
    ASSERT_TRUE(CudaCastFromFloat(dst, static_cast<const float*>(src_dev->data()) + offset, n,
                                  DTypeOf<T>::value, nullptr)
                    .ok());
    auto got = ToHost<T>(*dst_dev, src.size() + offset);
    ASSERT_TRUE(got.ok());
    size_t bad = 0;
    for (size_t i = 0; i < src.size(); ++i) {
      const uint16_t want = Bits(FromFloat<T>(src[i]));
      const uint16_t have = Bits((*got)[i + offset]);
      if (have != want && bad++ < 5) {
        ADD_FAILURE() << "FromFloat(" << src[i] << " = 0x" << std::hex << FloatToBits(src[i])
                      << ") got 0x" << have << " want 0x" << want;
      }
    }
    EXPECT_EQ(bad, 0u);
  }

  // Every bit pattern of T back to float.
  std::vector<T> all(65536);
  for (uint32_t b = 0; b < 65536; ++b) all[b].bits = static_cast<uint16_t>(b);
  for (size_t offset : {0, 1}) {
    SCOPED_TRACE("ToFloat offset " + std::to_string(offset));
    std::vector<T> padded(offset, T{0});
    padded.insert(padded.end(), all.begin(), all.end());
    auto src_dev = ToDevice(padded);
    auto dst_dev = DeviceBuffer::Allocate((all.size() + offset) * sizeof(float));
    ASSERT_TRUE(src_dev.ok() && dst_dev.ok());
    ASSERT_TRUE(CudaCastToFloat(dst_dev->template as<float>() + offset,
                                static_cast<const T*>(src_dev->data()) + offset, 65536,
                                DTypeOf<T>::value, nullptr)
                    .ok());
    auto got = ToHost<float>(*dst_dev, all.size() + offset);
    ASSERT_TRUE(got.ok());
    size_t bad = 0;
    for (uint32_t b = 0; b < 65536; ++b) {
      const float want = ToFloat(all[b]);
      const float have = (*got)[b + offset];
      const bool same =
          std::isnan(want) ? std::isnan(have) : FloatToBits(have) == FloatToBits(want);
      if (!same && bad++ < 5) {
        ADD_FAILURE() << "ToFloat(0x" << std::hex << b << ") got " << have << " want " << want;
      }
    }
    EXPECT_EQ(bad, 0u);
  }
}

TEST(CudaReduceTest, CastsMatchDtypeBitwise) {
  STRATA_REQUIRE_GPU();
  CheckCasts<bf16>();
  CheckCasts<f16>();
}

TEST(CudaReduceTest, Fp32CastIsACopy) {
  STRATA_REQUIRE_GPU();
  const auto x = UniformFloats(1027, -1.f, 1.f, 10);
  auto src = ToDevice(x);
  auto dst = DeviceBuffer::Allocate(x.size() * sizeof(float));
  ASSERT_TRUE(src.ok() && dst.ok());
  ASSERT_TRUE(CudaCastFromFloat(dst->data(), src->as<float>(), 1027, DType::kF32, nullptr).ok());
  auto got = ToHost<float>(*dst, x.size());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, x);
  ASSERT_TRUE(CudaCastToFloat(dst->as<float>(), src->data(), 1027, DType::kF32, nullptr).ok());
  got = ToHost<float>(*dst, x.size());
  ASSERT_TRUE(got.ok());
  EXPECT_EQ(*got, x);
}

}  // namespace
}  // namespace strata::model
