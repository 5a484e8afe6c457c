// Planner speed: how long MakePlan takes for the two reference cases, best of a few runs.
//
//   build/bin/planner_bench [--repeats N] [--explain]
//
//   1T    the Megatron-LM 1T GPT (128 layers, d_model 25600, 160 heads, vocab 51200, seq 2048),
//         global batch 3072, bf16, on 3,072 H100s (the bar: <= 1 s).
//   124M  GPT-2 small (12 x 768, 12 heads, vocab 50257, seq 1024), global batch 512, bf16, on
//         64 H100s.
// Prints per case the candidates costed, the time and the chosen plan.
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "coordinator/planner.h"

namespace {

namespace co = strata::coordinator;

int Run(const char* name, const co::PlanRequest& req, int repeats, bool explain) {
  double best = 1e30;
  strata::Result<co::PlanResult> res = strata::Internal("not run");
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    res = co::MakePlan(req);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!res.ok()) {
      std::fprintf(stderr, "%s: %s\n", name, res.status().ToString().c_str());
      return 1;
    }
    best = std::min(best, s);
  }
  std::printf("%-5s %5d x %-5s %9lld candidates  %8.2f ms   %s\n", name, req.workers,
              req.device.kind.c_str(), static_cast<long long>(res->considered), best * 1e3,
              res->Summary().c_str());
  if (explain) std::printf("%s\n", res->Explain().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int repeats = 5;
  bool explain = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--repeats") == 0 && i + 1 < argc) {
      repeats = std::max(1, std::atoi(argv[++i]));
    } else if (std::strcmp(argv[i], "--explain") == 0) {
      explain = true;
    } else {
      std::fprintf(stderr, "usage: planner_bench [--repeats N] [--explain]\n");
      return 2;
    }
  }
  auto h100 = co::DeviceProfileByName("h100");
  if (!h100.ok()) return 1;

  co::PlanRequest big;
  big.model = {128, 160, 25600, 51200, 2048, 2048};
  big.global_batch = 3072;
  big.precision = "bf16";
  big.workers = 3072;
  big.device = *h100;

  co::PlanRequest small;
  small.model = {12, 12, 768, 50257, 1024, 1024};
  small.global_batch = 512;
  small.precision = "bf16";
  small.workers = 64;
  small.device = *h100;

  std::printf("MakePlan, best of %d runs\n", repeats);
  int rc = Run("1T", big, repeats, explain);
  rc |= Run("124M", small, repeats, explain);
  return rc;
}
