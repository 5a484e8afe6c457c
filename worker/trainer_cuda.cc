// The trainer's CUDA path: Trainer::Step with the model, its gradients and the AdamW state on a
// CUDA device, through worker/device_ops.h (no CUDA type here; this file builds everywhere and
// is reached only when Trainer::Create made a CUDA model).
//
// The step is Trainer::Step's, operation for operation, with device buffers:
//  - data-parallel buckets are all-reduced in place on the device gradients from the
//    grad-ready callback; an NCCL dp group orders them after the model's stream by itself
//    (SetNcclComputeStream), any other group (host staging) gets the stream drained first;
//  - ZeRO-1 reduce-scatters into a device shard, updates it, all-gathers the parameters;
//  - the gradient norm's sum of squares runs on the device under the same counting rules
//    (LocalSumOfSquares); the one double comes back to the host, where the TP / PP / ZeRO
//    reductions of the scalar happen as on the CPU (through a device scratch for groups that
//    take device buffers);
//  - unscaling (1 / loss scale) and clipping are folded into the fused AdamW's grad_scale, so
//    the gradients are not rewritten: fp32 parity with the CPU path holds because both multiply
//    by a power of two and then by the same float clip coefficient;
//  - the tied-embedding gradient sum of a pipeline goes through host memory (the pipeline group
//    is a CPU group in v1).
#include <chrono>
#include <cmath>

#include "comm/nccl.h"
#include "common/logging.h"
#include "worker/trainer.h"

