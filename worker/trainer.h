// The single-process trainer: data -> micro-batches -> forward/backward -> clipping -> AdamW,
// with periodic validation and one log line per step. It is the one-process case of the later
// distributed engine.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/store.h"
#include "comm/process_group.h"
#include "common/status.h"
#include "model/gpt.h"
#include "model/optimizer.h"
#include "model/tensor_parallel.h"
#include "proto/job.pb.h"
#include "worker/checkpointing.h"
#include "worker/data.h"
#include "worker/device_ops.h"
#include "worker/pipeline.h"

namespace strata::worker {

struct StepStats;

struct TrainOptions {
  int64_t max_steps = -1;  // stop after this many steps (< 0: train.steps)
  int threads = -1;        // overrides resources.threads when >= 0
  bool log_steps = true;   // one log line per step (every train.log_every)
  // When set, one JSON line per step ({"step":..,"loss":..,"lr":..,"grad_norm":..,
  // "tokens_per_s":..,"applied":..}, full float precision) and per validation is appended here.
  std::string metrics_path;
  // fp16 dynamic loss scaling (torch.cuda.amp.GradScaler's defaults).
  float initial_loss_scale = 65536.f;
  int loss_scale_growth_interval = 2000;

  // Data parallelism: this rank's data-parallel group (nullptr or size 1: none). Each of the
  // group's dp ranks runs global_batch/dp samples of every step — the same samples, in the same
  // global order, as one process would — and gradients are reduced over the group: bucketed
  // all-reduces launched while backward is still running, or, with parallel.zero1, a
  // reduce-scatter after which each rank updates its shard of the fp32 master weights and AdamW
  // moments and the parameters are all-gathered.
  comm::ProcessGroup* dp_group = nullptr;
  // Tensor parallelism: this rank's tensor-parallel group (nullptr or size 1: none). All ranks
  // of a TP group belong to the same data-parallel slice and see the same samples.
  comm::ProcessGroup* tp_group = nullptr;
  // Pipeline parallelism: this rank's pipeline group (ranks = stages in order; nullptr or size
  // 1: none). The stage holds a balanced range of blocks; micro-batches run on the schedule of
  // parallel.schedule (1f1b or gpipe); the loss reaches every stage.
  comm::ProcessGroup* pp_group = nullptr;
  int64_t bucket_bytes = 4 << 20;  // all-reduce bucket size
  // Launch bucket all-reduces during backward (true) or all after backward (false; for
  // measuring what the overlap hides).
  bool overlap_grad_reduce = true;
  std::chrono::milliseconds comm_timeout{30000};

  // Checkpoints (spec.checkpoint; none when its dir is empty). Resume() loads the latest
  // usable committed checkpoint. The world rank is derived from the groups' ranks (TP
  // innermost, then PP, then DP); world rank 0 commits unless `external_commit` (daemon mode:
  // the coordinator commits).
  bool external_commit = false;
  // Tags this run's checkpoint instances (daemon mode: the generation), see SaverOptions::tag.
  std::string checkpoint_tag;
  // See SaverOptions::fence.
  std::function<Status()> checkpoint_fence;
  // Called by Run after every step (daemon mode: step reports to the coordinator).
  std::function<void(const StepStats&)> on_step;
  // The file system checkpoints go through (tests pass a fault-injecting one).
  std::shared_ptr<checkpoint::Storage> checkpoint_storage;
  // Called once this rank's shards of a checkpoint step are durable or failed (SaverOptions::
  // on_written); daemon mode reports it to the coordinator, which commits (external_commit).
  std::function<void(const proto::Manifest&, const Status&)> on_checkpoint_written;

