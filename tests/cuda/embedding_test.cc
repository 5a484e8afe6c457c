// CUDA token + position embedding (model/cuda/embedding_cuda.h) against the CPU kernels
// (model/kernels/vocab_parallel.h): full table and vocabulary shards, tokens outside the shard
// (negative, past the shard, INT32_MAX), heavily repeated tokens (a run longer than one block of
// the segment kernel), fp32/bf16/fp16 tables, c with and without the 8-wide vector path.
//
// Tolerance: none. The forward is a conversion plus one fp32 addition on both sides, and the
// backward adds each token's rows into the old gradient in increasing r, the CPU's own order, so
// every result is compared bitwise. Determinism: two backward runs give the same bits.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/embedding_cuda.h"
#include "model/dtype.h"
#include "model/kernels/vocab_parallel.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::Round;
using testing::SameBits;
using testing::ToDevice;
using testing::ToHost;
using testing::UniformFloats;

struct Case {
  int b, t, c;
  int64_t lo;
  int valid;
  int vocab;  // tokens are drawn from [-3, vocab + 3) plus a few extremes
};

// Tokens with a heavy favourite (about 40% of rows, so runs longer than 256 appear for
// b * t >= 700), the rest spread over and around the shard, and some extremes.
std::vector<int32_t> MakeTokens(const Case& k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> any(-3, k.vocab + 2);
  std::uniform_real_distribution<float> coin(0.f, 1.f);
  const int favourite = static_cast<int>(k.lo) + k.valid / 2;
  std::vector<int32_t> tokens(static_cast<size_t>(k.b) * k.t);
  for (size_t r = 0; r < tokens.size(); ++r) {
    const float p = coin(rng);
    if (p < 0.4f) {
      tokens[r] = favourite;
    } else if (p < 0.42f) {
      tokens[r] = std::numeric_limits<int32_t>::max();
    } else if (p < 0.44f) {
      tokens[r] = std::numeric_limits<int32_t>::min();
    } else {
      tokens[r] = any(rng);
    }
  }
  return tokens;
}

// First mismatching index, for messages.
std::string FirstDiff(const std::vector<float>& got, const std::vector<float>& want) {
  std::ostringstream out;
  if (got.size() != want.size()) {
    out << "size " << got.size() << " != " << want.size();
    return out.str();
  }
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      out << "[" << i << "] got " << got[i] << " want " << want[i];
      return out.str();
    }
  }
  return "none";
}

