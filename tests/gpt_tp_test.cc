// Tensor-parallel GPT (model/gpt with a TensorParallelComm): every TP layout must reproduce the
// tp = 1 model. Ranks run as threads over an in-process group (shared memory + std::barrier);
// each rank's loss, local gradients and initial weights are compared with the matching slices
// of a tp = 1 model built from the same seed. Also: collective counts, padding of a vocabulary
// that tp does not divide, recomputation, the gradient-ready callback on local buffers, and
// propagation of collective errors through Forward/Backward.
#include <gtest/gtest.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "model/cpu_info.h"
#include "model/gpt.h"
#include "model/tensor_parallel.h"
#include "tests/test_util.h"

namespace strata::model {
namespace {

// ---- In-process TP group ----------------------------------------------------------------------

// State shared by the ranks of one group. Every collective is two barrier phases: publish the
// buffer, then (after everyone has read every buffer) overwrite one's own. Each rank reduces in
// rank order in fp32, so all ranks get bitwise identical results, as the interface requires.
struct Group {
  explicit Group(int n) : size(n), barrier(n), bufs(n), counts(n), types(n) {}
  int size;
  std::barrier<> barrier;
  std::vector<const void*> bufs;
  std::vector<int64_t> counts;
  std::vector<int> types;  // DType, or -1 for a max
};

float LoadFloat(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::kF32:
      return static_cast<const float*>(p)[i];
    case DType::kBF16:
      return ToFloat(static_cast<const bf16*>(p)[i]);
    case DType::kF16:
      return ToFloat(static_cast<const f16*>(p)[i]);
  }
  return 0.f;
}

void StoreFloat(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::kF32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBF16:
      static_cast<bf16*>(p)[i] = FromFloat<bf16>(v);
      break;
    case DType::kF16:
      static_cast<f16*>(p)[i] = FromFloat<f16>(v);
      break;
  }
}

class ThreadComm final : public TensorParallelComm {
 public:
  ThreadComm(Group* g, int rank) : g_(g), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->size; }
  Status AllReduceSum(void* buf, int64_t count, DType type) override {
    return Reduce(buf, count, type, static_cast<int>(type));
  }
  Status AllReduceMax(float* buf, int64_t count) override {
    return Reduce(buf, count, DType::kF32, -1);
  }
  int calls() const { return calls_; }

 private:
  Status Reduce(void* buf, int64_t count, DType type, int op) {
    ++calls_;
    g_->bufs[rank_] = buf;
    g_->counts[rank_] = count;
    g_->types[rank_] = op;
    g_->barrier.arrive_and_wait();
    bool same = true;
    for (int r = 0; r < g_->size; ++r) {
      same &= g_->counts[r] == count && g_->types[r] == op;
    }
    std::vector<float> acc(static_cast<size_t>(count));
    if (same) {
      for (int64_t i = 0; i < count; ++i) {
        float v = LoadFloat(g_->bufs[0], type, i);
        for (int r = 1; r < g_->size; ++r) {
          const float x = LoadFloat(g_->bufs[r], type, i);
          v = op < 0 ? std::max(v, x) : v + x;
        }
        acc[static_cast<size_t>(i)] = v;
      }
    }
    g_->barrier.arrive_and_wait();
    if (!same) {
      ADD_FAILURE() << "rank " << rank_ << ": collective " << calls_
                    << " differs between ranks (count or type)";
      return Internal("mismatched collective");
    }
    for (int64_t i = 0; i < count; ++i) StoreFloat(buf, type, i, acc[static_cast<size_t>(i)]);
    return Status::Ok();
  }

  Group* g_;
  int rank_;
  int calls_ = 0;
};

// One rank of a group of `size` with no peers: collectives succeed (leaving the buffer as it
// is) until call number `fail_at` (counting from 0), which fails, as do all after it.
class FaultyComm final : public TensorParallelComm {
 public:
  FaultyComm(int size, int fail_at) : size_(size), fail_at_(fail_at) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  Status AllReduceSum(void*, int64_t, DType) override { return Next(); }
  Status AllReduceMax(float*, int64_t) override { return Next(); }
  int calls() const { return calls_; }

 private:
  Status Next() {
    const int n = calls_++;
    if (fail_at_ >= 0 && n >= fail_at_) return {StatusCode::kUnavailable, "peer 1 gone"};
    return Status::Ok();
  }
  int size_, fail_at_;
  int calls_ = 0;
};

