// The planner: picks the data x tensor x pipeline layout, micro-batch, activation recomputation
// and ZeRO-1 for a GPT model, a global batch and a set of identical workers.
//
// MakePlan enumerates every valid (dp, tp, pp, micro_batch, zero1, recompute), rejects what
// does not fit in device memory (the trainer's own analytic memory model, worker::Trainer::
// Memory, plus kernel scratch and a reserve), ranks the rest by a cost model and returns the
// fastest plan with its runners-up. It is pure arithmetic: no kernels, no communication, no
// model objects (this library must not depend on strata_model), so it is cheap enough to run
// per job submission and per elastic re-plan: 3,072 devices and a 1T-parameter model plan in
// milliseconds.
//
// Validity (the same rules comm::Grid::Create and comm::CheckModelFits enforce at start-up):
//   tp divides model.heads (and so d_model); tp <= devices_per_node when nodes are known;
//   1 <= pp <= layers; dp * tp * pp == workers_used <= workers (a plan may leave workers idle
//   when that is faster or when divisibility requires it; PlanResult::notes says so);
//   global_batch % (dp * micro_batch) == 0.
//
// Cost model (one optimizer step, the slowest pipeline stage; all terms in seconds):
//   compute  GEMM FLOPs / (device FLOP/s x efficiency x a shape factor for small GEMMs) plus a
//            per-kernel launch overhead, forward + 2x backward (+ a block forward again with
//            recompute), per micro-batch, times the micro-batches per step.
//   tp_comm  ring all-reduces of the [b, T, C] activations: 2 per block forward, 2 per block
//            backward (+2 with recompute), synchronous (not hidden).
//   pp_comm  the fp32 residual stream sent forward and its gradient backward per micro-batch,
//            plus the tied-embedding gradient sum between the first and the last stage.
//   bubble   (pp - 1) micro-batch slots of the 1F1B / GPipe schedule.
//   dp_comm_exposed  the fp32 gradient all-reduce over dp, minus what hides behind the last
//            micro-batch's backward (bucketed, launched during backward); with ZeRO-1 the
//            reduce-scatter + all-gather run after backward and are fully exposed.
//   optimizer  the AdamW update, memory-bandwidth bound (1/dp of it with ZeRO-1).
// Links: a TP group whose size divides devices_per_node stays inside a node (intra_node_bw);
// pipeline neighbours are inside a node when tp * pp divides devices_per_node; the dp ring
// when the whole job does; everything else uses inter_node_bw (per device).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"

namespace strata::proto {
class JobSpec;
}  // namespace strata::proto

namespace strata::coordinator {

// One kind of worker device. Bandwidths are per device and per direction.
struct DeviceProfile {
  std::string kind;          // "h100", "a100", "cpu", or a caller's own name
  double flops = 0;          // peak dense FLOP/s of the training precision bf16/fp16 (CPU: fp32)
  double fp32_flops = 0;     // peak for precision fp32; 0: same as `flops`
  double efficiency = 1.0;   // fraction of the peak that large GEMMs reach
  int64_t memory_bytes = 0;  // device memory
  double intra_node_bw = 0;  // bytes/s between devices of one node (NVLink; shared memory)
  double inter_node_bw = 0;  // bytes/s from one device to another node (InfiniBand; Ethernet)
  double memory_bw = 0;      // bytes/s of device memory (bounds the optimizer update)
  double latency_s = 10e-6;  // per message hop
  double launch_overhead_s = 5e-6;  // per kernel (GPU launch; OpenMP region on CPU)
  int devices_per_node = 0;         // 0: unknown, no node constraint, every link intra-node

