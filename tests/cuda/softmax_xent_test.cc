// CUDA softmax + cross-entropy (model/cuda/softmax_xent_cuda.h) against the CPU kernels
// (model/kernels/softmax_xent.h, vocab_parallel.h), for fp32 / bf16 / fp16 logits, odd widths
// (the one-element path), 16-byte-aligned widths (the packed path), GPT-2's 50257 and the padded
// 50304, padding columns, and the vocabulary-parallel phases on 2 and 3 simulated shards.
//
// Tolerances. Both sides compute the statistics in fp32 from the same T inputs; they differ in
// exp (CPU FastExp ~2 ulp, GPU expf ~1 ulp) and in the summation order of the row sum. The loss
// is log(sum) - (x_t - max): its error is the relative error of the sum, which for v positive
// terms summed in float is about sqrt(v) * 2^-24 on average (the CPU's simd lanes make it
// smaller still): ~1.3e-5 at v = 50304 in the worst realistic case, so 3e-5 + 1e-6 |loss|
// absolute. The gradient (p - onehot) * dloss: p carries the sum's relative error plus ~3 ulp,
// so |dg| <= 3e-5 * p * |dloss|; at the target p - 1 may round to the neighbouring float, one
// ulp (2^-23 |g|); a bf16 / fp16 result may also round to the neighbouring value, one ulp of T:
// 2^-7 |g| (bf16), 2^-10 |g| + 2^-24 (fp16, subnormals). The loss of a bf16 / fp16
// row is fp32, same bound as fp32.
#include "model/kernels/softmax_xent.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/softmax_xent_cuda.h"
#include "model/dtype.h"
#include "model/kernels/vocab_parallel.h"
#include "tests/cuda/cuda_test_util.h"

