// Pipeline-parallel schedules (Megatron): runs one training (or evaluation) step of a pipeline
// stage of the GPT over the pipeline group, whose ranks are the stages in order.
//
// Per micro-batch m, stage p receives the residual stream [b, t, C] fp32 from stage p - 1,
// runs its blocks (model::Gpt::ForwardStage) and sends its output to stage p + 1; the last
// stage computes the loss. Backward runs the other way: the last stage starts from the loss,
// every stage sends d(input) to p - 1. Tags: 2m for the activation of micro-batch m, 2m + 1 for
// its gradient (p2p messages match by (src, dst, tag) in issue order).
//
// Schedules (both give the same gradients; they differ in memory and in nothing else):
//   GPipe  all forwards, then all backwards. Every stage keeps num_micro micro-batches of
//          activations (num_micro slots).
//   1F1B   warm-up: pp - p - 1 forwards; steady state: one forward then one backward, until
//          every forward is done; cool-down: the remaining backwards. Stage p keeps at most
//          pp - p micro-batches in flight (PipelineSlots), so memory does not grow with
//          num_micro.
//
// Deadlock freedom. Sends never block the schedule: each is posted (asynchronous Work) from a
// buffer of its own (one per activation slot and direction) and only waited on before that
// buffer is reused and at the end of the step. The only blocking waits are receives, and each
// stage issues them in an order that is a topological order of the step's dependency graph:
// the activation of m from p - 1 before F(m), the gradient of m from p + 1 before B(m). With
// non-blocking sends a stage waits only for messages its neighbour posts earlier in the
// neighbour's own order, so there is no cycle of waits. Buffer reuse does not add one: in
// 1F1B stage p reuses its activation buffer of m - W (W = pp - p) at F(m), which comes after
// its B(m - W), which needed the gradient of m - W from p + 1, which p + 1 sends only after it
// received that activation; and it reuses its gradient buffer of m - W at B(m), after
// receiving the activation of m from p - 1, which p - 1 posts right before its B(m - W) (whose
// first action is the matching receive) — p - 1 waits for nothing from p in between. GPipe
// never reuses a buffer. The closing collectives (loss broadcast, tied-embedding sum) come
// after every p2p op of the step on every stage.
//
// Failure. Every wait has the step's timeout. On the first error (timeout, lost peer, failed
// TP collective inside the model) the pipeline group is aborted — pending ops on every stage
// fail at once instead of running into their own timeouts, and no op touches this step's
// buffers after return — and the error comes back with the stage and micro-batch as context.
// The group is then unusable (process_group.h): the worker re-forms it, the gradients of the
// step are partial (ZeroGrad before the next step).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "comm/process_group.h"
#include "common/status.h"
#include "model/gpt.h"

namespace strata::worker {

enum class PipelineSchedule { k1F1B, kGPipe };

// "1f1b" | "gpipe" (parallel.schedule); INVALID_ARGUMENT naming parallel.schedule otherwise.
Result<PipelineSchedule> ParsePipelineSchedule(const std::string& name);
const char* PipelineScheduleName(PipelineSchedule schedule);

// Activation slots (model::Gpt::Create's num_slots) stage `stage` of `pp` needs to train on
// `num_micro` micro-batches per step: 1F1B min(pp - stage, num_micro), GPipe num_micro.
// (Evaluation steps need 1.)
int PipelineSlots(PipelineSchedule schedule, int pp, int stage, int num_micro);

// Fills micro-batch `micro` (in [0, num_micro), called in increasing order) of this step:
// inputs[b * t] and targets[b * t]. Called on the first stage (which reads the inputs) and on
// the last (which reads the targets) only.
using MicroBatchFn = std::function<void(int micro, int32_t* inputs, int32_t* targets)>;

struct PipelineStepOptions {
  PipelineSchedule schedule = PipelineSchedule::k1F1B;
  int num_micro = 1;    // micro-batches per step (gradient accumulation steps)
  int micro_batch = 1;  // b
  int seq = 1;          // t
  // As model::Gpt::Forward: loss_scale / (b * t * num_micro * dp). 0: evaluation (forwards
  // only, no gradients, no tied sum).
  float dloss = 0.f;
  std::chrono::milliseconds timeout = comm::kDefaultTimeout;  // per wait
  // Passed to the backward of the last micro-batch (to start data-parallel reductions).
  model::Gpt::GradReadyFn on_ready = nullptr;
  // Sum the tied wte gradients of the first and last stage at the end of the step
  // (SumTiedEmbeddingGrads). Turn off to do it later, e.g. after the data-parallel reduction.
  bool sum_tied_embedding = true;
};

struct PipelineStepResult {
  double loss_sum = 0.0;  // sum over micro-batches of their mean losses
  float mean_loss = 0.f;  // loss_sum / num_micro
};

// Runs one step of this stage: `stage` is this rank's model (its stage().index must be
// pp_group.rank() and stage().count pp_group.size(); num_slots() >= PipelineSlots(...) when
// training), gradients accumulate (+=) into stage.grads(). Every stage of the group calls it
// with the same options (on_ready aside). Returns the loss on every stage (broadcast from the
// last). INVALID_ARGUMENT / FAILED_PRECONDITION for mismatched arguments (nothing is sent);
// otherwise the first communication or model error, with context, after aborting pp_group.
Result<PipelineStepResult> RunPipelineStep(model::Gpt& stage, comm::ProcessGroup& pp_group,
                                           const MicroBatchFn& batch,
                                           const PipelineStepOptions& options);

// Tied embeddings under pipeline parallelism: the first and the last stage each hold wte
// (ParamTensor::pipeline_tied) and each accumulated its part of the gradient (embedding,
// LM head). Exchanges the two and leaves the sum on both, bitwise equal (float addition is
// commutative). Every stage calls it (a no-op on middle stages and when pp = 1), after the
// gradients are final; with data parallelism it may come before or after the data-parallel
// reduction (sums commute), but on both stages on the same side of it. Errors: as
// RunPipelineStep (the group is aborted).
Status SumTiedEmbeddingGrads(model::Gpt& stage, comm::ProcessGroup& pp_group,
                             std::chrono::milliseconds timeout);

// Whether this stage counts tensor `p` in a global gradient norm (summed over the pipeline
// group, like the norms of the other dimensions): every tensor once, so the tied wte on the
// first stage only. (Under TP, replicated tensors are in addition counted on one TP rank.)
inline bool CountsInGradNorm(const model::ParamTensor& p, const model::PipelineStage& stage) {
  return !p.pipeline_tied || stage.first();
}

}  // namespace strata::worker
