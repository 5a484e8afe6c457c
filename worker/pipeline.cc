#include "worker/pipeline.h"

#include <algorithm>
#include <memory>
#include <vector>

namespace strata::worker {

namespace {

constexpr int kActivation = 0, kGradient = 1;
// Above every micro-batch tag (num_micro is checked against it).
constexpr int kTiedTag = 1 << 30;

int Tag(int micro, int direction) { return 2 * micro + direction; }

std::string StageLabel(const comm::ProcessGroup& pp) {
  return "pipeline stage " + std::to_string(pp.rank()) + "/" + std::to_string(pp.size()) + " (" +
         pp.name() + ")";
}

// Waits for `w` (if any) and releases it.
Status WaitAndReset(std::unique_ptr<comm::Work>& w, std::chrono::milliseconds timeout) {
  if (w == nullptr) return Status::Ok();
  Status s = w->Wait(timeout);
  w.reset();
  return s;
}

// One step of one stage: the buffers and the two halves of the schedule.
class StageRunner {
 public:
  StageRunner(model::Gpt& model, comm::ProcessGroup& pp, const MicroBatchFn& batch,
              const PipelineStepOptions& o, int slots)
      : m_(model),
        pp_(pp),
        batch_(batch),
        o_(o),
        s_(pp.rank()),
        n_(pp.size()),
        first_(s_ == 0),
        last_(s_ == n_ - 1),
        slots_(slots),
        act_(static_cast<size_t>(o.micro_batch) * o.seq * model.config().channels) {
    const size_t bt = static_cast<size_t>(o.micro_batch) * o.seq;
    inputs_.resize(bt);
    targets_.resize(bt);
    if (!first_) recv_act_.resize(act_);
    if (!last_) recv_grad_.resize(act_);
    send_act_.resize(last_ ? 0 : static_cast<size_t>(slots));
    send_grad_.resize(first_ || o.dloss == 0.f ? 0 : static_cast<size_t>(slots));
    for (auto& b : send_act_) b.resize(act_);
    for (auto& b : send_grad_) b.resize(act_);
    act_sends_.resize(static_cast<size_t>(slots));
    grad_sends_.resize(static_cast<size_t>(slots));
  }

  Status Forward(int micro) {
    const size_t slot = static_cast<size_t>(micro % slots_);
    const std::string what = "micro-batch " + std::to_string(micro) + " forward";
    if (first_ || last_) batch_(micro, inputs_.data(), targets_.data());
    if (!first_) {
      auto w =
          pp_.Recv(recv_act_.data(), act_, comm::ElemType::kF32, s_ - 1, Tag(micro, kActivation));
      RETURN_IF_ERROR(w->Wait(o_.timeout)
                          .WithContext(what + ": activation from stage " + std::to_string(s_ - 1)));
    }
    // The slot's send buffer is free once its previous micro-batch has been received.
    if (!last_) RETURN_IF_ERROR(WaitAndReset(act_sends_[slot], o_.timeout).WithContext(what));
    Result<float> loss =
        m_.ForwardStage(static_cast<int>(slot), inputs_.data(), recv_act_.data(), targets_.data(),
                        o_.micro_batch, o_.seq, o_.dloss, last_ ? nullptr : send_act_[slot].data());
    RETURN_IF_ERROR(loss.status().ok() ? Status::Ok() : loss.status().WithContext(what));
    if (last_) {
      loss_sum_ += *loss;
    } else {
      act_sends_[slot] = pp_.Send(send_act_[slot].data(), act_, comm::ElemType::kF32, s_ + 1,
                                  Tag(micro, kActivation));
    }
    return Status::Ok();
  }

  Status Backward(int micro) {
    const size_t slot = static_cast<size_t>(micro % slots_);
    const std::string what = "micro-batch " + std::to_string(micro) + " backward";
    if (!last_) {
      auto w =
          pp_.Recv(recv_grad_.data(), act_, comm::ElemType::kF32, s_ + 1, Tag(micro, kGradient));
      RETURN_IF_ERROR(w->Wait(o_.timeout)
                          .WithContext(what + ": gradient from stage " + std::to_string(s_ + 1)));
    }
    if (!first_) RETURN_IF_ERROR(WaitAndReset(grad_sends_[slot], o_.timeout).WithContext(what));
    const bool final_micro = micro == o_.num_micro - 1;
    RETURN_IF_ERROR(m_.BackwardStage(static_cast<int>(slot), recv_grad_.data(),
                                     first_ ? nullptr : send_grad_[slot].data(),
                                     final_micro ? o_.on_ready : nullptr)
                        .WithContext(what));
    if (!first_) {
      grad_sends_[slot] = pp_.Send(send_grad_[slot].data(), act_, comm::ElemType::kF32, s_ - 1,
                                   Tag(micro, kGradient));
    }
    return Status::Ok();
  }

  Status Schedule() {
    const int n = o_.num_micro;
    if (o_.dloss == 0.f) {  // evaluation: forwards only
      for (int m = 0; m < n; ++m) RETURN_IF_ERROR(Forward(m));
    } else if (o_.schedule == PipelineSchedule::kGPipe) {
      for (int m = 0; m < n; ++m) RETURN_IF_ERROR(Forward(m));
      for (int m = 0; m < n; ++m) RETURN_IF_ERROR(Backward(m));
    } else {
      const int warmup = std::min(n_ - s_ - 1, n);
      for (int m = 0; m < warmup; ++m) RETURN_IF_ERROR(Forward(m));
      for (int i = 0; i < n - warmup; ++i) {
        RETURN_IF_ERROR(Forward(warmup + i));
        RETURN_IF_ERROR(Backward(i));
      }
      for (int m = n - warmup; m < n; ++m) RETURN_IF_ERROR(Backward(m));
    }
    // Every send of the step has been received before the buffers go away.
    for (auto* sends : {&act_sends_, &grad_sends_}) {
      for (auto& w : *sends) RETURN_IF_ERROR(WaitAndReset(w, o_.timeout).WithContext("last sends"));
    }
    return Status::Ok();
  }

