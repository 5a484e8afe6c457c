// Pipeline schedules (worker/pipeline) over the in-process backend, every stage a thread: for
// pp in {2, 4} and schedules 1F1B / GPipe (with and without recomputation) one step gives the
// pp = 1 loss, and every stage's gradients equal the pp = 1 gradients of its tensors (wte on
// both ends after the tied sum). Also: pp = 1 through the runner is the plain loop bit for
// bit, evaluation steps, fewer micro-batches than stages, TP x PP on a 2 x 2 grid, argument
// errors, and a stage that never shows up (DEADLINE_EXCEEDED, no hang).
#include "worker/pipeline.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <latch>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm/grid.h"
#include "comm/inprocess.h"
#include "model/cpu_info.h"
#include "tests/test_util.h"
#include "worker/tp_comm.h"

namespace strata::worker {
namespace {

using model::Gpt;
using model::ParamTensor;

constexpr int kB = 2, kT = 8;
constexpr uint64_t kSeed = 21;

model::GptConfig Config(bool recompute = false) {
  return ::strata::testing::SmallPipelineConfig(kT, recompute);
}

using Batch = ::strata::testing::TokenBatch;

std::vector<Batch> MakeBatches(int n, int vocab) {
  return ::strata::testing::RandomTokenBatches(n, vocab, kB, kT, 4);
}

MicroBatchFn Provider(const std::vector<Batch>& batches) {
  return [&batches](int m, int32_t* x, int32_t* y) {
    const Batch& b = batches[static_cast<size_t>(m)];
    std::copy(b.x.begin(), b.x.end(), x);
    std::copy(b.y.begin(), b.y.end(), y);
  };
}

const ParamTensor* Find(const Gpt& m, const std::string& name) {
  for (const auto& p : m.tensors()) {
    if (p.name == name) return &p;
  }
  return nullptr;
}

// The pp = 1 model: perturbed weights (so every path carries a sizeable gradient), the
// gradients of num_micro micro-batches accumulated in the plain loop, and their losses' sum.
struct Reference {
  std::unique_ptr<Gpt> model;
  double loss_sum = 0;
  double gmax = 0;
};

Reference RunReference(const model::GptConfig& cfg, const std::vector<Batch>& batches,
                       float dloss) {
  Reference ref;
  // One thread, as every stage thread runs: the kernels' reduction order depends on it.
  model::SetNumThreads(1);
  auto m = Gpt::Create(cfg, model::DType::kF32, kB, kT);
  EXPECT_TRUE(m.ok());
  ref.model = std::move(m).value();
  Gpt& g = *ref.model;
  g.InitWeights(kSeed);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 0.3f);
  for (int64_t i = 0; i < g.num_params(); ++i) g.params()[i] += n(rng);
  g.RefreshComputeWeights();
  g.ZeroGrad();
  for (const Batch& b : batches) {
    ref.loss_sum += g.Forward(b.x.data(), b.y.data(), kB, kT, dloss).value();
    if (dloss != 0.f) {
      EXPECT_TRUE(g.Backward().ok());
    }
  }
  model::SetNumThreads(0);
  for (int64_t i = 0; i < g.num_params(); ++i) {
    ref.gmax = std::max(ref.gmax, static_cast<double>(std::fabs(g.grads()[i])));
  }
  return ref;
}

// Copies this rank's slice of the reference weights (by name and GlobalIndex; padding 0).
void LoadReference(const Gpt& ref, Gpt& m) {
  for (const ParamTensor& p : m.tensors()) {
    const ParamTensor* r = Find(ref, p.name);
    CHECK(r != nullptr);
    for (int64_t i = 0; i < p.numel; ++i) {
      const int64_t gi = p.GlobalIndex(i);
      m.params()[p.offset + i] = gi < 0 ? 0.f : ref.params()[r->offset + gi];
    }
  }
  m.RefreshComputeWeights();
}

// What one stage saw.
struct StageResult {
  std::unique_ptr<Gpt> model;
  Status status;
  PipelineStepResult step;
  std::chrono::duration<double> seconds{};
};

struct RunSpec {
  int pp = 2;
  int tp = 1;
  PipelineSchedule schedule = PipelineSchedule::k1F1B;
  bool recompute = false;
  int num_micro = 4;
  bool train = true;
  std::chrono::milliseconds timeout{20000};
  int absent_rank = -1;  // this rank joins the group but never runs the step
};

// Runs one pipeline step on a tp x pp grid of threads (rank = p * tp + t).
std::vector<StageResult> RunPipeline(const RunSpec& k, const Reference& ref,
                                     const std::vector<Batch>& batches, float dloss) {
  const int world_size = k.pp * k.tp;
  comm::InProcessWorld world(world_size);
  std::vector<StageResult> out(static_cast<size_t>(world_size));
  std::latch done(world_size);
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      model::SetNumThreads(1);
      StageResult& res = out[static_cast<size_t>(r)];
      auto finish = [&](Status s) {
        res.status = std::move(s);
        done.count_down();
      };
      auto wg = comm::MakeInProcessGroup(world, r);
      if (!wg.ok()) return finish(wg.status());
      auto grid = comm::Grid::Create(world_size, 1, k.tp, k.pp);
      if (!grid.ok()) return finish(grid.status());
      auto groups = comm::SplitGrid(**wg, *grid);
      if (!groups.ok()) return finish(groups.status());
      if (r == k.absent_rank) {  // keep the group alive (no abort) until the others are done
        done.count_down();
        done.wait();
        return;
      }
      comm::ProcessGroup& pp = *groups->pp;
      ProcessGroupTpComm tp_comm(groups->tp.get(), k.timeout);
      const int slots = PipelineSlots(k.schedule, k.pp, pp.rank(), k.num_micro);
      auto made = Gpt::Create(Config(k.recompute), model::DType::kF32, kB, kT,
                              k.tp > 1 ? &tp_comm : nullptr, {pp.rank(), k.pp}, slots);
      if (!made.ok()) return finish(made.status());
      res.model = std::move(made).value();
      LoadReference(*ref.model, *res.model);
      res.model->ZeroGrad();
      PipelineStepOptions opt;
      opt.schedule = k.schedule;
      opt.num_micro = k.num_micro;
      opt.micro_batch = kB;
      opt.seq = kT;
      opt.dloss = k.train ? dloss : 0.f;
      opt.timeout = k.timeout;
      const auto t0 = std::chrono::steady_clock::now();
      auto step = RunPipelineStep(*res.model, pp, Provider(batches), opt);
      res.seconds = std::chrono::steady_clock::now() - t0;
      if (step.ok()) res.step = *step;
      finish(step.status());
    });
  }
  for (auto& t : threads) t.join();
  model::SetNumThreads(0);
  return out;
}