template <typename T>
void CheckForward(const Case& k, DType dtype, bool with_wpe) {
  const size_t rows = static_cast<size_t>(k.b) * k.t;
  const auto tokens = MakeTokens(k, 1);
  const auto wte = Round<T>(UniformFloats(static_cast<size_t>(k.valid) * k.c, -1.f, 1.f, 2));
  const auto wpe = Round<T>(UniformFloats(static_cast<size_t>(k.t) * k.c, -1.f, 1.f, 3));
  std::vector<float> want(rows * k.c);
  VocabShardEmbeddingForward<T>(want.data(), tokens.data(), wte.data(), k.lo, k.valid,
                                static_cast<int64_t>(rows), k.c);
  if (with_wpe) AddPositionEmbedding<T>(want.data(), wpe.data(), k.b, k.t, k.c);

  auto d_tokens = ToDevice(tokens);
  auto d_wte = ToDevice(wte);
  auto d_wpe = ToDevice(wpe);
  // NaN-filled output: every element must be written.
  auto d_out = ToDevice(std::vector<float>(rows * k.c, std::numeric_limits<float>::quiet_NaN()));
  ASSERT_TRUE(d_tokens.ok() && d_wte.ok() && d_wpe.ok() && d_out.ok());
  const Status st = CudaEmbeddingForward(d_out->as<float>(), d_tokens->as<int32_t>(), d_wte->data(),
                                         with_wpe ? d_wpe->data() : nullptr, k.lo, k.valid, k.b,
                                         k.t, k.c, dtype, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto got = ToHost<float>(*d_out, rows * k.c);
  ASSERT_TRUE(got.ok()) << got.status().ToString();
  EXPECT_TRUE(SameBits(*got, want)) << FirstDiff(*got, want);
}

void CheckBackward(const Case& k, bool with_wpe) {
  const size_t rows = static_cast<size_t>(k.b) * k.t;
  const auto tokens = MakeTokens(k, 4);
  const auto dout = UniformFloats(rows * k.c, -1.f, 1.f, 5);
  const auto dwte0 = UniformFloats(static_cast<size_t>(k.valid) * k.c, -1.f, 1.f, 6);
  const auto dwpe0 = UniformFloats(static_cast<size_t>(k.t) * k.c, -1.f, 1.f, 7);
  std::vector<float> want_dwte = dwte0, want_dwpe = dwpe0;
  VocabShardEmbeddingBackward(want_dwte.data(), want_dwpe.data(), dout.data(), tokens.data(), k.lo,
                              k.valid, k.b, k.t, k.c);

  auto d_tokens = ToDevice(tokens);
  auto d_dout = ToDevice(dout);
  const size_t ws_bytes = CudaEmbeddingBackwardWorkspace(static_cast<int64_t>(rows));
  ASSERT_GT(ws_bytes, 0u);
  auto d_ws = DeviceBuffer::Allocate(ws_bytes);
  ASSERT_TRUE(d_tokens.ok() && d_dout.ok() && d_ws.ok());
  std::vector<float> first_dwte, first_dwpe;
  for (int run = 0; run < 2; ++run) {
    auto d_dwte = ToDevice(dwte0);
    auto d_dwpe = ToDevice(dwpe0);
    ASSERT_TRUE(d_dwte.ok() && d_dwpe.ok());
    const Status st = CudaEmbeddingBackward(
        d_dwte->as<float>(), with_wpe ? d_dwpe->as<float>() : nullptr, d_dout->as<float>(),
        d_tokens->as<int32_t>(), k.lo, k.valid, k.b, k.t, k.c, d_ws->data(), ws_bytes, nullptr);
    ASSERT_TRUE(st.ok()) << st.ToString();
    auto dwte = ToHost<float>(*d_dwte, dwte0.size());
    auto dwpe = ToHost<float>(*d_dwpe, dwpe0.size());
    ASSERT_TRUE(dwte.ok() && dwpe.ok());
    EXPECT_TRUE(SameBits(*dwte, want_dwte)) << "dwte " << FirstDiff(*dwte, want_dwte);
    if (with_wpe) {
      EXPECT_TRUE(SameBits(*dwpe, want_dwpe)) << "dwpe " << FirstDiff(*dwpe, want_dwpe);
    } else {
      EXPECT_TRUE(SameBits(*dwpe, dwpe0)) << "dwpe == nullptr must leave wpe's grad alone";
    }
    if (run == 0) {
      first_dwte = std::move(*dwte), first_dwpe = std::move(*dwpe);
    } else {
      EXPECT_TRUE(SameBits(*dwte, first_dwte)) << "two runs differ";
      EXPECT_TRUE(SameBits(*dwpe, first_dwpe)) << "two runs differ";
    }
  }
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaEmbeddingTest, RejectsBadArgumentsBeforeLaunching) {
  float f = 0.f;
  int32_t tok = 0;
  const auto kBad = StatusCode::kInvalidArgument;
  EXPECT_EQ(CudaEmbeddingForward(&f, &tok, &f, &f, 0, 1, -1, 1, 1, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaEmbeddingForward(&f, &tok, &f, &f, 0, 1, 1, 1, -1, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaEmbeddingForward(&f, &tok, &f, &f, 0, -1, 1, 1, 1, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaEmbeddingForward(&f, nullptr, &f, &f, 0, 1, 1, 1, 1, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaEmbeddingForward(&f, &tok, nullptr, &f, 0, 1, 1, 1, 1, DType::kBF16, nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaEmbeddingForward(&f, &tok, &f, &f, 0, 1, 1, 1, 1, static_cast<DType>(99), nullptr).code(),
      kBad);
  // Empty work touches no device.
  EXPECT_TRUE(
      CudaEmbeddingForward(nullptr, nullptr, nullptr, nullptr, 0, 5, 0, 4, 8, DType::kF32, nullptr)
          .ok());

  EXPECT_EQ(CudaEmbeddingBackwardWorkspace(0), 0u);
  EXPECT_EQ(CudaEmbeddingBackwardWorkspace(-1), 0u);
  EXPECT_EQ(CudaEmbeddingBackwardWorkspace(int64_t{1} << 31), 0u);
  char ws[64];
  EXPECT_EQ(CudaEmbeddingBackward(&f, &f, &f, &tok, 0, 1, 1, -1, 1, ws, sizeof(ws), nullptr).code(),
            kBad);
  EXPECT_EQ(CudaEmbeddingBackward(&f, &f, &f, &tok, 0, -1, 1, 1, 1, ws, sizeof(ws), nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaEmbeddingBackward(&f, &f, nullptr, &tok, 0, 1, 1, 1, 1, ws, sizeof(ws), nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaEmbeddingBackward(nullptr, &f, &f, &tok, 0, 1, 1, 1, 1, ws, sizeof(ws), nullptr).code(),
      kBad);
  // More rows than int32 indexes.
  EXPECT_EQ(CudaEmbeddingBackward(&f, &f, &f, &tok, 0, 1, 65536, 65536, 1, ws, sizeof(ws), nullptr)
                .code(),
            kBad);
  // No workspace, or one smaller than its own key arrays (4 x 256 bytes for one row).
  EXPECT_EQ(CudaEmbeddingBackward(&f, &f, &f, &tok, 0, 1, 1, 1, 1, nullptr, 4096, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaEmbeddingBackward(&f, &f, &f, &tok, 0, 1, 1, 1, 1, ws, sizeof(ws), nullptr).code(),
            kBad);
  EXPECT_TRUE(
      CudaEmbeddingBackward(nullptr, nullptr, nullptr, nullptr, 0, 5, 0, 4, 8, nullptr, 0, nullptr)
          .ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

class CudaEmbeddingVsCpuTest : public ::testing::TestWithParam<std::tuple<DType, Case>> {
 protected:
  void SetUp() override { STRATA_REQUIRE_GPU(); }
  DType dtype() const { return std::get<0>(GetParam()); }
  const Case& kase() const { return std::get<1>(GetParam()); }
};

TEST_P(CudaEmbeddingVsCpuTest, Forward) {
  for (const bool with_wpe : {true, false}) {
    SCOPED_TRACE(with_wpe ? "with wpe" : "without wpe");
    switch (dtype()) {
      case DType::kF32:
        CheckForward<float>(kase(), dtype(), with_wpe);
        break;
      case DType::kBF16:
        CheckForward<bf16>(kase(), dtype(), with_wpe);
        break;
      case DType::kF16:
        CheckForward<f16>(kase(), dtype(), with_wpe);
        break;
    }
  }
}

// The backward has no dtype (fp32 gradients); run once per case.
TEST_P(CudaEmbeddingVsCpuTest, Backward) {
  if (dtype() != DType::kF32) GTEST_SKIP() << "dtype-independent, covered by the fp32 instance";
  for (const bool with_wpe : {true, false}) {
    SCOPED_TRACE(with_wpe ? "with wpe" : "without wpe");
    CheckBackward(kase(), with_wpe);
  }
}

std::string ParamName(const ::testing::TestParamInfo<std::tuple<DType, Case>>& info) {
  const Case& k = std::get<1>(info.param);
  return std::string(DTypeName(std::get<0>(info.param))) + "_b" + std::to_string(k.b) + "_t" +
         std::to_string(k.t) + "_c" + std::to_string(k.c) + "_lo" + std::to_string(k.lo) +
         "_valid" + std::to_string(k.valid);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaEmbeddingVsCpuTest,
    ::testing::Combine(::testing::Values(DType::kF32, DType::kBF16, DType::kF16),
                       ::testing::Values(
                           // b, t, c, lo, valid, vocab
                           Case{1, 1, 1, 0, 1, 1}, Case{2, 3, 7, 0, 5, 5},
                           Case{3, 250, 33, 100, 77, 300},   // a middle shard, odd c
                           Case{4, 200, 768, 0, 300, 300},   // full table, vector path
                           Case{8, 128, 64, 192, 64, 256},   // last shard of a byte vocab
                           Case{2, 333, 1600, 37, 50, 120},  // runs > 256 rows, wide c
                           Case{2, 5, 24, 10, 0, 20})),      // empty shard: only dwpe
    ParamName);

}  // namespace
}  // namespace strata::model
