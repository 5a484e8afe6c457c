// The planner (coordinator/planner.h): every plan obeys the layout rules (and passes the grid's
// own checks), explicit sizes are kept or rejected with the field's name, the memory model is
// the trainer's analytic estimate (checked against real trainers, sharded ones included),
// known cases pick sane layouts, and a 1T model on 3,072 GPUs plans well within a second.
#include "coordinator/planner.h"

#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>
#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "comm/grid.h"
#include "comm/inprocess.h"
#include "tests/test_util.h"
#include "worker/trainer.h"

namespace strata {
namespace {

using coordinator::DeviceProfile;
using coordinator::Layout;
using coordinator::MemoryBreakdown;
using coordinator::Plan;
using coordinator::PlanRequest;
using coordinator::PlanResult;

DeviceProfile Device(const std::string& name) {
  auto d = coordinator::DeviceProfileByName(name);
  EXPECT_TRUE(d.ok()) << d.status().ToString();
  return d.ok() ? *d : DeviceProfile();
}

PlanRequest Gpt2Request(int workers, int global_batch = 512) {
  PlanRequest r;
  r.model = {12, 12, 768, 50257, 1024, 1024};
  r.global_batch = global_batch;
  r.precision = "bf16";
  r.workers = workers;
  r.device = Device("h100");
  return r;
}

// The Megatron-LM 1T GPT (Narayanan et al. 2021): 128 x 25600, 160 heads.
PlanRequest OneTrillionRequest() {
  PlanRequest r;
  r.model = {128, 160, 25600, 51200, 2048, 2048};
  r.global_batch = 3072;
  r.precision = "bf16";
  r.workers = 3072;
  r.device = Device("h100");
  return r;
}

// Every rule a plan must obey, and the runtime's own checks of the layout.
void ExpectValid(const PlanRequest& r, const Plan& p) {
  SCOPED_TRACE(p.Layout::ToString());
  EXPECT_GE(p.dp, 1);
  EXPECT_GE(p.tp, 1);
  EXPECT_GE(p.pp, 1);
  EXPECT_EQ(r.model.heads % p.tp, 0);
  EXPECT_EQ(r.model.d_model % p.tp, 0);
  EXPECT_LE(p.pp, r.model.layers);
  EXPECT_EQ(p.dp * p.tp * p.pp, p.workers_used);
  EXPECT_LE(p.workers_used, r.workers);
  EXPECT_EQ(r.global_batch % (p.dp * p.micro_batch), 0);
  EXPECT_EQ(p.accumulation * p.dp * p.micro_batch, r.global_batch);
  if (r.device.devices_per_node > 0) {
    EXPECT_LE(p.tp, r.device.devices_per_node);
  }
  EXPECT_LE(static_cast<double>(p.memory_per_device),
            r.device.memory_bytes * (1.0 - r.memory_reserve));
  EXPECT_EQ(p.memory_per_device, p.memory.total());
  EXPECT_GT(p.step_seconds, 0);
  const auto& b = p.breakdown;
  EXPECT_NEAR(p.step_seconds,
              b.compute + b.tp_comm + b.pp_comm + b.bubble + b.dp_comm_exposed + b.optimizer,
              1e-9 * p.step_seconds);
  if (p.pp == 1) {
    EXPECT_EQ(b.bubble, 0);
  }
  if (p.tp == 1) {
    EXPECT_EQ(b.tp_comm, 0);
  }
  if (p.dp == 1) {
    EXPECT_FALSE(p.zero1);
  }
  auto grid = comm::Grid::Create(p.workers_used, p.dp, p.tp, p.pp);
  ASSERT_TRUE(grid.ok()) << grid.status().ToString();
  Status fits =
      comm::CheckModelFits(*grid, r.model.heads, r.model.d_model, r.model.vocab, r.model.layers);
  EXPECT_TRUE(fits.ok()) << fits.ToString();
}

void ExpectValid(const PlanResult& res) {
  ExpectValid(res.request, res.best);
  for (const Plan& p : res.runners_up) {
    ExpectValid(res.request, p);
    EXPECT_GE(p.step_seconds, res.best.step_seconds);
    EXPECT_FALSE(p.why.empty());
  }
  for (size_t i = 1; i < res.runners_up.size(); ++i) {
    EXPECT_GE(res.runners_up[i].step_seconds, res.runners_up[i - 1].step_seconds);
  }
}

TEST(DeviceProfile, BuiltInsAndErrors) {
  for (const char* name : {"h100", "A100", "cpu"}) {
    auto d = coordinator::DeviceProfileByName(name);
    ASSERT_TRUE(d.ok()) << d.status().ToString();
    EXPECT_GT(d->flops, 0);
    EXPECT_GT(d->memory_bytes, 0);
    EXPECT_GT(d->intra_node_bw, 0);
    EXPECT_GT(d->inter_node_bw, 0);
    EXPECT_FALSE(d->ToString().empty());
  }
  EXPECT_EQ(Device("h100").flops, 989e12);
  EXPECT_EQ(Device("a100").flops, 312e12);
  EXPECT_EQ(Device("h100").devices_per_node, 8);
  auto bad = coordinator::DeviceProfileByName("tpu");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(bad.status().message(), "device");
  EXPECT_HAS(bad.status().message(), "h100");
}

TEST(ModelShape, ParameterCountIsTheModels) {
  for (const auto& [layers, heads, c, vocab, seq] :
       std::vector<std::tuple<int, int, int, int, int>>{
           {12, 12, 768, 50257, 1024}, {4, 4, 128, 256, 128}, {128, 160, 25600, 51200, 2048}}) {
    model::GptConfig g;
    g.layers = layers;
    g.heads = heads;
    g.channels = c;
    g.vocab_size = vocab;
    g.max_seq_len = seq;
    coordinator::ModelShape s{layers, heads, c, vocab, seq, 0};
    EXPECT_EQ(s.NumParameters(), g.NumParameters());
  }
}

// A sweep of models, batches, worker counts and devices: every plan and runner-up obeys the
// rules.
TEST(Planner, ConstraintsHoldAcrossASweep) {
  struct M {
    coordinator::ModelShape shape;
    int batch;
  };
  const std::vector<M> models = {
      {{4, 4, 128, 256, 128, 0}, 8},          {{6, 6, 384, 256, 256, 0}, 24},
      {{12, 12, 768, 50257, 1024, 0}, 512},   {{24, 16, 1024, 50257, 1024, 0}, 96},
      {{48, 25, 1600, 50257, 1024, 0}, 100},  {{32, 32, 4096, 32000, 2048, 0}, 1024},
      {{80, 64, 8192, 32000, 4096, 0}, 1536}, {{7, 3, 96, 1000, 64, 0}, 21}};
  int plans = 0;
  for (const M& m : models) {
    for (int workers : {1, 2, 3, 7, 8, 12, 64, 96, 512}) {
      for (const char* dev : {"h100", "a100", "cpu"}) {
        PlanRequest r;
        r.model = m.shape;
        r.global_batch = m.batch;
        r.precision = std::string(dev) == "cpu" ? "fp32" : "bf16";
        r.workers = workers;
        r.device = Device(dev);
        SCOPED_TRACE(::testing::Message() << m.shape.layers << "x" << m.shape.d_model << " on "
                                          << workers << " " << dev);
        auto res = coordinator::MakePlan(r);
        if (!res.ok()) {
          // Only "does not fit" is acceptable here, and it must say so.
          EXPECT_EQ(res.status().code(), StatusCode::kInvalidArgument);
          EXPECT_HAS(res.status().message(), "does not fit");
          continue;
        }
        ++plans;
        ExpectValid(*res);
        EXPECT_GT(res->considered, 0);
        EXPECT_GE(res->considered, res->feasible);
        if (res->best.workers_used < workers) {
          EXPECT_FALSE(res->notes.empty());
        }
      }
    }
  }
  EXPECT_GT(plans, 150);
}

TEST(Planner, ExplicitSizesAreKept) {
  PlanRequest r = Gpt2Request(16);
  r.tp = 2;
  r.pp = 2;
  auto res = coordinator::MakePlan(r);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ExpectValid(*res);
  EXPECT_EQ(res->best.tp, 2);
  EXPECT_EQ(res->best.pp, 2);
  for (const Plan& p : res->runners_up) {
    EXPECT_EQ(p.tp, 2);
    EXPECT_EQ(p.pp, 2);
  }

  r = Gpt2Request(8);
  r.dp = 2;
  r.micro_batch = 4;
  r.zero1 = true;
  r.recompute = true;
  res = coordinator::MakePlan(r);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ExpectValid(*res);
  EXPECT_EQ(res->best.dp, 2);
  EXPECT_EQ(res->best.micro_batch, 4);
  EXPECT_TRUE(res->best.zero1);
  EXPECT_TRUE(res->best.recompute);
  EXPECT_EQ(res->best.accumulation, 512 / (2 * 4));

  // Everything fixed: the plan is that layout, costed.
  r = Gpt2Request(8);
  r.dp = 2;
  r.tp = 2;
  r.pp = 2;
  r.micro_batch = 8;
  r.zero1 = false;
  r.recompute = false;
  res = coordinator::MakePlan(r);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_EQ(res->best.Layout::ToString(), "dp=2 tp=2 pp=2 micro=8 zero1=off recompute=off");
  EXPECT_TRUE(res->runners_up.empty());
}

TEST(Planner, InvalidExplicitSizesNameTheField) {
  struct Case {
    std::function<void(PlanRequest*)> set;
    const char* field;
  };
  const std::vector<Case> cases = {
      {[](PlanRequest* r) { r->tp = 5; }, "parallel.tp"},   // 12 heads
      {[](PlanRequest* r) { r->tp = 12; }, "parallel.tp"},  // > 8 devices per node
      {[](PlanRequest* r) { r->pp = 13; }, "parallel.pp"},  // 12 layers
      {[](PlanRequest* r) { r->dp = 3; }, "parallel.dp"},   // 512 % 3
      {[](PlanRequest* r) { r->micro_batch = 3; }, "train.micro_batch"},
      {[](PlanRequest* r) {
         r->dp = 8;
         r->micro_batch = 128;
       },
       "train.micro_batch"},
      {[](PlanRequest* r) {
         r->dp = 8;
         r->tp = 4;
       },
       "resources.workers"},
      {[](PlanRequest* r) { r->tp = -1; }, "parallel.tp"},
      {[](PlanRequest* r) { r->model.heads = 7; }, "model.heads"},
      {[](PlanRequest* r) { r->global_batch = 0; }, "train.global_batch"},
      {[](PlanRequest* r) { r->workers = 0; }, "resources.workers"},
      {[](PlanRequest* r) { r->precision = "fp8"; }, "train.precision"},
      {[](PlanRequest* r) { r->device.flops = 0; }, "device.flops"},
  };
  for (const Case& c : cases) {
    PlanRequest r = Gpt2Request(16);
    c.set(&r);
    auto res = coordinator::MakePlan(r);
    ASSERT_FALSE(res.ok()) << c.field;
    EXPECT_EQ(res.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(res.status().message().rfind(c.field, 0), 0u)
        << "expected to start with " << c.field << ": " << res.status().message();
  }
}

TEST(Planner, NothingFitsSaysWhyAndWhatToDo) {
  PlanRequest r = OneTrillionRequest();
  r.workers = 8;
  auto res = coordinator::MakePlan(r);
  ASSERT_FALSE(res.ok());
  EXPECT_EQ(res.status().code(), StatusCode::kInvalidArgument);
  const std::string& m = res.status().message();
  EXPECT_HAS(m, "resources.workers");
  EXPECT_HAS(m, "does not fit");
  EXPECT_HAS(m, "smallest per-device memory");
  EXPECT_HAS(m, "tp=8");
  EXPECT_HAS(m, "add workers");

  // Recompute ruled out by the spec: the message suggests it, and names the fixed choices.
  r = Gpt2Request(1, 512);
  r.device.memory_bytes = int64_t{2} << 30;
  r.micro_batch = 512;
  r.recompute = false;
  res = coordinator::MakePlan(r);
  ASSERT_FALSE(res.ok());
  EXPECT_HAS(res.status().message(), "model.recompute");
  EXPECT_HAS(res.status().message(), "train.micro_batch=512");
}

TEST(Planner, Gpt2On8H100IsPlainDataParallel) {
  auto res = coordinator::MakePlan(Gpt2Request(8));
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ExpectValid(*res);
  const Plan& p = res->best;
  EXPECT_EQ(p.dp, 8);
  EXPECT_EQ(p.tp, 1);
  EXPECT_EQ(p.pp, 1);
  EXPECT_FALSE(p.recompute);
  EXPECT_EQ(p.workers_used, 8);
  EXPECT_GT(p.mfu, 0.2);
  EXPECT_LT(p.mfu, 0.7);
  // Tiny model: everything fits comfortably.
  EXPECT_LT(p.memory_per_device, int64_t{40} << 30);
  EXPECT_FALSE(res->runners_up.empty());
  const std::string text = res->Explain();
  EXPECT_HAS(text, "chosen:  dp=8 tp=1 pp=1");
  EXPECT_HAS(text, "runners-up");
  EXPECT_HAS(text, "why it lost");
  EXPECT_HAS(text, "activations");
  // The JSON parses.
  google::protobuf::Struct parsed;
  const auto st = google::protobuf::util::JsonStringToMessage(res->ToJson(), &parsed);
  EXPECT_TRUE(st.ok()) << res->ToJson();
  EXPECT_EQ(parsed.fields().at("best").struct_value().fields().at("dp").number_value(), 8);
}

TEST(Planner, OneTrillionOn3072H100InUnderASecond) {
  const auto t0 = std::chrono::steady_clock::now();
  auto res = coordinator::MakePlan(OneTrillionRequest());
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  EXPECT_LT(s, 1.0);
  ExpectValid(*res);
  const Plan& p = res->best;
  EXPECT_LE(p.tp, 8);
  EXPECT_GE(p.pp, 16) << "10+ bytes per parameter need the model split over >= 140 devices";
  EXPECT_GE(p.workers_used, 3072 / 2);
  EXPECT_GT(res->considered, 1000);
  std::printf("%s", res->Explain().c_str());
}

TEST(Planner, FewerWorkersWhenDivisibilityRequires) {
  // 7 workers, 4 layers, 4 heads, batch 8: no dp x tp x pp = 7 is valid.
  PlanRequest r;
  r.model = {4, 4, 128, 256, 128, 0};
  r.global_batch = 8;
  r.precision = "fp32";
  r.workers = 7;
  r.device = Device("cpu");
  auto res = coordinator::MakePlan(r);
  ASSERT_TRUE(res.ok()) << res.status().ToString();
  ExpectValid(*res);
  EXPECT_LT(res->best.workers_used, 7);
  ASSERT_FALSE(res->notes.empty());
  EXPECT_HAS(res->notes[0], "of 7 workers");
  EXPECT_HAS(res->Explain(), "note:");
}

// ---- the memory model against the trainer ----

std::string TinyYaml(const std::string& data, const std::string& extra, bool recompute = false) {
  return std::string("model: {layers: 4, heads: 4, d_model: 32, seq_len: 16, vocab_size: 300, ") +
         "recompute: " + (recompute ? "true" : "false") + "}\ndata: {train: " + data + "}\n" +
         extra + "eval: {every: 0}\n";
}

PlanRequest RequestFor(const proto::JobSpec& spec, int workers) {
  auto r = coordinator::PlanRequestFromJob(spec, workers, Device("cpu"));
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : PlanRequest();
}

void ExpectSameAsTrainer(const worker::MemoryReport& t, const MemoryBreakdown& m,
                         bool compare_optimizer = true) {
  EXPECT_EQ(m.params, t.est_params);
  EXPECT_EQ(m.compute_copy, t.est_compute_copy);
  EXPECT_EQ(m.grads, t.est_grads);
  if (compare_optimizer) {
    EXPECT_EQ(m.optimizer, t.est_optimizer);
  }
  EXPECT_EQ(m.activations, t.est_activations);
  // And the trainer's estimate is what it holds (params, grads, optimizer exactly).
  EXPECT_EQ(t.est_params, t.params);
  EXPECT_EQ(t.est_grads, t.grads);
  if (compare_optimizer) {
    EXPECT_EQ(t.est_optimizer, t.optimizer);
  }
}

TEST(PlannerMemory, MatchesOneProcessTrainer) {
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  const std::vector<std::pair<std::string, bool>> cases = {
      {"train: {global_batch: 8, micro_batch: 4}\n", false},
      {"train: {global_batch: 8, micro_batch: 2, precision: bf16}\n", false},
      {"train: {global_batch: 6, micro_batch: 3}\n", true},
      {"train: {global_batch: 4, micro_batch: 4, precision: fp16}\n", true}};
  for (const auto& [extra, recompute] : cases) {
    SCOPED_TRACE(extra + (recompute ? " recompute" : ""));
    const proto::JobSpec spec = testing::SpecFromYaml(TinyYaml(text, extra, recompute));
    worker::TrainOptions opt;
    opt.threads = 1;
    opt.log_steps = false;
    auto t = worker::Trainer::Create(spec, opt);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    const PlanRequest r = RequestFor(spec, 1);
    Layout l;
    l.micro_batch = spec.train().micro_batch();
    l.recompute = spec.model().recompute();
    auto m = coordinator::StageMemory(r, l, 0);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    ExpectSameAsTrainer((*t)->Memory(), *m);
    // Kernel scratch is real memory the estimate leaves out: measured activations include it.
    EXPECT_LE(m->activations + m->workspace, (*t)->Memory().activations + 64 * 1024);
  }
}

// dp x tp x pp trainers as threads over one in-process world: every rank's analytic memory is
// the planner's for its stage (data-parallel rank 0 for ZeRO-1's optimizer, whose shard is
// the full one; other ranks may own less).
struct Sharded {
  int dp, tp, pp;
  bool zero1;
  const char* schedule;
};

class PlannerShardedMemory : public ::testing::TestWithParam<Sharded> {};

TEST_P(PlannerShardedMemory, MatchesEveryRank) {
  const Sharded s = GetParam();
  testing::ScratchDir dir;
  const std::string text = testing::WriteText(dir.path() + "/input.txt", 20000);
  const proto::JobSpec spec = testing::SpecFromYaml(
      TinyYaml(text, std::string("train: {global_batch: 12, micro_batch: 2, precision: bf16}\n") +
                         "parallel: {zero1: " + (s.zero1 ? "true" : "false") +
                         ", schedule: " + s.schedule + "}\n"));
  const int world_size = s.dp * s.tp * s.pp;
  comm::InProcessWorld world(world_size);
  std::vector<worker::MemoryReport> reports(world_size);
  std::vector<comm::GridCoords> coords(world_size);
  std::vector<Status> statuses(world_size);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < world_size; ++rank) {
    threads.emplace_back([&, rank] {
      auto wg = comm::MakeInProcessGroup(world, rank);
      if (!wg.ok()) return void(statuses[rank] = wg.status());
      auto grid = comm::Grid::Create(world_size, s.dp, s.tp, s.pp);
      if (!grid.ok()) return void(statuses[rank] = grid.status());
      coords[rank] = grid->coords(rank);
      auto groups = comm::SplitGrid(**wg, *grid);
      if (!groups.ok()) return void(statuses[rank] = groups.status());
      worker::TrainOptions opt;
      opt.threads = 1;
      opt.log_steps = false;
      opt.dp_group = groups->dp.get();
      opt.tp_group = groups->tp.get();
      opt.pp_group = groups->pp.get();
      auto t = worker::Trainer::Create(spec, opt);
      if (!t.ok()) return void(statuses[rank] = t.status());
      reports[rank] = (*t)->Memory();
    });
  }
  for (auto& th : threads) th.join();
  for (const Status& st : statuses) ASSERT_TRUE(st.ok()) << st.ToString();

  PlanRequest r = RequestFor(spec, world_size);
  const Layout l{s.dp, s.tp, s.pp, 2, s.zero1, false};
  for (int rank = 0; rank < world_size; ++rank) {
    SCOPED_TRACE(::testing::Message() << "rank " << rank);
    auto m = coordinator::StageMemory(r, l, coords[rank].p);
    ASSERT_TRUE(m.ok()) << m.status().ToString();
    ExpectSameAsTrainer(reports[rank], *m, /*compare_optimizer=*/!s.zero1 || coords[rank].d == 0);
  }
  // The plan of that fixed layout reports the fullest stage.
  r.dp = s.dp;
  r.tp = s.tp;
  r.pp = s.pp;
  r.micro_batch = 2;
  r.zero1 = s.zero1;
  r.recompute = false;
  auto plan = coordinator::MakePlan(r);
  ASSERT_TRUE(plan.ok()) << plan.status().ToString();
  int64_t fullest = 0;
  for (int rank = 0; rank < world_size; ++rank) {
    if (coords[rank].d != 0) continue;
    const worker::MemoryReport& t = reports[rank];
    auto m = coordinator::StageMemory(r, l, coords[rank].p);
    ASSERT_TRUE(m.ok());
    fullest = std::max(fullest, t.est_params + t.est_compute_copy + t.est_grads + t.est_optimizer +
                                    t.est_activations + m->workspace);
  }
  EXPECT_EQ(plan->best.memory_per_device, fullest);
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, PlannerShardedMemory,
    ::testing::Values(Sharded{2, 2, 1, false, "1f1b"}, Sharded{2, 2, 1, true, "1f1b"},
                      Sharded{1, 2, 2, false, "1f1b"}, Sharded{2, 1, 2, true, "gpipe"},
                      Sharded{1, 1, 4, false, "1f1b"}, Sharded{2, 2, 2, true, "1f1b"},
                      Sharded{3, 1, 1, true, "1f1b"}),
    [](const ::testing::TestParamInfo<Sharded>& i) {
      return "dp" + std::to_string(i.param.dp) + "_tp" + std::to_string(i.param.tp) + "_pp" +
             std::to_string(i.param.pp) + (i.param.zero1 ? "_zero1" : "") + "_" + i.param.schedule;
    });

TEST(PlanRequestFromJob, MapsTheSpec) {
  // No data file needed; an absent micro_batch stays free.
  auto parsed = spec::ParseYaml(
      "model: {preset: gpt2}\ndata: {train: none.bin}\n"
      "train: {global_batch: 64, precision: bf16}\nparallel: {tp: 2, zero1: true}\n",
      "test");
  ASSERT_TRUE(parsed.ok()) << parsed.status().ToString();
  auto r = coordinator::PlanRequestFromJob(*parsed, 16, Device("h100"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->model.layers, 12);
  EXPECT_EQ(r->model.heads, 12);
  EXPECT_EQ(r->model.d_model, 768);
  EXPECT_EQ(r->model.vocab, 50257);  // llmc data (.bin)
  EXPECT_EQ(r->model.seq_len, 1024);
  EXPECT_EQ(r->global_batch, 64);
  EXPECT_EQ(r->precision, "bf16");
  EXPECT_EQ(r->workers, 16);
  EXPECT_EQ(r->tp, 2);
  EXPECT_EQ(r->dp, 0);
  EXPECT_EQ(r->pp, 0);
  EXPECT_EQ(r->micro_batch, 0);
  EXPECT_EQ(r->zero1, std::optional<bool>(true));
  EXPECT_FALSE(r->recompute.has_value());

  parsed = spec::ParseYaml(
      "model: {layers: 2, heads: 2, d_model: 32, seq_len: 16, recompute: true}\n"
      "data: {train: x.txt}\ntrain: {global_batch: 8, micro_batch: 2}\n"
      "parallel: {dp: 2, pp: 2}\n",
      "test");
  ASSERT_TRUE(parsed.ok());
  r = coordinator::PlanRequestFromJob(*parsed, 4, Device("cpu"));
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->micro_batch, 2);
  EXPECT_EQ(r->dp, 2);
  EXPECT_EQ(r->pp, 2);
  EXPECT_EQ(r->recompute, std::optional<bool>(true));
  EXPECT_EQ(r->precision, "fp32");
  EXPECT_EQ(r->model.vocab, 256);

  // Sizes that cannot work are refused with the field's name.
  parsed =
      spec::ParseYaml("model: {preset: gpt2}\ndata: {train: x.txt}\nparallel: {tp: 5}\n", "test");
  ASSERT_TRUE(parsed.ok());
  r = coordinator::PlanRequestFromJob(*parsed, 8, Device("h100"));
  ASSERT_FALSE(r.ok());
  EXPECT_HAS(r.status().message(), "parallel.tp");
  r = coordinator::PlanRequestFromJob(*parsed, 0, Device("h100"));
  ASSERT_FALSE(r.ok());
}

}  // namespace
}  // namespace strata