  double loss_sum() const { return loss_sum_; }

 private:
  model::Gpt& m_;
  comm::ProcessGroup& pp_;
  const MicroBatchFn& batch_;
  const PipelineStepOptions& o_;
  int s_, n_;
  bool first_, last_;
  int slots_;
  size_t act_;  // elements of one activation message: b * t * C
  std::vector<int32_t> inputs_, targets_;
  std::vector<float> recv_act_, recv_grad_;
  std::vector<std::vector<float>> send_act_, send_grad_;             // per slot
  std::vector<std::unique_ptr<comm::Work>> act_sends_, grad_sends_;  // in flight, per slot
  double loss_sum_ = 0.0;
};

}  // namespace

Result<PipelineSchedule> ParsePipelineSchedule(const std::string& name) {
  if (name == "1f1b") return PipelineSchedule::k1F1B;
  if (name == "gpipe") return PipelineSchedule::kGPipe;
  return InvalidArgument("parallel.schedule: '" + name + "' is not one of 1f1b, gpipe");
}

const char* PipelineScheduleName(PipelineSchedule schedule) {
  return schedule == PipelineSchedule::k1F1B ? "1f1b" : "gpipe";
}

int PipelineSlots(PipelineSchedule schedule, int pp, int stage, int num_micro) {
  if (schedule == PipelineSchedule::kGPipe) return num_micro;
  return std::max(1, std::min(pp - stage, num_micro));
}

Result<PipelineStepResult> RunPipelineStep(model::Gpt& stage, comm::ProcessGroup& pp_group,
                                           const MicroBatchFn& batch,
                                           const PipelineStepOptions& options) {
  const model::PipelineStage& ps = stage.stage();
  if (ps.index != pp_group.rank() || ps.count != pp_group.size()) {
    return InvalidArgument("pipeline: the model is stage " + std::to_string(ps.index) + " of " +
                           std::to_string(ps.count) + " but holds rank " +
                           std::to_string(pp_group.rank()) + " of " + pp_group.name() + " (size " +
                           std::to_string(pp_group.size()) + ")");
  }
  if (options.num_micro < 1 || options.num_micro >= kTiedTag / 2) {
    return InvalidArgument("pipeline: " + std::to_string(options.num_micro) +
                           " micro-batches per step");
  }
  if (options.micro_batch < 1 || options.seq < 1) {
    return InvalidArgument("pipeline: micro-batch shape " + std::to_string(options.micro_batch) +
                           " x " + std::to_string(options.seq));
  }
  const bool train = options.dloss != 0.f;
  const int slots =
      train ? PipelineSlots(options.schedule, ps.count, ps.index, options.num_micro) : 1;
  if (stage.num_slots() < slots) {
    return FailedPrecondition(
        StageLabel(pp_group) + ": schedule " + PipelineScheduleName(options.schedule) + " with " +
        std::to_string(options.num_micro) + " micro-batches needs " + std::to_string(slots) +
        " activation slots; the model has " + std::to_string(stage.num_slots()));
  }
  auto fail = [&](const Status& s) {
    pp_group.Abort();  // peers fail fast; nothing touches our buffers after return
    return s.WithContext(StageLabel(pp_group));
  };

  PipelineStepResult out;
  {
    StageRunner runner(stage, pp_group, batch, options, slots);
    if (Status s = runner.Schedule(); !s.ok()) return fail(s);
    out.loss_sum = runner.loss_sum();
  }
  if (ps.count > 1) {
    // The loss exists on the last stage only.
    Status s = pp_group.Broadcast(&out.loss_sum, 1, comm::ElemType::kF64, ps.count - 1)
                   ->Wait(options.timeout);
    if (!s.ok()) return fail(s.WithContext("loss broadcast"));
  }
  out.mean_loss = static_cast<float>(out.loss_sum / options.num_micro);
  if (train && options.sum_tied_embedding) {
    RETURN_IF_ERROR(SumTiedEmbeddingGrads(stage, pp_group, options.timeout));
  }
  return out;
}

Status SumTiedEmbeddingGrads(model::Gpt& stage, comm::ProcessGroup& pp_group,
                             std::chrono::milliseconds timeout) {
  const model::PipelineStage& ps = stage.stage();
  if (ps.count == 1 || !(ps.first() || ps.last())) return Status::Ok();
  const model::ParamTensor* tied = nullptr;
  for (const model::ParamTensor& p : stage.tensors()) {
    if (p.pipeline_tied) tied = &p;
  }
  CHECK_MSG(tied != nullptr, "pipeline end stage without a tied embedding");
  const int peer = ps.first() ? ps.count - 1 : 0;
  const size_t n = static_cast<size_t>(tied->numel);
  float* g = stage.grads() + tied->offset;
  std::vector<float> other(n);
  // Both ends post both ops before waiting on either: no ordering between them can deadlock.
  auto recv = pp_group.Recv(other.data(), n, comm::ElemType::kF32, peer, kTiedTag);
  auto send = pp_group.Send(g, n, comm::ElemType::kF32, peer, kTiedTag);
  Status s = recv->Wait(timeout);
  if (s.ok()) s = send->Wait(timeout);  // g is read until then
  if (!s.ok()) {
    pp_group.Abort();
    return s.WithContext(StageLabel(pp_group) + ": tied embedding gradient exchange with stage " +
                         std::to_string(peer));
  }
  for (size_t i = 0; i < n; ++i) g[i] += other[i];
  return Status::Ok();
}

}  // namespace strata::worker
