// Helpers shared by tests: temporary directories, job specs from YAML, deterministic text,
// small model configurations, running a command.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "model/gpt.h"
#include "proto/job_spec.h"

// Substring check with both strings in the failure message (plain gtest; gmock is not linked).
#define EXPECT_HAS(haystack, needle)                               \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "expected to contain: " << (needle) << "\n  actual: " << (haystack) << "\n  "

namespace strata::testing {

// A fresh directory under the GoogleTest temp dir, removed when the object goes away.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = ::testing::TempDir() + "strata_XXXXXX";
    path_ = ::mkdtemp(tmpl.data()) ? tmpl : "";
    EXPECT_FALSE(path_.empty());
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  const std::string& path() const { return path_; }
  // Writes `contents` to path()/name (creating sub-directories) and returns the full path.
  std::string Write(const std::string& name, const std::string& contents) const {
    const std::string p = path_ + "/" + name;
    std::filesystem::create_directories(std::filesystem::path(p).parent_path());
    std::ofstream(p, std::ios::binary) << contents;
    return p;
  }

 private:
  std::string path_;
};

// A fresh directory under the test temp dir, unique per test.
inline std::string MakeTempDir(const std::string& tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "_" + info->name() + "_" + tag;
  for (char& ch : name) {
    if (ch == '/') ch = '_';
  }
  std::filesystem::path p = std::filesystem::path(::testing::TempDir()) / ("strata_" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Pseudo-English text of about `bytes` bytes, deterministic in `seed`.
inline std::string WriteText(const std::string& path, size_t bytes, unsigned seed = 7) {
  static const char* kWords[] = {"the",   "cat",   "sat",  "on",    "a",   "mat", "and",
                                 "dog",   "ran",   "to",   "see",   "it",  "was", "very",
                                 "happy", "today", "with", "some",  "big", "red", "ball",
                                 "in",    "park",  "we",   "played"};
  std::mt19937 rng(seed);
  std::string text;
  while (text.size() < bytes) {
    text += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
    text += (rng() % 9 == 0) ? ".\n" : " ";
  }
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// Parses, defaults and validates a spec given as YAML; fails the test on error.
inline proto::JobSpec SpecFromYaml(const std::string& yaml) {
  auto parsed = spec::ParseYaml(yaml, "test");
  EXPECT_TRUE(parsed.ok()) << parsed.status().ToString();
  proto::JobSpec s = parsed.ok() ? *parsed : proto::JobSpec();
  spec::ApplyDefaults(&s);
  Status v = spec::Validate(s);
  EXPECT_TRUE(v.ok()) << v.ToString();
  return s;
}

// A GPT configuration from its sizes.
inline model::GptConfig GptConfigOf(int vocab_size, int max_seq_len, int layers, int heads,
                                    int channels, bool recompute = false) {
  model::GptConfig c;
  c.vocab_size = vocab_size;
  c.max_seq_len = max_seq_len;
  c.layers = layers;
  c.heads = heads;
  c.channels = channels;
  c.recompute = recompute;
  return c;
}

// The small GPT of the pipeline suites: 4 layers (so pp = 2 and 4 split it), 2 heads, C 16,
// vocabulary 40, context `seq`.
inline model::GptConfig SmallPipelineConfig(int seq, bool recompute = false) {
  return GptConfigOf(40, seq, 4, 2, 16, recompute);
}

// What a command printed (stdout and stderr together) and its exit status (-1: it could not be
// started or did not exit normally).
struct CommandRun {
  int code = -1;
  std::string out;
};

// Runs `cmd` through the shell with stderr folded into stdout, and waits for it.
inline CommandRun RunCommand(const std::string& cmd) {
  CommandRun r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
  const int st = pclose(p);
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

struct TokenBatch {
  std::vector<int32_t> x, y;
};

// n random micro-batches of b x t tokens below `vocab`, deterministic in `seed`.
inline std::vector<TokenBatch> RandomTokenBatches(int n, int vocab, int b, int t, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<TokenBatch> out(static_cast<size_t>(n));
  for (TokenBatch& tb : out) {
    tb.x.resize(static_cast<size_t>(b) * t);
    tb.y.resize(static_cast<size_t>(b) * t);
    for (auto& v : tb.x) v = static_cast<int32_t>(rng() % vocab);
    for (auto& v : tb.y) v = static_cast<int32_t>(rng() % vocab);
  }
  return out;
}

}  // namespace strata::testing