// Every stage's loss and gradients against the reference.
void ExpectMatchesReference(const std::vector<StageResult>& stages, const Reference& ref,
                            int num_micro) {
  double worst = 0;
  for (size_t r = 0; r < stages.size(); ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const StageResult& s = stages[r];
    ASSERT_TRUE(s.status.ok()) << s.status.ToString();
    EXPECT_NEAR(s.step.loss_sum, ref.loss_sum, 1e-6 * ref.loss_sum);
    EXPECT_EQ(s.step.loss_sum, stages[0].step.loss_sum);  // the same on every stage
    EXPECT_FLOAT_EQ(s.step.mean_loss, static_cast<float>(s.step.loss_sum / num_micro));
    const Gpt& m = *s.model;
    for (const ParamTensor& p : m.tensors()) {
      const ParamTensor* rp = Find(*ref.model, p.name);
      ASSERT_NE(rp, nullptr);
      for (int64_t i = 0; i < p.numel; ++i) {
        const int64_t gi = p.GlobalIndex(i);
        const float g = m.grads()[p.offset + i];
        if (gi < 0) {
          EXPECT_EQ(g, 0.f);
          continue;
        }
        const float want = ref.model->grads()[rp->offset + gi];
        ASSERT_NEAR(g, want, 1e-5 * ref.gmax) << p.name << "[" << i << "]";
        worst = std::max(worst, std::fabs(double(g) - want) / ref.gmax);
      }
    }
  }
  // The two wte copies (same TP coordinate) hold bitwise the same summed gradient.
  const StageResult& first = stages.front();
  const StageResult& last = stages.back();
  if (first.model->stage().count > 1 && first.model->tensors().size() > 0) {
    const ParamTensor* a = Find(*first.model, "wte.weight");
    const ParamTensor* b = Find(*last.model, "wte.weight");
    ASSERT_TRUE(a && b && a->pipeline_tied && b->pipeline_tied);
    if (a->shard_offset == b->shard_offset) {
      EXPECT_TRUE(std::equal(first.model->grads() + a->offset,
                             first.model->grads() + a->offset + a->numel,
                             last.model->grads() + b->offset));
    }
  }
  std::printf("max gradient difference %.2g of max |g| %.3g\n", worst, ref.gmax);
}

struct Case {
  int pp;
  PipelineSchedule schedule;
  bool recompute;
  int num_micro;
};

