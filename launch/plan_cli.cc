#include "launch/plan_cli.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "coordinator/planner.h"
#include "model/cpu_info.h"
#include "proto/job.pb.h"
#include "proto/job_spec.h"

namespace strata::launch {
namespace {

constexpr const char* kPlanUsage =
    "usage: strata plan JOB.yaml --workers N --device h100|a100|cpu [--explain] [--json]\n"
    "                   [--devices-per-node N] [--memory-gb G] [--runners-up K]\n"
    "  Picks dp x tp x pp, micro-batch, ZeRO-1 and recompute for the job's model and global\n"
    "  batch on N workers (default: resources.workers); explicit parallel.dp/tp/pp,\n"
    "  train.micro_batch, parallel.zero1: true and model.recompute: true are kept.\n"
    "  --device cpu uses this host's measured GEMM rate. --explain adds the time and memory\n"
    "  breakdowns and the runners-up; --json prints the plan as one JSON object instead of\n"
    "  the summary line (the explanation then goes to stderr).\n";

int BadUsage(const std::string& m) {
  std::fprintf(stderr, "strata plan: %s\n\n%s", m.c_str(), kPlanUsage);
  return 2;
}

int Fail(const std::string& job, const Status& s) {
  std::fprintf(stderr, "strata plan: %s: %s\n", job.c_str(), s.message().c_str());
  return s.code() == StatusCode::kInvalidArgument || s.code() == StatusCode::kNotFound ? 2 : 1;
}

bool ParsePositiveInt(const std::string& s, int* out) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < 1 || v > (1 << 30)) return false;
  *out = static_cast<int>(v);
  return true;
}

bool ParsePositiveDouble(const std::string& s, double* out) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(s.c_str(), &end);
  if (s.empty() || *end != '\0' || errno != 0 || !(v > 0)) return false;
  *out = v;
  return true;
}

}  // namespace

int PlanCommand(const std::vector<std::string>& args) {
  std::string job, device_name;
  int workers = 0, devices_per_node = -1, runners_up = -1;
  double memory_gb = 0;
  bool explain = false, json = false;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--workers" || a == "--devices-per-node" || a == "--runners-up") {
      if (!has_value) return BadUsage(a + " needs a positive integer");
      int v = 0;
      if (!ParsePositiveInt(args[++i], &v)) {
        return BadUsage(a + ": '" + args[i] + "' is not a positive integer");
      }
      (a == "--workers" ? workers : a == "--devices-per-node" ? devices_per_node : runners_up) = v;
    } else if (a == "--device") {
      if (!has_value) return BadUsage("--device needs h100, a100 or cpu");
      device_name = args[++i];
    } else if (a == "--memory-gb") {
      if (!has_value || !ParsePositiveDouble(args[i + 1], &memory_gb)) {
        return BadUsage("--memory-gb needs a positive number of GiB per device");
      }
      ++i;
    } else if (a == "--explain") {
      explain = true;
    } else if (a == "--json") {
      json = true;
    } else if (a == "-h" || a == "--help") {
      std::printf("%s", kPlanUsage);
      return 0;
    } else if (!a.empty() && a[0] == '-') {
      return BadUsage("unknown flag '" + a + "'");
    } else if (job.empty()) {
      job = a;
    } else {
      return BadUsage("plan takes one JOB.yaml, got also '" + a + "'");
    }
  }
  if (job.empty()) return BadUsage("plan needs a JOB.yaml");
  if (device_name.empty()) return BadUsage("--device is required (h100, a100 or cpu)");

  auto device = coordinator::DeviceProfileByName(device_name);
  if (!device.ok()) return BadUsage(device.status().message());
  if (device->kind == "cpu") device->flops = device->fp32_flops = model::MeasuredGemmFlops();
  if (memory_gb > 0) device->memory_bytes = static_cast<int64_t>(memory_gb * (1ll << 30));
  if (devices_per_node > 0) device->devices_per_node = devices_per_node;

  // The spec as parsed, not defaulted (an absent train.micro_batch stays free) and without
  // checking data files: planning needs only the model, the batch and the parallel keys.
  std::ifstream in(job, std::ios::binary);
  if (!in) {
    return Fail(job, NotFound("cannot read the job file: " + std::string(std::strerror(errno))));
  }
  std::stringstream text;
  text << in.rdbuf();
  auto spec = spec::ParseYaml(text.str(), job);
  if (!spec.ok()) return Fail(job, spec.status());
  proto::JobSpec defaulted = *spec;
  spec::ApplyDefaults(&defaulted);
  if (workers == 0) workers = defaulted.resources().workers();

  auto request = coordinator::PlanRequestFromJob(*spec, workers, *device);
  if (!request.ok()) return Fail(job, request.status());
  if (runners_up > 0) request->max_runners_up = runners_up;
  auto plan = coordinator::MakePlan(*request);
  if (!plan.ok()) return Fail(job, plan.status());

  if (json) {
    std::printf("%s\n", plan->ToJson().c_str());
    if (explain) std::fprintf(stderr, "%s", plan->Explain().c_str());
  } else {
    std::printf("%s\n", plan->Summary().c_str());
    if (explain) std::printf("%s", plan->Explain().c_str());
  }
  return 0;
}

}  // namespace strata::launch
