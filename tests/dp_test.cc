// Data parallelism (plain bucketed all-reduce and ZeRO-1) over the in-process backend: every
// data-parallel layout trains the same model as one process — same per-step losses and final
// weights to float tolerance — because each rank takes its slice of the same global batch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <thread>
#include <vector>

#include "comm/gloo.h"
#include "comm/grid.h"
#include "comm/inprocess.h"
#include "comm/store.h"
#include "tests/test_util.h"
#include "worker/trainer.h"

namespace strata {
namespace {

constexpr int kSteps = 6;

std::string Yaml(const std::string& text, bool zero1, int global_batch = 8) {
  return "model: {layers: 2, heads: 2, d_model: 32, seq_len: 16}\n"
         "data: {train: " +
         text +
         "}\n"
         "train: {steps: 6, global_batch: " +
         std::to_string(global_batch) +
         ", micro_batch: 2, lr: 1.0e-2, warmup: 2, seed: 5, grad_clip: 0.5}\n"
         "parallel: {zero1: " +
         (zero1 ? "true" : "false") +
         "}\n"
         "eval: {every: 0}\n";
}

struct RunResult {
  std::vector<float> losses;
  std::vector<float> norms;
  std::vector<std::vector<float>> params;  // per rank, after the last step
  Status status;
};

RunResult RunSingle(const proto::JobSpec& spec) {
  RunResult out;
  worker::TrainOptions opt;
  opt.threads = 1;
  opt.log_steps = false;
  auto t = worker::Trainer::Create(spec, opt);
  if (!t.ok()) {
    out.status = t.status();
    return out;
  }
  for (int s = 0; s < kSteps; ++s) {
    auto st = (*t)->Step();
    if (!st.ok()) {
      out.status = st.status();
      return out;
    }
    out.losses.push_back(st->loss);
    out.norms.push_back(st->grad_norm);
  }
  const model::Gpt& m = (*t)->model();
  out.params.emplace_back(m.params(), m.params() + m.num_params());
  return out;
}

RunResult RunDataParallel(const proto::JobSpec& spec, int dp, int64_t bucket_bytes) {
  comm::InProcessWorld world(dp);
  RunResult out;
  out.params.resize(dp);
  std::vector<Status> statuses(dp);
  std::vector<std::vector<float>> losses(dp), norms(dp);
  std::vector<std::thread> threads;
  for (int r = 0; r < dp; ++r) {
    threads.emplace_back([&, r] {
      auto pg = comm::MakeInProcessGroup(world, r);
      if (!pg.ok()) {
        statuses[r] = pg.status();
        return;
      }
      worker::TrainOptions opt;
      opt.threads = 1;
      opt.log_steps = false;
      opt.dp_group = pg->get();
      opt.bucket_bytes = bucket_bytes;
      opt.comm_timeout = std::chrono::milliseconds(20000);
      auto t = worker::Trainer::Create(spec, opt);
      if (!t.ok()) {
        statuses[r] = t.status();
        return;
      }
      for (int s = 0; s < kSteps; ++s) {
        auto st = (*t)->Step();
        if (!st.ok()) {
          statuses[r] = st.status();
          (*pg)->Abort();
          return;
        }
        losses[r].push_back(st->loss);
        norms[r].push_back(st->grad_norm);
      }
      const model::Gpt& m = (*t)->model();
      out.params[r].assign(m.params(), m.params() + m.num_params());
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& s : statuses) {
    if (!s.ok()) out.status = s;
  }
  out.losses = losses[0];
  out.norms = norms[0];
  for (int r = 1; r < dp && out.status.ok(); ++r) {
    EXPECT_EQ(losses[r], losses[0]) << "rank " << r << " reports a different loss";
  }
  return out;
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst =
        std::max(worst, std::fabs(double(a[i]) - b[i]) / std::max(1e-6, std::fabs(double(b[i]))));
  }
  return worst;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(double(a[i]) - b[i]));
  return worst;
}

struct Layout {
  int dp;
  bool zero1;
  int64_t bucket_bytes;
  int global_batch = 8;
};

class DataParallelTest : public ::testing::TestWithParam<Layout> {};

TEST_P(DataParallelTest, MatchesOneProcessStepForStep) {
  const Layout l = GetParam();
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  const proto::JobSpec spec = testing::SpecFromYaml(Yaml(text, l.zero1, l.global_batch));
  const RunResult ref = RunSingle(spec);
  ASSERT_TRUE(ref.status.ok()) << ref.status.ToString();
  const RunResult got = RunDataParallel(spec, l.dp, l.bucket_bytes);
  ASSERT_TRUE(got.status.ok()) << got.status.ToString();
  ASSERT_EQ(got.losses.size(), ref.losses.size());
  EXPECT_LE(MaxRelDiff(got.losses, ref.losses), 1e-5);
  EXPECT_LE(MaxRelDiff(got.norms, ref.norms), 1e-4);
  EXPECT_LT(ref.losses.back(), ref.losses.front() - 0.1)
      << "the run must learn for this to mean much";
  for (int r = 0; r < l.dp; ++r) {
    ASSERT_EQ(got.params[r].size(), ref.params[0].size());
    EXPECT_LE(MaxAbsDiff(got.params[r], ref.params[0]), 2e-5) << "rank " << r;
    EXPECT_EQ(got.params[r], got.params[0]) << "rank " << r << " diverged from rank 0";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, DataParallelTest,
    ::testing::Values(Layout{2, false, 4 << 20}, Layout{2, false, 1024}, Layout{4, false, 4096},
                      Layout{2, true, 0}, Layout{4, true, 0},
                      // 3 ranks: the parameter count does not split evenly (ZeRO-1 padding)
                      Layout{3, true, 0, 12}, Layout{3, false, 2048, 12}),
    [](const ::testing::TestParamInfo<Layout>& i) {
      return "dp" + std::to_string(i.param.dp) + (i.param.zero1 ? "_zero1" : "_allreduce") +
             "_bucket" + std::to_string(i.param.bucket_bytes);
    });

TEST(DataParallel, GlobalBatchMustSplitEvenly) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  // global_batch 8 over dp 3 with micro_batch 2 does not divide.
  proto::JobSpec spec = testing::SpecFromYaml(Yaml(text, false));
  const RunResult got = RunDataParallel(spec, 3, 1 << 20);
  ASSERT_FALSE(got.status.ok());
  EXPECT_EQ(got.status.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(got.status.message(), "train.global_batch");
  EXPECT_HAS(got.status.message(), "parallel.dp");
}

// dp x tp over one in-process world: groups split by the 3D grid (pp = 1). Returns the losses
// of world rank 0 and, per rank, its local parameters mapped to the one-process flat layout
// (index -> value).
struct GridRun {
  std::vector<float> losses, norms;
  std::vector<std::vector<std::pair<int64_t, float>>> params;
  Status status;
};

enum class Backend { kInProcess, kGloo };

GridRun RunGrid(const proto::JobSpec& spec, int dp, int tp, const model::Gpt& reference_layout,
                int pp = 1, Backend backend = Backend::kInProcess) {
  const int world_size = dp * tp * pp;
  comm::InProcessWorld world(world_size);
  std::shared_ptr<comm::Store> store = comm::MakeHashStore();
  GridRun out;
  out.params.resize(world_size);
  std::vector<Status> statuses(world_size);
  std::vector<std::vector<float>> losses(world_size), norms(world_size);
  std::map<std::string, int64_t> ref_offset;
  for (const auto& t : reference_layout.tensors()) ref_offset[t.name] = t.offset;
  std::vector<std::thread> threads;
  for (int r = 0; r < world_size; ++r) {
    threads.emplace_back([&, r] {
      auto fail = [&](const Status& s) { statuses[r] = s; };
      auto wg = backend == Backend::kGloo ? comm::MakeGlooGroup(store, "world", r, world_size,
                                                                std::chrono::milliseconds(20000))
                                          : comm::MakeInProcessGroup(world, r);
      if (!wg.ok()) return fail(wg.status());
      auto grid = comm::Grid::Create(world_size, dp, tp, pp);
      if (!grid.ok()) return fail(grid.status());
      auto groups = comm::SplitGrid(**wg, *grid);
      if (!groups.ok()) return fail(groups.status());
      worker::TrainOptions opt;
      opt.threads = 1;
      opt.log_steps = false;
      opt.dp_group = groups->dp.get();
      opt.tp_group = groups->tp.get();
      opt.pp_group = groups->pp.get();
      opt.bucket_bytes = 2048;
      auto t = worker::Trainer::Create(spec, opt);
      if (!t.ok()) return fail(t.status());
      for (int s = 0; s < kSteps; ++s) {
        auto st = (*t)->Step();
        if (!st.ok()) {
          (*wg)->Abort();
          return fail(st.status());
        }
        losses[r].push_back(st->loss);
        norms[r].push_back(st->grad_norm);
      }
      // The analytic memory model agrees with the buffers actually held.
      const worker::MemoryReport mem = (*t)->Memory();
      EXPECT_EQ(mem.est_params, mem.params) << "rank " << r;
      EXPECT_EQ(mem.est_grads, mem.grads) << "rank " << r;
      EXPECT_EQ(mem.est_optimizer, mem.optimizer) << "rank " << r;
      EXPECT_LE(mem.est_activations, mem.activations) << "rank " << r;
      EXPECT_GE(mem.est_activations, mem.activations / 2) << "rank " << r;
      const model::Gpt& m = (*t)->model();
      for (const auto& p : m.tensors()) {
        for (int64_t i = 0; i < p.numel; ++i) {
          const int64_t gi = p.GlobalIndex(i);
          if (gi >= 0) out.params[r].push_back({ref_offset[p.name] + gi, m.params()[p.offset + i]});
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& s : statuses) {
    if (!s.ok()) out.status = s;
  }
  out.losses = losses[0];
  out.norms = norms[0];
  for (int r = 1; r < world_size && out.status.ok(); ++r) {
    EXPECT_EQ(losses[r], losses[0]) << "rank " << r;
    EXPECT_EQ(norms[r], norms[0]) << "rank " << r;
  }
  return out;
}

struct GridLayout {
  int dp, tp, pp;
  bool zero1;
  Backend backend = Backend::kInProcess;
};

class GridTest : public ::testing::TestWithParam<GridLayout> {};

TEST_P(GridTest, ThreeDLayoutMatchesOneProcess) {
  const GridLayout l = GetParam();
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  const proto::JobSpec spec = testing::SpecFromYaml(Yaml(text, l.zero1));
  worker::TrainOptions opt;
  opt.threads = 1;
  opt.log_steps = false;
  auto ref = worker::Trainer::Create(spec, opt);
  ASSERT_TRUE(ref.ok()) << ref.status().ToString();
  std::vector<float> ref_losses, ref_norms;
  for (int s = 0; s < kSteps; ++s) {
    auto st = (*ref)->Step();
    ASSERT_TRUE(st.ok());
    ref_losses.push_back(st->loss);
    ref_norms.push_back(st->grad_norm);
  }
  const model::Gpt& rm = (*ref)->model();
  const GridRun got = RunGrid(spec, l.dp, l.tp, rm, l.pp, l.backend);
  ASSERT_TRUE(got.status.ok()) << got.status.ToString();
  EXPECT_LE(MaxRelDiff(got.losses, ref_losses), 1e-5);
  EXPECT_LE(MaxRelDiff(got.norms, ref_norms), 1e-4) << "each parameter counted exactly once";
  size_t covered = 0;
  for (const auto& rank_params : got.params) {
    double worst = 0;
    for (const auto& [index, value] : rank_params) {
      worst = std::max(worst, std::fabs(double(value) - rm.params()[index]));
    }
    EXPECT_LE(worst, 2e-5);
    covered += rank_params.size();
  }
  // Every global parameter lives on tp ranks (shards) x dp replicas; replicated ones on all.
  EXPECT_GE(covered, static_cast<size_t>(rm.num_params()) * l.dp);
}

TEST(GridLayoutErrors, TensorParallelMustDivideHeads) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  const proto::JobSpec spec = testing::SpecFromYaml(Yaml(text, false));  // 2 heads
  worker::TrainOptions opt;
  auto probe = worker::Trainer::Create(spec, opt);
  ASSERT_TRUE(probe.ok());
  const GridRun got = RunGrid(spec, 1, 4, (*probe)->model());
  ASSERT_FALSE(got.status.ok());
  EXPECT_EQ(got.status.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(got.status.message(), "parallel.tp");
}

INSTANTIATE_TEST_SUITE_P(Layouts, GridTest,
                         ::testing::Values(GridLayout{1, 2, 1, false}, GridLayout{2, 2, 1, false},
                                           GridLayout{2, 2, 1, true}, GridLayout{1, 1, 2, false},
                                           GridLayout{2, 1, 2, true}, GridLayout{2, 2, 2, false},
                                           // Gloo over loopback TCP, bootstrapped by a store
                                           GridLayout{2, 1, 1, false, Backend::kGloo},
                                           GridLayout{1, 2, 1, false, Backend::kGloo},
                                           GridLayout{1, 1, 2, false, Backend::kGloo},
                                           GridLayout{2, 1, 1, true, Backend::kGloo},
                                           GridLayout{2, 2, 2, false, Backend::kGloo}),
                         [](const ::testing::TestParamInfo<GridLayout>& i) {
                           return std::string(i.param.backend == Backend::kGloo ? "gloo_"
                                                                                : "inproc_") +
                                  "dp" + std::to_string(i.param.dp) + "_tp" +
                                  std::to_string(i.param.tp) + "_pp" + std::to_string(i.param.pp) +
                                  (i.param.zero1 ? "_zero1" : "");
                         });

}  // namespace
}  // namespace strata