namespace strata::worker {

Status Trainer::InitCuda(const model::AdamWConfig& ac, int64_t lo, int64_t count) {
  const int64_t n = model_->num_params();
  RETURN_IF_ERROR(dev_->InitOptimizer(ac, lo, count));
  ASSIGN_OR_RETURN(dev_scalar_, dev_->Allocate(sizeof(double)));
  ASSIGN_OR_RETURN(void* sumsq, dev_->Allocate(sizeof(double)));
  dev_sumsq_ = static_cast<double*>(sumsq);
  if (zero1_) {
    ASSIGN_OR_RETURN(void* shard, dev_->Allocate(static_cast<size_t>(shard_) * sizeof(float)));
    dev_shard_ = static_cast<float*>(shard);
    if (n % dp_ != 0) {
      ASSIGN_OR_RETURN(void* padded,
                       dev_->Allocate(static_cast<size_t>(shard_) * dp_ * sizeof(float)));
      dev_padded_ = static_cast<float*>(padded);
    }
    // The host-side ZeRO-1 buffers of the CPU path are not used.
    std::vector<float>().swap(padded_);
    std::vector<float>().swap(shard_buf_);
  }
  host_params_.assign(static_cast<size_t>(n), 0.f);
  // NCCL groups wait for the model's stream at every op; other groups (host staging) are
  // handed buffers only after the stream is drained (see StepCuda).
  if (dp_ > 1) dp_ordered_ = comm::SetNcclComputeStream(*options_.dp_group, dev_->stream()).ok();
  if (tp_ > 1) comm::SetNcclComputeStream(*options_.tp_group, dev_->stream()).IgnoreError();
  return Status::Ok();
}

Status Trainer::AllReduceScalar(comm::ProcessGroup* g, void* value, comm::ElemType type,
                                comm::ReduceOp op) {
  const size_t bytes = comm::ElemSize(type);
  const bool device = DeviceGroup(g);
  void* buf = value;
  if (device) {
    RETURN_IF_ERROR(dev_->ToDevice(dev_scalar_, value, bytes));
    buf = dev_scalar_;
  }
  std::vector<std::unique_ptr<comm::Work>> works;
  works.push_back(g->AllReduce(buf, 1, type, op));
  RETURN_IF_ERROR(WaitAll(&works));
  if (device) RETURN_IF_ERROR(dev_->ToHost(value, dev_scalar_, bytes));
  return Status::Ok();
}

Result<double> Trainer::DeviceSumOfSquares(const float* g, int64_t lo, int64_t n) {
  bool any = false;
  for (const auto& [off, count] : GradNormRanges(lo, n)) {
    RETURN_IF_ERROR(dev_->SumOfSquares(dev_sumsq_, g + off, count, /*accumulate=*/any));
    any = true;
  }
  if (!any) return 0.0;
  double sum = 0.0;
  RETURN_IF_ERROR(dev_->ToHost(&sum, dev_sumsq_, sizeof(double)));
  return sum;
}

Status Trainer::SumTiedEmbeddingGradsCuda() {
  const model::PipelineStage& ps = model_->stage();
  if (ps.count == 1 || !(ps.first() || ps.last())) return Status::Ok();
  const model::ParamTensor* tied = nullptr;
  for (const model::ParamTensor& p : model_->tensors()) {
    if (p.pipeline_tied) tied = &p;
  }
  CHECK_MSG(tied != nullptr, "pipeline end stage without a tied embedding");
  comm::ProcessGroup& pp = *options_.pp_group;
  const int peer = ps.first() ? ps.count - 1 : 0;
  const size_t n = static_cast<size_t>(tied->numel);
  float* g = model_->grads() + tied->offset;
  std::vector<float> mine(n), other(n);
  RETURN_IF_ERROR(dev_->ToHost(mine.data(), g, n * sizeof(float)));
  // As SumTiedEmbeddingGrads (worker/pipeline.cc): both ends post both ops, then wait. The tag
  // is that function's (outside the schedule's tags, 2m and 2m + 1).
  constexpr int kTiedTag = 1 << 30;
  auto recv = pp.Recv(other.data(), n, comm::ElemType::kF32, peer, kTiedTag);
  auto send = pp.Send(mine.data(), n, comm::ElemType::kF32, peer, kTiedTag);
  Status s = recv->Wait(options_.comm_timeout);
  if (s.ok()) s = send->Wait(options_.comm_timeout);
  if (!s.ok()) {
    pp.Abort();
    return s.WithContext(pp.name() + ": tied embedding gradient exchange with stage " +
                         std::to_string(peer));
  }
  for (size_t i = 0; i < n; ++i) mine[i] += other[i];  // own + other, as on the CPU
  return dev_->ToDevice(g, mine.data(), n * sizeof(float));
}

Status Trainer::PullToHostMirrors() {
  RETURN_IF_ERROR(model_->CopyParamsToHost(host_params_.data()));
  const size_t bytes = static_cast<size_t>(adam_->size()) * sizeof(float);
  RETURN_IF_ERROR(dev_->ToHost(adam_->m(), dev_->m(), bytes));
  return dev_->ToHost(adam_->v(), dev_->v(), bytes);
}

Status Trainer::PushFromHostMirrors() {
  RETURN_IF_ERROR(model_->CopyParamsFromHost(host_params_.data()));
  const size_t bytes = static_cast<size_t>(adam_->size()) * sizeof(float);
  RETURN_IF_ERROR(dev_->ToDevice(dev_->m(), adam_->m(), bytes));
  return dev_->ToDevice(dev_->v(), adam_->v(), bytes);
}

Result<StepStats> Trainer::StepCuda() {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string ctx = "step " + std::to_string(step_);
  float dloss = 0.f;
  StepStats st = BeginStep(&dloss);
  float* g = model_->grads();  // device
  float* params = model_->params();
  const int64_t n = model_->num_params();
  comm::ProcessGroup* dp = options_.dp_group;

  // Buckets as in Step. A group that does not order itself after the model's stream gets the
  // stream drained before each launch (the host-staging adapter copies at issue).
  Status launch_status;
  int64_t lo = -1, hi = -1;
  auto launch = [&] {
    if (!dp_ordered_) {
      Status s = dev_->Synchronize();
      if (!s.ok() && launch_status.ok()) launch_status = s;
    }
    pending_.push_back(dp->AllReduce(g + lo, static_cast<size_t>(hi - lo), comm::ElemType::kF32,
                                     comm::ReduceOp::kSum));
    lo = hi = -1;
  };
  const bool bucketed = dp_ > 1 && !zero1_ && options_.overlap_grad_reduce;
  Status bs = RunMicroBatches(dloss, bucketed ? GradBucketer(&lo, &hi, launch) : nullptr, &st.loss);
  if (bs.ok()) bs = launch_status;
  if (!bs.ok()) {
    WaitAll(&pending_).IgnoreError();
    return bs.WithContext(ctx);
  }
  FlushGradBuckets(&lo, &hi, n, launch);
  if (!launch_status.ok()) {
    WaitAll(&pending_).IgnoreError();
    return launch_status.WithContext(ctx);
  }
  if (pp_ > 1) {
    RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
    RETURN_IF_ERROR(SumTiedEmbeddingGradsCuda().WithContext(ctx));
  }

  float* ug = g;
  float* up = params;
  int64_t un = n;
  if (dp_ > 1) {
    RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
    RETURN_IF_ERROR(
        AllReduceScalar(dp, &st.loss, comm::ElemType::kF32, comm::ReduceOp::kAvg).WithContext(ctx));
    if (zero1_) {
      const float* src = g;
      if (dev_padded_ != nullptr) {
        RETURN_IF_ERROR(dev_->Copy(dev_padded_, g, static_cast<size_t>(n) * sizeof(float)));
        RETURN_IF_ERROR(
            dev_->Zero(dev_padded_ + n, static_cast<size_t>(shard_ * dp_ - n) * sizeof(float)));
        src = dev_padded_;
      }
      if (!dp_ordered_) RETURN_IF_ERROR(dev_->Synchronize().WithContext(ctx));
      pending_.push_back(dp->ReduceScatter(src, dev_shard_, static_cast<size_t>(shard_),
                                           comm::ElemType::kF32, comm::ReduceOp::kSum));
      RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
      ug = dev_shard_;
      up = params + adam_->offset();
      un = adam_->size();
    }
  }
  ASSIGN_OR_RETURN(double sumsq, DeviceSumOfSquares(ug, up - params, un));
  // The norm of the unscaled gradients: the loss scale is a power of two, so this equals the
  // CPU path's sum over gradients divided by it first.
  const double inv_scale = 1.0 / static_cast<double>(st.loss_scale);
  sumsq *= inv_scale * inv_scale;
  double norm = 0.0;
  RETURN_IF_ERROR(DecideUpdate(sumsq, &st, &norm).WithContext(ctx));
  if (st.applied) {
    DeviceAdamWStep a;
    a.lr = st.lr;
    a.step = ++opt_step_;
    // As the CPU path: g * (1 / scale), then * float(clip coefficient).
    a.grad_scale = 1.f / st.loss_scale;
    if (const std::optional<float> clip = ClipScale(norm)) a.grad_scale *= *clip;
    // ZeRO-1 refreshes the whole compute copy after the all-gather instead.
    a.refresh_compute = !zero1_;
    RETURN_IF_ERROR(dev_->Update(up, ug, a).WithContext(ctx));
    if (zero1_) {
      RETURN_IF_ERROR(dev_->Copy(dev_shard_, up, static_cast<size_t>(un) * sizeof(float)));
      RETURN_IF_ERROR(
          dev_->Zero(dev_shard_ + un, static_cast<size_t>(shard_ - un) * sizeof(float)));
      float* gathered = dev_padded_ != nullptr ? dev_padded_ : params;
      if (!dp_ordered_) RETURN_IF_ERROR(dev_->Synchronize().WithContext(ctx));
      pending_.push_back(
          dp->AllGather(dev_shard_, gathered, static_cast<size_t>(shard_), comm::ElemType::kF32));
      RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
      if (gathered != params) {
        RETURN_IF_ERROR(dev_->Copy(params, gathered, static_cast<size_t>(n) * sizeof(float)));
      }
      model_->RefreshComputeWeights();
    }
  } else if (!fp16_) {
    spdlog::warn("step {}: non-finite gradient norm; update skipped", step_);
  }
  // Kernel faults of the update surface in this step, and the step time covers its work.
  RETURN_IF_ERROR(dev_->Synchronize().WithContext(ctx));
  EndStep(&st, t0);
  st.mfu = 0.0;  // peak_flops_ is the CPU's measured GEMM rate: no GPU peak is known here
  return st;
}

}  // namespace strata::worker