std::string CaseString(const Case& c) {
  return "pp" + std::to_string(c.pp) + "_" + PipelineScheduleName(c.schedule) +
         (c.recompute ? "_recompute" : "") + "_micro" + std::to_string(c.num_micro);
}
std::string CaseName(const ::testing::TestParamInfo<Case>& info) { return CaseString(info.param); }
void PrintTo(const Case& c, std::ostream* os) { *os << CaseString(c); }

class PipelineSchedules : public ::testing::TestWithParam<Case> {};

TEST_P(PipelineSchedules, MatchesSingleStage) {
  const Case c = GetParam();
  const model::GptConfig cfg = Config(c.recompute);
  const auto batches = MakeBatches(c.num_micro, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * c.num_micro);
  const Reference ref = RunReference(cfg, batches, dloss);
  RunSpec k;
  k.pp = c.pp;
  k.schedule = c.schedule;
  k.recompute = c.recompute;
  k.num_micro = c.num_micro;
  ExpectMatchesReference(RunPipeline(k, ref, batches, dloss), ref, c.num_micro);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PipelineSchedules,
    ::testing::Values(
        Case{2, PipelineSchedule::k1F1B, false, 4}, Case{4, PipelineSchedule::k1F1B, false, 4},
        Case{2, PipelineSchedule::kGPipe, false, 4}, Case{4, PipelineSchedule::kGPipe, false, 4},
        Case{2, PipelineSchedule::k1F1B, true, 4}, Case{4, PipelineSchedule::k1F1B, true, 4},
        Case{2, PipelineSchedule::kGPipe, true, 4}, Case{4, PipelineSchedule::kGPipe, true, 4},
        // fewer micro-batches than stages; more than the 1F1B window
        Case{4, PipelineSchedule::k1F1B, false, 2}, Case{2, PipelineSchedule::k1F1B, false, 7}),
    CaseName);

// pp = 1 through the runner is the plain Forward/Backward loop, bit for bit.
TEST(Pipeline, SingleStageIsThePlainLoopBitwise) {
  const model::GptConfig cfg = Config(false);
  const auto batches = MakeBatches(4, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * 4);
  const Reference ref = RunReference(cfg, batches, dloss);
  for (auto schedule : {PipelineSchedule::k1F1B, PipelineSchedule::kGPipe}) {
    RunSpec k;
    k.pp = 1;
    k.schedule = schedule;
    const auto stages = RunPipeline(k, ref, batches, dloss);
    ASSERT_TRUE(stages[0].status.ok()) << stages[0].status.ToString();
    EXPECT_EQ(stages[0].step.loss_sum, ref.loss_sum);
    const Gpt& m = *stages[0].model;
    EXPECT_TRUE(std::equal(m.grads(), m.grads() + m.num_params(), ref.model->grads()));
  }
}

// dloss = 0: forwards only, the loss on every stage, no gradients.
TEST(Pipeline, EvaluationStepGivesTheLossEverywhere) {
  const model::GptConfig cfg = Config(false);
  const auto batches = MakeBatches(4, cfg.vocab_size);
  const Reference ref = RunReference(cfg, batches, 0.f);
  RunSpec k;
  k.pp = 4;
  k.train = false;
  for (const StageResult& s : RunPipeline(k, ref, batches, 0.f)) {
    ASSERT_TRUE(s.status.ok()) << s.status.ToString();
    EXPECT_NEAR(s.step.loss_sum, ref.loss_sum, 1e-6 * ref.loss_sum);
    const Gpt& m = *s.model;
    EXPECT_TRUE(std::all_of(m.grads(), m.grads() + m.num_params(), [](float g) { return g == 0; }));
  }
}

// TP x PP: a 2 x 2 grid, each stage TP-sharded, against the unsharded single-stage model.
TEST(Pipeline, TensorAndPipelineParallelMatchSingleRank) {
  const model::GptConfig cfg = Config(false);
  const auto batches = MakeBatches(4, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * 4);
  const Reference ref = RunReference(cfg, batches, dloss);
  RunSpec k;
  k.pp = 2;
  k.tp = 2;
  const auto stages = RunPipeline(k, ref, batches, dloss);
  ExpectMatchesReference(stages, ref, 4);
  // wte of the first stage (ranks 0, 1) and of the last (ranks 2, 3), per TP coordinate.
  for (int t = 0; t < 2; ++t) {
    const Gpt& a = *stages[static_cast<size_t>(t)].model;
    const Gpt& b = *stages[static_cast<size_t>(2 + t)].model;
    const ParamTensor* wa = Find(a, "wte.weight");
    const ParamTensor* wb = Find(b, "wte.weight");
    EXPECT_EQ(wa->shard_offset, wb->shard_offset);
    EXPECT_TRUE(std::equal(a.grads() + wa->offset, a.grads() + wa->offset + wa->numel,
                           b.grads() + wb->offset));
  }
}