// ---- Reference and TP runs --------------------------------------------------------------------

struct Case {
  int tp;
  int heads;
  int channels;
  int vocab;
  DType dtype;
  bool recompute;
};

std::string CaseString(const Case& c) {
  return "tp" + std::to_string(c.tp) + "_heads" + std::to_string(c.heads) + "_vocab" +
         std::to_string(c.vocab) + "_" + DTypeName(c.dtype) + (c.recompute ? "_recompute" : "");
}
std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return CaseString(info.param); }
void PrintTo(const Case& c, std::ostream* os) { *os << CaseString(c); }

GptConfig ConfigOf(const Case& k) {
  GptConfig c;
  c.vocab_size = k.vocab;
  c.max_seq_len = 8;
  c.layers = 2;
  c.heads = k.heads;
  c.channels = k.channels;
  c.recompute = k.recompute;
  return c;
}

constexpr int kB = 2, kT = 8;
constexpr uint64_t kSeed = 17;

struct Batch {
  std::vector<int32_t> x, y;
};

Batch MakeBatch(int vocab) {
  Batch b{std::vector<int32_t>(kB * kT), std::vector<int32_t>(kB * kT)};
  std::mt19937 rng(5);
  for (auto& v : b.x) v = static_cast<int32_t>(rng() % vocab);
  for (auto& v : b.y) v = static_cast<int32_t>(rng() % vocab);
  b.y[3] = vocab - 1;  // the last token (next to any padding) is a target and an input
  b.x[4] = vocab - 1;
  return b;
}

// The tp = 1 model: initial weights, the perturbed weights both runs use, loss, gradients.
struct Reference {
  std::unique_ptr<Gpt> model;
  std::vector<float> init, params, grads;
  float loss = 0.f;
  int64_t activation_bytes = 0;
};

// Larger weights than GPT-2 init, so that every path carries a sizeable gradient.
Reference RunReference(const Case& k, const Batch& batch) {
  GptConfig cfg = ConfigOf(k);
  cfg.recompute = false;
  Reference ref;
  auto m = Gpt::Create(cfg, k.dtype, kB, kT);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  ref.model = std::move(m).value();
  Gpt& g = *ref.model;
  g.InitWeights(kSeed);
  ref.init.assign(g.params(), g.params() + g.num_params());
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 0.3f);
  for (int64_t i = 0; i < g.num_params(); ++i) g.params()[i] += n(rng);
  g.RefreshComputeWeights();
  ref.params.assign(g.params(), g.params() + g.num_params());
  g.ZeroGrad();
  auto loss = g.Forward(batch.x.data(), batch.y.data(), kB, kT, 1.f / (kB * kT));
  EXPECT_TRUE(loss.ok());
  ref.loss = loss.ok() ? *loss : NAN;
  EXPECT_TRUE(g.Backward().ok());
  ref.grads.assign(g.grads(), g.grads() + g.num_params());
  ref.activation_bytes = g.activation_bytes();
  return ref;
}

const ParamTensor& FindTensor(const Gpt& m, const std::string& name) {
  for (const auto& p : m.tensors()) {
    if (p.name == name) return p;
  }
  CHECK_MSG(false, "no tensor " + name);
  return m.tensors().front();
}

// What one rank saw.
struct RankResult {
  std::vector<ParamTensor> tensors;
  std::vector<float> init, grads;
  float loss = NAN;
  int fwd_calls = 0, bwd_calls = 0;
  int64_t activation_bytes = 0;
  struct Range {
    int64_t offset, count;
    std::vector<float> at_report;
  };
  std::vector<Range> ready;
  std::string error;
};