  // Device: "" follows resources.device; "cpu" or "cuda" overrides it (strata train --device).
  // With cuda the model, its gradients and the AdamW state live on CUDA device `cuda_device`
  // (worker/device_ops.h); a build without CUDA answers INVALID_ARGUMENT, a machine without a
  // visible device UNAVAILABLE. Groups under cuda: dp_group and tp_group receive DEVICE buffers
  // (gradients, activations, and the step's scalars through a small device buffer), so they
  // must be NCCL groups (comm/nccl.h) or CPU groups wrapped with host staging
  // (comm/device_staged.h) — set `device_groups` to say so; the pipeline group carries HOST
  // buffers (activations are copied through host memory in v1), so it is a CPU group.
  std::string device;
  int cuda_device = 0;
  bool device_groups = false;
};

struct StepStats {
  int64_t step = 0;  // 0-based index of the step just taken
  float loss = 0.f;
  float lr = 0.f;
  float grad_norm = 0.f;  // before clipping
  bool applied = true;    // false when fp16 overflow skipped the update
  float loss_scale = 1.f;
  double seconds = 0.0;
  double tokens_per_second = 0.0;
  double mfu = 0.0;  // fraction of the measured GEMM rate
  // Time this rank spent blocked waiting for collectives after its own compute (exposed
  // communication: the part not hidden behind backward).
  double comm_wait_seconds = 0.0;
  // Time this rank was blocked by a checkpoint save after this step (async: the snapshot copy
  // and any wait for the previous save; sync: the whole save).
  double checkpoint_stall_seconds = 0.0;
};

struct TrainSummary {
  int64_t steps = 0;
  float first_loss = 0.f;
  float last_loss = 0.f;
  float last_val_loss = -1.f;      // < 0 when no validation ran
  double tokens_per_second = 0.0;  // mean over steps after the first
  double seconds = 0.0;
  int64_t skipped_steps = 0;
  bool interrupted = false;
};

// Memory held by one rank, measured from its buffers and estimated analytically from the model
// shape and layout (bytes). The estimate ignores kernel scratch, so measured >= estimated.
struct MemoryReport {
  int64_t params = 0, compute_copy = 0, grads = 0, optimizer = 0, activations = 0;
  int64_t est_params = 0, est_compute_copy = 0, est_grads = 0, est_optimizer = 0,
          est_activations = 0;
};

// Model config from a defaulted, validated spec.
model::GptConfig GptConfigFromSpec(const proto::JobSpec& spec);

class Trainer {
 public:
  // Builds the model, optimizer and data from a validated spec; initialises weights from
  // train.seed. INVALID_ARGUMENT / NOT_FOUND for bad specs or data.
  static Result<std::unique_ptr<Trainer>> Create(const proto::JobSpec& spec,
                                                 const TrainOptions& options);

  // One optimizer step over global_batch samples.
  // A failed collective (timeout, lost peer) aborts the step with its status.
  Result<StepStats> Step();
  // Mean loss over eval.batches validation micro-batches.
  Result<float> EvalLoss();
  // Steps until train.steps (or options.max_steps) or until *stop becomes true. Fails with the
  // step's status when a collective fails.
  // Saves a checkpoint at the end of the last step (also when *stop ended training early),
  // and every checkpoint.every steps.
  Result<TrainSummary> Run(const std::atomic<bool>* stop);

  // Loads the newest committed checkpoint under checkpoint.dir that every rank can read and
  // verify, whatever layout wrote it (all ranks of the job must call it). A checkpoint that is
  // unusable on any rank (missing or corrupt shard) is skipped with a message naming the
  // problem, and the previous committed one is tried. Returns the step resumed from, or -1 when
  // the root holds no committed checkpoint (training starts from step 0). INVALID_ARGUMENT when
  // the checkpoint was written for another model shape, global batch or sequence length (naming
  // the field); DATA_LOSS when committed checkpoints exist but none is usable.
  Result<int64_t> Resume();
  // What launchers call before Run: with `resume`, Resume(); without, checks that
  // checkpoint.dir holds no committed checkpoint (INVALID_ARGUMENT naming the latest step and
  // the fix: --resume or another dir) so that a new run never overwrites an old one. Returns the
  // step training starts from. OK (0) without checkpoint.dir.
  Result<int64_t> StartCheckpoints(bool resume);
  // Saves a checkpoint of the current step now (async per checkpoint.async). FAILED_PRECONDITION
  // without checkpoint.dir. Returns a failed save's status (also logged).
  Status SaveCheckpoint(double* stall_seconds = nullptr);
  // Waits for the save in flight (and its commit on the committing rank).
  Status WaitForCheckpoint();
  // For a rank being aborted from another thread: a commit waiting for peers gives up.
  void CancelCheckpointCommitWait() {
    if (saver_) saver_->CancelCommitWait();
  }

