// End-to-end tests of the `strata` binary: exit codes and messages for bad input, a short real
// training run, and Ctrl-C.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

#include "tests/test_util.h"
#include "worker/data.h"

namespace strata {
namespace {

const std::string kStrata = std::string(STRATA_BINARY_DIR) + "/bin/strata";

using CliRun = testing::CommandRun;

CliRun Exec(const std::string& args) { return testing::RunCommand(kStrata + " " + args); }

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("cli");
    text_ = testing::WriteText(dir_ + "/input.txt", 30000);
  }
  // A small valid job with `extra` YAML lines appended to the train section's siblings.
  std::string Job(const std::string& name, const std::string& model, const std::string& train,
                  const std::string& extra = "") {
    const std::string path = dir_ + "/" + name + ".yaml";
    std::ofstream(path) << "model: {" << model << "}\n"
                        << "data: {train: " << text_ << "}\n"
                        << "train: {" << train << "}\n"
                        << "eval: {every: 2, batches: 2}\n"
                        << extra;
    return path;
  }
  std::string dir_, text_;
};

const char* kModel = "layers: 2, heads: 2, d_model: 32, seq_len: 16";
const char* kTrain = "steps: 3, global_batch: 4, micro_batch: 2, lr: 1.0e-3";

TEST_F(CliTest, TrainsAndPrintsStepsAndSummary) {
  CliRun r = Exec("train " + Job("ok", kModel, kTrain) + " --threads 1");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("step     3/3 | loss"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tok/s"), std::string::npos);
  EXPECT_NE(r.out.find("MFU"), std::string::npos);
  EXPECT_NE(r.out.find("val loss"), std::string::npos);
  EXPECT_NE(r.out.find("done: 3 steps"), std::string::npos) << r.out;
}

// llm.c / nanoGPT token shards (.bin) train unchanged.
TEST_F(CliTest, TrainsOnLlmcShards) {
  std::vector<uint16_t> tokens(20000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>((i * 7) % 300);
  ASSERT_TRUE(worker::WriteLlmcShard(dir_ + "/shard_000.bin", tokens).ok());
  ASSERT_TRUE(worker::WriteLlmcShard(dir_ + "/shard_001.bin", tokens).ok());
  const std::string job = dir_ + "/llmc.yaml";
  std::ofstream(job) << "model: {layers: 1, heads: 2, d_model: 16, seq_len: 16, vocab_size: 300}\n"
                     << "data: {train: '" << dir_ << "/shard_*.bin'}\n"
                     << "train: {" << kTrain << "}\neval: {every: 0}\n";
  CliRun r = Exec("train " + job);
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("38000 train tokens (2374 samples of 16), 2000 val tokens"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("done: 3 steps"), std::string::npos) << r.out;
}

TEST_F(CliTest, MaxStepsStopsEarly) {
  CliRun r = Exec("train " + Job("ok", kModel, kTrain) + " --max-steps 1");
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("done: 1 steps"), std::string::npos) << r.out;
}

struct BadCase {
  std::string model, train, extra, expect;
};

TEST_F(CliTest, BadSpecsExitTwoNamingTheField) {
  const BadCase cases[] = {
      {"layers: 2, heads: 3, d_model: 32, seq_len: 16", kTrain, "", "model.heads"},
      {"layers: 2, heads: 2, d_model: 32, seq_len: 64, max_seq_len: 32", kTrain, "",
       "model.seq_len"},
      {kModel, "steps: 0, global_batch: 4, micro_batch: 2", "", "train.steps"},
      {kModel, "steps: 3, global_batch: 4, micro_batch: 2, lr: -1", "", "train.lr"},
      {kModel, "steps: 3, global_batch: 4, micro_batch: 3", "", "train.micro_batch"},
      {kModel, "steps: 3, global_batch: 4, micro_batch: 2, precision: fp8", "", "train.precision"},
      {kModel, kTrain, "bogus_section: {a: 1}\n", "bogus_section"},
      {kModel + std::string(", colour: blue"), kTrain, "", "model.colour"},
      {kModel, "steps: many", "", "train.steps"},
  };
  int i = 0;
  for (const BadCase& c : cases) {
    CliRun r = Exec("train " + Job("bad" + std::to_string(i++), c.model, c.train, c.extra));
    EXPECT_EQ(r.code, 2) << c.expect << ": " << r.out;
    EXPECT_NE(r.out.find(c.expect), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find("terminate"), std::string::npos) << r.out;  // no uncaught exception
  }
}

TEST_F(CliTest, MissingFilesExitTwo) {
  CliRun r = Exec("train " + dir_ + "/nope.yaml");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("nope.yaml"), std::string::npos) << r.out;
  const std::string job = dir_ + "/missing_data.yaml";
  std::ofstream(job) << "data: {train: " << dir_ << "/no_such_*.txt}\n";
  r = Exec("train " + job);
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("data.train"), std::string::npos) << r.out;
}

TEST_F(CliTest, BadFlagsExitTwo) {
  EXPECT_EQ(Exec("").code, 2);
  EXPECT_EQ(Exec("frobnicate").code, 2);
  const std::string job = Job("ok", kModel, kTrain);
  CliRun r = Exec("train " + job + " --max-steps abc");
  EXPECT_EQ(r.code, 2);
  EXPECT_NE(r.out.find("--max-steps"), std::string::npos) << r.out;
  EXPECT_EQ(Exec("train " + job + " --frob").code, 2);
  EXPECT_EQ(Exec("help").code, 0);
}

TEST_F(CliTest, ValidatePrintsDefaults) {
  CliRun r = Exec("validate " + Job("ok", kModel, kTrain));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("beta2: 0.95"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("precision: \"fp32\""), std::string::npos) << r.out;
}

// Ctrl-C: the running step finishes, the summary is printed, exit code 130.
TEST_F(CliTest, SigintEndsCleanly) {
  const std::string job =
      Job("long", kModel, "steps: 100000, global_batch: 4, micro_batch: 2, lr: 1.0e-3");
  const std::string log = dir_ + "/sigint.log";
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    execl(kStrata.c_str(), kStrata.c_str(), "train", job.c_str(), "--threads", "1",
          static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until it is training (a step line appears), at most 60 s.
  auto contents = [&] {
    std::ifstream f(log);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (contents().find("step ") == std::string::npos &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(kill(pid, SIGINT), 0);
  int st = 0;
  ASSERT_EQ(waitpid(pid, &st, 0), pid);
  ASSERT_TRUE(WIFEXITED(st)) << "killed by a signal instead of ending cleanly\n" << contents();
  EXPECT_EQ(WEXITSTATUS(st), 130) << contents();
  EXPECT_NE(contents().find("interrupted:"), std::string::npos) << contents();
}

}  // namespace
}  // namespace strata