TEST(Pipeline, MismatchedArgumentsAreRejectedBeforeSending) {
  comm::InProcessWorld world(1);
  auto pg = comm::MakeInProcessGroup(world, 0);
  ASSERT_TRUE(pg.ok());
  auto stage1 = Gpt::Create(Config(false), model::DType::kF32, kB, kT, nullptr, {1, 2});
  ASSERT_TRUE(stage1.ok());
  const auto batches = MakeBatches(4, 40);
  PipelineStepOptions opt;
  opt.num_micro = 4;
  opt.micro_batch = kB;
  opt.seq = kT;
  opt.dloss = 1.f;
  auto r = RunPipelineStep(**stage1, **pg, Provider(batches), opt);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  // GPipe needs a slot per micro-batch.
  auto one_slot = Gpt::Create(Config(false), model::DType::kF32, kB, kT);
  ASSERT_TRUE(one_slot.ok());
  opt.schedule = PipelineSchedule::kGPipe;
  r = RunPipelineStep(**one_slot, **pg, Provider(batches), opt);
  EXPECT_EQ(r.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_HAS(r.status().message(), "activation slots");
  // The tied wte is counted in a gradient norm on the first stage only.
  auto stage0 = Gpt::Create(Config(false), model::DType::kF32, kB, kT, nullptr, {0, 2});
  ASSERT_TRUE(stage0.ok());
  EXPECT_TRUE(CountsInGradNorm(*Find(**stage0, "wte.weight"), (*stage0)->stage()));
  EXPECT_FALSE(CountsInGradNorm(*Find(**stage1, "wte.weight"), (*stage1)->stage()));
  EXPECT_TRUE(CountsInGradNorm(*Find(**stage1, "ln_f.weight"), (*stage1)->stage()));
  EXPECT_TRUE(CountsInGradNorm(*Find(**one_slot, "wte.weight"), (*one_slot)->stage()));
  EXPECT_EQ(ParsePipelineSchedule("gpipe").value(), PipelineSchedule::kGPipe);
  EXPECT_EQ(ParsePipelineSchedule("1f1b").value(), PipelineSchedule::k1F1B);
  EXPECT_HAS(ParsePipelineSchedule("zb").status().message(), "parallel.schedule");
}

// A stage that never sends or receives: its neighbours' waits time out, the step fails with
// DEADLINE_EXCEEDED (or CANCELLED once a neighbour has aborted the group), nothing hangs.
TEST(Pipeline, AbsentStageIsDeadlineExceeded) {
  const model::GptConfig cfg = Config(false);
  const auto batches = MakeBatches(4, cfg.vocab_size);
  const float dloss = 1.f / (kB * kT * 4);
  const Reference ref = RunReference(cfg, batches, dloss);
  for (int absent : {0, 1}) {
    SCOPED_TRACE("absent stage " + std::to_string(absent));
    RunSpec k;
    k.pp = 2;
    k.absent_rank = absent;
    k.timeout = std::chrono::milliseconds(300);
    const auto t0 = std::chrono::steady_clock::now();
    const auto stages = RunPipeline(k, ref, batches, dloss);
    const Status& s = stages[static_cast<size_t>(1 - absent)].status;
    EXPECT_EQ(s.code(), StatusCode::kDeadlineExceeded) << s.ToString();
    EXPECT_HAS(s.message(), "pipeline stage " + std::to_string(1 - absent) + "/2");
    EXPECT_HAS(s.message(), absent == 0 ? "activation from stage 0" : "gradient from stage 1");
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  }
  // Four stages, the last one absent: the first stage to time out aborts the group, the
  // others fail at once (CANCELLED) or by their own timeout.
  RunSpec k;
  k.pp = 4;
  k.absent_rank = 3;
  k.timeout = std::chrono::milliseconds(300);
  const auto stages = RunPipeline(k, ref, batches, dloss);
  int timed_out = 0;
  for (int r = 0; r < 3; ++r) {
    const Status& s = stages[static_cast<size_t>(r)].status;
    EXPECT_TRUE(s.code() == StatusCode::kDeadlineExceeded || s.code() == StatusCode::kCancelled)
        << s.ToString();
    timed_out += s.code() == StatusCode::kDeadlineExceeded;
    EXPECT_LT(stages[static_cast<size_t>(r)].seconds, std::chrono::seconds(5));
  }
  EXPECT_GE(timed_out, 1);
}

}  // namespace
}  // namespace strata::worker
