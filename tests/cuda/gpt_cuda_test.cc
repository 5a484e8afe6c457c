// The CUDA GPT (model/cuda/gpt_cuda.h) and the trainer's CUDA path against the CPU model, the
// reference: bitwise-equal initialisation; 10 training steps in fp32 (losses and final
// parameters within 1e-4 relative; TF32 is off in the CUDA model) and bf16 (2e-2 on losses,
// 2e-2 relative L2 on parameters: both sides round to bf16, at different places); tensor
// parallelism (tp = 2) and pipeline parallelism (pp = 2) with ranks as threads on one GPU
// against the unsharded model; the trainer's device optimizer against the CPU trainer; and
// `strata train --device cuda` with a falling loss. Every test skips without a GPU.
#include "model/cuda/gpt_cuda.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "comm/device_staged.h"
#include "comm/inprocess.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "proto/job_spec.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"
#include "worker/pipeline.h"
#include "worker/tp_comm.h"
#include "worker/trainer.h"

namespace strata::model {
namespace {

constexpr int kB = 2, kT = 16;
constexpr uint64_t kSeed = 5;

// Head size 32 (the attention kernels take 32, 64, 128); a vocabulary that tp = 2 does not
// divide, so the padded wte rows are exercised.
GptConfig Config(bool recompute = false) {
  return ::strata::testing::GptConfigOf(97, 32, 2, 2, 64, recompute);
}

std::unique_ptr<Gpt> Cpu(const GptConfig& cfg, DType dt, TensorParallelComm* tp = nullptr,
                         PipelineStage stage = {}, int slots = 1) {
  auto m = Gpt::Create(cfg, dt, kB, kT, tp, stage, slots);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

std::unique_ptr<Gpt> Cuda(const GptConfig& cfg, DType dt, TensorParallelComm* tp = nullptr,
                          PipelineStage stage = {}, int slots = 1) {
  auto m = CreateCudaGpt(cfg, dt, kB, kT, tp, stage, slots, 0);
  EXPECT_TRUE(m.ok()) << m.status().ToString();
  return m.ok() ? std::move(m).value() : nullptr;
}

std::vector<float> Params(const Gpt& m) {
  std::vector<float> p(static_cast<size_t>(m.num_params()));
  EXPECT_TRUE(m.CopyParamsToHost(p.data()).ok());
  return p;
}
std::vector<float> Grads(const Gpt& m) {
  std::vector<float> g(static_cast<size_t>(m.num_params()));
  EXPECT_TRUE(m.CopyGradsToHost(g.data()).ok());
  return g;
}

double RelL2(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

struct ModelRun {
  std::vector<float> losses;
  std::vector<float> params;
};

// `steps` steps of forward, backward and a host AdamW (the same optimizer for both models, so
// that only the model differs), through the device-independent Copy* interface.
ModelRun Train(Gpt& m, int steps) {
  const auto batches =
      ::strata::testing::RandomTokenBatches(steps, m.config().vocab_size, kB, kT, 3);
  const int64_t n = m.num_params();
  std::vector<float> p = Params(m), g(static_cast<size_t>(n));
  AdamW opt(m.tensors(), n, AdamWConfig{});
  ModelRun r;
  for (int s = 0; s < steps; ++s) {
    m.ZeroGrad();
    auto loss = m.Forward(batches[s].x.data(), batches[s].y.data(), kB, kT, 1.f / (kB * kT));
    EXPECT_TRUE(loss.ok()) << loss.status().ToString();
    if (!loss.ok()) return r;
    r.losses.push_back(*loss);
    EXPECT_TRUE(m.Backward().ok());
    EXPECT_TRUE(m.CopyGradsToHost(g.data()).ok());
    opt.Update(p.data(), g.data(), 1e-3f, s + 1);
    EXPECT_TRUE(m.CopyParamsFromHost(p.data()).ok());
    m.RefreshComputeWeights();
  }
  r.params = Params(m);
  return r;
}

TEST(GptCuda, InitWeightsAreBitwiseTheCpuModels) {
  STRATA_REQUIRE_GPU();
  for (DType dt : {DType::kF32, DType::kBF16}) {
    auto cpu = Cpu(Config(), dt);
    auto gpu = Cuda(Config(), dt);
    ASSERT_TRUE(cpu && gpu);
    ASSERT_EQ(gpu->device(), Device::kCuda);
    ASSERT_EQ(cpu->num_params(), gpu->num_params());
    cpu->InitWeights(kSeed);
    gpu->InitWeights(kSeed);
    const std::vector<float> a = Params(*cpu), b = Params(*gpu);
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << DTypeName(dt);
  }
}

TEST(GptCuda, Fp32TrainingMatchesCpu) {
  STRATA_REQUIRE_GPU();
  for (bool recompute : {false, true}) {
    SCOPED_TRACE(recompute ? "recompute" : "no recompute");
    auto cpu = Cpu(Config(recompute), DType::kF32);
    auto gpu = Cuda(Config(recompute), DType::kF32);
    ASSERT_TRUE(cpu && gpu);
    cpu->InitWeights(kSeed);
    gpu->InitWeights(kSeed);
    const ModelRun a = Train(*cpu, 10), b = Train(*gpu, 10);
    ASSERT_EQ(a.losses.size(), 10u);
    ASSERT_EQ(b.losses.size(), 10u);
    for (size_t s = 0; s < a.losses.size(); ++s) {
      EXPECT_NEAR(b.losses[s], a.losses[s], 1e-4 * std::fabs(a.losses[s])) << "step " << s;
    }
    EXPECT_LT(a.losses.back(), a.losses.front());  // the run trains at all
    EXPECT_LT(RelL2(b.params, a.params), 1e-4);
  }
}

TEST(GptCuda, Bf16TrainingMatchesCpu) {
  STRATA_REQUIRE_GPU();
  auto cpu = Cpu(Config(), DType::kBF16);
  auto gpu = Cuda(Config(), DType::kBF16);
  ASSERT_TRUE(cpu && gpu);
  cpu->InitWeights(kSeed);
  gpu->InitWeights(kSeed);
  const ModelRun a = Train(*cpu, 10), b = Train(*gpu, 10);
  ASSERT_EQ(b.losses.size(), 10u);
  for (size_t s = 0; s < a.losses.size(); ++s) {
    EXPECT_NEAR(b.losses[s], a.losses[s], 2e-2 * std::fabs(a.losses[s])) << "step " << s;
  }
  EXPECT_LT(RelL2(b.params, a.params), 2e-2);
}

// Each rank's local gradient against the unsharded reference's, element by element through
// ParamTensor::GlobalIndex (padding: zero gradient).
void ExpectShardGradsMatch(const Gpt& ref, const std::vector<float>& ref_grads, const Gpt& shard,
                           const std::vector<float>& grads, double tol) {
  for (const ParamTensor& t : shard.tensors()) {
    const ParamTensor* r = nullptr;
    for (const ParamTensor& q : ref.tensors()) {
      if (q.name == t.name) r = &q;
    }
    ASSERT_NE(r, nullptr) << t.name;
    double worst = 0;
    for (int64_t i = 0; i < t.numel; ++i) {
      const float got = grads[static_cast<size_t>(t.offset + i)];
      const int64_t gi = t.GlobalIndex(i);
      const float want = gi < 0 ? 0.f : ref_grads[static_cast<size_t>(r->offset + gi)];
      worst = std::max(worst, std::fabs(static_cast<double>(got) - want) /
                                  (std::fabs(static_cast<double>(want)) + 1e-3));
    }
    EXPECT_LT(worst, tol) << t.name;
  }
}

TEST(GptCuda, TensorParallelTwoRanksOnOneGpuMatchesUnsharded) {
  STRATA_REQUIRE_GPU();
  const GptConfig cfg = Config();
  const auto batch = ::strata::testing::RandomTokenBatches(1, cfg.vocab_size, kB, kT, 8)[0];
  const float dloss = 1.f / (kB * kT);
  auto ref = Cpu(cfg, DType::kF32);
  ASSERT_TRUE(ref);
  ref->InitWeights(kSeed);
  ref->ZeroGrad();
  auto ref_loss = ref->Forward(batch.x.data(), batch.y.data(), kB, kT, dloss);
  ASSERT_TRUE(ref_loss.ok());
  ASSERT_TRUE(ref->Backward().ok());
  const std::vector<float> ref_grads = Grads(*ref);

  comm::InProcessWorld world(2);
  std::vector<float> losses(2, 0.f);
  std::vector<std::vector<float>> grads(2);
  std::vector<std::unique_ptr<Gpt>> models(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      auto pg = comm::MakeInProcessGroup(world, r);
      ASSERT_TRUE(pg.ok());
      // Device buffers through host staging (NCCL cannot run two ranks on one GPU).
      std::unique_ptr<comm::ProcessGroup> staged = comm::WrapWithHostStaging(std::move(*pg));
      worker::ProcessGroupTpComm tp(staged.get(), std::chrono::seconds(60));
      auto m = CreateCudaGpt(cfg, DType::kF32, kB, kT, &tp, {}, 1, 0);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      (*m)->InitWeights(kSeed);
      (*m)->ZeroGrad();
      auto loss = (*m)->Forward(batch.x.data(), batch.y.data(), kB, kT, dloss);
      ASSERT_TRUE(loss.ok()) << loss.status().ToString();
      losses[static_cast<size_t>(r)] = *loss;
      ASSERT_TRUE((*m)->Backward().ok());
      grads[static_cast<size_t>(r)] = Grads(**m);
      models[static_cast<size_t>(r)] = std::move(*m);
    });
  }
  for (auto& th : ranks) th.join();
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("tp rank " + std::to_string(r));
    ASSERT_TRUE(models[static_cast<size_t>(r)]);
    EXPECT_NEAR(losses[static_cast<size_t>(r)], *ref_loss, 1e-4 * std::fabs(*ref_loss));
    ExpectShardGradsMatch(*ref, ref_grads, *models[static_cast<size_t>(r)],
                          grads[static_cast<size_t>(r)], 1e-3);
  }
}

TEST(GptCuda, PipelineTwoStagesOnOneGpuMatchesUnsharded) {
  STRATA_REQUIRE_GPU();
  const GptConfig cfg = Config();
  constexpr int kMicro = 2;
  const auto batches = ::strata::testing::RandomTokenBatches(kMicro, cfg.vocab_size, kB, kT, 9);
  const float dloss = 1.f / (kB * kT * kMicro);
  auto ref = Cpu(cfg, DType::kF32);
  ASSERT_TRUE(ref);
  ref->InitWeights(kSeed);
  ref->ZeroGrad();
  double ref_loss = 0;
  for (const auto& b : batches) {
    auto l = ref->Forward(b.x.data(), b.y.data(), kB, kT, dloss);
    ASSERT_TRUE(l.ok());
    ref_loss += *l / kMicro;
    ASSERT_TRUE(ref->Backward().ok());
  }
  const std::vector<float> ref_grads = Grads(*ref);

  comm::InProcessWorld world(2);
  std::vector<float> losses(2, 0.f);
  std::vector<std::vector<float>> grads(2);
  std::vector<std::unique_ptr<Gpt>> models(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      auto pg = comm::MakeInProcessGroup(world, r);
      ASSERT_TRUE(pg.ok());
      const int slots = worker::PipelineSlots(worker::PipelineSchedule::k1F1B, 2, r, kMicro);
      auto m = CreateCudaGpt(cfg, DType::kF32, kB, kT, nullptr, {r, 2}, slots, 0);
      ASSERT_TRUE(m.ok()) << m.status().ToString();
      (*m)->InitWeights(kSeed);
      (*m)->ZeroGrad();
      worker::PipelineStepOptions po;
      po.num_micro = kMicro;
      po.micro_batch = kB;
      po.seq = kT;
      po.dloss = dloss;
      po.timeout = std::chrono::seconds(60);
      po.sum_tied_embedding = false;  // device gradients: summed below on host copies
      auto res = worker::RunPipelineStep(
          **m, **pg,
          [&](int micro, int32_t* in, int32_t* tg) {
            std::copy(batches[micro].x.begin(), batches[micro].x.end(), in);
            std::copy(batches[micro].y.begin(), batches[micro].y.end(), tg);
          },
          po);
      ASSERT_TRUE(res.ok()) << res.status().ToString();
      losses[static_cast<size_t>(r)] = res->mean_loss;
      grads[static_cast<size_t>(r)] = Grads(**m);
      models[static_cast<size_t>(r)] = std::move(*m);
    });
  }
  for (auto& th : ranks) th.join();
  ASSERT_TRUE(models[0] && models[1]);
  // The tied wte: both stages' parts summed (what SumTiedEmbeddingGrads does on the CPU).
  const ParamTensor& w0 = models[0]->tensors()[0];
  const ParamTensor& w1 = models[1]->tensors()[0];
  ASSERT_TRUE(w0.pipeline_tied && w1.pipeline_tied);
  for (int64_t i = 0; i < w0.numel; ++i) {
    const float sum =
        grads[0][static_cast<size_t>(w0.offset + i)] + grads[1][static_cast<size_t>(w1.offset + i)];
    grads[0][static_cast<size_t>(w0.offset + i)] = sum;
    grads[1][static_cast<size_t>(w1.offset + i)] = sum;
  }
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("stage " + std::to_string(r));
    EXPECT_NEAR(losses[static_cast<size_t>(r)], ref_loss, 1e-4 * std::fabs(ref_loss));
    ExpectShardGradsMatch(*ref, ref_grads, *models[static_cast<size_t>(r)],
                          grads[static_cast<size_t>(r)], 1e-3);
  }
}

