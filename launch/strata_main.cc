// The `strata` command line. This issue provides `train` and `validate`; the daemon commands
// (submit, jobs, status, logs, cancel, plan) arrive with the coordinator.
//
// Exit codes: 0 success, 1 runtime failure, 2 bad input (usage, job spec, data), 130 interrupted.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "common/logging.h"
#include "launch/api_client.h"
#include "launch/ckpt_cli.h"
#include "launch/plan_cli.h"
#include "model/cpu_info.h"
#include "proto/job_spec.h"
#include "worker/trainer.h"

namespace {

std::atomic<bool> g_stop{false};

void OnSigint(int) {
  g_stop.store(true);
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
}

constexpr const char* kUsage =
    "usage: strata <command> [args]\n"
    "\n"
    "commands:\n"
    "  train JOB.yaml [--max-steps N] [--threads N] [--metrics FILE] [--log-level LEVEL]\n"
    "                 [--checkpoint-dir DIR] [--checkpoint-every N] [--resume]\n"
    "                 [--device cpu|cuda]\n"
    "        train the job in this process; one log line per step; --metrics appends\n"
    "        one JSON line per step to FILE; --resume continues from the latest usable\n"
    "        committed checkpoint in checkpoint.dir; --device overrides resources.device\n"
    "        (cuda: CUDA device 0)\n"
    "  ckpt ls CKPT_ROOT              committed checkpoints: step, layout, size, status\n"
    "  ckpt verify CKPT_ROOT [--step S]\n"
    "        read every shard of the latest (or step S) checkpoint and check its checksum\n"
    "  export CKPT_ROOT [--step S] --format safetensors -o FILE\n"
    "        the model's weights with Hugging Face GPT-2 names and layouts\n"
    "  plan JOB.yaml --workers N --device h100|a100|cpu [--explain] [--json]\n"
    "        choose dp x tp x pp, micro-batch, ZeRO-1, recompute; --explain: breakdowns,\n"
    "        runners-up and why they lost\n"
    "  validate JOB.yaml\n"
    "        check a job spec and print it with every default filled in\n"
    "  help  this text\n";

int Usage(const std::string& error) {
  std::fprintf(stderr, "strata: %s\n\n%s", error.c_str(), kUsage);
  return 2;
}

int ExitCodeFor(const strata::Status& s) {
  return (s.code() == strata::StatusCode::kInvalidArgument ||
          s.code() == strata::StatusCode::kNotFound)
             ? 2
             : 1;
}

bool ParseInt(const std::string& s, long long* out) {
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0) return false;
  *out = v;
  return true;
}

int Validate(const std::vector<std::string>& args) {
  if (args.size() != 1) return Usage("validate takes exactly one JOB.yaml");
  auto spec = strata::spec::LoadJobFile(args[0]);
  if (!spec.ok()) {
    std::fprintf(stderr, "strata: %s: %s\n", args[0].c_str(), spec.status().message().c_str());
    return ExitCodeFor(spec.status());
  }
  std::printf("%s\n", strata::spec::ToYaml(*spec).c_str());
  return 0;
}

