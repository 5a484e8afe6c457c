// CUDA causal attention (model/cuda/attention.cu) against the CPU reference
// (model/kernels/attention.cc), forward and backward, fp32 / bf16 / fp16, on lengths that are
// and are not multiples of the tile (1, 7, 33, 64, 65, 100, 256, 1024) and head sizes 32, 64,
// 128; plus bitwise determinism and argument checks. The argument checks and the workspace
// arithmetic run without a GPU; everything else skips, loudly, without one.
//
// Tolerances (|got - want| per element, `scale` = max |want| over the tensor compared):
// - fp32: 1e-4 * scale. Both sides compute in fp32 from the same inputs; they differ only in
//   summation order and in their exp (CPU FastExp, GPU exp2f of pre-scaled scores, ~2 ulp each),
//   a few 1e-7 relative per dot product even at t = 1024. lse: 1e-5 * max(1, max |lse|).
// - bf16 / fp16: 2^-7 (bf16) or 2^-10 (fp16) * |want| + 1e-4 * scale. The CPU reference gets the
//   same rounded inputs and, like the GPU, computes in fp32 and rounds each result once; the
//   fp32 results differ as above, so the rounded results differ by at most one ulp of the
//   value (<= 2^-7 / 2^-10 of it) where the two land on opposite sides of a rounding boundary,
//   plus the fp32 difference itself for values near zero. lse is fp32 for every dtype: as fp32.
// The backward pass is fed the CPU's forward results (out, lse) on both sides, so its check does
// not inherit forward differences. Output buffers start filled with NaN bytes, so an element
// the kernels forget to write fails the comparison.
#include "model/kernels/attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "model/cuda/attention_cuda.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/dtype.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::Round;
using testing::ToDevice;
using testing::ToFloats;
using testing::ToHost;
using testing::UniformFloats;

// ---- argument checks (no GPU needed: nothing is launched)
// ----------------------------------------

TEST(CudaAttentionArgsTest, RejectsUnsupportedHeadSizeNamingTheConfig) {
  float dummy = 0.f;
  // c / nh = 48, 100 / 3 (not integral) and nh = 0.
  for (const auto& [c, nh] :
       std::vector<std::pair<int, int>>{{96, 2}, {100, 3}, {64, 0}, {16, 1}, {512, 2}}) {
    const Status fwd =
        CudaAttentionForward(&dummy, &dummy, &dummy, 1, 4, c, nh, DType::kF32, nullptr);
    EXPECT_EQ(fwd.code(), StatusCode::kInvalidArgument) << c << "/" << nh;
    EXPECT_NE(fwd.message().find("model.channels"), std::string::npos) << fwd.message();
    EXPECT_NE(fwd.message().find("model.heads"), std::string::npos) << fwd.message();
    const Status bwd = CudaAttentionBackward(&dummy, &dummy, &dummy, &dummy, &dummy, 1, 4, c, nh,
                                             &dummy, 1 << 20, DType::kBF16, nullptr);
    EXPECT_EQ(bwd.code(), StatusCode::kInvalidArgument) << c << "/" << nh;
    EXPECT_NE(bwd.message().find("model.channels"), std::string::npos) << bwd.message();
    EXPECT_NE(bwd.message().find("model.heads"), std::string::npos) << bwd.message();
  }
}