// ---- the trainer's CUDA path ----

std::string WriteJob(const std::string& dir, const std::string& device,
                     const std::string& precision) {
  const std::string text = ::strata::testing::WriteText(dir + "/input.txt", 40000);
  const std::string path = dir + "/job_" + device + "_" + precision + ".yaml";
  std::ofstream(path) << "model: {layers: 2, heads: 2, d_model: 64, seq_len: 16}\n"
                      << "data: {train: " << text << "}\n"
                      << "train: {steps: 10, global_batch: 8, micro_batch: 4, lr: 1.0e-3, "
                         "warmup: 2, grad_clip: 1.0, precision: "
                      << precision << ", seed: 7}\n"
                      << "eval: {every: 0}\n"
                      << "resources: {device: " << device << ", threads: 1}\n";
  return path;
}

struct TrainerRun {
  std::vector<float> losses;
  std::vector<float> params;
};

TrainerRun RunTrainer(const std::string& job) {
  TrainerRun out;
  auto spec = spec::LoadJobFile(job);
  EXPECT_TRUE(spec.ok()) << spec.status().ToString();
  if (!spec.ok()) return out;
  worker::TrainOptions opt;
  opt.log_steps = false;
  auto t = worker::Trainer::Create(*spec, opt);
  EXPECT_TRUE(t.ok()) << t.status().ToString();
  if (!t.ok()) return out;
  for (int s = 0; s < 10; ++s) {
    auto st = (*t)->Step();
    EXPECT_TRUE(st.ok()) << st.status().ToString();
    if (!st.ok()) return out;
    out.losses.push_back(st->loss);
  }
  out.params = Params((*t)->model());
  return out;
}