  model::Gpt& model() { return *model_; }
  MemoryReport Memory() const;
  const Dataset& data() const { return data_; }
  int64_t step() const { return step_; }
  int64_t total_steps() const { return total_steps_; }
  // Global sample index of the first sample of micro-batch `micro` of step `step`.
  int64_t FirstSample(int64_t step, int micro) const;
  int world_rank() const { return (dp_rank_ * pp_ + pp_rank_) * tp_ + tp_rank_; }
  int world_size() const { return dp_ * tp_ * pp_; }
  // What this rank saves: every global element of parameters and AdamW moments is saved by
  // exactly one rank (data-parallel rank 0, tensor-parallel rank 0 for replicated tensors, the
  // first stage for the tied embedding; with ZeRO-1 each data-parallel rank saves the moments
  // it owns).
  std::vector<SaveItem> CheckpointItems() const;

 private:
  Trainer(const proto::JobSpec& spec, const TrainOptions& options, Dataset data);

  proto::JobSpec spec_;
  TrainOptions options_;
  Dataset data_;
  std::unique_ptr<model::Gpt> model_;
  // CUDA only: device operations on the model's stream (declared after model_: destroyed
  // first). AdamW's moments then live on the device (dev_->m(), v()), and adam_ below holds
  // their host mirror for checkpoints, with host_params_ the mirror of the parameters.
  std::unique_ptr<DeviceOps> dev_;
  std::unique_ptr<model::AdamW> adam_;
  model::LossScaler scaler_;
  bool fp16_ = false;
  // Reduces gradients over the data-parallel group and applies the update (dp > 1).
  Status ReduceAndUpdate(StepStats* st);
  Status WaitAll(std::vector<std::unique_ptr<comm::Work>>* works);
  proto::Manifest ManifestBase() const;
  // model.init_from: this rank's slices of a safetensors file with HF GPT-2 names.
  Status InitFrom(const std::string& path);
  // Loads a checkpoint into this rank's parameters, moments and counters.
  Status LoadCheckpoint(checkpoint::CheckpointReader& reader);
  // Max of `v` over every rank of the job (through the tp, pp and dp groups).
  Result<int> MaxOverWorld(int v);
  std::unique_ptr<CheckpointSaver> saver_;
  int64_t last_saved_step_ = -1;
  std::shared_ptr<checkpoint::Storage> storage_;
  // Sum of squares of the gradients in `g` (elements [lo, lo + n) of the local flat buffer),
  // counting replicated tensors on tensor-parallel rank 0 only.
  double LocalSumOfSquares(const float* g, int64_t lo, int64_t n) const;