  std::string ToString() const;  // "h100: 989 TFLOP/s, 80.0 GiB, 8 per node, ..."
};

// Built-in profiles: "h100" (SXM, 80 GB, NVLink ~450 GB/s, IB ~50 GB/s per GPU, 8 per node),
// "a100" (80 GB, ~240 GB/s NVLink, ~25 GB/s IB, 8 per node) and "cpu" (a conservative default
// for one worker process: 50 GFLOP/s fp32, 16 GiB; overwrite `flops` with the worker's
// measured GEMM rate, model::MeasuredGemmFlops, and memory with what the host has).
// Case-insensitive. INVALID_ARGUMENT naming the valid kinds otherwise.
Result<DeviceProfile> DeviceProfileByName(const std::string& name);

// The GPT shape (model/gpt.h, GptConfig) the planner needs.
struct ModelShape {
  int layers = 0;
  int heads = 0;
  int d_model = 0;
  int vocab = 0;
  int seq_len = 0;                // tokens per sample
  int max_seq_len = 0;            // position table (parameters); 0: seq_len
  int64_t NumParameters() const;  // of the whole model; equals model::GptConfig's
};

// One layout: the choices the planner makes.
struct Layout {
  int dp = 1, tp = 1, pp = 1;
  int micro_batch = 1;  // samples per forward/backward on one data-parallel rank
  bool zero1 = false;   // optimizer state sharded over dp (only meaningful for dp > 1)
  bool recompute = false;
  int workers() const { return dp * tp * pp; }
  std::string ToString() const;  // "dp=8 tp=1 pp=1 micro=4 zero1=off recompute=off"
};

struct PlanRequest {
  ModelShape model;
  int global_batch = 0;            // samples per optimizer step
  std::string precision = "bf16";  // fp32 | bf16 | fp16
  std::string schedule = "1f1b";   // 1f1b | gpipe (pipeline activation slots)
  int workers = 0;                 // available; a plan may use fewer
  DeviceProfile device;
  // Fixed choices (explicit sizes in the job spec); 0 / nullopt: the planner chooses.
  int dp = 0, tp = 0, pp = 0, micro_batch = 0;
  std::optional<bool> zero1, recompute;
  // Fraction of device memory kept free for what the model does not count: the allocator's
  // fragmentation, the CUDA context, communication buffers.
  double memory_reserve = 0.10;
  int max_runners_up = 5;
};

// Memory of one device in bytes. params .. activations are exactly worker::Trainer::Memory's
// est_* fields for that rank; workspace is what the trainer allocates on top and its estimate
// leaves out: kernel scratch (the recompute buffers, gradient scratch) and, under pipeline
// parallelism, the message buffers (a send buffer per activation slot and direction).
struct MemoryBreakdown {
  int64_t params = 0, compute_copy = 0, grads = 0, optimizer = 0, activations = 0, workspace = 0;
  int64_t total() const {
    return params + compute_copy + grads + optimizer + activations + workspace;
  }
};

// Predicted seconds per optimizer step, by cause (see the file comment).
struct StepBreakdown {
  double compute = 0, tp_comm = 0, pp_comm = 0, bubble = 0, dp_comm_exposed = 0, optimizer = 0;
};

struct Plan : Layout {
  int workers_used = 0;  // dp * tp * pp
  int accumulation = 1;  // micro-batches per step per data-parallel rank
  double step_seconds = 0;
  double tokens_per_second = 0;
  double mfu = 0;  // model FLOPs (6N + attention) / (step_seconds x workers_used x peak)
  StepBreakdown breakdown;
  int64_t memory_per_device = 0;  // of the fullest device (memory.total())
  MemoryBreakdown memory;         // that device's parts
  int worst_stage = 0;            // the pipeline stage holding the fullest device
  std::string why;                // runners-up: why it lost to the chosen plan
};

struct PlanResult {
  PlanRequest request;
  Plan best;
  // Fastest first: the best plan of each other tp and pp band [2^k, 2^(k+1)) (variants of one
  // shape in dp, micro-batch, ZeRO-1, recompute or a neighbouring pp are not listed).
  std::vector<Plan> runners_up;
  // The fastest layout rejected for memory (needing at most twice the usable memory) when it
  // would have beaten `best`: what more memory per device would buy.
  std::optional<Plan> fastest_rejected;
  int64_t considered = 0;  // full candidates costed (memory and time)
  int64_t feasible = 0;    // of those, fit in memory
  // Candidates rejected, by reason (structural rejections count the value ruled out, e.g. one
  // tp that does not divide heads rules out every layout with it).
  std::map<std::string, int64_t> rejected;
  std::vector<std::string> notes;  // e.g. why fewer workers than available are used
  double planning_seconds = 0;

  // Human-readable: the request, the chosen plan with its time and memory breakdowns, the
  // candidate counts and a table of the runners-up with why they lost.
  std::string Explain() const;
  // One line: "dp=8 tp=1 pp=1 micro=8 zero1=off recompute=off on 8/8 workers: 0.105 s/step".
  std::string Summary() const;
  // The best plan, runners-up and counts as one JSON object.
  std::string ToJson() const;
};

// Checks a request (model shape, batch, workers, device, precision, fixed choices that are
// invalid on their own) and searches. INVALID_ARGUMENT naming the field when the request is
// bad, when fixed sizes violate a rule ("parallel.tp: 5 does not divide model.heads=12; ...")
// or when nothing fits ("resources.workers: the model does not fit ...: smallest per-device
// memory X GiB > Y GiB usable with tp=.., pp=..; add workers or enable model.recompute").
Result<PlanResult> MakePlan(const PlanRequest& request);

// The memory of the device holding pipeline stage `stage` (data-parallel rank 0, which owns
// a full ZeRO-1 shard) under `layout`. INVALID_ARGUMENT (naming the field) for a layout that
// breaks a rule above (workers are not checked) or a stage outside [0, pp).
Result<MemoryBreakdown> StageMemory(const PlanRequest& request, const Layout& layout, int stage);

// Maps a job spec onto a request: model shape, train.global_batch, train.precision,
// parallel.schedule, and as fixed choices parallel.dp/tp/pp when > 0, parallel.zero1 and
// model.recompute when true, train.micro_batch when set. Defaults are applied to a copy
// (spec::ApplyDefaults), so pass the spec as parsed: ApplyDefaults sets an absent micro_batch
// to global_batch, which would then count as fixed (clear train.micro_batch to let the
// planner choose). Does not need data files. INVALID_ARGUMENT naming the field for a bad
// model or batch, or workers < 1.
Result<PlanRequest> PlanRequestFromJob(const proto::JobSpec& spec, int workers,
                                       const DeviceProfile& device);

}  // namespace strata::coordinator