TEST(TrainerCuda, DeviceOptimizerMatchesCpuTrainerFp32) {
  STRATA_REQUIRE_GPU();
  const std::string dir = ::strata::testing::MakeTempDir("trainer_cuda");
  const TrainerRun cpu = RunTrainer(WriteJob(dir, "cpu", "fp32"));
  const TrainerRun gpu = RunTrainer(WriteJob(dir, "cuda", "fp32"));
  ASSERT_EQ(cpu.losses.size(), 10u);
  ASSERT_EQ(gpu.losses.size(), 10u);
  for (size_t s = 0; s < 10; ++s) {
    EXPECT_NEAR(gpu.losses[s], cpu.losses[s], 1e-4 * std::fabs(cpu.losses[s])) << "step " << s;
  }
  EXPECT_LT(RelL2(gpu.params, cpu.params), 1e-4);
}

TEST(TrainerCuda, Bf16TrainerLossFalls) {
  STRATA_REQUIRE_GPU();
  const std::string dir = ::strata::testing::MakeTempDir("trainer_cuda_bf16");
  const TrainerRun cpu = RunTrainer(WriteJob(dir, "cpu", "bf16"));
  const TrainerRun gpu = RunTrainer(WriteJob(dir, "cuda", "bf16"));
  ASSERT_EQ(gpu.losses.size(), 10u);
  ASSERT_EQ(cpu.losses.size(), 10u);
  for (size_t s = 0; s < 10; ++s) {
    EXPECT_NEAR(gpu.losses[s], cpu.losses[s], 2e-2 * std::fabs(cpu.losses[s])) << "step " << s;
  }
  EXPECT_LT(gpu.losses.back(), gpu.losses.front());
}

