#include "launch/ckpt_cli.h"

#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <map>
#include <set>

#include "checkpoint/hf_gpt2.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/store.h"

namespace strata::launch {
namespace {

int Fail(const Status& s) {
  std::fprintf(stderr, "strata: %s\n", s.ToString().c_str());
  return s.code() == StatusCode::kInvalidArgument ? 2 : 1;
}

int Bad(const std::string& m) {
  std::fprintf(stderr, "strata: %s\n(see `strata help`)\n", m.c_str());
  return 2;
}

bool ParseStep(const std::string& s, int64_t* out) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  if (s.empty() || *end != '\0' || errno != 0 || v < 0) return false;
  *out = v;
  return true;
}

// The latest committed step, or `want` when given (>= 0); NOT_FOUND otherwise.
Result<int64_t> PickStep(const std::string& root, int64_t want) {
  checkpoint::Storage& storage = *checkpoint::DefaultStorage();
  ASSIGN_OR_RETURN(std::vector<int64_t> steps, checkpoint::CommittedSteps(storage, root));
  if (steps.empty()) return NotFound(fmt::format("{}: no committed checkpoint", root));
  if (want < 0) return steps.back();
  for (int64_t s : steps) {
    if (s == want) return s;
  }
  return NotFound(fmt::format("{}: step {} is not committed (committed: {} .. {})", root, want,
                              steps.front(), steps.back()));
}

std::string Layout(const proto::Manifest& m) {
  return fmt::format("dp{}xtp{}xpp{}{}", m.layout().dp(), m.layout().tp(), m.layout().pp(),
                     m.layout().zero1() ? "+zero1" : "");
}

int Ls(const std::vector<std::string>& args) {
  if (args.size() != 1) return Bad("ckpt ls takes one CKPT_ROOT");
  const std::string& root = args[0];
  checkpoint::Storage& storage = *checkpoint::DefaultStorage();
  auto steps = checkpoint::CommittedSteps(storage, root);
  if (!steps.ok()) return Fail(steps.status());
  std::printf("%-10s %-20s %6s %12s %8s  %-20s %s\n", "STEP", "LAYOUT", "RANKS", "SIZE", "SHARDS",
              "WRITTEN", "STATUS");
  for (int64_t step : *steps) {
    auto m = checkpoint::ReadManifest(storage, root, step);
    if (!m.ok()) {
      std::printf("%-10lld %s\n", static_cast<long long>(step), m.status().ToString().c_str());
      continue;
    }
    const std::time_t t = static_cast<std::time_t>(m->created_unix_ms() / 1000);
    char when[32];
    std::strftime(when, sizeof(when), "%Y-%m-%d %H:%M:%S", std::localtime(&t));
    std::printf("%-10lld %-20s %6d %10.1fMB %8d  %-20s %s\n", static_cast<long long>(step),
                Layout(*m).c_str(), m->world(), m->total_bytes() / 1e6, m->shards_size(), when,
                step == steps->back() ? "committed (latest)" : "committed");
  }
  if (steps->empty()) std::printf("(no committed checkpoint under %s)\n", root.c_str());
  return 0;
}

int Verify(const std::vector<std::string>& args) {
  std::string root;
  int64_t want = -1;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--step") {
      if (i + 1 >= args.size() || !ParseStep(args[i + 1], &want)) {
        return Bad("--step needs a non-negative step number");
      }
      ++i;
    } else if (!args[i].empty() && args[i][0] == '-') {
      return Bad("unknown flag '" + args[i] + "' for ckpt verify");
    } else if (root.empty()) {
      root = args[i];
    } else {
      return Bad("ckpt verify takes one CKPT_ROOT");
    }
  }
  if (root.empty()) return Bad("ckpt verify needs a CKPT_ROOT");
  auto step = PickStep(root, want);
  if (!step.ok()) return Fail(step.status());
  auto storage = checkpoint::DefaultStorage();
  auto m = checkpoint::ReadManifest(*storage, root, *step);
  if (!m.ok()) return Fail(m.status());
  const int shards = m->shards_size();
  const double mb = m->total_bytes() / 1e6;
  auto reader = checkpoint::CheckpointReader::Open(storage, root, *std::move(m));
  if (!reader.ok()) return Fail(reader.status());
  const auto t0 = std::chrono::steady_clock::now();
  Status s = (*reader)->VerifyAll();
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!s.ok()) {
    std::fprintf(stderr, "checkpoint step %lld under %s is NOT usable:\n%s\n",
                 static_cast<long long>(*step), root.c_str(), s.message().c_str());
    return 1;
  }
  std::printf(
      "checkpoint step %lld under %s: %d shards, %.1f MB, every checksum matches (%.2f s)\n",
      static_cast<long long>(*step), root.c_str(), shards, mb, secs);
  return 0;
}

}  // namespace

