// Pipeline stages of the GPT (model/gpt with a PipelineStage), without communication: stage
// partitioning (balanced, global names, embedding and head placement, pp = 1 weights), the
// pp > layers error, activation slots (micro-batches in flight give the sequential results),
// pp = 1 unchanged bit for bit, and stages chained by hand reproducing the whole model.
// tests/pipeline_test.cc runs the stages over a process group with real schedules.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "tests/test_util.h"

namespace strata::model {
namespace {

constexpr int kB = 2, kT = 8, kMicro = 4;
constexpr uint64_t kSeed = 11;

GptConfig Config(bool recompute = false) {
  return ::strata::testing::SmallPipelineConfig(kT, recompute);
}

using Batch = ::strata::testing::TokenBatch;

std::vector<Batch> MakeBatches(int n, int vocab) {
  return ::strata::testing::RandomTokenBatches(n, vocab, kB, kT, 9);
}

std::unique_ptr<Gpt> Make(const GptConfig& cfg, PipelineStage stage = {}, int slots = 1) {
  auto m = Gpt::Create(cfg, DType::kF32, kB, kT, nullptr, stage, slots);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

// Larger weights than GPT-2 init, so that every path carries a sizeable gradient.
void Perturb(Gpt& m) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 0.3f);
  for (int64_t i = 0; i < m.num_params(); ++i) m.params()[i] += n(rng);
  m.RefreshComputeWeights();
}

const ParamTensor* Find(const Gpt& m, const std::string& name) {
  for (const auto& p : m.tensors()) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

// Copies the weights of `from` into `to` by tensor name (every tensor of `to` must exist).
void CopyByName(const Gpt& from, Gpt& to) {
  for (const ParamTensor& p : to.tensors()) {
    const ParamTensor* q = Find(from, p.name);
    ASSERT_NE(q, nullptr) << p.name;
    std::copy(from.params() + q->offset, from.params() + q->offset + q->numel,
              to.params() + p.offset);
  }
  to.RefreshComputeWeights();
}

TEST(GptPipelineStages, LayersAreContiguousAndBalanced) {
  for (int layers = 1; layers <= 9; ++layers) {
    for (int pp = 1; pp <= layers; ++pp) {
      SCOPED_TRACE(std::to_string(layers) + " layers, pp " + std::to_string(pp));
      int next = 0, prev_size = layers + 1;
      for (int s = 0; s < pp; ++s) {
        const LayerRange r = StageLayers(layers, {s, pp});
        EXPECT_EQ(r.begin, next);
        const int size = r.end - r.begin;
        EXPECT_GE(size, 1);
        EXPECT_LE(size, prev_size);  // extra blocks go to the earlier stages
        EXPECT_TRUE(size == layers / pp || size == layers / pp + 1);
        prev_size = size;
        next = r.end;
      }
      EXPECT_EQ(next, layers);
    }
  }
}

TEST(GptPipelineStages, PartitionNamesPlacementAndWeights) {
  const GptConfig cfg = Config();
  auto whole = Make(cfg);
  whole->InitWeights(kSeed);
  for (int pp : {1, 2, 3, 4}) {
    SCOPED_TRACE("pp " + std::to_string(pp));
    std::map<std::string, int> seen;
    for (int s = 0; s < pp; ++s) {
      SCOPED_TRACE("stage " + std::to_string(s));
      auto m = Make(cfg, {s, pp});
      m->InitWeights(kSeed);
      EXPECT_EQ(m->stage().index, s);
      EXPECT_EQ(m->layers().begin, StageLayers(cfg.layers, {s, pp}).begin);
      const bool first = s == 0, last = s == pp - 1;
      EXPECT_EQ(Find(*m, "wte.weight") != nullptr, first || last);
      EXPECT_EQ(Find(*m, "wpe.weight") != nullptr, first);
      EXPECT_EQ(Find(*m, "ln_f.weight") != nullptr, last);
      EXPECT_EQ(Find(*m, "ln_f.bias") != nullptr, last);
      if (first || last) {
        EXPECT_EQ(m->tensors().front().name, "wte.weight");
        EXPECT_EQ(Find(*m, "wte.weight")->pipeline_tied, pp > 1);
      }
      int64_t offset = 0;
      for (const ParamTensor& p : m->tensors()) {
        SCOPED_TRACE(p.name);
        EXPECT_EQ(p.offset, offset);  // contiguous, in buffer order
        offset += p.numel;
        if (p.name != "wte.weight") {
          EXPECT_FALSE(p.pipeline_tied);
        }
        if (p.name.starts_with("h.")) {
          const int l = std::stoi(p.name.substr(2));
          EXPECT_GE(l, m->layers().begin);
          EXPECT_LT(l, m->layers().end);
        }
        ++seen[p.name];
        const ParamTensor* w = Find(*whole, p.name);
        ASSERT_NE(w, nullptr);
        EXPECT_EQ(p.shape, w->shape);
        EXPECT_EQ(p.decay, w->decay);
        // InitWeights gives the pp = 1 weights (both wte copies included).
        EXPECT_TRUE(std::equal(m->params() + p.offset, m->params() + p.offset + p.numel,
                               whole->params() + w->offset));
      }
      EXPECT_EQ(offset, m->num_params());
    }
    // Every tensor of the model lives on exactly one stage, wte on the first and the last.
    EXPECT_EQ(seen.size(), whole->tensors().size());
    for (const auto& [name, n] : seen) {
      EXPECT_EQ(n, name == "wte.weight" && pp > 1 ? 2 : 1) << name;
    }
  }
}

TEST(GptPipelineStages, MoreStagesThanLayersIsInvalidArgument) {
  auto m = Gpt::Create(Config(), DType::kF32, kB, kT, nullptr, {0, 5});
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(m.status().message(), "parallel.pp");
  EXPECT_HAS(m.status().message(), "model.layers=4");
  auto bad_index = Gpt::Create(Config(), DType::kF32, kB, kT, nullptr, {2, 2});
  ASSERT_FALSE(bad_index.ok());
  EXPECT_HAS(bad_index.status().message(), "parallel.pp");
  auto no_slots = Gpt::Create(Config(), DType::kF32, kB, kT, nullptr, {}, 0);
  ASSERT_FALSE(no_slots.ok());
  EXPECT_EQ(no_slots.status().code(), StatusCode::kInvalidArgument);
}

// pp = 1 through every entry point (default Create, explicit stage and slots, ForwardStage)
// gives bitwise the same losses and gradients.
TEST(GptPipelineStages, SingleStageIsTheWholeModelBitwise) {
  const GptConfig cfg = Config();
  const auto batches = MakeBatches(kMicro, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * kMicro);
  auto ref = Make(cfg);
  ref->InitWeights(kSeed);
  Perturb(*ref);
  std::vector<float> ref_losses;
  ref->ZeroGrad();
  for (const Batch& b : batches) {
    ref_losses.push_back(ref->Forward(b.x.data(), b.y.data(), kB, kT, dloss).value());
    ASSERT_TRUE(ref->Backward().ok());
  }
  auto m = Make(cfg, {0, 1}, 3);
  EXPECT_EQ(m->num_params(), ref->num_params());
  EXPECT_EQ(m->num_params(), cfg.NumParameters());
  EXPECT_EQ(Make(cfg)->activation_bytes(), ref->activation_bytes());
  CopyByName(*ref, *m);
  m->ZeroGrad();
  for (int i = 0; i < kMicro; ++i) {
    const Batch& b = batches[static_cast<size_t>(i)];
    auto loss = m->ForwardStage(i % 3, b.x.data(), nullptr, b.y.data(), kB, kT, dloss, nullptr);
    ASSERT_TRUE(loss.ok());
    EXPECT_EQ(*loss, ref_losses[static_cast<size_t>(i)]);
    ASSERT_TRUE(m->BackwardStage(i % 3, nullptr, nullptr).ok());
  }
  EXPECT_TRUE(std::equal(ref->grads(), ref->grads() + ref->num_params(), m->grads()));
}

// Several micro-batches in flight (forwards into different slots before their backwards)
// give bitwise the sequential results, with and without recomputation.
TEST(GptPipelineStages, SlotsAreIndependent) {
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(recompute ? "recompute" : "stored activations");
    const GptConfig cfg = Config(recompute);
    const auto batches = MakeBatches(kMicro, cfg.vocab_size);
    const float dloss = 1.f / (kB * kT * kMicro);
    auto seq = Make(cfg);
    seq->InitWeights(kSeed);
    Perturb(*seq);
    seq->ZeroGrad();
    std::vector<float> losses;
    for (const Batch& b : batches) {
      losses.push_back(seq->Forward(b.x.data(), b.y.data(), kB, kT, dloss).value());
      ASSERT_TRUE(seq->Backward().ok());
    }
    auto m = Make(cfg, {}, kMicro);
    CopyByName(*seq, *m);
    m->ZeroGrad();
    // All forwards, then the backwards in order (GPipe on one stage).
    for (int i = 0; i < kMicro; ++i) {
      const Batch& b = batches[static_cast<size_t>(i)];
      auto loss = m->ForwardStage(i, b.x.data(), nullptr, b.y.data(), kB, kT, dloss, nullptr);
      ASSERT_TRUE(loss.ok());
      EXPECT_EQ(*loss, losses[static_cast<size_t>(i)]);
    }
    for (int i = 0; i < kMicro; ++i) ASSERT_TRUE(m->BackwardStage(i, nullptr, nullptr).ok());
    EXPECT_TRUE(std::equal(seq->grads(), seq->grads() + seq->num_params(), m->grads()));
    // Each slot holds its own activations; recomputation keeps only the block inputs per slot.
    EXPECT_GT(m->slot_activation_bytes(), 0);
    EXPECT_GE(m->activation_bytes(),
              seq->activation_bytes() + (kMicro - 1) * m->slot_activation_bytes());
  }
  EXPECT_LT(Make(Config(true), {}, 2)->slot_activation_bytes(),
            Make(Config(false), {}, 2)->slot_activation_bytes());
}

// Stages chained by hand (the residual stream passed along, its gradient passed back, the two
// wte gradients summed) reproduce the whole model's loss and gradients.
TEST(GptPipelineStages, ChainedStagesMatchWholeModel) {
  const GptConfig cfg = Config();
  const auto batches = MakeBatches(kMicro, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * kMicro);
  auto ref = Make(cfg);
  ref->InitWeights(kSeed);
  Perturb(*ref);
  ref->ZeroGrad();
  double ref_loss = 0;
  for (const Batch& b : batches) {
    ref_loss += ref->Forward(b.x.data(), b.y.data(), kB, kT, dloss).value();
    ASSERT_TRUE(ref->Backward().ok());
  }
  double gmax = 0;
  for (int64_t i = 0; i < ref->num_params(); ++i) {
    gmax = std::max(gmax, static_cast<double>(std::fabs(ref->grads()[i])));
  }
  for (int pp : {2, 3, 4}) {
    SCOPED_TRACE("pp " + std::to_string(pp));
    std::vector<std::unique_ptr<Gpt>> stages;
    for (int s = 0; s < pp; ++s) {
      stages.push_back(Make(cfg, {s, pp}, kMicro));
      CopyByName(*ref, *stages.back());
      stages.back()->ZeroGrad();
    }
    const size_t act = static_cast<size_t>(kB) * kT * cfg.channels;
    std::vector<std::vector<float>> acts(static_cast<size_t>(pp + 1), std::vector<float>(act));
    double loss = 0;
    for (int i = 0; i < kMicro; ++i) {
      const Batch& b = batches[static_cast<size_t>(i)];
      for (int s = 0; s < pp; ++s) {
        auto l = stages[s]->ForwardStage(i, b.x.data(), acts[s].data(), b.y.data(), kB, kT, dloss,
                                         acts[s + 1].data());
        ASSERT_TRUE(l.ok());
        if (s == pp - 1) loss += *l;
      }
    }
    for (int i = 0; i < kMicro; ++i) {
      for (int s = pp - 1; s >= 0; --s) {
        ASSERT_TRUE(stages[s]->BackwardStage(i, acts[s + 1].data(), acts[s].data()).ok());
      }
    }
    EXPECT_NEAR(loss, ref_loss, 1e-6 * ref_loss);
    const ParamTensor* w0 = Find(*stages.front(), "wte.weight");
    const ParamTensor* wl = Find(*stages.back(), "wte.weight");
    for (int64_t i = 0; i < w0->numel; ++i) {
      const float sum =
          stages.front()->grads()[w0->offset + i] + stages.back()->grads()[wl->offset + i];
      stages.front()->grads()[w0->offset + i] = sum;
      stages.back()->grads()[wl->offset + i] = sum;
    }
    for (const auto& m : stages) {
      for (const ParamTensor& p : m->tensors()) {
        const ParamTensor* r = Find(*ref, p.name);
        for (int64_t i = 0; i < p.numel; ++i) {
          ASSERT_NEAR(m->grads()[p.offset + i], ref->grads()[r->offset + i], 1e-5 * gmax)
              << p.name << "[" << i << "]";
        }
      }
    }
  }
}

}  // namespace
}  // namespace strata::model