// Checkpoints of a CUDA run go through host mirrors: a run resumed from step 3 holds bitwise
// the saved parameters and continues with bitwise the same loss (deterministic kernels).
TEST(TrainerCuda, CheckpointResumeIsExact) {
  STRATA_REQUIRE_GPU();
  const std::string dir = ::strata::testing::MakeTempDir("trainer_cuda_ckpt");
  const std::string job = WriteJob(dir, "cuda", "bf16");
  std::ofstream(job, std::ios::app) << "checkpoint: {dir: " << dir << "/ckpt, every: 0}\n";
  auto spec = spec::LoadJobFile(job);
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  worker::TrainOptions opt;
  opt.log_steps = false;
  auto a = worker::Trainer::Create(*spec, opt);
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  ASSERT_TRUE((*a)->StartCheckpoints(false).ok());
  for (int s = 0; s < 3; ++s) ASSERT_TRUE((*a)->Step().ok());
  ASSERT_TRUE((*a)->SaveCheckpoint().ok());
  ASSERT_TRUE((*a)->WaitForCheckpoint().ok());
  const std::vector<float> saved = Params((*a)->model());
  auto next_a = (*a)->Step();
  ASSERT_TRUE(next_a.ok());

  auto b = worker::Trainer::Create(*spec, opt);
  ASSERT_TRUE(b.ok()) << b.status().ToString();
  auto start = (*b)->StartCheckpoints(true);
  ASSERT_TRUE(start.ok()) << start.status().ToString();
  EXPECT_EQ(*start, 3);
  const std::vector<float> resumed = Params((*b)->model());
  ASSERT_EQ(saved.size(), resumed.size());
  EXPECT_EQ(0, std::memcmp(saved.data(), resumed.data(), saved.size() * sizeof(float)));
  auto next_b = (*b)->Step();
  ASSERT_TRUE(next_b.ok());
  EXPECT_EQ(next_a->loss, next_b->loss);
  EXPECT_EQ(next_a->grad_norm, next_b->grad_norm);
  EXPECT_EQ(0, std::memcmp(Params((*a)->model()).data(), Params((*b)->model()).data(),
                           saved.size() * sizeof(float)));
}