// Runs forward + backward on every rank of a TP group, from the reference's perturbed weights.
std::vector<RankResult> RunTensorParallel(const Case& k, const Reference& ref, const Batch& batch) {
  std::vector<RankResult> out(static_cast<size_t>(k.tp));
  Group group(k.tp);
  std::vector<std::thread> threads;
  for (int r = 0; r < k.tp; ++r) {
    threads.emplace_back([&, r] {
      SetNumThreads(1);  // k.tp ranks share this machine's cores
      RankResult& res = out[static_cast<size_t>(r)];
      ThreadComm comm(&group, r);
      auto made = Gpt::Create(ConfigOf(k), k.dtype, kB, kT, &comm);
      if (!made.ok()) {
        res.error = made.status().ToString();
        return;  // every rank fails alike: no collective is left waiting
      }
      Gpt& m = **made;
      m.InitWeights(kSeed);
      res.tensors = m.tensors();
      res.init.assign(m.params(), m.params() + m.num_params());
      // This rank's slice of the reference weights; padding stays 0.
      for (const ParamTensor& p : m.tensors()) {
        const ParamTensor& rp = FindTensor(*ref.model, p.name);
        for (int64_t i = 0; i < p.numel; ++i) {
          const int64_t gi = p.GlobalIndex(i);
          m.params()[p.offset + i] = gi < 0 ? 0.f : ref.params[static_cast<size_t>(rp.offset + gi)];
        }
      }
      m.RefreshComputeWeights();
      m.ZeroGrad();
      auto loss = m.Forward(batch.x.data(), batch.y.data(), kB, kT, 1.f / (kB * kT));
      res.fwd_calls = comm.calls();
      if (!loss.ok()) {
        res.error = loss.status().ToString();
        return;
      }
      res.loss = *loss;
      const Gpt::GradReadyFn record = [&](int64_t offset, int64_t count) {
        res.ready.push_back(
            {offset, count, std::vector<float>(m.grads() + offset, m.grads() + offset + count)});
      };
      Status s = m.Backward(record);
      res.bwd_calls = comm.calls() - res.fwd_calls;
      if (!s.ok()) res.error = s.ToString();
      res.grads.assign(m.grads(), m.grads() + m.num_params());
      res.activation_bytes = m.activation_bytes();
    });
  }
  for (auto& t : threads) t.join();
  SetNumThreads(0);
  return out;
}

double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, static_cast<double>(std::fabs(x)));
  return m;
}

class GptTensorParallel : public ::testing::TestWithParam<Case> {};

