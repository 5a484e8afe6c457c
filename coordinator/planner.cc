#include "coordinator/planner.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <limits>

#include "proto/job.pb.h"
#include "proto/job_spec.h"

namespace strata::coordinator {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// Kernels one transformer block launches per forward pass (LayerNorms, GEMMs, attention,
// GELU, residual adds, casts); backward launches about twice as many.
constexpr int kKernelsPerBlockPass = 16;
// A GEMM dimension of this size runs at half the device's large-GEMM efficiency: the shape
// factor is x / (x + kGemmHalfSize) for the row count and for the (local) width.
constexpr double kGemmHalfSize = 64;
// AdamW traffic per updated parameter: read master weight, gradient, two moments (16 bytes),
// write weight and moments (12), write the bf16/fp16 compute copy (2), plus the clipping
// norm's read of the gradient; rounded to 32.
constexpr double kAdamBytesPerParam = 32;
// worker::TrainOptions::bucket_bytes' default: the last bucket's all-reduce cannot hide.
constexpr double kBucketBytes = 4 << 20;

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<int> DivisorsOf(int n) {
  std::vector<int> small, large;
  for (int d = 1; static_cast<int64_t>(d) * d <= n; ++d) {
    if (n % d != 0) continue;
    small.push_back(d);
    if (d != n / d) large.push_back(n / d);
  }
  small.insert(small.end(), large.rbegin(), large.rend());
  return small;
}

std::string DivisorList(int n) {
  std::string s = "{";
  for (int d : DivisorsOf(n)) {
    if (s.size() > 1) s += ", ";
    s += std::to_string(d);
  }
  return s + "}";
}

// Ring all-reduce of `bytes` over n devices (a reduce-scatter plus an all-gather move the same
// bytes): busbw convention of nccl-tests, 2(n-1)/n of the buffer per device.
double AllReduceSeconds(double bytes, int n, double bw, double latency) {
  if (n <= 1) return 0;
  return 2.0 * (n - 1) / n * bytes / bw + 2.0 * (n - 1) * latency;
}

double ShapeFactor(double x) { return x / (x + kGemmHalfSize); }

std::string Seconds(double s) {
  if (s == 0) return "0";
  if (s >= 1) return fmt::format("{:.3f} s", s);
  if (s >= 1e-3) return fmt::format("{:.2f} ms", s * 1e3);
  return fmt::format("{:.1f} us", s * 1e6);
}

std::string GiB(int64_t bytes) { return fmt::format("{:.2f} GiB", bytes / kGiB); }

// GiB from 1 GiB up, MiB below (the parts of small models).
std::string Bytes(int64_t bytes) {
  if (bytes >= int64_t{1} << 30 || bytes == 0) return GiB(bytes);
  return fmt::format("{:.2f} MiB", bytes / (1024.0 * 1024.0));
}

std::string FlopRate(double f) {
  return f >= 1e12 ? fmt::format("{:.0f} TFLOP/s", f / 1e12)
                   : fmt::format("{:.1f} GFLOP/s", f / 1e9);
}

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Everything per request that the per-candidate arithmetic needs.
struct Consts {
  int64_t L, H, C, V, S, max_t, B;
  int W;
  int64_t lowp;  // bytes of the compute copy per parameter: 0 (fp32) or 2
  int64_t act;   // bytes of a compute-precision activation element
  bool gpipe;
  double peak;  // FLOP/s of the precision
  double rate;  // large-GEMM FLOP/s
  double usable;
  const DeviceProfile* dev;
};

Consts MakeConsts(const PlanRequest& r) {
  Consts k;
  k.L = r.model.layers;
  k.H = r.model.heads;
  k.C = r.model.d_model;
  k.V = r.model.vocab;
  k.S = r.model.seq_len;
  k.max_t = r.model.max_seq_len > 0 ? r.model.max_seq_len : r.model.seq_len;
  k.B = r.global_batch;
  k.W = r.workers;
  k.lowp = r.precision == "fp32" ? 0 : 2;
  k.act = k.lowp ? k.lowp : 4;
  k.gpipe = r.schedule == "gpipe";
  k.peak = r.precision == "fp32" && r.device.fp32_flops > 0 ? r.device.fp32_flops : r.device.flops;
  k.rate = k.peak * r.device.efficiency;
  k.usable = static_cast<double>(r.device.memory_bytes) * (1.0 - r.memory_reserve);
  k.dev = &r.device;
  return k;
}

int64_t StageBlocks(const Consts& k, int pp, int stage) {
  return k.L / pp + (stage < k.L % pp ? 1 : 0);
}

// Parameters held by a stage: replicates worker::Trainer::Memory's analytic count (per block
// 12C^2 + 7C split over tp and 6C replicated; wte (vocabulary padded to a multiple of tp) and
// wpe on the first stage, ln_f and wte on the last).
int64_t StageParams(const Consts& k, int tp, int pp, int stage) {
  const int64_t C = k.C, vl = CeilDiv(k.V, tp);
  int64_t n = StageBlocks(k, pp, stage) * ((12 * C * C + 7 * C) / tp + 6 * C);
  const bool first = stage == 0, last = stage == pp - 1;
  if (first) n += vl * C + k.max_t * C;
  if (last) n += 2 * C + (first ? 0 : vl * C);
  return n;
}

// Memory of data-parallel rank 0 of stage `stage`; params .. activations replicate
// worker::Trainer::Memory's est_* formulas exactly (tests/planner_test.cc checks them against
// real trainers); workspace is the scratch model::Gpt allocates besides (AllocateActivations)
// plus the pipeline's message buffers.
MemoryBreakdown StageMemoryOf(const Consts& k, const Layout& l, int accum, int stage) {
  MemoryBreakdown m;
  const int64_t C = k.C, tp = l.tp, s = k.act;
  const bool last = stage == l.pp - 1;
  const int64_t blocks = StageBlocks(k, l.pp, stage);
  const int64_t vl = CeilDiv(k.V, tp);
  const int64_t est = StageParams(k, l.tp, l.pp, stage);
  m.params = 4 * est;
  m.compute_copy = k.lowp * est;
  m.grads = 4 * est;
  if (l.zero1 && l.dp > 1) {
    // Moments of the owned shard, the reduced-gradient shard, and a padded staging copy of
    // the flat buffer only when it does not split evenly.
    const int64_t shard = CeilDiv(est, l.dp);
    const int64_t owned = std::min(est, shard);
    m.optimizer = 8 * owned + 4 * shard + (est % l.dp ? 4 * shard * l.dp : 0);
  } else {
    m.optimizer = 8 * est;
  }
  const int64_t bt = static_cast<int64_t>(l.micro_batch) * k.S;
  const int64_t per_block = s * (2 * C + 12 * C / tp) + 4 * (2 * C + 4 + k.H / tp);
  int64_t per_slot =
      bt * ((l.recompute ? 0 : blocks) * per_block + (l.recompute ? blocks * 4 * C : 0));
  if (last) per_slot += bt * (s * (C + vl) + 4 * 3);
  int64_t slots = 1;
  if (l.pp > 1) {
    slots = k.gpipe ? accum : std::max<int64_t>(1, std::min<int64_t>(l.pp - stage, accum));
  }
  m.activations = per_slot * slots;
  // Scratch: the shared recompute set (one block's activations), a non-last stage's output
  // buffer (the last stage's per-token losses), gradient scratch of one layer (dres fp32;
  // branch_out, dbranch, dln in compute precision; dqkv, datty, dfch of the local heads/units),
  // and the vocabulary-parallel cross-entropy's row statistics.
  int64_t ws = (l.recompute ? s * (2 * C + 12 * C / tp) + 4 * (C + 4 + k.H / tp) : 0) +
               (last ? 4 : 4 * C) + 4 * C + 3 * s * C + s * 8 * C / tp + (tp > 1 && last ? 12 : 0);
  m.workspace = bt * ws;
  if (l.pp > 1) {
    // worker/pipeline.cc: a receive buffer per direction and a send buffer per slot and
    // direction ([b, T, C] fp32 each), and the copy of wte that the tied-gradient sum receives.
    const bool first = stage == 0;
    const int64_t buffers =
        (first ? 0 : 1) + (last ? 0 : 1) + slots * ((first ? 0 : 1) + (last ? 0 : 1));
    m.workspace += buffers * bt * C * 4 + (first || last ? 4 * vl * C : 0);
  }
  return m;
}

// One costed candidate.
struct Eval {
  Layout l;
  int accum = 1;
  double step = 0;
  int64_t step_key = 0;  // step quantised to a relative 1e-6, so that float noise does not rank
  StepBreakdown b;
  MemoryBreakdown mem;
  int worst_stage = 0;
  bool fits = false;
};

// Total order: faster first. Near-ties (within 1e-6, e.g. recompute lengthening backward by
// exactly what it then hides of the gradient all-reduce) go to the simpler plan (no recompute,
// no ZeRO-1), then to less memory, smaller tp, pp, dp and larger micro-batches, so that the
// result is deterministic.
bool Better(const Eval& a, const Eval& b) {
  if (a.step_key != b.step_key) return a.step_key < b.step_key;
  if (a.l.recompute != b.l.recompute) return !a.l.recompute;
  if (a.l.zero1 != b.l.zero1) return !a.l.zero1;
  const int64_t ma = a.mem.total(), mb = b.mem.total();
  if (ma != mb) return ma < mb;
  if (a.l.tp != b.l.tp) return a.l.tp < b.l.tp;
  if (a.l.pp != b.l.pp) return a.l.pp < b.l.pp;
  if (a.l.dp != b.l.dp) return a.l.dp < b.l.dp;
  return a.l.micro_batch > b.l.micro_batch;
}

// Link bandwidths of a layout: a group stays inside a node when its rank span divides the node
// size (ranks are placed tp innermost, then pp, then dp: comm/grid.h), so that no group
// straddles two nodes.
struct Links {
  double tp, pp, dp;
};
Links LinksOf(const DeviceProfile& d, int dp, int tp, int pp) {
  const int n = d.devices_per_node;
  auto inside = [&](int64_t span) { return n <= 0 || (span <= n && n % span == 0); };
  return Links{inside(tp) ? d.intra_node_bw : d.inter_node_bw,
               inside(static_cast<int64_t>(tp) * pp) ? d.intra_node_bw : d.inter_node_bw,
               inside(static_cast<int64_t>(tp) * pp * dp) ? d.intra_node_bw : d.inter_node_bw};
}

struct StageTime {
  double compute = 0, tp = 0, pp = 0;    // per micro-batch
  double backward = 0;                   // per micro-batch: the dp overlap window
  double dp_exposed = 0, optimizer = 0;  // per step
  double micro() const { return compute + tp + pp; }
};

StageTime StageTimeOf(const Consts& k, const Layout& l, const Links& links, int stage) {
  const DeviceProfile& d = *k.dev;
  StageTime t;
  const bool first = stage == 0, last = stage == l.pp - 1;
  const double C = static_cast<double>(k.C), tp = l.tp;
  const double blocks = static_cast<double>(StageBlocks(k, l.pp, stage));
  const double bt = static_cast<double>(l.micro_batch) * k.S;
  const double vl = static_cast<double>(CeilDiv(k.V, l.tp));
  const double rate = k.rate * ShapeFactor(bt) * ShapeFactor(C / tp);
  // Forward GEMM FLOPs per block: qkv 6C^2, attention projection 2C^2, MLP 16C^2 per token, and
  // the attention scores and weighted sum 4TC (the PaLM count the trainer's MFU uses).
  const double block_fwd = blocks * bt * (24.0 * C * C + 4.0 * k.S * C) / tp / rate;
  const double head_fwd = last ? 2.0 * bt * C * vl / rate : 0.0;
  const double launch = blocks * kKernelsPerBlockPass * d.launch_overhead_s;
  const double fwd = block_fwd + head_fwd + launch;
  const double recompute = l.recompute ? block_fwd + launch : 0.0;
  t.backward = 2 * fwd + recompute;
  t.compute = fwd + t.backward;
  if (l.tp > 1) {
    // Row-parallel outputs (2 per block forward) and column-parallel input gradients (2 per
    // block backward) in compute precision; a recomputed forward repeats its 2.
    const double act_ar = AllReduceSeconds(bt * C * k.act, l.tp, links.tp, d.latency_s);
    double n = blocks * (4 + (l.recompute ? 2 : 0));
    t.tp = n * act_ar;
    if (first) t.tp += AllReduceSeconds(bt * C * 4, l.tp, links.tp, d.latency_s);  // embedding
    if (last) {  // LM-head input gradient; cross-entropy row max and sums
      t.tp += act_ar + AllReduceSeconds(bt * 4, l.tp, links.tp, d.latency_s) +
              AllReduceSeconds(bt * 8, l.tp, links.tp, d.latency_s);
    }
  }
  if (l.pp > 1) {
    // The fp32 residual stream forward and its gradient backward, one transfer each.
    t.pp = 2 * (bt * C * 4 / links.pp + d.latency_s);
  }
  const double params = static_cast<double>(StageParams(k, l.tp, l.pp, stage));
  const bool zero1 = l.zero1 && l.dp > 1;
  const double dp_time = AllReduceSeconds(params * 4, l.dp, links.dp, d.latency_s);
  if (zero1) {
    t.dp_exposed = dp_time;  // reduce-scatter after backward, all-gather after the update
  } else if (l.dp > 1) {
    const double last_bucket =
        AllReduceSeconds(std::min(params * 4, kBucketBytes), l.dp, links.dp, d.latency_s);
    t.dp_exposed = std::max(dp_time - t.backward, last_bucket);
  }
  const double updated = zero1 ? std::ceil(params / l.dp) : params;
  t.optimizer = updated * kAdamBytesPerParam / d.memory_bw;
  return t;
}

// Costs one layout: memory of the fullest device (stage 0 or the last; middle stages hold
// fewer blocks and slots than stage 0 and no head) and the step time of the slowest stage.
Eval Evaluate(const Consts& k, const Layout& l, const Links& links) {
  Eval e;
  e.l = l;
  e.accum = static_cast<int>(k.B / (static_cast<int64_t>(l.dp) * l.micro_batch));
  const int last = l.pp - 1;
  e.mem = StageMemoryOf(k, l, e.accum, 0);
  if (last != 0) {
    MemoryBreakdown ml = StageMemoryOf(k, l, e.accum, last);
    if (ml.total() > e.mem.total()) {
      e.mem = ml;
      e.worst_stage = last;
    }
  }
  e.fits = static_cast<double>(e.mem.total()) <= k.usable;
  const StageTime t0 = StageTimeOf(k, l, links, 0);
  const StageTime tl = last != 0 ? StageTimeOf(k, l, links, last) : t0;
  const StageTime& slow = tl.micro() > t0.micro() ? tl : t0;
  const double micro = slow.micro();
  e.b.compute = e.accum * slow.compute;
  e.b.tp_comm = e.accum * slow.tp;
  e.b.pp_comm = e.accum * slow.pp;
  if (l.pp > 1) {
    // The tied-embedding gradient sum between the first and the last stage.
    const double wte = static_cast<double>(CeilDiv(k.V, l.tp)) * k.C * 4;
    e.b.pp_comm += AllReduceSeconds(wte, 2, links.pp, k.dev->latency_s);
  }
  e.b.bubble = (l.pp - 1) * micro;
  // Every stage reduces and updates its own parameters after its last backward.
  const StageTime& dps = t0.dp_exposed + t0.optimizer >= tl.dp_exposed + tl.optimizer ? t0 : tl;
  e.b.dp_comm_exposed = dps.dp_exposed;
  e.b.optimizer = dps.optimizer;
  e.step =
      e.b.compute + e.b.tp_comm + e.b.pp_comm + e.b.bubble + e.b.dp_comm_exposed + e.b.optimizer;
  e.step_key = std::llround(std::log(std::max(e.step, 1e-30)) * 1e6);
  return e;
}

Status Bad(const std::string& m) { return InvalidArgument(m); }

Status ValidateShape(const PlanRequest& r) {
  const ModelShape& m = r.model;
  const struct {
    const char* name;
    int value;
  } positive[] = {{"model.layers", m.layers},   {"model.heads", m.heads},
                  {"model.d_model", m.d_model}, {"model.vocab_size", m.vocab},
                  {"model.seq_len", m.seq_len}, {"train.global_batch", r.global_batch}};
  for (const auto& [name, value] : positive) {
    if (value <= 0) return Bad(fmt::format("{}: must be positive, got {}", name, value));
  }
  if (m.d_model % m.heads != 0) {
    return Bad(fmt::format("model.heads: {} does not divide model.d_model={}; choose heads in {}",
                           m.heads, m.d_model, DivisorList(m.d_model)));
  }
  if (m.max_seq_len < 0 || (m.max_seq_len > 0 && m.max_seq_len < m.seq_len)) {
    return Bad(
        fmt::format("model.max_seq_len: {} is below model.seq_len={}", m.max_seq_len, m.seq_len));
  }
  if (r.workers < 1) {
    return Bad(fmt::format("resources.workers: must be at least 1, got {}", r.workers));
  }
  if (r.precision != "fp32" && r.precision != "bf16" && r.precision != "fp16") {
    return Bad(fmt::format("train.precision: unknown precision '{}'; use fp32, bf16 or fp16",
                           r.precision));
  }
  if (r.schedule != "1f1b" && r.schedule != "gpipe") {
    return Bad(
        fmt::format("parallel.schedule: unknown schedule '{}'; use 1f1b or gpipe", r.schedule));
  }
  const DeviceProfile& d = r.device;
  const struct {
    const char* name;
    double value;
  } device[] = {{"flops", d.flops},
                {"efficiency", d.efficiency},
                {"memory_bytes", static_cast<double>(d.memory_bytes)},
                {"intra_node_bw", d.intra_node_bw},
                {"inter_node_bw", d.inter_node_bw},
                {"memory_bw", d.memory_bw}};
  for (const auto& [name, value] : device) {
    if (!(value > 0)) {
      return Bad(
          fmt::format("device.{}: must be positive, got {} (device '{}')", name, value, d.kind));
    }
  }
  if (!(d.latency_s >= 0) || !(d.launch_overhead_s >= 0) || !(d.fp32_flops >= 0) ||
      d.devices_per_node < 0) {
    return Bad(
        fmt::format("device '{}': latency_s, launch_overhead_s, fp32_flops and "
                    "devices_per_node must be >= 0",
                    d.kind));
  }
  if (!(r.memory_reserve >= 0 && r.memory_reserve < 1)) {
    return Bad(fmt::format("memory_reserve: {} is outside [0, 1)", r.memory_reserve));
  }
  return Status::Ok();
}

// Rules on the sizes that are given (> 0); a zero size is free. `workers` < 0: not checked.
Status CheckSizes(const PlanRequest& r, int dp, int tp, int pp, int micro, int workers) {
  const struct {
    const char* name;
    int value;
  } sizes[] = {
      {"parallel.dp", dp}, {"parallel.tp", tp}, {"parallel.pp", pp}, {"train.micro_batch", micro}};
  for (const auto& [name, value] : sizes) {
    if (value < 0) {
      return Bad(fmt::format("{}: must be >= 0 (0 lets the planner choose), got {}", name, value));
    }
  }
  const int heads = r.model.heads, n = r.device.devices_per_node, B = r.global_batch;
  if (tp > 0 && heads % tp != 0) {
    return Bad(fmt::format("parallel.tp: {} does not divide model.heads={}; choose tp in {}", tp,
                           heads, DivisorList(heads)));
  }
  if (tp > 0 && n > 0 && tp > n) {
    return Bad(fmt::format(
        "parallel.tp: {} exceeds the {} devices per node of '{}' (tensor parallelism stays "
        "inside a node); choose tp <= {}",
        tp, n, r.device.kind, n));
  }
  if (pp > r.model.layers) {
    return Bad(fmt::format(
        "parallel.pp: {} exceeds model.layers={} (every stage needs a layer); choose pp <= {}", pp,
        r.model.layers, r.model.layers));
  }
  if (dp > 0 && B % dp != 0) {
    return Bad(fmt::format(
        "parallel.dp: {} does not divide train.global_batch={}; choose dp in {} or change the "
        "batch",
        dp, B, DivisorList(B)));
  }
  if (micro > 0 && B % micro != 0) {
    return Bad(fmt::format(
        "train.micro_batch: {} does not divide train.global_batch={}; choose micro_batch in {}",
        micro, B, DivisorList(B)));
  }
  if (dp > 0 && micro > 0 && B % (static_cast<int64_t>(dp) * micro) != 0) {
    return Bad(
        fmt::format("train.micro_batch: train.global_batch={} is not divisible by parallel.dp * "
                    "train.micro_batch = {} * {}; choose micro_batch in {}",
                    B, dp, micro, DivisorList(B / dp)));
  }
  const int64_t fixed = static_cast<int64_t>(std::max(dp, 1)) * std::max(tp, 1) * std::max(pp, 1);
  if (workers >= 0 && fixed > workers) {
    return Bad(fmt::format(
        "resources.workers: {} workers cannot hold parallel.dp * parallel.tp * parallel.pp = "
        "{} * {} * {} = {}; add workers or lower the fixed sizes",
        workers, std::max(dp, 1), std::max(tp, 1), std::max(pp, 1), fixed));
  }
  return Status::Ok();
}

Plan ToPlan(const Consts& k, const Eval& e) {
  Plan p;
  static_cast<Layout&>(p) = e.l;
  p.zero1 = e.l.zero1 && e.l.dp > 1;
  p.workers_used = e.l.workers();
  p.accumulation = e.accum;
  p.step_seconds = e.step;
  const double tokens = static_cast<double>(k.B) * k.S;
  p.tokens_per_second = e.step > 0 ? tokens / e.step : 0;
  // Model FLOPs per token as the trainer's MFU: 6 per parameter plus attention 12 L C T.
  ModelShape shape{static_cast<int>(k.L), static_cast<int>(k.H), static_cast<int>(k.C),
                   static_cast<int>(k.V), static_cast<int>(k.S), static_cast<int>(k.max_t)};
  const double flops_per_token =
      6.0 * static_cast<double>(shape.NumParameters()) + 12.0 * k.L * k.C * k.S;
  p.mfu = e.step > 0 ? flops_per_token * tokens / (e.step * p.workers_used * k.peak) : 0;
  p.breakdown = e.b;
  p.memory = e.mem;
  p.memory_per_device = e.mem.total();
  p.worst_stage = e.worst_stage;
  return p;
}

// Why `r` lost to `best`: its slowdown and the components that grew most.
std::string WhyLost(const Plan& best, const Plan& r) {
  const StepBreakdown& a = best.breakdown;
  const StepBreakdown& b = r.breakdown;
  std::vector<std::pair<double, std::string>> grew = {
      {b.compute - a.compute, "compute"},
      {b.tp_comm - a.tp_comm, "tp comm"},
      {b.pp_comm - a.pp_comm, "pp comm"},
      {b.bubble - a.bubble, "bubble"},
      {b.dp_comm_exposed - a.dp_comm_exposed, "dp comm"},
      {b.optimizer - a.optimizer, "optimizer"}};
  std::sort(grew.begin(), grew.end(),
            [](const auto& x, const auto& y) { return x.first > y.first; });
  std::string why;
  for (size_t i = 0; i < grew.size() && i < 2; ++i) {
    if (grew[i].first <= 0.005 * best.step_seconds) break;
    if (!why.empty()) why += ", ";
    why += grew[i].second + " +" + Seconds(grew[i].first);
  }
  if (r.workers_used < best.workers_used) {
    why = fmt::format("{} workers{}{}", r.workers_used, why.empty() ? "" : ": ", why);
  }
  if (why.empty()) why = "slower by a hair (ties broken towards less memory)";
  return why;
}

std::string Describe(const PlanRequest& r) {
  const ModelShape& m = r.model;
  return fmt::format(
      "GPT {} layers x d_model {}, {} heads, vocab {}, seq {} ({:.1f}M parameters), {}; global "
      "batch {} ({} tokens/step) on {} x {}",
      m.layers, m.d_model, m.heads, m.vocab, m.seq_len, m.NumParameters() / 1e6, r.precision,
      r.global_batch, static_cast<int64_t>(r.global_batch) * m.seq_len, r.workers,
      r.device.ToString());
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      out += fmt::format("\\u{:04x}", static_cast<int>(c));
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string PlanJson(const Plan& p) {
  const StepBreakdown& b = p.breakdown;
  const MemoryBreakdown& m = p.memory;
  return fmt::format(
      "{{\"dp\":{},\"tp\":{},\"pp\":{},\"micro_batch\":{},\"zero1\":{},\"recompute\":{},"
      "\"workers_used\":{},\"accumulation\":{},\"step_seconds\":{},\"tokens_per_second\":{},"
      "\"mfu\":{},\"breakdown\":{{\"compute\":{},\"tp_comm\":{},\"pp_comm\":{},\"bubble\":{},"
      "\"dp_comm_exposed\":{},\"optimizer\":{}}},\"memory_per_device\":{},\"memory\":{{"
      "\"params\":{},\"compute_copy\":{},\"grads\":{},\"optimizer\":{},\"activations\":{},"
      "\"workspace\":{}}},\"worst_stage\":{},\"why\":{}}}",
      p.dp, p.tp, p.pp, p.micro_batch, p.zero1, p.recompute, p.workers_used, p.accumulation,
      p.step_seconds, p.tokens_per_second, p.mfu, b.compute, b.tp_comm, b.pp_comm, b.bubble,
      b.dp_comm_exposed, b.optimizer, p.memory_per_device, m.params, m.compute_copy, m.grads,
      m.optimizer, m.activations, m.workspace, p.worst_stage, JsonString(p.why));
}

}  // namespace

int64_t ModelShape::NumParameters() const {
  // Replicates model::GptConfig::NumParameters (this library may not link strata_model):
  // wte, wpe, per block 2 LayerNorms (4C), qkv (3C^2 + 3C), attention projection (C^2 + C),
  // MLP (4C^2 + 4C and 4C^2 + C), and ln_f (2C).
  const int64_t c = d_model;
  const int64_t per_layer = 12 * c * c + 13 * c;
  const int64_t t = max_seq_len > 0 ? max_seq_len : seq_len;
  return static_cast<int64_t>(vocab) * c + t * c + layers * per_layer + 2 * c;
}

std::string Layout::ToString() const {
  return fmt::format("dp={} tp={} pp={} micro={} zero1={} recompute={}", dp, tp, pp, micro_batch,
                     zero1 ? "on" : "off", recompute ? "on" : "off");
}

std::string DeviceProfile::ToString() const {
  return fmt::format(
      "{} ({}{}, {:.1f} GiB, {} per node, {:.1f}/{:.1f} GB/s intra/inter)", kind, FlopRate(flops),
      fp32_flops > 0 && fp32_flops != flops ? " (" + FlopRate(fp32_flops) + " fp32)"
                                            : std::string(),
      memory_bytes / kGiB, devices_per_node > 0 ? std::to_string(devices_per_node) : "?",
      intra_node_bw / 1e9, inter_node_bw / 1e9);
}

Result<DeviceProfile> DeviceProfileByName(const std::string& name) {
  const std::string n = Lower(name);
  DeviceProfile d;
  d.kind = n;
  if (n == "h100") {
    // H100 SXM5: 989 TFLOP/s dense bf16, 67 TFLOP/s fp32 (no TF32 in our kernels), 80 GB
    // HBM3 at 3.35 TB/s; NVLink 4 ~450 GB/s per direction effective; one 400 Gb/s NDR
    // InfiniBand port per GPU (~50 GB/s).
    d.flops = 989e12;
    d.fp32_flops = 67e12;
    d.efficiency = 0.6;
    d.memory_bytes = int64_t{80} << 30;
    d.intra_node_bw = 450e9;
    d.inter_node_bw = 50e9;
    d.memory_bw = 3.35e12;
    d.latency_s = 8e-6;
    d.launch_overhead_s = 4e-6;
    d.devices_per_node = 8;
  } else if (n == "a100") {
    // A100 SXM4 80 GB: 312 TFLOP/s bf16, 19.5 fp32, HBM2e 2.0 TB/s; NVLink 3 ~240 GB/s per
    // direction effective; 200 Gb/s HDR InfiniBand per GPU (~25 GB/s).
    d.flops = 312e12;
    d.fp32_flops = 19.5e12;
    d.efficiency = 0.6;
    d.memory_bytes = int64_t{80} << 30;
    d.intra_node_bw = 240e9;
    d.inter_node_bw = 25e9;
    d.memory_bw = 2.0e12;
    d.latency_s = 10e-6;
    d.launch_overhead_s = 5e-6;
    d.devices_per_node = 8;
  } else if (n == "cpu") {
    // One worker process on a small host. `flops` is meant to be the worker's measured fp32
    // GEMM rate (already an achieved rate, so efficiency 1); these defaults are a floor.
    // Shared memory between processes of one host, 10 GbE between hosts.
    d.flops = 50e9;
    d.fp32_flops = 50e9;
    d.efficiency = 1.0;
    d.memory_bytes = int64_t{16} << 30;
    d.intra_node_bw = 5e9;
    d.inter_node_bw = 1.25e9;
    d.memory_bw = 10e9;
    d.latency_s = 30e-6;
    d.launch_overhead_s = 5e-6;
    d.devices_per_node = 0;
  } else {
    return InvalidArgument(fmt::format("device: unknown device '{}'; use h100, a100 or cpu", name));
  }
  return d;
}

Result<MemoryBreakdown> StageMemory(const PlanRequest& request, const Layout& layout, int stage) {
  RETURN_IF_ERROR(ValidateShape(request));
  if (layout.dp < 1 || layout.tp < 1 || layout.pp < 1 || layout.micro_batch < 1) {
    return InvalidArgument("layout: dp, tp, pp and micro_batch must be >= 1, got " +
                           layout.ToString());
  }
  RETURN_IF_ERROR(CheckSizes(request, layout.dp, layout.tp, layout.pp, layout.micro_batch, -1));
  if (stage < 0 || stage >= layout.pp) {
    return InvalidArgument(fmt::format("stage: {} is outside [0, pp={})", stage, layout.pp));
  }
  const Consts k = MakeConsts(request);
  const int accum = request.global_batch / (layout.dp * layout.micro_batch);
  return StageMemoryOf(k, layout, accum, stage);
}

Result<PlanResult> MakePlan(const PlanRequest& request) {
  const auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(ValidateShape(request));
  const PlanRequest& r = request;
  RETURN_IF_ERROR(CheckSizes(r, r.dp, r.tp, r.pp, r.micro_batch, r.workers));
  const Consts k = MakeConsts(r);
  const int W = r.workers, B = r.global_batch, heads = r.model.heads;
  const int node = r.device.devices_per_node;

  PlanResult out;
  out.request = r;
  std::vector<Eval> shape_best;  // the best fitting candidate per (tp, pp)
  Eval best_all;                 // best fitting candidate on all W workers
  bool have_all = false, any_all_structural = false;
  Eval fastest_oom, smallest;  // fastest rejected for memory (by < 2x); smallest memory
  bool have_oom = false, have_smallest = false;

  const std::vector<int> batch_divisors = DivisorsOf(B);
  std::vector<std::vector<int>> micro_options(batch_divisors.size());
  for (size_t i = 0; i < batch_divisors.size(); ++i) {
    const int per_dp = B / batch_divisors[i];
    if (r.micro_batch > 0) {
      if (per_dp % r.micro_batch == 0) micro_options[i] = {r.micro_batch};
    } else {
      micro_options[i] = DivisorsOf(per_dp);
    }
  }
  std::vector<bool> zero1_options, recompute_options;
  if (r.zero1.has_value()) {
    zero1_options = {*r.zero1};
  } else {
    zero1_options = {false, true};
  }
  if (r.recompute.has_value()) {
    recompute_options = {*r.recompute};
  } else {
    recompute_options = {false, true};
  }
  int64_t rejected_tp_heads = 0, rejected_tp_node = 0, rejected_batch = 0, rejected_micro = 0,
          rejected_memory = 0;

  const int tp_hi = r.tp > 0 ? r.tp : std::min(heads, W);
  for (int tp = r.tp > 0 ? r.tp : 1; tp <= tp_hi; ++tp) {
    if (heads % tp != 0) {
      ++rejected_tp_heads;
      continue;
    }
    if (node > 0 && tp > node) {
      ++rejected_tp_node;
      continue;
    }
    const int pp_hi = r.pp > 0 ? r.pp : std::min(r.model.layers, W / tp);
    for (int pp = r.pp > 0 ? r.pp : 1; pp <= pp_hi; ++pp) {
      const int max_dp = W / (tp * pp);
      if (max_dp < 1) continue;
      Eval pair;  // the best fitting candidate of this (tp, pp), over dp and the rest
      bool have_pair = false;
      if (r.dp == 0) {
        // dp values in [1, max_dp] that do not divide the global batch, counted not visited.
        const int64_t ok = std::upper_bound(batch_divisors.begin(), batch_divisors.end(), max_dp) -
                           batch_divisors.begin();
        rejected_batch += max_dp - ok;
      }
      for (size_t di = 0; di < batch_divisors.size(); ++di) {
        const int dp = batch_divisors[di];
        if (dp > max_dp) break;
        if (r.dp > 0 && dp != r.dp) continue;
        if (micro_options[di].empty()) {
          ++rejected_micro;
          continue;
        }
        const bool all = dp * tp * pp == W;
        any_all_structural |= all;
        const Links links = LinksOf(r.device, dp, tp, pp);
        Eval shape;
        bool have_shape = false;
        for (int micro : micro_options[di]) {
          for (bool zero1 : zero1_options) {
            if (zero1 && dp == 1 && !r.zero1.has_value()) continue;  // same as zero1 off
            for (bool recompute : recompute_options) {
              const Layout l{dp, tp, pp, micro, zero1, recompute};
              const Eval e = Evaluate(k, l, links);
              ++out.considered;
              if (!have_smallest || e.mem.total() < smallest.mem.total()) {
                smallest = e;
                have_smallest = true;
              }
              if (!e.fits) {
                ++rejected_memory;
                if (e.mem.total() <= 2 * k.usable && (!have_oom || Better(e, fastest_oom))) {
                  fastest_oom = e;
                  have_oom = true;
                }
                continue;
              }
              ++out.feasible;
              if (!have_shape || Better(e, shape)) {
                shape = e;
                have_shape = true;
              }
            }
          }
        }
        if (!have_shape) continue;
        if (!have_pair || Better(shape, pair)) {
          pair = shape;
          have_pair = true;
        }
        if (all && (!have_all || Better(shape, best_all))) {
          best_all = shape;
          have_all = true;
        }
      }
      if (have_pair) shape_best.push_back(pair);
    }
  }
  if (rejected_tp_heads) out.rejected["tp values not dividing model.heads"] = rejected_tp_heads;
  if (rejected_tp_node) out.rejected["tp values above devices_per_node"] = rejected_tp_node;
  if (rejected_batch) {
    out.rejected["dp values not dividing train.global_batch"] = rejected_batch;
  }
  if (rejected_micro) {
    out.rejected["dp values leaving global_batch/dp not divisible by train.micro_batch"] =
        rejected_micro;
  }
  if (rejected_memory) out.rejected["candidates out of memory"] = rejected_memory;

  if (shape_best.empty()) {
    if (!have_smallest) {
      return InvalidArgument(fmt::format(
          "resources.workers: no valid layout for {} workers (tp must divide model.heads={}, "
          "pp <= model.layers={}, global_batch={} divisible by dp * micro_batch)",
          W, heads, r.model.layers, B));
    }
    std::string fixed;
    auto add = [&](const std::string& f) {
      if (!fixed.empty()) fixed += ", ";
      fixed += f;
    };
    if (r.dp > 0) add(fmt::format("parallel.dp={}", r.dp));
    if (r.tp > 0) add(fmt::format("parallel.tp={}", r.tp));
    if (r.pp > 0) add(fmt::format("parallel.pp={}", r.pp));
    if (r.micro_batch > 0) add(fmt::format("train.micro_batch={}", r.micro_batch));
    if (r.zero1.has_value()) add(fmt::format("parallel.zero1={}", *r.zero1));
    if (r.recompute.has_value()) add(fmt::format("model.recompute={}", *r.recompute));
    const bool recompute_fixed_off = r.recompute.has_value() && !*r.recompute;
    return InvalidArgument(fmt::format(
        "resources.workers: the model does not fit on {} x {}: smallest per-device memory {} > "
        "{} usable ({:.0f}% of {} kept free) with {} (worst stage {}); add workers{}{}",
        W, r.device.kind, GiB(smallest.mem.total()), GiB(static_cast<int64_t>(k.usable)),
        r.memory_reserve * 100, GiB(r.device.memory_bytes), smallest.l.ToString(),
        smallest.worst_stage, recompute_fixed_off ? ", enable model.recompute" : "",
        fixed.empty() ? " or use devices with more memory"
                      : ", or free the fixed choices (" + fixed + ")"));
  }

  std::sort(shape_best.begin(), shape_best.end(), Better);
  out.best = ToPlan(k, shape_best[0]);
  // Runners-up: one per tp and power-of-two band of pp, so that the list shows different
  // shapes rather than pp = 43, 44, 45 of one.
  auto band = [](const Eval& e) {
    return std::make_pair(e.l.tp, static_cast<int>(std::floor(std::log2(e.l.pp))));
  };
  std::vector<std::pair<int, int>> shown = {band(shape_best[0])};
  for (size_t i = 1; i < shape_best.size() &&
                     static_cast<int>(out.runners_up.size()) < std::max(0, r.max_runners_up);
       ++i) {
    if (std::find(shown.begin(), shown.end(), band(shape_best[i])) != shown.end()) continue;
    shown.push_back(band(shape_best[i]));
    Plan p = ToPlan(k, shape_best[i]);
    p.why = WhyLost(out.best, p);
    out.runners_up.push_back(std::move(p));
  }
  if (have_oom && Better(fastest_oom, shape_best[0])) {
    Plan p = ToPlan(k, fastest_oom);
    p.why = fmt::format("needs {} per device > {} usable", GiB(p.memory_per_device),
                        GiB(static_cast<int64_t>(k.usable)));
    out.fastest_rejected = std::move(p);
  }
  if (out.best.workers_used < W) {
    if (have_all) {
      const Plan all = ToPlan(k, best_all);
      out.notes.push_back(fmt::format(
          "uses {} of {} workers: the fastest layout on all {} ({}) predicts {} per step, {:.1f}% "
          "slower",
          out.best.workers_used, W, W, all.Layout::ToString(), Seconds(all.step_seconds),
          (all.step_seconds / out.best.step_seconds - 1) * 100));
    } else if (any_all_structural) {
      out.notes.push_back(
          fmt::format("uses {} of {} workers: every layout on all {} runs out of memory",
                      out.best.workers_used, W, W));
    } else {
      out.notes.push_back(
          fmt::format("uses {} of {} workers: no dp x tp x pp = {} satisfies the rules (tp divides "
                      "model.heads={}, pp <= model.layers={}, dp divides train.global_batch={}{})",
                      out.best.workers_used, W, W, heads, r.model.layers, B,
                      r.dp || r.tp || r.pp ? ", the fixed parallel sizes" : ""));
    }
  }
  if (r.zero1.value_or(false) && out.best.dp == 1) {
    out.notes.push_back("parallel.zero1 has no effect with dp = 1");
  }
  out.planning_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

std::string PlanResult::Summary() const {
  return fmt::format("{} on {}/{} workers: {} per step, {:.0f} tokens/s, {} per device",
                     best.Layout::ToString(), best.workers_used, request.workers,
                     Seconds(best.step_seconds), best.tokens_per_second,
                     Bytes(best.memory_per_device));
}

std::string PlanResult::Explain() const {
  const PlanRequest& r = request;
  const Plan& p = best;
  const StepBreakdown& b = p.breakdown;
  const MemoryBreakdown& m = p.memory;
  const double usable = r.device.memory_bytes * (1.0 - r.memory_reserve);
  std::string s = "request: " + Describe(r) + "\n";
  s += fmt::format("chosen:  {}, {} micro-batch{} per step, {} of {} workers\n",
                   p.Layout::ToString(), p.accumulation, p.accumulation == 1 ? "" : "es",
                   p.workers_used, r.workers);
  s += fmt::format("  step    {} predicted ({:.0f} tokens/s, MFU {:.1f}%)\n",
                   Seconds(p.step_seconds), p.tokens_per_second, p.mfu * 100);
  s += fmt::format(
      "          compute {} | tp comm {} | pp comm {} | bubble {} | dp comm exposed {} | "
      "optimizer {}\n",
      Seconds(b.compute), Seconds(b.tp_comm), Seconds(b.pp_comm), Seconds(b.bubble),
      Seconds(b.dp_comm_exposed), Seconds(b.optimizer));
  s += fmt::format(
      "  memory  {} per device (fullest: stage {}) of {} usable ({} with {:.0f}% kept free)\n",
      Bytes(p.memory_per_device), p.worst_stage, GiB(static_cast<int64_t>(usable)),
      GiB(r.device.memory_bytes), r.memory_reserve * 100);
  s += fmt::format(
      "          params {} | {} | grads {} | optimizer {} | activations {} | workspace {}\n",
      Bytes(m.params),
      m.compute_copy ? r.precision + " copy " + Bytes(m.compute_copy) : "no compute copy (fp32)",
      Bytes(m.grads), Bytes(m.optimizer), Bytes(m.activations), Bytes(m.workspace));
  s += fmt::format("search:  {} candidates costed, {} fit", considered, feasible);
  if (!rejected.empty()) {
    s += "; rejected:";
    bool first = true;
    for (const auto& [reason, count] : rejected) {
      s += fmt::format("{} {} {}", first ? "" : ",", count, reason);
      first = false;
    }
  }
  s += fmt::format(" ({})\n", Seconds(planning_seconds));
  for (const std::string& n : notes) s += "note:    " + n + "\n";
  if (!runners_up.empty()) {
    s += "runners-up (the fastest plan of each other tp and pp band [2^k, 2^(k+1))):\n";
    s += fmt::format("  {:<52} {:>10} {:>8} {:>10}  {}\n", "layout", "step", "vs best", "memory",
                     "why it lost");
    for (const Plan& q : runners_up) {
      s += fmt::format("  {:<52} {:>10} {:>7.1f}% {:>10}  {}\n", q.Layout::ToString(),
                       Seconds(q.step_seconds), (q.step_seconds / p.step_seconds - 1) * 100,
                       Bytes(q.memory_per_device), q.why);
    }
  }
  if (fastest_rejected.has_value()) {
    const Plan& q = *fastest_rejected;
    s += fmt::format("faster but does not fit: {} would take {} per step but {}\n",
                     q.Layout::ToString(), Seconds(q.step_seconds), q.why);
  }
  return s;
}

std::string PlanResult::ToJson() const {
  std::string s = "{\"best\":" + PlanJson(best) + ",\"runners_up\":[";
  for (size_t i = 0; i < runners_up.size(); ++i) {
    if (i) s += ',';
    s += PlanJson(runners_up[i]);
  }
  s += "]";
  if (fastest_rejected.has_value()) s += ",\"fastest_rejected\":" + PlanJson(*fastest_rejected);
  s +=
      fmt::format(",\"workers\":{},\"device\":{},\"considered\":{},\"feasible\":{},\"rejected\":{{",
                  request.workers, JsonString(request.device.kind), considered, feasible);
  bool first = true;
  for (const auto& [reason, count] : rejected) {
    s += fmt::format("{}{}:{}", first ? "" : ",", JsonString(reason), count);
    first = false;
  }
  s += "},\"notes\":[";
  for (size_t i = 0; i < notes.size(); ++i) {
    if (i) s += ',';
    s += JsonString(notes[i]);
  }
  s += fmt::format("],\"planning_seconds\":{}}}", planning_seconds);
  return s;
}

Result<PlanRequest> PlanRequestFromJob(const proto::JobSpec& spec, int workers,
                                       const DeviceProfile& device) {
  proto::JobSpec s = spec;
  const bool micro_set = spec.train().has_micro_batch();
  spec::ApplyDefaults(&s);
  PlanRequest r;
  const proto::ModelSpec& m = s.model();
  if (!m.preset().empty() && m.layers() == 0) {
    return InvalidArgument(fmt::format("model.preset: unknown preset '{}'", m.preset()));
  }
  r.model.layers = m.layers();
  r.model.heads = m.heads();
  r.model.d_model = m.d_model();
  r.model.vocab = m.vocab_size();
  r.model.seq_len = m.seq_len();
  r.model.max_seq_len = m.max_seq_len();
  r.global_batch = s.train().global_batch();
  r.precision = s.train().precision();
  r.schedule = s.parallel().schedule();
  r.workers = workers;
  r.device = device;
  r.dp = s.parallel().dp();
  r.tp = s.parallel().tp();
  r.pp = s.parallel().pp();
  if (s.parallel().zero1()) r.zero1 = true;
  if (m.recompute()) r.recompute = true;
  if (micro_set) r.micro_batch = s.train().micro_batch();
  RETURN_IF_ERROR(ValidateShape(r));
  RETURN_IF_ERROR(CheckSizes(r, r.dp, r.tp, r.pp, r.micro_batch, r.workers));
  return r;
}

}  // namespace strata::coordinator