TEST(TrainerCuda, StrataTrainDeviceCudaLossFalls) {
  STRATA_REQUIRE_GPU();
  // examples/tiny.yaml reads the fortunes database; where it is not installed, the same model
  // on generated text.
  std::string job = std::string(STRATA_SOURCE_DIR) + "/examples/tiny.yaml";
  if (!std::filesystem::exists("/usr/share/games/fortunes")) {
    const std::string dir = ::strata::testing::MakeTempDir("strata_train_cuda");
    const std::string text = ::strata::testing::WriteText(dir + "/input.txt", 200000);
    job = dir + "/tiny.yaml";
    std::ofstream(job) << "model: {preset: tiny}\n"
                       << "data: {train: " << text << "}\n"
                       << "train: {steps: 600, global_batch: 32, micro_batch: 8, lr: 3e-3, "
                          "min_lr: 3e-4, warmup: 20, precision: fp32, seed: 1337}\n"
                       << "eval: {every: 100, batches: 8}\n";
  }
  const ::strata::testing::CommandRun run =
      ::strata::testing::RunCommand(std::string(STRATA_BINARY_DIR) + "/bin/strata train " + job +
                                    " --device cuda --max-steps 30");
  const std::string& out = run.out;
  ASSERT_EQ(run.code, 0) << out;
  EXPECT_NE(out.find("CUDA device"), std::string::npos) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(out, m, std::regex(R"(loss ([0-9.]+) -> ([0-9.]+))"))) << out;
  EXPECT_LT(std::stod(m[2]), std::stod(m[1])) << out;
}

}  // namespace
}  // namespace strata::model