int CkptCommand(const std::vector<std::string>& args) {
  if (args.empty()) return Bad("ckpt needs a subcommand: ls | verify");
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (args[0] == "ls") return Ls(rest);
  if (args[0] == "verify") return Verify(rest);
  return Bad("unknown ckpt subcommand '" + args[0] + "' (ls | verify)");
}

int ExportCommand(const std::vector<std::string>& args) {
  std::string root, out, format, dtype = "f32";
  int64_t want = -1;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& a = args[i];
    const bool has_value = i + 1 < args.size();
    if (a == "--step") {
      if (!has_value || !ParseStep(args[i + 1], &want)) {
        return Bad("--step needs a non-negative step number");
      }
      ++i;
    } else if (a == "--format") {
      if (!has_value) return Bad("--format needs a value (safetensors)");
      format = args[++i];
    } else if (a == "-o" || a == "--output") {
      if (!has_value) return Bad("-o needs an output file");
      out = args[++i];
    } else if (a == "--dtype") {
      if (!has_value) return Bad("--dtype needs a value (f32 | bf16 | f16)");
      dtype = args[++i];
    } else if (!a.empty() && a[0] == '-') {
      return Bad("unknown flag '" + a + "' for export");
    } else if (root.empty()) {
      root = a;
    } else {
      return Bad("export takes one CKPT_ROOT");
    }
  }
  if (root.empty()) return Bad("export needs a CKPT_ROOT");
  if (format != "safetensors") {
    return Bad(format.empty() ? "export needs --format safetensors"
                              : "--format: '" + format + "' is not supported; use safetensors");
  }
  if (out.empty()) return Bad("export needs -o FILE");
  checkpoint::TensorDType type;
  if (dtype == "f32") {
    type = checkpoint::TensorDType::kF32;
  } else if (dtype == "bf16") {
    type = checkpoint::TensorDType::kBF16;
  } else if (dtype == "f16") {
    type = checkpoint::TensorDType::kF16;
  } else {
    return Bad("--dtype: '" + dtype + "' is not one of f32, bf16, f16");
  }
  auto step = PickStep(root, want);
  if (!step.ok()) return Fail(step.status());
  auto storage = checkpoint::DefaultStorage();
  auto m = checkpoint::ReadManifest(*storage, root, *step);
  if (!m.ok()) return Fail(m.status());
  checkpoint::Gpt2Config config;
  config.layers = m->job().model().layers();
  config.heads = m->job().model().heads();
  config.channels = m->job().model().d_model();
  config.vocab_size = m->job().model().vocab_size();
  config.max_seq_len = m->job().model().max_seq_len();
  auto reader = checkpoint::CheckpointReader::Open(storage, root, *std::move(m));
  if (!reader.ok()) return Fail(reader.status());
  checkpoint::TensorMap tensors;
  for (const auto& [name, shape] : checkpoint::Gpt2TensorShapes(config)) {
    auto t = (*reader)->ReadGlobal("param/" + name, nullptr);
    if (!t.ok()) return Fail(t.status());
    tensors[name] = *std::move(t);
  }
  Status s = checkpoint::WriteHfGpt2(out, config, tensors, type);
  if (!s.ok()) return Fail(s);
  std::printf("exported checkpoint step %lld under %s to %s (%zu tensors, %s)\n",
              static_cast<long long>(*step), root.c_str(), out.c_str(), tensors.size(),
              dtype.c_str());
  return 0;
}

}  // namespace strata::launch