namespace strata::model {
namespace {

using testing::SameBits;
using testing::ToDevice;
using testing::ToFloats;
using testing::ToHost;
using testing::UniformFloats;

constexpr double kStatRel = 3e-5;
// At the target, p - 1 rounds to the float grid near 1 (spacing up to 2^-23): two p that differ
// by far less than kStatRel * p can land on neighbouring floats.
constexpr double kF32Ulp = 1.1920928955078125e-7;

// Streams the arguments into one string (GCC 12 warns falsely on long std::string + chains).
template <typename... A>
std::string Cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// One ulp of T relative to |g| (0 for fp32) and the absolute floor (fp16 subnormals).
template <typename T>
double TRel() {
  if constexpr (std::is_same_v<T, bf16>) return 1.0 / 128;
  if constexpr (std::is_same_v<T, f16>) return 1.0 / 1024;
  return 0.0;
}
template <typename T>
double TAbs() {
  return std::is_same_v<T, f16> ? 5.9604644775390625e-8 : 0.0;
}

::testing::AssertionResult LossesClose(const std::vector<float>& got,
                                       const std::vector<float>& want) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = 3e-5 + 1e-6 * std::fabs(want[i]);
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) {
      return ::testing::AssertionFailure()
             << "loss[" << i << "] got " << got[i] << " want " << want[i] << " (tol " << tol << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// got / want are gradients of rows of width v; probs[i] is the softmax probability behind
// want[i] (scaled by |dloss|), the scale of its fp32 error.
template <typename T>
::testing::AssertionResult GradsClose(const std::vector<float>& got, const std::vector<float>& want,
                                      const std::vector<double>& prob_scale) {
  if (got.size() != want.size()) return ::testing::AssertionFailure() << "size mismatch";
  size_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < got.size(); ++i) {
    const double tol = kStatRel * prob_scale[i] + (kF32Ulp + TRel<T>()) * std::fabs(want[i]) +
                       TAbs<T>() + std::numeric_limits<float>::denorm_min();
    if (!(std::fabs(static_cast<double>(got[i]) - want[i]) <= tol)) {
      if (bad < 5) first << "\n  [" << i << "] got " << got[i] << " want " << want[i];
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " differ:" << first.str();
}

// Softmax probabilities * |dloss| of the rows [n, v] with `valid` real columns, in double: the
// scale of each gradient element's fp32 error.
std::vector<double> ProbScale(const std::vector<float>& x, int64_t n, int v, int valid,
                              float dloss) {
  std::vector<double> p(x.size(), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = x.data() + i * v;
    double mx = -INFINITY;
    for (int j = 0; j < valid; ++j) mx = std::max<double>(mx, row[j]);
    double s = 0;
    for (int j = 0; j < valid; ++j) s += std::exp(row[j] - mx);
    for (int j = 0; j < valid; ++j) p[i * v + j] = std::exp(row[j] - mx) / s * std::fabs(dloss);
  }
  return p;
}

std::vector<int32_t> RandomTargets(int64_t n, int valid, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, valid - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = dist(rng);
  if (n > 0) t[0] = 0;
  if (n > 1) t[1] = valid - 1;
  return t;
}

// Logits [n, v]: uniform in [-6, 6], one row with a dominant entry; padding columns (>= valid)
// hold NaN so that reading them anywhere would show.
std::vector<float> MakeLogits(int64_t n, int v, int valid, uint32_t seed) {
  std::vector<float> x = UniformFloats(static_cast<size_t>(n) * v, -6.f, 6.f, seed);
  if (n > 2) x[2 * static_cast<size_t>(v) + valid / 2] = 30.f;
  for (int64_t i = 0; i < n; ++i) {
    for (int j = valid; j < v; ++j) x[i * v + j] = std::numeric_limits<float>::quiet_NaN();
  }
  return x;
}

// CPU reference for rows with padding: the CPU whole-vocabulary kernel on the valid columns,
// gradient 0 in the padding.
template <typename T>
void CpuReference(std::vector<T>& logits, std::vector<float>& losses,
                  const std::vector<int32_t>& targets, int64_t n, int v, int valid, float dloss) {
  std::vector<T> packed(static_cast<size_t>(n) * valid);
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(logits.begin() + i * v, valid, packed.begin() + i * valid);
  }
  losses.assign(static_cast<size_t>(n), 0.f);
  SoftmaxCrossEntropy<T>(packed.data(), losses.data(), targets.data(), n, valid, dloss);
  if (dloss == 0.f) return;
  for (int64_t i = 0; i < n; ++i) {
    std::copy_n(packed.begin() + i * valid, valid, logits.begin() + i * v);
    std::fill(logits.begin() + i * v + valid, logits.begin() + (i + 1) * v, FromFloat<T>(0.f));
  }
}

struct Shape {
  int64_t n;
  int v;
  int valid;
};

std::string ShapeName(const Shape& s) { return Cat("n", s.n, "_v", s.v, "_valid", s.valid); }

// Runs CudaSoftmaxCrossEntropy; returns (losses, logits after).
template <typename T>
void RunGpu(const std::vector<T>& logits, const std::vector<int32_t>& targets, int64_t n, int v,
            int valid, float dloss, std::vector<float>* losses, std::vector<T>* out) {
  auto x_dev = ToDevice(logits);
  ASSERT_TRUE(x_dev.ok()) << x_dev.status().ToString();
  auto t_dev = ToDevice(targets);
  ASSERT_TRUE(t_dev.ok()) << t_dev.status().ToString();
  auto l_dev = DeviceBuffer::Allocate(static_cast<size_t>(n) * sizeof(float));
  ASSERT_TRUE(l_dev.ok()) << l_dev.status().ToString();
  const Status st = CudaSoftmaxCrossEntropy(x_dev->data(), l_dev->as<float>(), t_dev->as<int32_t>(),
                                            n, v, valid, dloss, DTypeOf<T>::value, nullptr);
  ASSERT_TRUE(st.ok()) << st.ToString();
  auto l = ToHost<float>(*l_dev, static_cast<size_t>(n));
  ASSERT_TRUE(l.ok()) << l.status().ToString();
  *losses = *l;
  auto o = ToHost<T>(*x_dev, logits.size());
  ASSERT_TRUE(o.ok()) << o.status().ToString();
  *out = *o;
}

template <typename T>
void CheckWholeVocabulary(const Shape& s, float dloss) {
  SCOPED_TRACE(Cat(ShapeName(s), " ", DTypeName(DTypeOf<T>::value), " dloss=", dloss));
  const std::vector<float> xf = MakeLogits(s.n, s.v, s.valid, 11);
  const std::vector<T> x = testing::Round<T>(xf);
  const std::vector<int32_t> targets = RandomTargets(s.n, s.valid, 12);

  std::vector<T> want_x = x;
  std::vector<float> want_loss;
  CpuReference(want_x, want_loss, targets, s.n, s.v, s.valid, dloss);

  std::vector<float> got_loss;
  std::vector<T> got_x;
  RunGpu(x, targets, s.n, s.v, s.valid, dloss, &got_loss, &got_x);
  if (::testing::Test::HasFatalFailure()) return;
  EXPECT_TRUE(LossesClose(got_loss, want_loss));
  if (dloss == 0.f) {
    EXPECT_TRUE(SameBits(got_x, x)) << "dloss == 0 must leave the logits alone";
    return;
  }
  const auto prob = ProbScale(ToFloats(x), s.n, s.v, s.valid, dloss);
  EXPECT_TRUE(GradsClose<T>(ToFloats(got_x), ToFloats(want_x), prob));

  // Deterministic: a second run gives the same bits.
  std::vector<float> again_loss;
  std::vector<T> again_x;
  RunGpu(x, targets, s.n, s.v, s.valid, dloss, &again_loss, &again_x);
  EXPECT_TRUE(SameBits(again_loss, got_loss));
  EXPECT_TRUE(SameBits(again_x, got_x));
}

// ---- runs everywhere ------------------------------------------------------------------------

TEST(CudaSoftmaxXentArgsTest, RejectsBadArgumentsBeforeLaunching) {
  // Dummy non-null pointers: every call below must fail before touching them or a device.
  float f = 0.f;
  int32_t t = 0;
  void* x = &f;
  const auto kBad = StatusCode::kInvalidArgument;
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, &t, -1, 4, 4, 1.f, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, &t, 1, -4, 4, 1.f, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, &t, 1, 4, 5, 1.f, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, &t, 1, 4, 0, 1.f, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, &t, 1, 4, -1, 1.f, DType::kBF16, nullptr).code(), kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(nullptr, &f, &t, 1, 4, 4, 1.f, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, nullptr, &t, 1, 4, 4, 1.f, DType::kF16, nullptr).code(),
            kBad);
  EXPECT_EQ(CudaSoftmaxCrossEntropy(x, &f, nullptr, 1, 4, 4, 1.f, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaSoftmaxCrossEntropy(x, &f, &t, 1, 4, 4, 1.f, static_cast<DType>(42), nullptr).code(),
      kBad);

  EXPECT_EQ(CudaShardRowMax(&f, x, -1, 4, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaShardRowMax(&f, x, 1, 4, 5, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaShardRowMax(nullptr, x, 1, 4, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaShardRowMax(&f, nullptr, 1, 4, 4, DType::kF32, nullptr).code(), kBad);
  EXPECT_EQ(CudaShardSumExpAndTarget(&f, &f, x, &f, &t, 0, 1, 4, -1, DType::kF32, nullptr).code(),
            kBad);
  EXPECT_EQ(
      CudaShardSumExpAndTarget(&f, nullptr, x, &f, &t, 0, 1, 4, 4, DType::kF32, nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaShardSumExpAndTarget(&f, &f, x, nullptr, &t, 0, 1, 4, 4, DType::kF32, nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaShardSumExpAndTarget(&f, &f, x, &f, nullptr, 0, 1, 4, 4, DType::kF32, nullptr).code(),
      kBad);
  EXPECT_EQ(
      CudaShardCrossEntropyFinish(x, &f, &f, &f, &f, &t, 0, 1, 4, 8, 1.f, DType::kF32, nullptr)
          .code(),
      kBad);
  EXPECT_EQ(
      CudaShardCrossEntropyFinish(x, nullptr, &f, &f, &f, &t, 0, 1, 4, 4, 1.f, DType::kF32, nullptr)
          .code(),
      kBad);
  EXPECT_EQ(CudaShardCrossEntropyFinish(nullptr, &f, &f, &f, &f, &t, 0, 1, 4, 4, 1.f, DType::kF32,
                                        nullptr)
                .code(),
            kBad);
  EXPECT_EQ(
      CudaShardCrossEntropyFinish(x, &f, &f, &f, &f, nullptr, 0, 1, 4, 4, 1.f, DType::kF32, nullptr)
          .code(),
      kBad);

  // No rows: nothing to do, no device touched, pointers not needed.
  EXPECT_TRUE(
      CudaSoftmaxCrossEntropy(nullptr, nullptr, nullptr, 0, 4, 4, 1.f, DType::kF32, nullptr).ok());
  EXPECT_TRUE(CudaShardRowMax(nullptr, nullptr, 0, 4, 0, DType::kBF16, nullptr).ok());
  EXPECT_TRUE(CudaShardSumExpAndTarget(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, 4, 4,
                                       DType::kF16, nullptr)
                  .ok());
  EXPECT_TRUE(CudaShardCrossEntropyFinish(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                                          0, 4, 4, 1.f, DType::kF32, nullptr)
                  .ok());
}

// ---- needs a GPU ----------------------------------------------------------------------------

const Shape kShapes[] = {
    {1, 1, 1},                               // a single column: loss 0, gradient 0 (times dloss)
    {5, 7, 7},                               // odd width: one element at a time
    {3, 256, 256},                           // byte-level vocabulary, packed
    {33, 1001, 1001},                        // odd width, several warps
    {17, 1000, 997},                         // packed with padding inside the last pack
    {9, 4096, 3000},                         // padding spanning whole packs
    {8, 50257, 50257},                       // GPT-2, odd: one element at a time
    {16, 50304, 50304}, {16, 50304, 50257},  // GPT-2 padded to a multiple of 128
};

TEST(CudaSoftmaxXentTest, WholeVocabularyMatchesCpu) {
  STRATA_REQUIRE_GPU();
  for (const Shape& s : kShapes) {
    CheckWholeVocabulary<float>(s, 1.f / 64);
    CheckWholeVocabulary<bf16>(s, 1.f / 64);
    CheckWholeVocabulary<f16>(s, 1.f / 64);
  }
}

TEST(CudaSoftmaxXentTest, ForwardOnlyLeavesLogits) {
  STRATA_REQUIRE_GPU();
  CheckWholeVocabulary<float>({7, 1024, 1000}, 0.f);
  CheckWholeVocabulary<bf16>({7, 50304, 50257}, 0.f);
}

TEST(CudaSoftmaxXentTest, ManyRowsLoopTheGrid) {
  STRATA_REQUIRE_GPU();
  // More rows than a tiny vocabulary has threads, negative dloss.
  CheckWholeVocabulary<float>({4099, 64, 50}, -0.25f);
}

TEST(CudaSoftmaxXentTest, TargetOutsideTheVocabularyIsNaNNotAFault) {
  STRATA_REQUIRE_GPU();
  const int64_t n = 4;
  const int v = 64, valid = 60;
  const std::vector<float> x = MakeLogits(n, v, valid, 3);
  // -1, a padding column, far beyond the row, and one good target.
  const std::vector<int32_t> targets = {-1, 62, 1 << 30, 5};
  std::vector<float> losses;
  std::vector<float> grads;
  RunGpu(x, targets, n, v, valid, 1.f, &losses, &grads);
  if (HasFatalFailure()) return;
  const auto prob = ProbScale(x, n, v, valid, 1.f);
  for (int64_t i = 0; i < n; ++i) {
    SCOPED_TRACE(Cat("row ", i));
    const bool good = i == 3;
    EXPECT_EQ(std::isnan(losses[i]), !good);
    for (int j = 0; j < v; ++j) {
      const size_t k = static_cast<size_t>(i * v + j);
      // Softmax alone (no one-hot term) for a bad target; 0 in the padding.
      const double want = j < valid ? prob[k] - (good && j == targets[i] ? 1.0 : 0.0) : 0.0;
      EXPECT_NEAR(grads[k], want, kStatRel * prob[k] + kF32Ulp * std::fabs(want) + 1e-30)
          << "column " << j;
    }
  }
}

// Vocabulary-parallel: the whole vocabulary [0, vocab) split over `tp` simulated ranks, each with
// ceil(vocab / tp) columns (the last one padded), the all-reduces done here on the host.
template <typename T>
void CheckVocabParallel(int64_t n, int vocab, int tp, float dloss) {
  SCOPED_TRACE(Cat("n", n, " vocab", vocab, " tp", tp, " ", DTypeName(DTypeOf<T>::value)));
  const int vs = (vocab + tp - 1) / tp;  // shard width, padding included
  const std::vector<T> full = testing::Round<T>(MakeLogits(n, vocab, vocab, 21));
  std::vector<int32_t> targets = RandomTargets(n, vocab, 22);
  if (n > 2) targets[2] = vs;      // first column of shard 1
  if (n > 3) targets[3] = vs - 1;  // last column of shard 0

  // Whole-vocabulary references: the CPU, and the GPU's own whole-vocabulary kernel.
  std::vector<T> want_x = full;
  std::vector<float> want_loss;
  CpuReference(want_x, want_loss, targets, n, vocab, vocab, dloss);
  const auto prob = ProbScale(ToFloats(full), n, vocab, vocab, dloss);

  struct ShardDev {
    int64_t lo;
    int valid;
    DeviceBuffer x, mx, sum_exp, target, losses;
  };
  std::vector<ShardDev> shards;
  auto t_dev = ToDevice(targets);
  ASSERT_TRUE(t_dev.ok()) << t_dev.status().ToString();
  const size_t rows = static_cast<size_t>(n);
  for (int r = 0; r < tp; ++r) {
    const int64_t lo = static_cast<int64_t>(r) * vs;
    const int valid = static_cast<int>(std::clamp<int64_t>(vocab - lo, 0, vs));
    // Padding columns hold NaN (bits of a NaN in T).
    std::vector<T> part(rows * vs, FromFloat<T>(std::numeric_limits<float>::quiet_NaN()));
    for (size_t i = 0; i < rows; ++i) {
      std::copy_n(full.begin() + i * vocab + lo, valid, part.begin() + i * vs);
    }
    auto x = ToDevice(part);
    ASSERT_TRUE(x.ok()) << x.status().ToString();
    ShardDev sd{lo, valid, std::move(*x), {}, {}, {}, {}};
    for (DeviceBuffer* b : {&sd.mx, &sd.sum_exp, &sd.target, &sd.losses}) {
      auto buf = DeviceBuffer::Allocate(rows * sizeof(float));
      ASSERT_TRUE(buf.ok()) << buf.status().ToString();
      *b = std::move(*buf);
    }
    shards.push_back(std::move(sd));
  }
  const DType dt = DTypeOf<T>::value;

  // Phase 1 + all-reduce(max).
  std::vector<float> mx(rows, -INFINITY);
  for (ShardDev& s : shards) {
    ASSERT_TRUE(
        CudaShardRowMax(s.mx.template as<float>(), s.x.data(), n, vs, s.valid, dt, nullptr).ok());
    auto m = ToHost<float>(s.mx, rows);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    for (size_t i = 0; i < rows; ++i) mx[i] = std::max(mx[i], (*m)[i]);
  }
  // Phase 2 + all-reduce(sum) of sum_exp and target.
  std::vector<float> sum_exp(rows, 0.f), target(rows, 0.f);
  for (ShardDev& s : shards) {
    ASSERT_TRUE(s.mx.CopyFromHost(mx.data(), rows * sizeof(float)).ok());
    ASSERT_TRUE(CudaShardSumExpAndTarget(s.sum_exp.template as<float>(),
                                         s.target.template as<float>(), s.x.data(),
                                         s.mx.template as<float>(), t_dev->template as<int32_t>(),
                                         s.lo, n, vs, s.valid, dt, nullptr)
                    .ok());
    auto se = ToHost<float>(s.sum_exp, rows);
    auto tg = ToHost<float>(s.target, rows);
    ASSERT_TRUE(se.ok() && tg.ok());
    for (size_t i = 0; i < rows; ++i) {
      sum_exp[i] += (*se)[i];
      target[i] += (*tg)[i];
    }
  }
  // Phase 3 on every shard; the losses agree across shards, the gradients tile the vocabulary.
  std::vector<float> got_grad(rows * vocab);
  for (ShardDev& s : shards) {
    ASSERT_TRUE(s.sum_exp.CopyFromHost(sum_exp.data(), rows * sizeof(float)).ok());
    ASSERT_TRUE(s.target.CopyFromHost(target.data(), rows * sizeof(float)).ok());
    ASSERT_TRUE(CudaShardCrossEntropyFinish(
                    s.x.data(), s.losses.template as<float>(), s.mx.template as<float>(),
                    s.sum_exp.template as<float>(), s.target.template as<float>(),
                    t_dev->template as<int32_t>(), s.lo, n, vs, s.valid, dloss, dt, nullptr)
                    .ok());
    auto l = ToHost<float>(s.losses, rows);
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    EXPECT_TRUE(LossesClose(*l, want_loss)) << "shard lo=" << s.lo;
    if (dloss == 0.f)
      continue;  // logits untouched (not checked: the loss-only kernel never
                 // reads them)
    auto g = ToHost<T>(s.x, rows * vs);
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    for (size_t i = 0; i < rows; ++i) {
      for (int j = 0; j < vs; ++j) {
        const float gj = ToFloat((*g)[i * vs + j]);
        if (j < s.valid) {
          got_grad[i * vocab + s.lo + j] = gj;
        } else {
          ASSERT_EQ(gj, 0.f) << "padding gradient, shard lo=" << s.lo << " row " << i;
        }
      }
    }
  }
  if (dloss != 0.f) {
    EXPECT_TRUE(GradsClose<T>(got_grad, ToFloats(want_x), prob));
  }
}

TEST(CudaSoftmaxXentTest, VocabParallelMatchesWholeVocabulary) {
  STRATA_REQUIRE_GPU();
  CheckVocabParallel<float>(6, 1000, 3, 0.5f);  // shards 334, 334, 332 + 2 padding
  CheckVocabParallel<bf16>(6, 1000, 3, 0.5f);
  CheckVocabParallel<f16>(6, 1001, 2, 0.5f);        // odd shard width
  CheckVocabParallel<float>(8, 50257, 2, 1.f / 8);  // 25129 + 25128 (+1 padding)
  CheckVocabParallel<bf16>(8, 50304, 3, 1.f / 8);   // 16768 each, packed
  CheckVocabParallel<float>(5, 7, 3, 1.f);          // 3, 3, 1 (+2 padding)
  CheckVocabParallel<float>(5, 7, 3, 0.f);          // forward only
}

TEST(CudaSoftmaxXentTest, EmptyShardHasMaxMinusInfinityAndSumZero) {
  STRATA_REQUIRE_GPU();
  // A shard with no real columns (vocab smaller than tp * width): -inf, 0, 0; gradient all 0.
  const int64_t n = 3;
  const int v = 8;
  const std::vector<float> x(static_cast<size_t>(n) * v, std::numeric_limits<float>::quiet_NaN());
  auto x_dev = ToDevice(x);
  auto mx_dev = ToDevice(std::vector<float>{1.f, 2.f, 3.f});
  auto se_dev = ToDevice(std::vector<float>(3, -1.f));
  auto tg_dev = ToDevice(std::vector<float>(3, -1.f));
  auto t_dev = ToDevice(std::vector<int32_t>{0, 5, 100});
  ASSERT_TRUE(x_dev.ok() && mx_dev.ok() && se_dev.ok() && tg_dev.ok() && t_dev.ok());
  ASSERT_TRUE(
      CudaShardRowMax(mx_dev->as<float>(), x_dev->data(), n, v, 0, DType::kF32, nullptr).ok());
  auto mx = ToHost<float>(*mx_dev, 3);
  ASSERT_TRUE(mx.ok());
  for (float m : *mx) EXPECT_EQ(m, -INFINITY);
  // The group-wide max comes from other shards.
  ASSERT_TRUE(mx_dev->CopyFromHost(std::vector<float>{1.f, 2.f, 3.f}.data(), 12).ok());
  ASSERT_TRUE(CudaShardSumExpAndTarget(se_dev->as<float>(), tg_dev->as<float>(), x_dev->data(),
                                       mx_dev->as<float>(), t_dev->as<int32_t>(), 0, n, v, 0,
                                       DType::kF32, nullptr)
                  .ok());
  auto se = ToHost<float>(*se_dev, 3);
  auto tg = ToHost<float>(*tg_dev, 3);
  ASSERT_TRUE(se.ok() && tg.ok());
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ((*se)[i], 0.f);
    EXPECT_EQ((*tg)[i], 0.f);
  }
}

}  // namespace
}  // namespace strata::model