int Train(const std::vector<std::string>& args) {
  std::string job;
  strata::worker::TrainOptions opt;
  std::string level = "info";
  bool resume = false;
  std::string ckpt_dir;
  long long ckpt_every = -1;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    auto value = [&](const char* flag) -> const std::string* {
      if (i + 1 >= args.size()) return nullptr;
      (void)flag;
      return &args[++i];
    };
    long long v = 0;
    if (a == "--max-steps" || a == "--threads" || a == "--checkpoint-every") {
      const std::string* s = value(a.c_str());
      if (s == nullptr) return Usage(a + " needs a value");
      if (!ParseInt(*s, &v) || v < 0) {
        return Usage(a + ": '" + *s + "' is not a non-negative integer");
      }
      if (a == "--max-steps")
        opt.max_steps = v;
      else if (a == "--threads")
        opt.threads = static_cast<int>(v);
      else
        ckpt_every = v;
    } else if (a == "--resume") {
      resume = true;
    } else if (a == "--checkpoint-dir") {
      const std::string* s = value(a.c_str());
      if (s == nullptr) return Usage("--checkpoint-dir needs a directory");
      ckpt_dir = *s;
    } else if (a == "--metrics") {
      const std::string* s = value(a.c_str());
      if (s == nullptr) return Usage("--metrics needs a file path");
      opt.metrics_path = *s;
    } else if (a == "--device") {
      const std::string* s = value(a.c_str());
      if (s == nullptr || (*s != "cpu" && *s != "cuda")) {
        return Usage("--device needs cpu or cuda");
      }
      opt.device = *s;
    } else if (a == "--log-level") {
      const std::string* s = value(a.c_str());
      if (s == nullptr) return Usage("--log-level needs a value (trace|debug|info|warn|error)");
      level = *s;
    } else if (!a.empty() && a[0] == '-') {
      return Usage("unknown flag '" + a + "' for train");
    } else if (job.empty()) {
      job = a;
    } else {
      return Usage("train takes one JOB.yaml, got also '" + a + "'");
    }
  }
  if (job.empty()) return Usage("train needs a JOB.yaml");
  strata::InitLogging(level.c_str());

  auto spec = strata::spec::LoadJobFile(job);
  if (!spec.ok()) {
    std::fprintf(stderr, "strata: %s: %s\n", job.c_str(), spec.status().message().c_str());
    return ExitCodeFor(spec.status());
  }
  if (!ckpt_dir.empty()) spec->mutable_checkpoint()->set_dir(ckpt_dir);
  if (ckpt_every >= 0) spec->mutable_checkpoint()->set_every(static_cast<int32_t>(ckpt_every));
  auto trainer = strata::worker::Trainer::Create(*spec, opt);
  if (!trainer.ok()) {
    std::fprintf(stderr, "strata: %s: %s\n", job.c_str(), trainer.status().message().c_str());
    return ExitCodeFor(trainer.status());
  }
  strata::worker::Trainer& t = **trainer;
  auto start = t.StartCheckpoints(resume);
  if (!start.ok()) {
    std::fprintf(stderr, "strata: %s: %s\n", job.c_str(), start.status().message().c_str());
    return start.status().code() == strata::StatusCode::kDataLoss ? 1 : 2;
  }
  const auto& cfg = t.model().config();
  spdlog::info("job '{}': GPT {} ({:.2f}M parameters), {} precision, {}", spec->name(),
               cfg.ToString(), t.model().num_params() / 1e6,
               strata::model::DTypeName(t.model().compute_dtype()),
               t.model().device() == strata::model::Device::kCuda
                   ? std::string("CUDA device ") + std::to_string(opt.cuda_device)
                   : std::to_string(strata::model::NumThreads()) + " threads");
  spdlog::info(
      "data: {} train tokens ({} samples of {}), {} val tokens; global batch {} = {} x {} "
      "micro-batches; measured GEMM peak {:.1f} GFLOP/s",
      t.data().train_tokens(), t.data().train_samples(), t.data().seq_len(), t.data().val_tokens(),
      spec->train().global_batch(), spec->train().global_batch() / spec->train().micro_batch(),
      spec->train().micro_batch(), strata::model::MeasuredGemmFlops() / 1e9);

  std::signal(SIGINT, OnSigint);
  auto run = t.Run(&g_stop);
  if (!run.ok()) {
    spdlog::error("training failed: {}", run.status().ToString());
    return 1;
  }
  const strata::worker::TrainSummary& s = *run;
  spdlog::info(
      "{}: {} steps in {:.1f} s | loss {:.4f} -> {:.4f}{} | {:.0f} tok/s{}",
      s.interrupted ? "interrupted" : "done", s.steps, s.seconds, s.first_loss, s.last_loss,
      s.last_val_loss >= 0 ? fmt::format(" | val loss {:.4f}", s.last_val_loss) : "",
      s.tokens_per_second,
      s.skipped_steps ? fmt::format(" | {} steps skipped (fp16 overflow)", s.skipped_steps) : "");
  return s.interrupted ? 130 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return Usage("no command given");
  const std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "train") return Train(args);
  if (cmd == "validate") return Validate(args);
  if (cmd == "ckpt") return strata::launch::CkptCommand(args);
  if (cmd == "export") return strata::launch::ExportCommand(args);
  if (cmd == "plan") return strata::launch::PlanCommand(args);
  if (cmd == "submit") return strata::launch::SubmitCommand(args);
  if (cmd == "jobs") return strata::launch::JobsCommand(args);
  if (cmd == "status") return strata::launch::StatusCommand(args);
  if (cmd == "logs") return strata::launch::LogsCommand(args);
  if (cmd == "cancel") return strata::launch::CancelCommand(args);
  if (cmd == "workers") return strata::launch::WorkersCommand(args);
  if (cmd == "help" || cmd == "--help" || cmd == "-h") {
    std::printf("%s%s", kUsage, strata::launch::kApiUsage);
    return 0;
  }
  return Usage("unknown command '" + cmd + "'");
}