TEST(CudaAttentionArgsTest, RejectsNegativeSizes) {
  float d = 0.f;
  for (const auto& [b, t, c, nh] : std::vector<std::array<int, 4>>{
           {-1, 4, 128, 2}, {1, -4, 128, 2}, {1, 4, -128, 2}, {1, 4, 128, -2}}) {
    EXPECT_EQ(CudaAttentionForward(&d, &d, &d, b, t, c, nh, DType::kF32, nullptr).code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(
        CudaAttentionBackward(&d, &d, &d, &d, &d, b, t, c, nh, &d, 1 << 20, DType::kF32, nullptr)
            .code(),
        StatusCode::kInvalidArgument);
    EXPECT_EQ(CudaAttentionBackwardWorkspace(b, t, c, nh), 0u);
  }
}

TEST(CudaAttentionArgsTest, RejectsNullPointersAndSmallWorkspace) {
  float d = 0.f;
  const int b = 2, t = 5, c = 128, nh = 2;
  EXPECT_EQ(CudaAttentionForward(nullptr, &d, &d, b, t, c, nh, DType::kF32, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaAttentionForward(&d, nullptr, &d, b, t, c, nh, DType::kF32, nullptr).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(CudaAttentionForward(&d, &d, nullptr, b, t, c, nh, DType::kF32, nullptr).code(),
            StatusCode::kInvalidArgument);
  const size_t ws = CudaAttentionBackwardWorkspace(b, t, c, nh);
  void* p = &d;
  for (int which = 0; which < 6; ++which) {
    void* ptr[6] = {p, p, p, p, p, p};
    ptr[which] = nullptr;
    EXPECT_EQ(CudaAttentionBackward(ptr[0], ptr[1], ptr[2], ptr[3], static_cast<float*>(ptr[4]), b,
                                    t, c, nh, ptr[5], ws, DType::kF16, nullptr)
                  .code(),
              StatusCode::kInvalidArgument)
        << "null pointer argument " << which;
  }
  const Status small =
      CudaAttentionBackward(p, p, p, p, &d, b, t, c, nh, p, ws - 1, DType::kF32, nullptr);
  EXPECT_EQ(small.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(small.message().find("workspace"), std::string::npos) << small.message();
  EXPECT_EQ(CudaAttentionForward(&d, &d, &d, b, t, c, nh, static_cast<DType>(42), nullptr).code(),
            StatusCode::kInvalidArgument);
}

TEST(CudaAttentionArgsTest, EmptyWorkIsOkWithoutPointers) {
  EXPECT_TRUE(
      CudaAttentionForward(nullptr, nullptr, nullptr, 0, 16, 128, 2, DType::kF32, nullptr).ok());
  EXPECT_TRUE(
      CudaAttentionForward(nullptr, nullptr, nullptr, 3, 0, 128, 2, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaAttentionBackward(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 16, 128, 2,
                                    nullptr, 0, DType::kF16, nullptr)
                  .ok());
  EXPECT_TRUE(CudaAttentionBackward(nullptr, nullptr, nullptr, nullptr, nullptr, 2, 0, 64, 1,
                                    nullptr, 0, DType::kF32, nullptr)
                  .ok());
}

TEST(CudaAttentionArgsTest, WorkspaceHoldsOneFloatPerRowAndHead) {
  EXPECT_EQ(CudaAttentionBackwardWorkspace(2, 100, 128, 2), 2u * 2u * 100u * sizeof(float));
  EXPECT_EQ(CudaAttentionBackwardWorkspace(8, 1024, 768, 12), 8u * 12u * 1024u * sizeof(float));
  EXPECT_EQ(CudaAttentionBackwardWorkspace(0, 1024, 768, 12), 0u);
  EXPECT_EQ(CudaAttentionBackwardWorkspace(4, 0, 768, 12), 0u);
}

// ---- GPU vs CPU
// ----------------------------------------------------------------------------------

struct Case {
  int b, t, nh, hs;
};

std::string CaseName(const Case& k) {
  std::ostringstream s;
  s << "b" << k.b << "_t" << k.t << "_nh" << k.nh << "_hs" << k.hs;
  return s.str();
}

// Relative rounding step of T (0 for fp32: results are not rounded beyond fp32).
template <typename T>
double RoundingRel() {
  if constexpr (std::is_same_v<T, bf16>) return 1.0 / 128;
  if constexpr (std::is_same_v<T, f16>) return 1.0 / 1024;
  return 0.0;
}

// Compares a strided sub-block: elements [row * stride + col, + width) for every row.
::testing::AssertionResult Close(const char* what, const std::vector<float>& got,
                                 const std::vector<float>& want, size_t rows, size_t stride,
                                 size_t col, size_t width, double rel, double atol_frac,
                                 double min_scale = 0.0) {
  double scale = 0.0;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t j = col; j < col + width; ++j)
      scale = std::max(scale, std::fabs(static_cast<double>(want[r * stride + j])));
  }
  const double atol = atol_frac * std::max({scale, min_scale, 1e-30});
  size_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (size_t r = 0; r < rows; ++r) {
    for (size_t j = col; j < col + width; ++j) {
      const size_t i = r * stride + j;
      const double w = want[i], g = got[i];
      const double diff = std::fabs(g - w);
      const double tol = rel * std::fabs(w) + atol;
      worst = std::max(worst, diff / (rel * std::fabs(w) + atol));
      if (!(diff <= tol)) {  // NaN fails
        if (bad < 5) first << "\n  [" << r << ", " << j - col << "] got " << g << " want " << w;
        ++bad;
      }
    }
  }
  if (bad == 0) {
    return ::testing::AssertionSuccess() << what << ": worst error / tolerance " << worst;
  }
  return ::testing::AssertionFailure()
         << what << ": " << bad << " of " << rows * width << " elements out of tolerance (scale "
         << scale << ", worst error / tolerance " << worst << "):" << first.str();
}

template <typename T>
std::vector<T> NanFilled(size_t n) {
  std::vector<T> v(n);
  std::memset(v.data(), 0xff, n * sizeof(T));  // NaN in fp32, bf16 and fp16
  return v;
}

template <typename T>
void CheckAgainstCpu(const Case& k) {
  const int b = k.b, t = k.t, nh = k.nh, c = k.nh * k.hs;
  const DType dt = DTypeOf<T>::value;
  const size_t n_qkv = static_cast<size_t>(b) * t * 3 * c, n_out = static_cast<size_t>(b) * t * c;
  const size_t n_lse = static_cast<size_t>(b) * nh * t;
  SCOPED_TRACE(CaseName(k) + " " + DTypeName(dt));
  // Scores q.k / sqrt(hs) with std ~0.75 at every hs: peaked enough to exercise the running max.
  const std::vector<T> qkv = Round<T>(UniformFloats(n_qkv, -1.5f, 1.5f, 17 + t + k.hs));
  const std::vector<T> dout = Round<T>(UniformFloats(n_out, -1.f, 1.f, 91 + t + k.hs));

  std::vector<T> out_cpu(n_out);
  std::vector<float> lse_cpu(n_lse);
  AttentionForward<T>(out_cpu.data(), lse_cpu.data(), qkv.data(), b, t, c, nh);
  std::vector<T> dqkv_cpu(n_qkv);
  AttentionBackward<T>(dqkv_cpu.data(), dout.data(), qkv.data(), out_cpu.data(), lse_cpu.data(), b,
                       t, c, nh);

  auto qkv_d = ToDevice(qkv);
  auto dout_d = ToDevice(dout);
  auto out_d = ToDevice(NanFilled<T>(n_out));
  auto lse_d = ToDevice(NanFilled<float>(n_lse));
  ASSERT_TRUE(qkv_d.ok() && dout_d.ok() && out_d.ok() && lse_d.ok());
  Status st = CudaAttentionForward(out_d->data(), lse_d->as<float>(), qkv_d->data(), b, t, c, nh,
                                   dt, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto out_gpu = ToHost<T>(*out_d, n_out);
  ASSERT_TRUE(out_gpu.ok()) << out_gpu.status().ToString();
  auto lse_gpu = ToHost<float>(*lse_d, n_lse);
  ASSERT_TRUE(lse_gpu.ok()) << lse_gpu.status().ToString();

  const double rel = RoundingRel<T>();
  EXPECT_TRUE(Close("out", ToFloats(*out_gpu), ToFloats(out_cpu), static_cast<size_t>(b) * t, c, 0,
                    c, rel, 1e-4));
  // lse is fp32 for every dtype: 1e-5 * max(1, max |lse|).
  EXPECT_TRUE(Close("lse", *lse_gpu, lse_cpu, 1, n_lse, 0, n_lse, 0.0, 1e-5, 1.0));

  // Backward from the CPU's forward results on both sides.
  auto out_ref_d = ToDevice(out_cpu);
  auto lse_ref_d = ToDevice(lse_cpu);
  auto dqkv_d = ToDevice(NanFilled<T>(n_qkv));
  const size_t ws_bytes = CudaAttentionBackwardWorkspace(b, t, c, nh);
  auto ws_d = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(out_ref_d.ok() && lse_ref_d.ok() && dqkv_d.ok() && ws_d.ok());
  st = CudaAttentionBackward(dqkv_d->data(), dout_d->data(), qkv_d->data(), out_ref_d->data(),
                             lse_ref_d->as<float>(), b, t, c, nh, ws_d->data(), ws_bytes, dt,
                             nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto dqkv_gpu = ToHost<T>(*dqkv_d, n_qkv);
  ASSERT_TRUE(dqkv_gpu.ok()) << dqkv_gpu.status().ToString();
  const std::vector<float> got = ToFloats(*dqkv_gpu), want = ToFloats(dqkv_cpu);
  const size_t rows = static_cast<size_t>(b) * t;
  EXPECT_TRUE(Close("dq", got, want, rows, 3 * c, 0, c, rel, 1e-4));
  EXPECT_TRUE(Close("dk", got, want, rows, 3 * c, c, c, rel, 1e-4));
  EXPECT_TRUE(Close("dv", got, want, rows, 3 * c, 2 * c, c, rel, 1e-4));
}

class CudaAttentionTest : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { STRATA_REQUIRE_GPU(); }
};

TEST_P(CudaAttentionTest, Fp32MatchesCpu) { CheckAgainstCpu<float>(GetParam()); }
TEST_P(CudaAttentionTest, Bf16MatchesCpu) { CheckAgainstCpu<bf16>(GetParam()); }
TEST_P(CudaAttentionTest, Fp16MatchesCpu) { CheckAgainstCpu<f16>(GetParam()); }

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionTest,
    ::testing::Values(Case{1, 1, 2, 64}, Case{2, 1, 1, 128}, Case{2, 7, 3, 32}, Case{1, 7, 2, 128},
                      Case{1, 33, 2, 128}, Case{1, 64, 2, 64}, Case{3, 65, 2, 64},
                      Case{2, 100, 3, 32}, Case{2, 100, 2, 128}, Case{1, 256, 4, 64},
                      Case{1, 256, 2, 128}, Case{1, 1024, 2, 64}, Case{1, 1024, 1, 128},
                      Case{1, 1024, 2, 32}),
    [](const ::testing::TestParamInfo<Case>& info) { return CaseName(info.param); });

// Two runs of forward and backward give bitwise the same bytes (no order-dependent atomics).
template <typename T>
void CheckDeterministic(const Case& k) {
  const int b = k.b, t = k.t, nh = k.nh, c = k.nh * k.hs;
  const DType dt = DTypeOf<T>::value;
  const size_t n_qkv = static_cast<size_t>(b) * t * 3 * c, n_out = static_cast<size_t>(b) * t * c;
  const size_t n_lse = static_cast<size_t>(b) * nh * t;
  SCOPED_TRACE(CaseName(k) + " " + DTypeName(dt));
  auto qkv_d = ToDevice(Round<T>(UniformFloats(n_qkv, -2.f, 2.f, 5)));
  auto dout_d = ToDevice(Round<T>(UniformFloats(n_out, -1.f, 1.f, 6)));
  const size_t ws_bytes = CudaAttentionBackwardWorkspace(b, t, c, nh);
  auto ws_d = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(qkv_d.ok() && dout_d.ok() && ws_d.ok());
  std::vector<std::vector<uint8_t>> outs, lses, grads;
  for (int run = 0; run < 2; ++run) {
    auto out_d = ToDevice(NanFilled<T>(n_out));
    auto lse_d = ToDevice(NanFilled<float>(n_lse));
    auto dqkv_d = ToDevice(NanFilled<T>(n_qkv));
    ASSERT_TRUE(out_d.ok() && lse_d.ok() && dqkv_d.ok());
    Status st = CudaAttentionForward(out_d->data(), lse_d->as<float>(), qkv_d->data(), b, t, c, nh,
                                     dt, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    st =
        CudaAttentionBackward(dqkv_d->data(), dout_d->data(), qkv_d->data(), out_d->data(),
                              lse_d->as<float>(), b, t, c, nh, ws_d->data(), ws_bytes, dt, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto out = ToHost<uint8_t>(*out_d, n_out * sizeof(T));
    auto lse = ToHost<uint8_t>(*lse_d, n_lse * sizeof(float));
    auto grad = ToHost<uint8_t>(*dqkv_d, n_qkv * sizeof(T));
    ASSERT_TRUE(out.ok() && lse.ok() && grad.ok());
    outs.push_back(*out);
    lses.push_back(*lse);
    grads.push_back(*grad);
  }
  EXPECT_TRUE(outs[0] == outs[1]) << "forward output differs between runs";
  EXPECT_TRUE(lses[0] == lses[1]) << "lse differs between runs";
  EXPECT_TRUE(grads[0] == grads[1]) << "dqkv differs between runs";
  // Not vacuous: the gradient holds finite, non-zero values.
  std::vector<T> g(n_qkv);
  std::memcpy(g.data(), grads[0].data(), n_qkv * sizeof(T));
  size_t nonzero = 0;
  for (const T& x : g) {
    ASSERT_TRUE(std::isfinite(ToFloat(x)));
    nonzero += ToFloat(x) != 0.f;
  }
  EXPECT_GT(nonzero, n_qkv / 2);
}

TEST(CudaAttentionDeterminismTest, TwoRunsAreBitwiseEqual) {
  STRATA_REQUIRE_GPU();
  CheckDeterministic<float>(Case{2, 300, 3, 64});
  CheckDeterministic<bf16>(Case{2, 300, 2, 128});
  CheckDeterministic<f16>(Case{3, 129, 2, 32});
}

}  // namespace
}  // namespace strata::model
