// Whole-model tests of model/gpt: gradients against finite differences, recomputation,
// mixed-precision compute copies, configuration errors.
#include "model/gpt.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/cpu_info.h"
#include "tests/test_util.h"

namespace strata::model {
namespace {

GptConfig SmallConfig() { return ::strata::testing::GptConfigOf(40, 12, 2, 2, 16); }

void RandomTokens(std::vector<int32_t>* v, int vocab, unsigned seed) {
  std::mt19937 rng(seed);
  for (auto& x : *v) x = static_cast<int32_t>(rng() % vocab);
}

std::unique_ptr<Gpt> Make(const GptConfig& c, DType dt, int b, int t, uint64_t seed = 3) {
  auto m = Gpt::Create(c, dt, b, t);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  (*m)->InitWeights(seed);
  return std::move(m).value();
}

// Larger weights than GPT-2 init so that every path carries a sizeable gradient.
void Perturb(Gpt* m, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n(0.f, 0.3f);
  for (int64_t i = 0; i < m->num_params(); ++i) m->params()[i] += n(rng);
  m->RefreshComputeWeights();
}

TEST(Gpt, ParameterCountAndLayout) {
  GptConfig c = SmallConfig();
  auto m = Make(c, DType::kF32, 2, 8);
  EXPECT_EQ(m->num_params(), c.NumParameters());
  // GPT-2 124M: 124,439,808 parameters with a 50257 vocabulary and 1024 positions.
  GptConfig g;
  g.vocab_size = 50257;
  g.max_seq_len = 1024;
  g.layers = 12;
  g.heads = 12;
  g.channels = 768;
  EXPECT_EQ(g.NumParameters(), 124439808);
  int64_t expect_off = 0;
  for (const auto& p : m->tensors()) {
    EXPECT_EQ(p.offset, expect_off) << p.name;
    expect_off += p.numel;
    EXPECT_EQ(p.decay, p.shape.size() == 2) << p.name;
  }
  EXPECT_EQ(expect_off, m->num_params());
  EXPECT_EQ(m->tensors().front().name, "wte.weight");
  EXPECT_EQ(m->tensors()[4].name, "h.0.attn.c_attn.weight");
}

TEST(Gpt, InitFollowsGpt2) {
  GptConfig c = SmallConfig();
  c.channels = 64;
  c.vocab_size = 256;
  auto m = Make(c, DType::kF32, 1, 4, 11);
  for (const auto& p : m->tensors()) {
    const float* x = m->params() + p.offset;
    double s = 0, s2 = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      s += x[i];
      s2 += double(x[i]) * x[i];
    }
    const double mean = s / p.numel, std = std::sqrt(s2 / p.numel - mean * mean);
    if (p.shape.size() == 1) {
      const bool ln_w =
          p.name.find("ln_") != std::string::npos && p.name.find("weight") != std::string::npos;
      EXPECT_EQ(x[0], ln_w ? 1.f : 0.f) << p.name;
      EXPECT_EQ(std, 0.0) << p.name;
    } else {
      const double want = p.name.find("c_proj.weight") != std::string::npos
                              ? 0.02 / std::sqrt(2.0 * c.layers)
                              : 0.02;
      EXPECT_NEAR(std, want, 0.1 * want) << p.name;
    }
  }
  // Deterministic in the seed.
  auto m2 = Make(c, DType::kF32, 1, 4, 11);
  EXPECT_TRUE(std::equal(m->params(), m->params() + m->num_params(), m2->params()));
  auto m3 = Make(c, DType::kF32, 1, 4, 12);
  EXPECT_FALSE(std::equal(m->params(), m->params() + m->num_params(), m3->params()));
}

TEST(Gpt, InitialLossIsNearUniform) {
  GptConfig c = SmallConfig();
  c.vocab_size = 256;
  auto m = Make(c, DType::kF32, 2, 12);
  std::vector<int32_t> x(24), y(24);
  RandomTokens(&x, 256, 1);
  RandomTokens(&y, 256, 2);
  EXPECT_NEAR(m->Forward(x.data(), y.data(), 2, 12, 0.f).value(), std::log(256.0), 0.05);
}

// Central differences on the fp32 model: the analytic gradient of every tensor is checked on a
// few entries. fp32 limits the accuracy of the numerical derivative, hence the tolerance; the
// float64 comparison against PyTorch in torch_parity_test is the tight check.
TEST(Gpt, GradientsMatchFiniteDifferences) {
  SetNumThreads(1);
  GptConfig c = SmallConfig();
  const int b = 2, t = 7;
  auto m = Make(c, DType::kF32, b, t);
  Perturb(m.get(), 5);
  std::vector<int32_t> x(b * t), y(b * t);
  RandomTokens(&x, c.vocab_size, 3);
  RandomTokens(&y, c.vocab_size, 4);
  m->ZeroGrad();
  ASSERT_TRUE(m->Forward(x.data(), y.data(), b, t, 1.f / (b * t)).ok());
  ASSERT_TRUE(m->Backward().ok());
  std::vector<float> g(m->grads(), m->grads() + m->num_params());
  std::mt19937 rng(9);
  int checked = 0;
  for (const auto& p : m->tensors()) {
    for (int k = 0; k < 3; ++k) {
      const int64_t i = p.offset + static_cast<int64_t>(rng() % p.numel);
      float* w = m->params() + i;
      const float orig = *w;
      const float eps = 1e-2f;
      *w = orig + eps;
      const double lp = m->Forward(x.data(), y.data(), b, t, 0.f).value();
      *w = orig - eps;
      const double lm = m->Forward(x.data(), y.data(), b, t, 0.f).value();
      *w = orig;
      const double fd = (lp - lm) / (2.0 * eps);
      EXPECT_NEAR(g[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << p.name << "[" << i - p.offset << "]";
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * static_cast<int>(m->tensors().size()));
  SetNumThreads(0);
}

TEST(Gpt, RecomputeGivesIdenticalLossAndGradients) {
  GptConfig c = SmallConfig();
  const int b = 3, t = 12;
  auto plain = Make(c, DType::kF32, b, t);
  c.recompute = true;
  auto rec = Make(c, DType::kF32, b, t);
  Perturb(plain.get(), 1);
  Perturb(rec.get(), 1);
  std::vector<int32_t> x(b * t), y(b * t);
  RandomTokens(&x, c.vocab_size, 5);
  RandomTokens(&y, c.vocab_size, 6);
  for (Gpt* m : {plain.get(), rec.get()}) {
    m->ZeroGrad();
    ASSERT_TRUE(m->Forward(x.data(), y.data(), b, t, 1.f / (b * t)).ok());
    ASSERT_TRUE(m->Backward().ok());
  }
  EXPECT_TRUE(std::equal(plain->grads(), plain->grads() + plain->num_params(), rec->grads()));
  EXPECT_LT(rec->activation_bytes(), plain->activation_bytes());
}

TEST(Gpt, GradientsAccumulateAcrossMicroBatches) {
  GptConfig c = SmallConfig();
  const int b = 2, t = 6;
  auto m = Make(c, DType::kF32, b, t);
  std::vector<int32_t> x(b * t), y(b * t);
  RandomTokens(&x, c.vocab_size, 7);
  RandomTokens(&y, c.vocab_size, 8);
  m->ZeroGrad();
  ASSERT_TRUE(m->Forward(x.data(), y.data(), b, t, 1.f).ok());
  ASSERT_TRUE(m->Backward().ok());
  std::vector<float> once(m->grads(), m->grads() + m->num_params());
  ASSERT_TRUE(m->Forward(x.data(), y.data(), b, t, 1.f).ok());
  ASSERT_TRUE(m->Backward().ok());
  for (int64_t i = 0; i < m->num_params(); i += 97) EXPECT_FLOAT_EQ(m->grads()[i], 2 * once[i]);
}

// The ready callback covers every parameter exactly once, from the end of the buffer to the
// start, and each range's gradients are already final when it is reported.
TEST(Gpt, GradReadyCallbackCoversEveryParameterWithFinalValues) {
  GptConfig c = SmallConfig();
  c.layers = 3;
  const int b = 2, t = 6;
  auto m = Make(c, DType::kF32, b, t);
  std::vector<int32_t> x(b * t), y(b * t);
  RandomTokens(&x, c.vocab_size, 11);
  RandomTokens(&y, c.vocab_size, 12);
  m->ZeroGrad();
  ASSERT_TRUE(m->Forward(x.data(), y.data(), b, t, 1.f).ok());
  struct Range {
    int64_t offset, count;
    std::vector<float> at_report;
  };
  std::vector<Range> ranges;
  const Gpt::GradReadyFn record = [&](int64_t offset, int64_t count) {
    ranges.push_back(
        {offset, count, std::vector<float>(m->grads() + offset, m->grads() + offset + count)});
  };
  ASSERT_TRUE(m->Backward(record).ok());
  ASSERT_EQ(ranges.size(), static_cast<size_t>(c.layers + 2));
  int64_t expect_end = m->num_params();
  for (const Range& r : ranges) {
    EXPECT_EQ(r.offset + r.count, expect_end);
    expect_end = r.offset;
    EXPECT_TRUE(std::equal(r.at_report.begin(), r.at_report.end(), m->grads() + r.offset))
        << "range at " << r.offset << " changed after it was reported";
  }
  EXPECT_EQ(expect_end, 0);
}

TEST(Gpt, LowPrecisionComputeTracksFp32) {
  GptConfig c = SmallConfig();
  const int b = 2, t = 12;
  std::vector<int32_t> x(b * t), y(b * t);
  RandomTokens(&x, c.vocab_size, 1);
  RandomTokens(&y, c.vocab_size, 2);
  auto f32 = Make(c, DType::kF32, b, t);
  Perturb(f32.get(), 4);
  const float ref = f32->Forward(x.data(), y.data(), b, t, 0.f).value();
  for (DType dt : {DType::kBF16, DType::kF16}) {
    auto m = Make(c, dt, b, t);
    std::copy(f32->params(), f32->params() + f32->num_params(), m->params());
    m->RefreshComputeWeights();
    const float l = m->Forward(x.data(), y.data(), b, t, 0.f).value();
    EXPECT_NEAR(l, ref, (dt == DType::kBF16 ? 2e-2 : 3e-3) * ref) << DTypeName(dt);
    EXPECT_NE(l, ref) << DTypeName(dt) << " gave the fp32 result bit for bit";
  }
}

TEST(Gpt, CreateRejectsBadConfigs) {
  GptConfig c = SmallConfig();
  c.heads = 3;  // does not divide 16
  auto r = Gpt::Create(c, DType::kF32, 1, 4);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.heads"), std::string::npos) << r.status().message();
  c = SmallConfig();
  auto r2 = Gpt::Create(c, DType::kF32, 1, 13);  // longer than max_seq_len 12
  ASSERT_FALSE(r2.ok());
  EXPECT_NE(r2.status().message().find("seq_len"), std::string::npos);
  c.layers = 0;
  EXPECT_FALSE(Gpt::Create(c, DType::kF32, 1, 4).ok());
}

}  // namespace
}  // namespace strata::model