TEST_P(GptTensorParallel, MatchesTp1Model) {
  const Case k = GetParam();
  const bool fp32 = k.dtype == DType::kF32;
  // Stated tolerances: fp32 sums in another order (1e-5); bf16/fp16 round the partial sums of
  // every row-parallel output and column-parallel input gradient to the compute type before
  // the all-reduce, which tp = 1 never does.
  const double loss_tol = fp32 ? 1e-5 : k.dtype == DType::kBF16 ? 3e-3 : 5e-4;
  const double grad_tol = fp32 ? 1e-5 : k.dtype == DType::kBF16 ? 3e-2 : 5e-3;
  const Batch batch = MakeBatch(k.vocab);
  const Reference ref = RunReference(k, batch);
  const auto ranks = RunTensorParallel(k, ref, batch);
  const GptConfig cfg = ConfigOf(k);
  const double gmax = MaxAbs(ref.grads);
  ASSERT_GT(gmax, 0.0);

  double worst_loss = 0, worst_grad = 0;
  // Global elements covered by some rank's shard, per sharded tensor.
  std::vector<std::vector<int>> covered(ref.model->tensors().size());
  for (size_t i = 0; i < covered.size(); ++i) {
    covered[i].assign(static_cast<size_t>(ref.model->tensors()[i].numel), 0);
  }
  for (int r = 0; r < k.tp; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const RankResult& res = ranks[static_cast<size_t>(r)];
    ASSERT_TRUE(res.error.empty()) << res.error;
    // (a) the loss, identical on all ranks.
    EXPECT_NEAR(res.loss, ref.loss, loss_tol * std::fabs(ref.loss));
    worst_loss = std::max(worst_loss, std::fabs(double(res.loss) - ref.loss) / std::fabs(ref.loss));
    EXPECT_EQ(res.loss, ranks[0].loss);
    // Collectives: embedding, 2 per layer and 2 for the cross-entropy forward; the LM head and
    // 2 per layer backward, plus the recomputed forward's 2 per layer.
    EXPECT_EQ(res.fwd_calls, 1 + 2 * cfg.layers + 2);
    EXPECT_EQ(res.bwd_calls, 1 + 2 * cfg.layers + (k.recompute ? 2 * cfg.layers : 0));
    EXPECT_LT(res.activation_bytes, ref.activation_bytes);

    ASSERT_EQ(res.tensors.size(), ref.model->tensors().size());
    for (size_t ti = 0; ti < res.tensors.size(); ++ti) {
      const ParamTensor& p = res.tensors[ti];
      const ParamTensor& rp = ref.model->tensors()[ti];
      SCOPED_TRACE(p.name);
      ASSERT_EQ(p.name, rp.name);  // names identical to the unsharded model
      EXPECT_EQ(p.global_shape, rp.shape);
      EXPECT_EQ(p.decay, rp.decay);
      const bool ln = p.name.find("ln_") != std::string::npos;
      const bool row_bias = p.name.ends_with("c_proj.bias");
      EXPECT_EQ(p.replicated(), ln || row_bias || p.name == "wpe.weight");
      if (p.name.ends_with("c_attn.weight") || p.name.ends_with("c_fc.weight")) {
        EXPECT_EQ(p.shard_dim, 0);
      }
      if (p.name.ends_with("c_proj.weight")) {
        EXPECT_EQ(p.shard_dim, 1);
      }
      for (int64_t i = 0; i < p.numel; ++i) {
        const int64_t gi = p.GlobalIndex(i);
        const float g = res.grads[static_cast<size_t>(p.offset + i)];
        if (gi < 0) {  // vocabulary padding: zero weights, no gradient
          EXPECT_EQ(res.init[static_cast<size_t>(p.offset + i)], 0.f) << "[" << i << "]";
          EXPECT_EQ(g, 0.f) << "[" << i << "]";
          continue;
        }
        ASSERT_LT(gi, rp.numel);
        if (!p.replicated()) ++covered[ti][static_cast<size_t>(gi)];
        // (f) InitWeights gives exactly the tp = 1 weights.
        EXPECT_EQ(res.init[static_cast<size_t>(p.offset + i)],
                  ref.init[static_cast<size_t>(rp.offset + gi)])
            << "init [" << i << "] = global [" << gi << "]";
        // (b) gradients equal the tp = 1 gradients' slice.
        const float want = ref.grads[static_cast<size_t>(rp.offset + gi)];
        EXPECT_NEAR(g, want, grad_tol * gmax) << "[" << i << "] = global [" << gi << "]";
        worst_grad = std::max(worst_grad, std::fabs(double(g) - want) / gmax);
        // Replicated gradients are bitwise equal on every rank.
        if (p.replicated() && r > 0) {
          const RankResult& r0 = ranks[0];
          EXPECT_EQ(g, r0.grads[static_cast<size_t>(r0.tensors[ti].offset + i)]) << "[" << i << "]";
        }
      }
    }
    // The ready callback covers the local buffer once, from end to start, with final values.
    int64_t expect_end = static_cast<int64_t>(res.grads.size());
    ASSERT_EQ(res.ready.size(), static_cast<size_t>(cfg.layers + 2));
    for (const auto& range : res.ready) {
      EXPECT_EQ(range.offset + range.count, expect_end);
      expect_end = range.offset;
      EXPECT_TRUE(std::equal(range.at_report.begin(), range.at_report.end(),
                             res.grads.begin() + range.offset));
    }
    EXPECT_EQ(expect_end, 0);
  }
  std::printf(
      "%s: loss %.6f, max relative loss difference %.2g, max gradient difference %.2g of max "
      "|g| %.3g\n",
      CaseString(k).c_str(), ref.loss, worst_loss, worst_grad, gmax);
  // Every element of every sharded tensor lives on exactly one rank.
  for (size_t ti = 0; ti < covered.size(); ++ti) {
    if (ranks[0].tensors[ti].replicated()) continue;
    EXPECT_TRUE(std::all_of(covered[ti].begin(), covered[ti].end(), [](int n) { return n == 1; }))
        << ranks[0].tensors[ti].name;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, GptTensorParallel,
    ::testing::Values(
        // vocab 41 is padded at tp 2, 3 and 4; vocab 40 is not at tp 2 and 4.
        Case{2, 4, 16, 41, DType::kF32, false}, Case{4, 4, 16, 41, DType::kF32, false},
        Case{3, 3, 12, 41, DType::kF32, false}, Case{2, 4, 16, 40, DType::kF32, false},
        Case{4, 4, 16, 40, DType::kF32, false}, Case{2, 4, 16, 41, DType::kF32, true},
        Case{4, 4, 16, 41, DType::kF32, true}, Case{2, 4, 16, 41, DType::kBF16, false},
        Case{4, 4, 16, 41, DType::kBF16, false}, Case{4, 4, 16, 41, DType::kBF16, true},
        Case{2, 4, 16, 41, DType::kF16, false}),
    CaseName);

// With TP as without, recomputation changes nothing: same collectives, bit-identical results.
TEST(GptTensorParallelRecompute, BitIdenticalToStoredActivations) {
  Case k{2, 4, 16, 41, DType::kF32, false};
  const Batch batch = MakeBatch(k.vocab);
  const Reference ref = RunReference(k, batch);
  const auto plain = RunTensorParallel(k, ref, batch);
  k.recompute = true;
  const auto rec = RunTensorParallel(k, ref, batch);
  for (int r = 0; r < k.tp; ++r) {
    ASSERT_TRUE(plain[r].error.empty() && rec[r].error.empty());
    EXPECT_EQ(plain[r].loss, rec[r].loss);
    EXPECT_EQ(plain[r].grads, rec[r].grads) << "rank " << r;
    EXPECT_LT(rec[r].activation_bytes, plain[r].activation_bytes);
  }
}

// (e) tp must divide the number of heads.
TEST(GptTensorParallelConfig, TpNotDividingHeadsIsInvalidArgument) {
  Group group(3);
  ThreadComm comm(&group, 0);
  GptConfig cfg = ConfigOf({3, 4, 16, 40, DType::kF32, false});
  auto m = Gpt::Create(cfg, DType::kF32, kB, kT, &comm);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(m.status().message(), "parallel.tp");
  EXPECT_HAS(m.status().message(), "model.heads=4");
}

TEST(GptTensorParallelConfig, SizeOneGroupIsTheUnshardedModel) {
  Group group(1);
  ThreadComm comm(&group, 0);
  const Case k{1, 4, 16, 41, DType::kF32, false};
  const Batch batch = MakeBatch(k.vocab);
  const Reference ref = RunReference(k, batch);
  auto m = Gpt::Create(ConfigOf(k), DType::kF32, kB, kT, &comm);
  ASSERT_TRUE(m.ok());
  (*m)->InitWeights(kSeed);
  EXPECT_TRUE(std::equal(ref.init.begin(), ref.init.end(), (*m)->params()));
  EXPECT_EQ((*m)->num_params(), ConfigOf(k).NumParameters());
  std::copy(ref.params.begin(), ref.params.end(), (*m)->params());
  (*m)->RefreshComputeWeights();
  (*m)->ZeroGrad();
  auto loss = (*m)->Forward(batch.x.data(), batch.y.data(), kB, kT, 1.f / (kB * kT));
  ASSERT_TRUE(loss.ok());
  EXPECT_EQ(*loss, ref.loss);
  ASSERT_TRUE((*m)->Backward().ok());
  EXPECT_TRUE(std::equal(ref.grads.begin(), ref.grads.end(), (*m)->grads()));
  EXPECT_EQ(comm.calls(), 0);
}

// A failing collective anywhere in Forward or Backward comes back as that error, with context.
TEST(GptTensorParallelErrors, CollectiveFailuresPropagate) {
  GptConfig cfg = ConfigOf({2, 4, 16, 41, DType::kF32, false});
  const Batch batch = MakeBatch(cfg.vocab_size);
  int total = 0;
  {
    FaultyComm counting(2, -1);
    auto m = Gpt::Create(cfg, DType::kF32, kB, kT, &counting);
    ASSERT_TRUE(m.ok());
    (*m)->InitWeights(kSeed);
    ASSERT_TRUE((*m)->Forward(batch.x.data(), batch.y.data(), kB, kT, 1.f).ok());
    ASSERT_TRUE((*m)->Backward().ok());
    total = counting.calls();
  }
  ASSERT_EQ(total, (1 + 2 * cfg.layers + 2) + (1 + 2 * cfg.layers));
  for (int fail_at = 0; fail_at < total; ++fail_at) {
    SCOPED_TRACE("failing collective " + std::to_string(fail_at));
    FaultyComm comm(2, fail_at);
    auto m = Gpt::Create(cfg, DType::kF32, kB, kT, &comm);
    ASSERT_TRUE(m.ok());
    (*m)->InitWeights(kSeed);
    auto loss = (*m)->Forward(batch.x.data(), batch.y.data(), kB, kT, 1.f);
    Status s = loss.status();
    if (loss.ok()) s = (*m)->Backward();
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.code(), StatusCode::kUnavailable);
    EXPECT_HAS(s.message(), "tensor-parallel all-reduce of");
    EXPECT_HAS(s.message(), "peer 1 gone");
    EXPECT_EQ(loss.ok(), fail_at >= 1 + 2 * cfg.layers + 2) << s.message();
  }
}

}  // namespace
}  // namespace strata::model