  // Pieces of a step shared by Step (host gradients) and StepCuda (device gradients).
  // The parts of elements [lo, lo + n) of the local flat buffer that count in the global
  // gradient norm, as (offset from lo, count): replicated tensors on tensor-parallel rank 0
  // only, wte on the first pipeline stage only.
  std::vector<std::pair<int64_t, int64_t>> GradNormRanges(int64_t lo, int64_t n) const;
  // Starts a step: its number, loss scale and cleared gradients; *dloss gets the loss
  // gradient of one micro-batch (each rank's share of the global batch carries 1/dp).
  StepStats BeginStep(float* dloss);
  // The grad-ready callback of plain data parallelism: during the last micro-batch's backward,
  // gradient ranges arrive from the end of the flat buffer to its start; contiguous ranges
  // gather into the bucket [*lo, *hi) (-1, -1: empty) and `launch` is called (and must empty
  // it) once the bucket holds options_.bucket_bytes.
  model::Gpt::GradReadyFn GradBucketer(int64_t* lo, int64_t* hi,
                                       const std::function<void()>& launch) const;
  // After backward: launches the last partial bucket, or the whole buffer [0, n) as one
  // bucket when gradients are all-reduced after backward rather than during it.
  void FlushGradBuckets(int64_t* lo, int64_t* hi, int64_t n, const std::function<void()>& launch);
  // Forward and backward of the step's accum_ micro-batches (pipelined when pp > 1, without
  // the tied-embedding sum); on_ready (may be empty) gets the last micro-batch's ranges.
  // *loss gets the mean loss (left as is by a failed pipeline step).
  Status RunMicroBatches(float dloss, const model::Gpt::GradReadyFn& on_ready, float* loss);
  // Sums the squared gradient norm over the ranks holding other parts of it (ZeRO-1 shards
  // over dp, tensor-parallel shards over tp, stages over pp), one group after the other.
  Status ReduceGradNormSquares(double* sumsq);
  // From this rank's squared gradient norm `sumsq`: the global norm (*norm, summed by
  // ReduceGradNormSquares) and, in *st, its float value, whether the update applies (a finite
  // norm; fp16 also updates the loss scaler) and this step's learning rate. Errors: those of
  // ReduceGradNormSquares (*st and *norm then unspecified).
  Status DecideUpdate(double sumsq, StepStats* st, double* norm);
  // The learning rate of this step.
  float StepLearningRate() const;
  // The factor that clips a gradient of norm `norm` to train.grad_clip, when it must be clipped.
  std::optional<float> ClipScale(double norm) const;
  // Ends a step begun at t0: advances step_, fills in the time, comm wait and tokens per second.
  void EndStep(StepStats* st, std::chrono::steady_clock::time_point t0);

  // The CUDA path (trainer_cuda.cc): Step with device gradients and a device optimizer.
  bool cuda_ = false;
  bool dp_ordered_ = false;         // the dp group orders its ops after the model's stream (NCCL)
  void* dev_scalar_ = nullptr;      // device scratch for one scalar collective (8 bytes)
  double* dev_sumsq_ = nullptr;     // device accumulator of the gradient norm
  float* dev_shard_ = nullptr;      // ZeRO-1: this rank's reduced gradient shard (device)
  float* dev_padded_ = nullptr;     // ZeRO-1, n % dp != 0 only (device)
  std::vector<float> host_params_;  // host mirror of the parameters for checkpoints
  Status InitCuda(const model::AdamWConfig& ac, int64_t lo, int64_t count);
  Result<StepStats> StepCuda();
  // One scalar collective over `g`, staged through dev_scalar_ when g takes device buffers.
  Status AllReduceScalar(comm::ProcessGroup* g, void* value, comm::ElemType type,
                         comm::ReduceOp op);
  bool DeviceGroup(const comm::ProcessGroup* g) const {
    return cuda_ && g != nullptr && g != options_.pp_group;
  }
  // LocalSumOfSquares of device gradients (waits for the result).
  Result<double> DeviceSumOfSquares(const float* g, int64_t lo, int64_t n);
  // SumTiedEmbeddingGrads for device gradients, exchanged through host memory.
  Status SumTiedEmbeddingGradsCuda();
  // Host mirrors <- device (before a save) and device <- host mirrors (after a load).
  Status PullToHostMirrors();
  Status PushFromHostMirrors();

  int micro_ = 0, accum_ = 0, seq_ = 0;
  int dp_ = 1, dp_rank_ = 0, tp_ = 1, tp_rank_ = 0, pp_ = 1, pp_rank_ = 0;
  PipelineSchedule schedule_ = PipelineSchedule::k1F1B;
  std::unique_ptr<model::TensorParallelComm> tp_comm_;
  bool zero1_ = false;
  int64_t shard_ = 0;             // ZeRO-1: elements per rank (padded)
  std::vector<float> padded_;     // ZeRO-1, n % dp != 0 only: padded gradients / parameters
  std::vector<float> shard_buf_;  // ZeRO-1: this rank's reduced gradient shard
  std::vector<std::unique_ptr<comm::Work>> pending_;
  double comm_wait_s_ = 0.0;  // this step's time blocked in WaitAll
  int64_t step_ = 0, opt_step_ = 0, total_steps_ = 0;
  double flops_per_token_ = 0.0, peak_flops_ = 0.0;
  std::vector<int32_t> inputs_, targets_;
};

}  // namespace strata::worker
