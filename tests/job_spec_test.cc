// Tests for proto/job_spec: YAML parsing, presets and defaults, validation messages, data-file
// checks, job-file loading and the ToYaml round trip.
#include "proto/job_spec.h"

#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "tests/test_util.h"

namespace strata::spec {
namespace {

namespace fs = std::filesystem;

using ::strata::testing::ScratchDir;

proto::JobSpec ParseOk(const std::string& yaml) {
  auto r = ParseYaml(yaml, "job.yaml");
  EXPECT_TRUE(r.ok()) << r.status().ToString();
  return r.ok() ? *r : proto::JobSpec();
}

Status ParseError(const std::string& yaml) {
  auto r = ParseYaml(yaml, "job.yaml");
  EXPECT_FALSE(r.ok()) << "parsed:\n" << yaml;
  return r.ok() ? Status::Ok() : r.status();
}

proto::JobSpec Defaulted(const std::string& yaml) {
  proto::JobSpec spec = ParseOk(yaml);
  ApplyDefaults(&spec);
  return spec;
}

// Parses, defaults and validates `yaml`; returns Validate's status.
Status Check(const std::string& yaml) {
  auto r = ParseYaml(yaml, "job.yaml");
  if (!r.ok()) return r.status();
  proto::JobSpec spec = *r;
  ApplyDefaults(&spec);
  return Validate(spec);
}

bool Same(const proto::JobSpec& a, const proto::JobSpec& b) {
  return google::protobuf::util::MessageDifferencer::Equals(a, b);
}

// ---- ParseYaml ----

TEST(ParseYaml, ReadsEveryKindOfField) {
  const proto::JobSpec spec = ParseOk(R"(
name: demo
model: {preset: gpt2, layers: 3, recompute: true}
data:
  train: data/*.txt
  val_fraction: 0.1
train:
  steps: 50
  lr: 3e-3
  min_lr: 0
  weight_decay: 0.0
  seed: 18446744073709551615
  precision: bf16
parallel: {dp: 2, tp: auto, pp: 1, zero1: false, schedule: gpipe}
checkpoint: {dir: ckpt, every: 10, keep: 2, async: True}
eval: {every: 0}
)");
  EXPECT_EQ(spec.name(), "demo");
  EXPECT_EQ(spec.model().preset(), "gpt2");
  EXPECT_EQ(spec.model().layers(), 3);
  EXPECT_TRUE(spec.model().recompute());
  EXPECT_EQ(spec.data().train(), "data/*.txt");
  EXPECT_DOUBLE_EQ(spec.data().val_fraction(), 0.1);
  EXPECT_EQ(spec.train().steps(), 50);
  EXPECT_DOUBLE_EQ(spec.train().lr(), 3e-3);
  EXPECT_TRUE(spec.train().has_min_lr());
  EXPECT_EQ(spec.train().min_lr(), 0);
  EXPECT_TRUE(spec.train().has_weight_decay());
  EXPECT_FALSE(spec.train().has_grad_clip());
  EXPECT_EQ(spec.train().seed(), 18446744073709551615ULL);
  EXPECT_EQ(spec.train().precision(), "bf16");
  EXPECT_EQ(spec.parallel().dp(), 2);
  EXPECT_EQ(spec.parallel().tp(), 0);
  EXPECT_EQ(spec.parallel().pp(), 1);
  EXPECT_EQ(spec.parallel().schedule(), "gpipe");
  EXPECT_TRUE(spec.checkpoint().async());
  EXPECT_TRUE(spec.eval().has_every());
  EXPECT_EQ(spec.eval().every(), 0);
}

TEST(ParseYaml, AutoMeansZeroForEveryParallelDegree) {
  const proto::JobSpec spec = ParseOk("parallel: {dp: auto, tp: auto, pp: auto}\n");
  EXPECT_EQ(spec.parallel().dp(), 0);
  EXPECT_EQ(spec.parallel().tp(), 0);
  EXPECT_EQ(spec.parallel().pp(), 0);
}

TEST(ParseYaml, AutoIsOnlyForParallel) {
  const Status st = ParseError("train: {steps: auto}\n");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(st.message(), "train.steps: expected an integer, got 'auto'");
}

TEST(ParseYaml, NullValueKeepsTheDefault) {
  const proto::JobSpec spec = ParseOk("train:\n  weight_decay:\n  seed: ~\nmodel:\n");
  EXPECT_FALSE(spec.train().has_weight_decay());
  EXPECT_FALSE(spec.train().has_seed());
  EXPECT_FALSE(spec.has_model());
}

TEST(ParseYaml, UnknownTopLevelKeyListsValidKeys) {
  const Status st = ParseError("modle: {layers: 2}\n");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(st.message(), "modle: unknown key");
  EXPECT_HAS(st.message(), "did you mean 'model'?");
  EXPECT_HAS(st.message(), "name, model, data, train, parallel, resources, checkpoint, eval");
}

TEST(ParseYaml, UnknownNestedKeyNamesItsPathAndTheValidKeys) {
  const Status st = ParseError("train:\n  steps: 5\n  lrr: 0.1\n");
  EXPECT_HAS(st.message(), "train.lrr: unknown key (job.yaml:3:3)");
  EXPECT_HAS(st.message(), "did you mean 'lr'?");
  EXPECT_HAS(st.message(), "valid keys under train: steps, global_batch");
}

TEST(ParseYaml, WrongScalarTypes) {
  struct Case {
    const char* yaml;
    const char* message;
  } cases[] = {
      {"train: {lr: abc}", "train.lr: expected a number, got 'abc'"},
      {"train: {lr: .inf}", "train.lr: expected a number, got '.inf'"},
      {"train: {steps: 1.5}", "train.steps: expected an integer, got '1.5'"},
      {"train: {steps: 10000000000}", "train.steps: 10000000000 does not fit in a 32-bit integer"},
      {"train: {seed: -1}", "train.seed: expected a non-negative integer, got '-1'"},
      {"model: {recompute: maybe}", "model.recompute: expected true or false, got 'maybe'"},
      {"model: {layers: [1, 2]}", "model.layers: expected an integer, got a list"},
      {"data: {train: {a: 1}}", "data.train: expected a string, got a map"},
      {"model: 5", "model: expected a map with keys {preset, layers"},
      {"parallel: {dp: two}", "parallel.dp: expected an integer or 'auto', got 'two'"},
  };
  for (const Case& c : cases) {
    const Status st = ParseError(c.yaml);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << c.yaml;
    EXPECT_HAS(st.message(), c.message) << c.yaml;
    EXPECT_HAS(st.message(), "job.yaml:1:") << c.yaml;
  }
}

TEST(ParseYaml, MalformedYamlGivesLineAndColumn) {
  const Status st = ParseError("name: x\nmodel:\n  layers: [1, 2\n");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(st.message(), "job.yaml:");
  EXPECT_HAS(st.message(), "malformed YAML");

  const Status tab = ParseError("model:\n  layers: 2\n   heads: 3\n");
  EXPECT_HAS(tab.message(), "job.yaml:3:");
  EXPECT_HAS(tab.message(), "malformed YAML");
}

TEST(ParseYaml, TopLevelMustBeAMap) {
  EXPECT_HAS(ParseError("- a\n- b\n").message(), "job.yaml: the job spec must be a map");
  EXPECT_HAS(ParseError("just words\n").message(), "got 'just words'");
  EXPECT_HAS(ParseError("").message(), "job.yaml: the job spec is empty");
  EXPECT_HAS(ParseError("# only a comment\n").message(), "is empty");
}

TEST(ParseYaml, DuplicateKeysAreRejected) {
  const Status st = ParseError("train:\n  lr: 0.1\n  lr: 0.2\n");
  EXPECT_HAS(st.message(), "train.lr: duplicate key");
}

// ---- ApplyDefaults ----

TEST(ApplyDefaults, PresetsHaveTheirDocumentedShapes) {
  struct Case {
    const char* preset;
    int layers, heads, d_model, seq_len, max_seq_len;
  } cases[] = {
      {"tiny", 4, 4, 128, 128, 128},
      {"small", 6, 6, 384, 256, 256},
      {"gpt2", 12, 12, 768, 1024, 1024},
      {"gpt2-medium", 24, 16, 1024, 1024, 1024},
      {"gpt2-large", 36, 20, 1280, 1024, 1024},
      {"gpt2-xl", 48, 25, 1600, 1024, 1024},
  };
  for (const Case& c : cases) {
    const proto::JobSpec spec =
        Defaulted(std::string("model: {preset: ") + c.preset + "}\ndata: {train: x.txt}\n");
    EXPECT_EQ(spec.model().layers(), c.layers) << c.preset;
    EXPECT_EQ(spec.model().heads(), c.heads) << c.preset;
    EXPECT_EQ(spec.model().d_model(), c.d_model) << c.preset;
    EXPECT_EQ(spec.model().seq_len(), c.seq_len) << c.preset;
    EXPECT_EQ(spec.model().max_seq_len(), c.max_seq_len) << c.preset;
    EXPECT_TRUE(Validate(spec).ok()) << c.preset << ": " << Validate(spec).ToString();
  }
}

TEST(ApplyDefaults, ExplicitFieldsOverrideThePreset) {
  const proto::JobSpec spec =
      Defaulted("model: {preset: gpt2, layers: 2, seq_len: 256}\ndata: {train: x.txt}\n");
  EXPECT_EQ(spec.model().preset(), "gpt2");
  EXPECT_EQ(spec.model().layers(), 2);
  EXPECT_EQ(spec.model().heads(), 12);
  EXPECT_EQ(spec.model().seq_len(), 256);
  EXPECT_EQ(spec.model().max_seq_len(), 1024);  // gpt2's context stays

  const proto::JobSpec tiny = Defaulted("model: {preset: tiny, seq_len: 64}\n");
  EXPECT_EQ(tiny.model().max_seq_len(), 64);  // tiny's context follows seq_len
}

TEST(ApplyDefaults, NoModelMeansTiny) {
  const proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  EXPECT_EQ(spec.model().preset(), "tiny");
  EXPECT_EQ(spec.model().layers(), 4);
  EXPECT_EQ(spec.model().d_model(), 128);

  const proto::JobSpec custom = Defaulted("model: {layers: 2, d_model: 64}\n");
  EXPECT_EQ(custom.model().preset(), "");
  EXPECT_EQ(custom.model().layers(), 2);
  EXPECT_EQ(custom.model().heads(), 4);
  EXPECT_EQ(custom.model().d_model(), 64);
  EXPECT_EQ(custom.model().seq_len(), 128);
}

TEST(ApplyDefaults, FillsEveryDocumentedDefault) {
  const proto::JobSpec spec = Defaulted("data: {train: corpus.txt}\n");
  EXPECT_EQ(spec.name(), "job");
  EXPECT_EQ(spec.model().vocab_size(), 256);
  EXPECT_EQ(spec.data().format(), "text");
  EXPECT_DOUBLE_EQ(spec.data().val_fraction(), 0.05);
  const proto::TrainSpec& t = spec.train();
  EXPECT_EQ(t.steps(), 1000);
  EXPECT_EQ(t.global_batch(), 8);
  EXPECT_EQ(t.micro_batch(), 8);
  EXPECT_DOUBLE_EQ(t.lr(), 1e-3);
  EXPECT_DOUBLE_EQ(t.min_lr(), 1e-4);
  EXPECT_EQ(t.warmup(), 0);
  EXPECT_DOUBLE_EQ(t.weight_decay(), 0.1);
  EXPECT_DOUBLE_EQ(t.grad_clip(), 1.0);
  EXPECT_EQ(t.precision(), "fp32");
  EXPECT_EQ(t.seed(), 1337u);
  EXPECT_DOUBLE_EQ(t.beta1(), 0.9);
  EXPECT_DOUBLE_EQ(t.beta2(), 0.95);
  EXPECT_DOUBLE_EQ(t.eps(), 1e-8);
  EXPECT_EQ(t.log_every(), 1);
  EXPECT_EQ(spec.parallel().schedule(), "1f1b");
  EXPECT_EQ(spec.parallel().dp(), 0);
  EXPECT_EQ(spec.resources().device(), "cpu");
  EXPECT_EQ(spec.resources().workers(), 1);
  EXPECT_EQ(spec.resources().min_workers(), 1);
  EXPECT_EQ(spec.resources().max_restarts(), 0);
  EXPECT_EQ(spec.resources().threads(), 0);
  EXPECT_EQ(spec.checkpoint().keep(), 3);
  EXPECT_EQ(spec.eval().every(), 100);
  EXPECT_EQ(spec.eval().batches(), 10);
  EXPECT_TRUE(Validate(spec).ok()) << Validate(spec).ToString();
}

TEST(ApplyDefaults, LlmcDataFromBinSuffix) {
  const proto::JobSpec spec = Defaulted("data: {train: 'shards/train_*.bin'}\n");
  EXPECT_EQ(spec.data().format(), "llmc");
  EXPECT_EQ(spec.model().vocab_size(), 50257);
  const proto::JobSpec text = Defaulted("data: {train: 'shards/*.bin', format: text}\n");
  EXPECT_EQ(text.model().vocab_size(), 256);
}

TEST(ApplyDefaults, ExplicitZeroIsKeptWhereZeroIsMeaningful) {
  const proto::JobSpec spec = Defaulted(
      "train: {weight_decay: 0, grad_clip: 0, seed: 0, min_lr: 0, warmup: 0}\n"
      "eval: {every: 0}\n");
  EXPECT_EQ(spec.train().weight_decay(), 0);
  EXPECT_EQ(spec.train().grad_clip(), 0);
  EXPECT_EQ(spec.train().seed(), 0u);
  EXPECT_EQ(spec.train().min_lr(), 0);
  EXPECT_EQ(spec.eval().every(), 0);
  const proto::JobSpec beta = Defaulted("data: {train: x.txt}\ntrain: {beta1: 0}\n");
  EXPECT_EQ(beta.train().beta1(), 0);
  EXPECT_TRUE(Validate(beta).ok()) << Validate(beta).ToString();
}

TEST(ApplyDefaults, MinLrFollowsAnExplicitLr) {
  const proto::JobSpec spec = Defaulted("train: {lr: 0.02}\n");
  EXPECT_DOUBLE_EQ(spec.train().min_lr(), 0.002);
  EXPECT_EQ(Defaulted("train: {global_batch: 32}\n").train().micro_batch(), 32);
}

TEST(ApplyDefaults, IsIdempotent) {
  for (const char* yaml : {"data: {train: x.txt}\n", "model: {layers: 2}\n",
                           "model: {preset: bogus}\ntrain: {lr: 0.5}\n"}) {
    proto::JobSpec once = Defaulted(yaml);
    proto::JobSpec twice = once;
    ApplyDefaults(&twice);
    EXPECT_TRUE(Same(once, twice)) << yaml;
  }
}

// ---- Validate ----

TEST(Validate, RejectsEachBadField) {
  struct Case {
    const char* yaml;
    const char* message;
  } cases[] = {
      {"model: {preset: gpt5}",
       "model.preset: unknown preset 'gpt5'; valid presets: tiny, small, gpt2, gpt2-medium, "
       "gpt2-large, gpt2-xl"},
      {"model: {layers: -1}", "model.layers: must be positive, got -1"},
      // An explicit 0 is an error, not a request for the default.
      {"model: {layers: 0}", "model.layers: must be positive, got 0"},
      {"model: {heads: 0}", "model.heads: must be positive, got 0"},
      {"train: {steps: 0}", "train.steps: must be positive, got 0"},
      {"train: {lr: 0}", "train.lr: must be positive, got 0"},
      {"train: {global_batch: 0}", "train.global_batch: must be positive, got 0"},
      {"model: {heads: -4}", "model.heads: must be positive, got -4"},
      {"model: {d_model: -128}", "model.d_model: must be positive, got -128"},
      {"model: {seq_len: -1}", "model.seq_len: must be positive"},
      {"model: {vocab_size: -5}", "model.vocab_size: must be positive"},
      {"model: {heads: 5}",
       "model.heads: 5 does not divide model.d_model=128; choose heads in {1, 2, 4, 8, 16, 32, 64, "
       "128}"},
      {"model: {preset: gpt2, seq_len: 2048}",
       "model.seq_len: 2048 exceeds the model's context model.max_seq_len=1024; lower seq_len or "
       "raise max_seq_len"},
      {"model: {vocab_size: 100}", "model.vocab_size: 100 is too small for text data"},
      {"model: {vocab_size: 70000}\ndata: {format: llmc}", "model.vocab_size: 70000 exceeds 65536"},
      {"data: {format: csv}", "data.format: unknown format 'csv'; use text or llmc"},
      {"data: {val_fraction: 1}", "data.val_fraction: 1 is outside [0, 1)"},
      {"data: {val_fraction: -0.1}", "data.val_fraction: -0.1 is outside [0, 1)"},
      {"train: {steps: -3}", "train.steps: must be positive, got -3"},
      {"train: {global_batch: -8}", "train.global_batch: must be positive"},
      {"train: {micro_batch: -1}", "train.micro_batch: must be positive"},
      {"train: {global_batch: 8, micro_batch: 3}",
       "train.micro_batch: 3 does not divide train.global_batch=8; choose micro_batch in {1, 2, 4, "
       "8}"},
      {"train: {lr: -0.1}", "train.lr: must be positive, got -0.1"},
      {"train: {min_lr: -1}", "train.min_lr: must be >= 0"},
      {"train: {lr: 0.001, min_lr: 0.01}", "train.min_lr: 0.01 exceeds train.lr=0.001"},
      {"train: {warmup: -5}", "train.warmup: must be >= 0"},
      {"train: {weight_decay: -0.1}", "train.weight_decay: must be >= 0"},
      {"train: {grad_clip: -1}", "train.grad_clip: must be >= 0"},
      {"train: {precision: fp8}",
       "train.precision: unknown precision 'fp8'; use fp32, bf16 or fp16"},
      {"train: {beta1: 1}", "train.beta1: 1 is outside [0, 1)"},
      {"train: {beta2: -0.5}", "train.beta2: -0.5 is outside [0, 1)"},
      {"train: {eps: -1e-8}", "train.eps: must be positive"},
      {"train: {log_every: -1}", "train.log_every: must be positive"},
      {"parallel: {dp: -1}", "parallel.dp: must be >= 0"},
      {"parallel: {tp: -2}", "parallel.tp: must be >= 0"},
      {"parallel: {pp: -3}", "parallel.pp: must be >= 0"},
      {"parallel: {schedule: zigzag}",
       "parallel.schedule: unknown schedule 'zigzag'; use 1f1b or gpipe"},
      {"resources: {device: tpu}", "resources.device: unknown device 'tpu'; use cpu or cuda"},
      {"resources: {workers: -1}", "resources.workers: must be at least 1"},
      {"resources: {workers: 2, min_workers: 3}",
       "resources.min_workers: 3 is outside [1, resources.workers=2]"},
      {"resources: {max_restarts: -1}", "resources.max_restarts: must be >= 0"},
      {"resources: {threads: -2}", "resources.threads: must be >= 0"},
      {"checkpoint: {every: -1}", "checkpoint.every: must be >= 0"},
      {"checkpoint: {keep: -1}", "checkpoint.keep: must be at least 1"},
      {"eval: {every: -1}", "eval.every: must be >= 0"},
      {"eval: {every: 10, batches: -1}", "eval.batches: must be positive when eval.every > 0"},
  };
  for (const Case& c : cases) {
    // Every case gets a valid data.train unless it sets data itself, so the error is its own.
    std::string yaml = c.yaml;
    if (yaml.find("data:") == std::string::npos) yaml += "\ndata: {train: x.txt}";
    if (yaml.find("data: {") != std::string::npos &&
        yaml.find("train:", yaml.find("data:")) == std::string::npos) {
      yaml.insert(yaml.find("data: {") + 7, "train: x.txt, ");
    }
    const Status st = Check(yaml);
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << yaml;
    EXPECT_HAS(st.message(), c.message) << yaml;
    EXPECT_EQ(st.message().rfind(std::string(c.message).substr(0, 6), 0), 0u)
        << "message should start with the field path: " << st.message();
  }
}

TEST(Validate, DataTrainIsRequired) {
  const Status st = Check("name: x\n");
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(st.message(), "data.train: required");
}

TEST(Validate, NanIsRejected) {
  proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  spec.mutable_train()->set_lr(std::nan(""));
  EXPECT_HAS(Validate(spec).message(), "train.lr: must be positive");
}

TEST(Validate, AcceptsBoundaryValues) {
  EXPECT_TRUE(Check("data: {train: x.txt, val_fraction: 0}\n"
                    "train: {beta1: 0, min_lr: 0, weight_decay: 0, grad_clip: 0}\n"
                    "eval: {every: 0, batches: 0}\n")
                  .ok());
  EXPECT_TRUE(Check("data: {train: x.bin}\nmodel: {vocab_size: 65536}\n").ok());
  EXPECT_TRUE(Check("data: {train: x.txt}\ntrain: {lr: 0.01, min_lr: 0.01}\n").ok());
}

// ---- data files ----

TEST(ValidateDataFiles, MissingFileIsNotFoundAndNamesThePattern) {
  ScratchDir dir;
  proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  spec.mutable_data()->set_train(dir.path() + "/nothing_*.txt");
  const Status st = ValidateDataFiles(spec);
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_HAS(st.message(), "data.train: no file matches '" + dir.path() + "/nothing_*.txt'");
}

TEST(ValidateDataFiles, GlobFollowsSymlinksAndChecksVal) {
  ScratchDir dir;
  const std::string real = dir.Write("real/a.txt", "hello");
  fs::create_symlink(real, dir.path() + "/link.txt");
  proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  spec.mutable_data()->set_train(dir.path() + "/*.txt");
  EXPECT_TRUE(ValidateDataFiles(spec).ok()) << ValidateDataFiles(spec).ToString();

  spec.mutable_data()->set_val(dir.path() + "/val.txt");
  const Status st = ValidateDataFiles(spec);
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_HAS(st.message(), "data.val: no file matches");
}

TEST(ValidateDataFiles, DirectoriesAndDanglingLinksAreErrors) {
  ScratchDir dir;
  dir.Write("sub.txt/inner", "x");  // a directory whose name matches *.txt
  proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  spec.mutable_data()->set_train(dir.path() + "/*.txt");
  Status st = ValidateDataFiles(spec);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_HAS(st.message(), "data.train:");
  EXPECT_HAS(st.message(), "is not a regular file");

  ScratchDir dir2;
  fs::create_symlink(dir2.path() + "/gone", dir2.path() + "/dangling.txt");
  spec.mutable_data()->set_train(dir2.path() + "/*.txt");
  st = ValidateDataFiles(spec);
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_HAS(st.message(), "dangling.txt");
}

TEST(ValidateDataFiles, UnreadableFileIsAnError) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can read any file";
  ScratchDir dir;
  const std::string p = dir.Write("secret.txt", "x");
  ::chmod(p.c_str(), 0);
  proto::JobSpec spec = Defaulted("data: {train: x.txt}\n");
  spec.mutable_data()->set_train(p);
  EXPECT_HAS(ValidateDataFiles(spec).message(), "is not readable");
}

TEST(MatchDataFiles, SortedByPath) {
  ScratchDir dir;
  dir.Write("b.txt", "b");
  dir.Write("a.txt", "a");
  dir.Write("C.txt", "c");
  auto files = MatchDataFiles("data.train", dir.path() + "/*.txt");
  ASSERT_TRUE(files.ok()) << files.status().ToString();
  EXPECT_EQ(*files, (std::vector<std::string>{dir.path() + "/C.txt", dir.path() + "/a.txt",
                                              dir.path() + "/b.txt"}));
}

// ---- LoadJobFile ----

TEST(LoadJobFile, MissingFileIsNotFound) {
  const Result<proto::JobSpec> r = LoadJobFile("/nonexistent/dir/job.yaml");
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_HAS(r.status().message(), "/nonexistent/dir/job.yaml");
}

TEST(LoadJobFile, ResolvesRelativeDataAgainstTheJobDirectory) {
  ScratchDir dir;
  dir.Write("jobs/data/a.txt", std::string(1000, 'a'));
  const std::string job = dir.Write("jobs/my-run.yaml", "data:\n  train: data/*.txt\n");
  const Result<proto::JobSpec> r = LoadJobFile(job);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->data().train(), dir.path() + "/jobs/data/*.txt");
  EXPECT_EQ(r->name(), "my-run");
  EXPECT_EQ(r->model().preset(), "tiny");

  // Absolute paths are kept; an explicit name wins.
  const std::string abs = dir.path() + "/jobs/data/a.txt";
  const std::string job2 = dir.Write("other/job2.yml", "name: keep\ndata: {train: " + abs + "}\n");
  const Result<proto::JobSpec> r2 = LoadJobFile(job2);
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  EXPECT_EQ(r2->data().train(), abs);
  EXPECT_EQ(r2->name(), "keep");
}

TEST(LoadJobFile, RelativeJobPathGivesAbsoluteDataPath) {
  ScratchDir dir;
  dir.Write("d/a.txt", "abc");
  dir.Write("d/job.yaml", "data: {train: a.txt, val: ./a.txt}\n");
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path());
  const Result<proto::JobSpec> r = LoadJobFile("d/job.yaml");
  fs::current_path(cwd);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->data().train(), fs::path(dir.path()).lexically_normal().string() + "/d/a.txt");
  EXPECT_EQ(r->data().val(), r->data().train());
}

TEST(LoadJobFile, ReportsParseValidationAndDataErrors) {
  ScratchDir dir;
  dir.Write("a.txt", "abc");
  const std::string bad_yaml = dir.Write("bad.yaml", "train: {lr: abc}\n");
  EXPECT_HAS(LoadJobFile(bad_yaml).status().message(),
             "train.lr: expected a number, got 'abc' (" + bad_yaml + ":1:");
  const std::string bad_value = dir.Write("v.yaml", "data: {train: a.txt}\nmodel: {heads: 3}\n");
  EXPECT_HAS(LoadJobFile(bad_value).status().message(), "model.heads: 3 does not divide");
  const std::string bad_data = dir.Write("d.yaml", "data: {train: missing/*.txt}\n");
  const Status st = LoadJobFile(bad_data).status();
  EXPECT_EQ(st.code(), StatusCode::kNotFound);
  EXPECT_HAS(st.message(), "data.train: no file matches '" + dir.path() + "/missing/*.txt'");
  EXPECT_EQ(LoadJobFile(dir.path()).status().code(), StatusCode::kInvalidArgument);
}

TEST(LoadJobFile, ShippedExamplesLoad) {
  if (!fs::exists("/usr/share/games/fortunes")) {
    GTEST_SKIP() << "fortune data not installed (scripts/install_deps.sh)";
  }
  for (const char* name : {"tiny", "small"}) {
    const std::string path = std::string(STRATA_SOURCE_DIR) + "/examples/" + name + ".yaml";
    const Result<proto::JobSpec> r = LoadJobFile(path);
    ASSERT_TRUE(r.ok()) << path << ": " << r.status().ToString();
    EXPECT_EQ(r->model().preset(), name);
    EXPECT_EQ(r->data().format(), "text");
    EXPECT_EQ(r->model().vocab_size(), 256);
  }
}

// ---- ToYaml ----

TEST(ToYaml, RoundTripsADefaultedSpec) {
  proto::JobSpec spec = Defaulted(
      "name: 'tricky: name'\nmodel: {preset: gpt2, recompute: true}\n"
      "data: {train: '/data/*.bin', val: '/v/#1.bin'}\n"
      "train: {lr: 0.1234567890123, seed: 18446744073709551615, precision: bf16}\n"
      "parallel: {dp: 4, schedule: gpipe, zero1: true}\ncheckpoint: {dir: 'true'}\n");
  const std::string yaml = ToYaml(spec);
  const Result<proto::JobSpec> back = ParseYaml(yaml, "roundtrip");
  ASSERT_TRUE(back.ok()) << back.status().ToString() << "\n" << yaml;
  EXPECT_TRUE(Same(spec, *back)) << yaml << "\nvs\n" << back->DebugString();
}

TEST(ToYaml, RoundTripsUnsetOptionalsAsUnset) {
  const proto::JobSpec spec = ParseOk("train: {steps: 5, weight_decay: 0}\n");
  const Result<proto::JobSpec> back = ParseYaml(ToYaml(spec), "roundtrip");
  ASSERT_TRUE(back.ok()) << back.status().ToString();
  EXPECT_TRUE(back->train().has_weight_decay());
  EXPECT_FALSE(back->train().has_grad_clip());
  EXPECT_FALSE(back->train().has_seed());
  EXPECT_TRUE(Same(spec, *back));
}

TEST(ToYaml, PrintsEveryFieldNested) {
  const std::string yaml = ToYaml(Defaulted("data: {train: x.txt}\n"));
  for (const char* line :
       {"name: \"job\"", "model:\n  preset: \"tiny\"", "  layers: 4", "  lr: 0.001", "  eps: 1e-08",
        "  grad_clip: 1.0", "  seed: 1337", "parallel:\n  dp: 0", "  recompute: false",
        "resources:", "checkpoint:\n  dir: \"\"", "eval:\n  every: 100\n  batches: 10"}) {
    EXPECT_HAS(yaml, line) << yaml;
  }
  const auto* d = proto::JobSpec::descriptor();
  for (int i = 0; i < d->field_count(); ++i) {
    const auto* sub = d->field(i)->message_type();
    if (sub == nullptr) continue;
    for (int j = 0; j < sub->field_count(); ++j) {
      EXPECT_HAS(yaml, "  " + sub->field(j)->name() + ":")
          << d->field(i)->name() << "." << sub->field(j)->name();
    }
  }
}

}  // namespace
}  // namespace strata::spec
