// `device: cuda` where it cannot run: a build without CUDA (INVALID_ARGUMENT naming
// resources.device and the missing nvcc) or a machine without a visible CUDA device
// (UNAVAILABLE), through Trainer::Create and through `strata train`. These run on every CPU
// machine; where a GPU is visible they skip (the success paths are tests/cuda/gpt_cuda_test.cc).
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "proto/job_spec.h"
#include "tests/test_util.h"
#include "worker/device_ops.h"
#include "worker/trainer.h"

namespace strata::worker {
namespace {

constexpr const char* kNoBuild =
    "resources.device: cuda, but this build has no CUDA (nvcc not found at configure time)";
constexpr const char* kNoDevice = "resources.device: cuda, but no CUDA device is visible";

using CliRun = testing::CommandRun;

CliRun Strata(const std::string& args) {
  return testing::RunCommand(std::string(STRATA_BINARY_DIR) + "/bin/strata " + args);
}

class DeviceCudaErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (VisibleCudaDevices() > 0) {
      GTEST_SKIP() << "a CUDA device is visible: the no-CUDA error paths cannot be exercised";
    }
    dir_ = testing::MakeTempDir("device_cuda");
    const std::string text = testing::WriteText(dir_ + "/input.txt", 20000);
    job_ = dir_ + "/job.yaml";
    std::ofstream(job_) << "model: {layers: 1, heads: 2, d_model: 64, seq_len: 16}\n"
                        << "data: {train: " << text << "}\n"
                        << "train: {steps: 2, global_batch: 2, micro_batch: 2}\n"
                        << "resources: {device: "
                        << "cuda"
                        << ", threads: 1}\n";
  }
  // What this build answers: INVALID_ARGUMENT without CUDA, UNAVAILABLE with CUDA (no device).
  static void ExpectCudaError(const Status& s) {
    const Status usable = CudaUsable();
    ASSERT_FALSE(usable.ok());
    EXPECT_EQ(s.code(), usable.code()) << s.ToString();
    if (usable.code() == StatusCode::kInvalidArgument) {
      EXPECT_EQ(s.message(), kNoBuild);
    } else {
      EXPECT_EQ(usable.code(), StatusCode::kUnavailable);
      EXPECT_EQ(s.message(), kNoDevice);
    }
  }
  std::string dir_, job_;
};

TEST_F(DeviceCudaErrors, CudaUsableSaysWhy) {
  const Status s = CudaUsable();
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE((s.code() == StatusCode::kInvalidArgument && s.message() == kNoBuild) ||
              (s.code() == StatusCode::kUnavailable && s.message() == kNoDevice))
      << s.ToString();
}

TEST_F(DeviceCudaErrors, TrainerRejectsResourcesDeviceCuda) {
  auto spec = spec::LoadJobFile(job_);
  ASSERT_TRUE(spec.ok()) << spec.status().ToString();
  auto t = Trainer::Create(*spec, TrainOptions{});
  ASSERT_FALSE(t.ok());
  ExpectCudaError(t.status());
}

TEST_F(DeviceCudaErrors, TrainerRejectsDeviceOverride) {
  auto spec = spec::LoadJobFile(job_);
  ASSERT_TRUE(spec.ok());
  spec->mutable_resources()->set_device("cpu");
  TrainOptions opt;
  opt.device = "cuda";
  auto t = Trainer::Create(*spec, opt);
  ASSERT_FALSE(t.ok());
  ExpectCudaError(t.status());
  // And the override to cpu of a cuda job trains on the CPU as before.
  spec->mutable_resources()->set_device("cuda");
  opt.device = "cpu";
  opt.log_steps = false;
  auto cpu = Trainer::Create(*spec, opt);
  ASSERT_TRUE(cpu.ok()) << cpu.status().ToString();
  EXPECT_EQ((*cpu)->model().device(), model::Device::kCpu);
  auto st = (*cpu)->Step();
  EXPECT_TRUE(st.ok()) << st.status().ToString();
}

TEST_F(DeviceCudaErrors, CudaModelFactoryRejects) {
  auto m = CreateCudaModel(model::GptConfig{}, model::DType::kF32, 1, 16, nullptr, {}, 1, 0);
  ASSERT_FALSE(m.ok());
  ExpectCudaError(m.status());
}

TEST_F(DeviceCudaErrors, StrataTrainDeviceCuda) {
  const Status usable = CudaUsable();
  const int want_code = usable.code() == StatusCode::kInvalidArgument ? 2 : 1;
  const std::string want = usable.code() == StatusCode::kInvalidArgument ? kNoBuild : kNoDevice;
  // From the job's resources.device ...
  CliRun r = Strata("train " + job_ + " --max-steps 1");
  EXPECT_EQ(r.code, want_code) << r.out;
  EXPECT_NE(r.out.find(want), std::string::npos) << r.out;
  // ... and from --device.
  r = Strata("train " + job_ + " --device cuda --max-steps 1");
  EXPECT_EQ(r.code, want_code) << r.out;
  EXPECT_NE(r.out.find(want), std::string::npos) << r.out;
  // --device cpu overrides the job.
  r = Strata("train " + job_ + " --device cpu --max-steps 1");
  EXPECT_EQ(r.code, 0) << r.out;
  // A device that does not exist is a usage error.
  r = Strata("train " + job_ + " --device tpu");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find("--device needs cpu or cuda"), std::string::npos) << r.out;
}

TEST_F(DeviceCudaErrors, WorkerDaemonDeviceCuda) {
  // A worker daemon asked to serve CUDA jobs where none can run refuses to start (exit 2) with
  // the same reason, before it registers anywhere (the coordinator address is never dialled).
  const Status usable = CudaUsable();
  const std::string want = usable.code() == StatusCode::kInvalidArgument ? kNoBuild : kNoDevice;
  const std::string worker = std::string(STRATA_BINARY_DIR) + "/bin/strata-worker";
  const CliRun r = testing::RunCommand(worker + " --coordinator 127.0.0.1:1 --device cuda");
  EXPECT_EQ(r.code, 2) << r.out;
  EXPECT_NE(r.out.find(want), std::string::npos) << r.out;
}

}  // namespace
}  // namespace strata::worker
