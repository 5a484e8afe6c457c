#include "worker/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include "checkpoint/hf_gpt2.h"
#include "checkpoint/safetensors.h"
#include "common/logging.h"
#include "model/cpu_info.h"
#include "worker/tp_comm.h"

namespace strata::worker {

model::GptConfig GptConfigFromSpec(const proto::JobSpec& spec) {
  model::GptConfig c;
  c.vocab_size = spec.model().vocab_size();
  c.max_seq_len = spec.model().max_seq_len();
  c.layers = spec.model().layers();
  c.heads = spec.model().heads();
  c.channels = spec.model().d_model();
  c.recompute = spec.model().recompute();
  return c;
}

Trainer::Trainer(const proto::JobSpec& spec, const TrainOptions& options, Dataset data)
    : spec_(spec), options_(options), data_(std::move(data)) {}

Result<std::unique_ptr<Trainer>> Trainer::Create(const proto::JobSpec& spec,
                                                 const TrainOptions& options) {
  const model::GptConfig cfg = GptConfigFromSpec(spec);
  RETURN_IF_ERROR(cfg.Validate());
  ASSIGN_OR_RETURN(model::DType dtype, model::ParseDType(spec.train().precision()));
  const std::string device = options.device.empty() ? spec.resources().device() : options.device;
  if (!device.empty() && device != "cpu" && device != "cuda") {
    return InvalidArgument("resources.device: unknown device '" + device + "'; use cpu or cuda");
  }
  const bool cuda = device == "cuda";
  if (cuda) RETURN_IF_ERROR(CudaUsable());  // before anything slow: the clearest error first
  ASSIGN_OR_RETURN(Dataset data,
                   Dataset::Open(spec.data(), cfg.vocab_size, spec.model().seq_len()));
  std::unique_ptr<Trainer> t(new Trainer(spec, options, std::move(data)));
  t->cuda_ = cuda;
  model::SetNumThreads(options.threads >= 0 ? options.threads : spec.resources().threads());
  t->micro_ = spec.train().micro_batch();
  t->seq_ = spec.model().seq_len();
  if (options.dp_group != nullptr) {
    t->dp_ = options.dp_group->size();
    t->dp_rank_ = options.dp_group->rank();
  }
  const int gb = spec.train().global_batch();
  if (gb % (t->dp_ * t->micro_) != 0) {
    return InvalidArgument(
        "train.global_batch: " + std::to_string(gb) +
        " is not divisible by parallel.dp * train.micro_batch = " + std::to_string(t->dp_) + " * " +
        std::to_string(t->micro_) + "; choose a global batch that is a multiple of " +
        std::to_string(t->dp_ * t->micro_) + " or a smaller micro_batch");
  }
  t->accum_ = gb / (t->dp_ * t->micro_);
  t->zero1_ = t->dp_ > 1 && spec.parallel().zero1();
  if (options.tp_group != nullptr && options.tp_group->size() > 1) {
    t->tp_ = options.tp_group->size();
    t->tp_rank_ = options.tp_group->rank();
    t->tp_comm_ = std::make_unique<ProcessGroupTpComm>(options.tp_group, options.comm_timeout);
  }
  model::PipelineStage stage;
  int slots = 1;
  if (options.pp_group != nullptr && options.pp_group->size() > 1) {
    t->pp_ = options.pp_group->size();
    t->pp_rank_ = options.pp_group->rank();
    ASSIGN_OR_RETURN(t->schedule_, ParsePipelineSchedule(spec.parallel().schedule()));
    stage.index = t->pp_rank_;
    stage.count = t->pp_;
    slots = PipelineSlots(t->schedule_, t->pp_, t->pp_rank_, t->accum_);
  }
  if (cuda && (t->dp_ > 1 || t->tp_ > 1) && !options.device_groups) {
    return FailedPrecondition(
        "resources.device: cuda with parallel.dp or parallel.tp > 1 needs process groups that "
        "take device buffers (NCCL or host-staged); this launcher passed CPU groups");
  }
  if (cuda) {
    ASSIGN_OR_RETURN(t->model_, CreateCudaModel(cfg, dtype, t->micro_, t->seq_, t->tp_comm_.get(),
                                                stage, slots, options.cuda_device));
    ASSIGN_OR_RETURN(t->dev_, CreateDeviceOps(*t->model_));
  } else {
    ASSIGN_OR_RETURN(t->model_, model::Gpt::Create(cfg, dtype, t->micro_, t->seq_,
                                                   t->tp_comm_.get(), stage, slots));
  }
  t->model_->InitWeights(spec.train().seed());
  if (!spec.model().init_from().empty()) RETURN_IF_ERROR(t->InitFrom(spec.model().init_from()));
  model::AdamWConfig ac;
  ac.beta1 = static_cast<float>(spec.train().beta1());
  ac.beta2 = static_cast<float>(spec.train().beta2());
  ac.eps = static_cast<float>(spec.train().eps());
  ac.weight_decay = static_cast<float>(spec.train().weight_decay());
  const int64_t n = t->model_->num_params();
  if (t->zero1_) {
    t->shard_ = (n + t->dp_ - 1) / t->dp_;
    const int64_t lo = std::min(n, t->dp_rank_ * t->shard_);
    const int64_t count = std::min(n, lo + t->shard_) - lo;
    t->adam_ = std::make_unique<model::AdamW>(t->model_->tensors(), n, ac, lo, count);
    // A staging buffer only when the flat buffer does not split evenly: otherwise the
    // reduce-scatter reads the gradients and the all-gather writes the parameters in place.
    if (n % t->dp_ != 0) t->padded_.assign(static_cast<size_t>(t->shard_) * t->dp_, 0.f);
    t->shard_buf_.assign(static_cast<size_t>(t->shard_), 0.f);
  } else {
    t->adam_ = std::make_unique<model::AdamW>(t->model_->tensors(), n, ac);
  }
  if (cuda) RETURN_IF_ERROR(t->InitCuda(ac, t->adam_->offset(), t->adam_->size()));
  t->fp16_ = dtype == model::DType::kF16;
  t->scaler_ =
      model::LossScaler(options.initial_loss_scale, 2.f, 0.5f, options.loss_scale_growth_interval);
  t->total_steps_ = spec.train().steps();
  if (options.max_steps >= 0 && options.max_steps < t->total_steps_) {
    t->total_steps_ = options.max_steps;
  }
  t->inputs_.resize(static_cast<size_t>(t->micro_) * t->seq_);
  t->targets_.resize(t->inputs_.size());
  // Training FLOPs per token: 6 per parameter (fwd + bwd) plus attention scores, as in PaLM.
  t->flops_per_token_ =
      6.0 * static_cast<double>(cfg.NumParameters()) + 12.0 * cfg.layers * cfg.channels * t->seq_;
  t->peak_flops_ = model::MeasuredGemmFlops();
  const proto::CheckpointSpec& ck = spec.checkpoint();
  t->storage_ =
      options.checkpoint_storage ? options.checkpoint_storage : checkpoint::DefaultStorage();
  if (!ck.dir().empty()) {
    SaverOptions so;
    so.storage = t->storage_;
    so.root = ck.dir();
    so.rank = t->world_rank();
    so.world = t->world_size();
    so.commit = so.rank == 0 && !options.external_commit;
    so.async = ck.async();
    so.retention.keep_last = ck.keep();
    so.retention.keep_every = ck.keep_every();
    so.commit_timeout = std::chrono::seconds(ck.commit_timeout_s());
    so.tag = options.checkpoint_tag;
    so.fence = options.checkpoint_fence;
    so.on_written = options.on_checkpoint_written;
    t->saver_ = std::make_unique<CheckpointSaver>(std::move(so));
    size_t floats = 0;
    for (const SaveItem& it : t->CheckpointItems()) {
      floats += static_cast<size_t>(it.layout.end() - it.layout.begin());
    }
    t->saver_->Reserve(floats);
  }
  return t;
}

Status Trainer::InitFrom(const std::string& path) {
  ASSIGN_OR_RETURN(checkpoint::SafetensorsFile file, checkpoint::ReadSafetensors(path));
  const model::GptConfig& c = model_->config();
  const checkpoint::Gpt2Config expected{c.layers, c.heads, c.channels, c.vocab_size, c.max_seq_len};
  Result<checkpoint::TensorMap> tensors = checkpoint::FromHfGpt2(file, expected);
  if (!tensors.ok()) {
    return InvalidArgument("model.init_from: " + tensors.status().message());
  }
  // CUDA: written into host memory, then uploaded (every element is written below).
  std::vector<float> staged(cuda_ ? static_cast<size_t>(model_->num_params()) : 0);
  float* params = cuda_ ? staged.data() : model_->params();
  for (const model::ParamTensor& t : model_->tensors()) {
    const std::vector<float>& global = tensors->at(t.name);
    for (int64_t i = 0; i < t.numel; ++i) {
      const int64_t g = t.GlobalIndex(i);
      params[t.offset + i] = g >= 0 ? global[static_cast<size_t>(g)] : 0.f;
    }
  }
  if (cuda_) RETURN_IF_ERROR(model_->CopyParamsFromHost(params));
  model_->RefreshComputeWeights();
  return Status::Ok();
}

std::vector<SaveItem> Trainer::CheckpointItems() const {
  std::vector<SaveItem> items;
  // CUDA: the host mirrors (filled by PullToHostMirrors before a save).
  const float* params = cuda_ ? host_params_.data() : model_->params();
  // Optimizer state of elements [lo, hi) of the flat buffer lives at m()/v() + (i - lo).
  const int64_t lo = adam_->offset(), hi = lo + adam_->size();
  model::AdamW& adam = *adam_;
  for (const model::ParamTensor& t : model_->tensors()) {
    if (tp_rank_ != 0 && t.replicated()) continue;              // tp rank 0 saves it
    if (t.pipeline_tied && !model_->stage().first()) continue;  // the first stage's copy
    if (dp_rank_ == 0) {
      items.push_back({"param/" + t.name, LayoutOf(t, 0, t.numel), params + t.offset});
    }
    if (!zero1_ && dp_rank_ != 0) continue;
    const int64_t a = std::max(t.offset, lo), b = std::min(t.offset + t.numel, hi);
    if (a >= b) continue;
    const proto::ShardLayout l = LayoutOf(t, a - t.offset, b - t.offset);
    items.push_back({"adam_m/" + t.name, l, adam.m() + (a - lo)});
    items.push_back({"adam_v/" + t.name, l, adam.v() + (a - lo)});
  }
  return items;
}

proto::Manifest Trainer::ManifestBase() const {
  proto::Manifest m;
  m.set_step(step_);
  *m.mutable_job() = spec_;
  proto::CheckpointLayout* l = m.mutable_layout();
  l->set_dp(dp_);
  l->set_tp(tp_);
  l->set_pp(pp_);
  l->set_zero1(zero1_);
  proto::TrainerState* s = m.mutable_trainer();
  s->set_step(step_);
  s->set_opt_step(opt_step_);
  s->set_next_sample(step_ * spec_.train().global_batch());
  s->set_seed(spec_.train().seed());
  s->set_global_batch(spec_.train().global_batch());
  s->set_seq_len(seq_);
  s->set_loss_scale(scaler_.scale());
  s->set_loss_scale_clean(scaler_.clean_steps());
  s->set_skipped_steps(scaler_.skipped());
  s->set_total_steps(spec_.train().steps());
  s->set_lr(model::LearningRate(std::max<int64_t>(0, step_ - 1), spec_.train().steps(),
                                spec_.train().warmup(), static_cast<float>(spec_.train().lr()),
                                static_cast<float>(spec_.train().min_lr())));
  return m;
}

Status Trainer::SaveCheckpoint(double* stall_seconds) {
  if (!saver_) return FailedPrecondition("checkpoint.dir is not set; nothing to save to");
  last_saved_step_ = step_;
  if (cuda_) RETURN_IF_ERROR(PullToHostMirrors().WithContext("checkpoint snapshot"));
  return saver_->Save(ManifestBase(), CheckpointItems(), stall_seconds);
}

Status Trainer::WaitForCheckpoint() { return saver_ ? saver_->Wait() : Status::Ok(); }

Result<int> Trainer::MaxOverWorld(int v) {
  int32_t x = v;
  for (comm::ProcessGroup* g : {options_.tp_group, options_.pp_group, options_.dp_group}) {
    if (g == nullptr || g->size() == 1) continue;
    if (DeviceGroup(g)) {
      RETURN_IF_ERROR(AllReduceScalar(g, &x, comm::ElemType::kI32, comm::ReduceOp::kMax));
      continue;
    }
    std::unique_ptr<comm::Work> w = g->AllReduce(&x, 1, comm::ElemType::kI32, comm::ReduceOp::kMax);
    RETURN_IF_ERROR(w->Wait(options_.comm_timeout));
  }
  return static_cast<int>(x);
}

Status Trainer::LoadCheckpoint(checkpoint::CheckpointReader& reader) {
  const proto::Manifest& m = reader.manifest();
  // CUDA: read into the host mirrors (first refreshed, so that what the checkpoint does not
  // cover keeps its device value), then uploaded.
  if (cuda_) RETURN_IF_ERROR(PullToHostMirrors());
  float* params = cuda_ ? host_params_.data() : model_->params();
  const int64_t lo = adam_->offset(), hi = lo + adam_->size();
  std::vector<checkpoint::CheckpointReader::ReadRequest> reads;
  for (const model::ParamTensor& t : model_->tensors()) {
    reads.push_back({"param/" + t.name, LayoutOf(t, 0, t.numel), params + t.offset});
    const int64_t a = std::max(t.offset, lo), b = std::min(t.offset + t.numel, hi);
    if (a >= b) continue;
    const proto::ShardLayout l = LayoutOf(t, a - t.offset, b - t.offset);
    reads.push_back({"adam_m/" + t.name, l, adam_->m() + (a - lo)});
    reads.push_back({"adam_v/" + t.name, l, adam_->v() + (a - lo)});
  }
  RETURN_IF_ERROR(reader.ReadMany(reads));
  if (cuda_) RETURN_IF_ERROR(PushFromHostMirrors());
  model_->RefreshComputeWeights();
  const proto::TrainerState& s = m.trainer();
  step_ = s.step();
  opt_step_ = s.opt_step();
  scaler_.Restore(s.loss_scale(), s.loss_scale_clean(), s.skipped_steps());
  return Status::Ok();
}

namespace {

// The fields a sample-exact continuation needs unchanged, compared with the checkpoint's.
Status CheckCompatible(const proto::JobSpec& now, const proto::Manifest& m) {
  const proto::JobSpec& was = m.job();
  auto same = [&](const char* field, int64_t a, int64_t b) -> Status {
    if (a == b) return Status::Ok();
    return InvalidArgument(fmt::format(
        "{}: the checkpoint at step {} was written with {} = {}, this job has {}; resume with the "
        "same value (or start a new run in another checkpoint.dir)",
        field, m.step(), field, b, a));
  };
  RETURN_IF_ERROR(same("model.layers", now.model().layers(), was.model().layers()));
  RETURN_IF_ERROR(same("model.heads", now.model().heads(), was.model().heads()));
  RETURN_IF_ERROR(same("model.d_model", now.model().d_model(), was.model().d_model()));
  RETURN_IF_ERROR(same("model.vocab_size", now.model().vocab_size(), was.model().vocab_size()));
  RETURN_IF_ERROR(same("model.max_seq_len", now.model().max_seq_len(), was.model().max_seq_len()));
  RETURN_IF_ERROR(same("model.seq_len", now.model().seq_len(), m.trainer().seq_len()));
  RETURN_IF_ERROR(
      same("train.global_batch", now.train().global_batch(), m.trainer().global_batch()));
  RETURN_IF_ERROR(same("train.seed", static_cast<int64_t>(now.train().seed()),
                       static_cast<int64_t>(m.trainer().seed())));
  return Status::Ok();
}

}  // namespace

Result<int64_t> Trainer::StartCheckpoints(bool resume) {
  const std::string& root = spec_.checkpoint().dir();
  if (root.empty()) {
    if (resume) return FailedPrecondition("--resume: the job has no checkpoint.dir");
    return int64_t{0};
  }
  if (resume) {
    ASSIGN_OR_RETURN(const int64_t step, Resume());
    return std::max<int64_t>(step, 0);
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> steps, checkpoint::CommittedSteps(*storage_, root));
  if (!steps.empty()) {
    return InvalidArgument(fmt::format(
        "checkpoint.dir: {} already holds committed checkpoints (latest step {}); pass --resume "
        "to continue from it, or choose another checkpoint.dir",
        root, steps.back()));
  }
  return int64_t{0};
}

Result<int64_t> Trainer::Resume() {
  const std::string& root = spec_.checkpoint().dir();
  if (root.empty()) {
    return FailedPrecondition("resume: checkpoint.dir is not set; say where checkpoints live");
  }
  ASSIGN_OR_RETURN(std::vector<int64_t> steps, checkpoint::CommittedSteps(*storage_, root));
  const bool leader = world_rank() == 0;
  if (steps.empty()) {
    if (leader) spdlog::info("resume: no committed checkpoint under {}; starting at step 0", root);
    return int64_t{-1};
  }
  std::string skipped;
  for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
    const int64_t step = *it;
    Status st = [&]() -> Status {
      ASSIGN_OR_RETURN(proto::Manifest m, checkpoint::ReadManifest(*storage_, root, step));
      RETURN_IF_ERROR(CheckCompatible(spec_, m));
      ASSIGN_OR_RETURN(std::unique_ptr<checkpoint::CheckpointReader> reader,
                       checkpoint::CheckpointReader::Open(storage_, root, std::move(m)));
      return LoadCheckpoint(*reader);
    }();
    // Incompatibility is the user's to fix, not a reason to fall back to an older step.
    const int code = st.ok() ? 0 : (st.code() == StatusCode::kInvalidArgument ? 2 : 1);
    ASSIGN_OR_RETURN(const int worst, MaxOverWorld(code));
    if (!st.ok()) {
      spdlog::error("resume: checkpoint step {} is unusable on rank {}: {}", step, world_rank(),
                    st.ToString());
    }
    if (worst == 2) {
      if (!st.ok() && st.code() == StatusCode::kInvalidArgument) return st;
      return InvalidArgument(fmt::format(
          "resume: checkpoint step {} does not fit this job (see rank 0's message)", step));
    }
    if (worst == 0) {
      if (leader) {
        spdlog::info("resume: loaded checkpoint step {} from {}{}", step, root, skipped);
        // Nothing is in flight yet: every uncommitted leftover is garbage, and checkpoints
        // after `step` (unusable ones) belong to an abandoned history.
        checkpoint::RetentionPolicy keep;
        keep.keep_last = spec_.checkpoint().keep();
        keep.keep_every = spec_.checkpoint().keep_every();
        Result<int> gc = checkpoint::CollectGarbage(*storage_, root, keep,
                                                    std::numeric_limits<int64_t>::max(), step);
        if (!gc.ok()) spdlog::warn("checkpoint retention: {}", gc.status().ToString());
      }
      return step;
    }
    if (leader)
      spdlog::warn(
          "resume: checkpoint step {} is unusable; falling back to the previous committed "
          "checkpoint",
          step);
    skipped += fmt::format(" (skipped unusable step {})", step);
  }
  return DataLoss(fmt::format(
      "resume: none of the {} committed checkpoints under {} is usable (see the errors above)",
      steps.size(), root));
}

int64_t Trainer::FirstSample(int64_t step, int micro) const {
  // The global batch in sample order: rank r of the data-parallel group takes the r-th slice.
  return step * spec_.train().global_batch() + static_cast<int64_t>(dp_rank_) * accum_ * micro_ +
         static_cast<int64_t>(micro) * micro_;
}

std::vector<std::pair<int64_t, int64_t>> Trainer::GradNormRanges(int64_t lo, int64_t n) const {
  if (tp_rank_ == 0 && pp_ == 1) return {{0, n}};
  std::vector<std::pair<int64_t, int64_t>> ranges;
  for (const model::ParamTensor& t : model_->tensors()) {
    if (tp_rank_ != 0 && t.replicated()) continue;
    if (!CountsInGradNorm(t, model_->stage())) continue;  // wte's last-stage copy
    const int64_t a = std::max(t.offset, lo), b = std::min(t.offset + t.numel, lo + n);
    if (a < b) ranges.emplace_back(a - lo, b - a);
  }
  return ranges;
}

double Trainer::LocalSumOfSquares(const float* g, int64_t lo, int64_t n) const {
  double sum = 0.0;
  for (const auto& [off, count] : GradNormRanges(lo, n)) sum += model::SumOfSquares(g + off, count);
  return sum;
}

MemoryReport Trainer::Memory() const {
  MemoryReport r;
  const int64_t n = model_->num_params();
  const int64_t lowp = model_->compute_dtype() == model::DType::kF32 ? 0 : 2;
  r.params = 4 * n;
  r.compute_copy = lowp * n;
  r.grads = 4 * n;
  r.optimizer = 8 * adam_->size() +
                4 * static_cast<int64_t>(padded_.size() + shard_buf_.size());  // ZeRO-1 buffers
  r.activations = model_->activation_bytes();
  // Analytic: per block 12C^2 + 7C parameters are split over tp, 6C replicated (LayerNorms
  // and the row-parallel biases); the first stage holds wpe and wte, the last ln_f and wte.
  const model::GptConfig& c = model_->config();
  const int64_t C = c.channels, tp = tp_;
  const int64_t vocab_local = (c.vocab_size + tp - 1) / tp;
  const model::LayerRange lr = model_->layers();
  const int64_t blocks = lr.end - lr.begin;
  int64_t est = blocks * ((12 * C * C + 7 * C) / tp + 6 * C);
  const model::PipelineStage& stage = model_->stage();
  if (stage.first()) est += vocab_local * C + static_cast<int64_t>(c.max_seq_len) * C;
  if (stage.last()) est += 2 * C + (stage.first() ? 0 : vocab_local * C);
  r.est_params = 4 * est;
  r.est_compute_copy = lowp * est;
  r.est_grads = 4 * est;
  // ZeRO-1: AdamW moments for this rank's shard, the shard's reduced gradient, and a padded
  // staging copy of the flat buffer only when it does not split evenly over dp.
  const int64_t shard = (est + dp_ - 1) / dp_;
  const int64_t owned = std::min(est, (dp_rank_ + 1) * shard) - std::min(est, dp_rank_ * shard);
  r.est_optimizer = zero1_ ? 8 * owned + 4 * shard + (est % dp_ ? 4 * shard * dp_ : 0) : 8 * est;
  // Saved activations per micro-batch in flight: per block, in compute precision ln1, ln2
  // (C each) and the tp-split qkv, attention output, fc and GELU outputs (12C/tp); in fp32
  // the block input and mid residual (2C), LayerNorm statistics (4) and lse (heads/tp).
  const int64_t s = lowp ? lowp : 4, bt = static_cast<int64_t>(micro_) * seq_;
  const int64_t per_block = s * (2 * C + 12 * C / tp) + 4 * (2 * C + 4 + c.heads / tp);
  const int64_t saved_blocks = c.recompute ? 0 : blocks;
  int64_t per_slot = bt * (saved_blocks * per_block + (c.recompute ? blocks * 4 * C : 0));
  if (stage.last()) per_slot += bt * (s * (C + vocab_local) + 4 * 3);
  r.est_activations = per_slot * model_->num_slots();
  return r;
}

Status Trainer::WaitAll(std::vector<std::unique_ptr<comm::Work>>* works) {
  const auto t0 = std::chrono::steady_clock::now();
  struct Timer {
    std::chrono::steady_clock::time_point t0;
    double* acc;
    ~Timer() {
      *acc += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
  } timer{t0, &comm_wait_s_};
  Status first;
  for (auto& w : *works) {
    Status s = w->Wait(options_.comm_timeout);
    if (!s.ok() && first.ok()) first = s;
  }
  works->clear();
  return first;
}

StepStats Trainer::BeginStep(float* dloss) {
  StepStats st;
  st.step = step_;
  comm_wait_s_ = 0.0;
  st.loss_scale = fp16_ ? scaler_.scale() : 1.f;
  model_->ZeroGrad();
  // Gradients are averaged over the global batch: each rank's share carries 1/dp.
  *dloss = st.loss_scale / (static_cast<float>(micro_) * seq_ * accum_ * dp_);
  return st;
}

model::Gpt::GradReadyFn Trainer::GradBucketer(int64_t* lo, int64_t* hi,
                                              const std::function<void()>& launch) const {
  return [lo, hi, launch, bucket_bytes = options_.bucket_bytes](int64_t offset, int64_t count) {
    if (*lo < 0) {
      *hi = offset + count;
    } else {
      CHECK(offset + count == *lo);
    }
    *lo = offset;
    if ((*hi - *lo) * static_cast<int64_t>(sizeof(float)) >= bucket_bytes) launch();
  };
}

void Trainer::FlushGradBuckets(int64_t* lo, int64_t* hi, int64_t n,
                               const std::function<void()>& launch) {
  if (*lo >= 0) launch();
  if (dp_ > 1 && !zero1_ && !options_.overlap_grad_reduce) {  // one all-reduce, after backward
    *lo = 0;
    *hi = n;
    launch();
  }
}

Status Trainer::RunMicroBatches(float dloss, const model::Gpt::GradReadyFn& on_ready, float* loss) {
  if (pp_ > 1) {
    PipelineStepOptions po;
    po.schedule = schedule_;
    po.num_micro = accum_;
    po.micro_batch = micro_;
    po.seq = seq_;
    po.dloss = dloss;
    po.timeout = options_.comm_timeout;
    po.on_ready = on_ready;
    // The tied-embedding sum writes wte's gradient: it must wait for the buckets reading it
    // (and device gradients go through SumTiedEmbeddingGradsCuda).
    po.sum_tied_embedding = false;
    auto r = RunPipelineStep(
        *model_, *options_.pp_group,
        [&](int m, int32_t* in, int32_t* tg) {
          data_.TrainBatch(spec_.train().seed(), FirstSample(step_, m), micro_, in, tg);
        },
        po);
    if (r.ok()) *loss = r->mean_loss;
    return r.status();
  }
  Status bs;
  double loss_sum = 0.0;
  for (int m = 0; m < accum_ && bs.ok(); ++m) {
    data_.TrainBatch(spec_.train().seed(), FirstSample(step_, m), micro_, inputs_.data(),
                     targets_.data());
    Result<float> l = model_->Forward(inputs_.data(), targets_.data(), micro_, seq_, dloss);
    bs = l.ok() ? model_->Backward(m == accum_ - 1 ? on_ready : nullptr) : l.status();
    if (l.ok()) loss_sum += *l;
  }
  *loss = static_cast<float>(loss_sum / accum_);
  return bs;
}

Status Trainer::ReduceGradNormSquares(double* sumsq) {
  // Every parameter is counted once: ZeRO-1 shards are disjoint over dp, tensor-parallel
  // shards over tp (replicated tensors count on tp rank 0 only).
  // (One after the other: both reduce the same scalar.)
  if (zero1_) {
    RETURN_IF_ERROR(
        AllReduceScalar(options_.dp_group, sumsq, comm::ElemType::kF64, comm::ReduceOp::kSum));
  }
  if (tp_ > 1) {
    RETURN_IF_ERROR(
        AllReduceScalar(options_.tp_group, sumsq, comm::ElemType::kF64, comm::ReduceOp::kSum));
  }
  if (pp_ > 1) {
    RETURN_IF_ERROR(
        AllReduceScalar(options_.pp_group, sumsq, comm::ElemType::kF64, comm::ReduceOp::kSum));
  }
  return Status::Ok();
}

Status Trainer::DecideUpdate(double sumsq, StepStats* st, double* norm) {
  RETURN_IF_ERROR(ReduceGradNormSquares(&sumsq));
  *norm = std::sqrt(sumsq);
  st->grad_norm = static_cast<float>(*norm);
  // Every rank sees the same norm, so every rank takes the same skip decision.
  const bool finite = std::isfinite(*norm);
  st->applied = fp16_ ? scaler_.Update(finite) : finite;
  st->lr = StepLearningRate();
  return Status::Ok();
}

float Trainer::StepLearningRate() const {
  return model::LearningRate(step_, spec_.train().steps(), spec_.train().warmup(),
                             static_cast<float>(spec_.train().lr()),
                             static_cast<float>(spec_.train().min_lr()));
}

std::optional<float> Trainer::ClipScale(double norm) const {
  const double clip = spec_.train().grad_clip();
  if (clip > 0) {
    const double coef = clip / (norm + 1e-6);
    if (coef < 1.0) return static_cast<float>(coef);
  }
  return std::nullopt;
}

void Trainer::EndStep(StepStats* st, std::chrono::steady_clock::time_point t0) {
  ++step_;
  st->comm_wait_seconds = comm_wait_s_;
  st->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double tokens = static_cast<double>(spec_.train().global_batch()) * seq_;
  st->tokens_per_second = tokens / st->seconds;
}

Result<StepStats> Trainer::Step() {
  if (cuda_) return StepCuda();
  const auto t0 = std::chrono::steady_clock::now();
  const std::string ctx = "step " + std::to_string(step_);
  float dloss = 0.f;
  StepStats st = BeginStep(&dloss);
  float* g = model_->grads();
  float* params = model_->params();
  const int64_t n = model_->num_params();
  comm::ProcessGroup* dp = options_.dp_group;

  int64_t lo = -1, hi = -1;
  auto launch = [&] {
    pending_.push_back(dp->AllReduce(g + lo, static_cast<size_t>(hi - lo), comm::ElemType::kF32,
                                     comm::ReduceOp::kSum));
    lo = hi = -1;
  };
  const bool bucketed = dp_ > 1 && !zero1_ && options_.overlap_grad_reduce;
  const Status bs =
      RunMicroBatches(dloss, bucketed ? GradBucketer(&lo, &hi, launch) : nullptr, &st.loss);
  if (!bs.ok()) {
    // Buckets already launched read the gradient buffer: drain them before returning.
    WaitAll(&pending_).IgnoreError();
    return bs.WithContext(ctx);
  }
  FlushGradBuckets(&lo, &hi, n, launch);
  if (pp_ > 1) {
    RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
    RETURN_IF_ERROR(
        SumTiedEmbeddingGrads(*model_, *options_.pp_group, options_.comm_timeout).WithContext(ctx));
  }

  // The gradient this rank updates: all of it, or its ZeRO-1 shard.
  float* ug = g;
  float* up = params;
  int64_t un = n;
  if (dp_ > 1) {
    pending_.push_back(dp->AllReduce(&st.loss, 1, comm::ElemType::kF32, comm::ReduceOp::kAvg));
    if (zero1_) {
      const float* src = g;
      if (!padded_.empty()) {
        std::copy(g, g + n, padded_.begin());
        std::fill(padded_.begin() + n, padded_.end(), 0.f);
        src = padded_.data();
      }
      pending_.push_back(dp->ReduceScatter(src, shard_buf_.data(), static_cast<size_t>(shard_),
                                           comm::ElemType::kF32, comm::ReduceOp::kSum));
      ug = shard_buf_.data();
      up = params + adam_->offset();
      un = adam_->size();
    }
    RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
  }
  if (st.loss_scale != 1.f) model::Scale(ug, un, 1.f / st.loss_scale);
  double sumsq = LocalSumOfSquares(ug, up - params, un);
  double norm = 0.0;
  RETURN_IF_ERROR(DecideUpdate(sumsq, &st, &norm).WithContext(ctx));
  if (st.applied) {
    if (const std::optional<float> clip = ClipScale(norm)) model::Scale(ug, un, *clip);
    adam_->Update(up, ug, st.lr, ++opt_step_);
    if (zero1_) {
      std::copy(up, up + un, shard_buf_.begin());
      std::fill(shard_buf_.begin() + un, shard_buf_.end(), 0.f);
      float* gathered = padded_.empty() ? params : padded_.data();
      pending_.push_back(dp->AllGather(shard_buf_.data(), gathered, static_cast<size_t>(shard_),
                                       comm::ElemType::kF32));
      RETURN_IF_ERROR(WaitAll(&pending_).WithContext(ctx));
      if (gathered != params) std::copy(padded_.begin(), padded_.begin() + n, params);
    }
    model_->RefreshComputeWeights();
  } else if (!fp16_) {
    spdlog::warn("step {}: non-finite gradient norm; update skipped", step_);
  }
  EndStep(&st, t0);
  // MFU per device: the global batch's FLOPs spread over dp * tp * pp devices.
  st.mfu = st.tokens_per_second * flops_per_token_ / (peak_flops_ * dp_ * tp_ * pp_);
  return st;
}

Result<float> Trainer::EvalLoss() {
  const int batches = spec_.eval().batches();
  double sum = 0.0;
  for (int i = 0; i < batches; ++i) {
    if (pp_ > 1) {
      PipelineStepOptions po;
      po.schedule = schedule_;
      po.num_micro = 1;
      po.micro_batch = micro_;
      po.seq = seq_;
      po.dloss = 0.f;  // forward only
      po.timeout = options_.comm_timeout;
      ASSIGN_OR_RETURN(const PipelineStepResult r,
                       RunPipelineStep(
                           *model_, *options_.pp_group,
                           [&](int, int32_t* in, int32_t* tg) {
                             data_.ValBatch(static_cast<int64_t>(i) * micro_, micro_, in, tg);
                           },
                           po));
      sum += r.mean_loss;
      continue;
    }
    data_.ValBatch(static_cast<int64_t>(i) * micro_, micro_, inputs_.data(), targets_.data());
    ASSIGN_OR_RETURN(const float loss,
                     model_->Forward(inputs_.data(), targets_.data(), micro_, seq_, 0.f));
    sum += loss;
  }
  return static_cast<float>(sum / batches);
}

Result<TrainSummary> Trainer::Run(const std::atomic<bool>* stop) {
  TrainSummary sum;
  const auto t0 = std::chrono::steady_clock::now();
  double timed_tokens = 0.0, timed_seconds = 0.0, comm_wait_total = 0.0;
  const int log_every = std::max(1, spec_.train().log_every());
  std::FILE* metrics = nullptr;
  if (!options_.metrics_path.empty()) {
    metrics = std::fopen(options_.metrics_path.c_str(), "a");
    if (metrics == nullptr) return IoError("cannot open metrics file " + options_.metrics_path);
  }
  struct Closer {
    std::FILE* f;
    ~Closer() {
      if (f) std::fclose(f);
    }
  } closer{metrics};
  const int eval_every = spec_.eval().every();
  while (step_ < total_steps_) {
    if (stop != nullptr && stop->load()) {
      sum.interrupted = true;
      break;
    }
    ASSIGN_OR_RETURN(StepStats st, Step());
    if (saver_) {
      Status saved = saver_->Poll();
      const int every = spec_.checkpoint().every();
      if (saved.ok() && ((every > 0 && step_ % every == 0) || step_ == total_steps_)) {
        saved = SaveCheckpoint(&st.checkpoint_stall_seconds);
      }
      if (!saved.ok() && spec_.checkpoint().stop_on_error()) return saved;
    }
    if (metrics != nullptr) {
      std::fprintf(
          metrics,
          "{\"step\":%lld,\"loss\":%.9g,\"lr\":%.9g,\"grad_norm\":%.9g,"
          "\"tokens_per_s\":%.1f,\"step_s\":%.6f,\"comm_wait_s\":%.6f,\"ckpt_stall_s\":%.6f,"
          "\"applied\":%s}\n",
          static_cast<long long>(st.step + 1), st.loss, st.lr, st.grad_norm, st.tokens_per_second,
          st.seconds, st.comm_wait_seconds, st.checkpoint_stall_seconds,
          st.applied ? "true" : "false");
      std::fflush(metrics);
    }
    if (options_.on_step) options_.on_step(st);
    comm_wait_total += st.comm_wait_seconds;
    if (sum.steps == 0) sum.first_loss = st.loss;
    sum.last_loss = st.loss;
    ++sum.steps;
    if (sum.steps > 1) {  // the first step includes warm-up costs (page faults, BLAS buffers)
      timed_tokens += st.tokens_per_second * st.seconds;
      timed_seconds += st.seconds;
    }
    if (options_.log_steps && (st.step % log_every == 0 || step_ == total_steps_)) {
      spdlog::info(
          "step {:>5}/{} | loss {:.4f} | lr {:.3e} | grad-norm {:.3f}{} | {:.0f} tok/s | "
          "MFU {:.1f}%{}",
          st.step + 1, total_steps_, st.loss, st.lr, st.grad_norm,
          fp16_ ? fmt::format(" | scale {:g}", st.loss_scale) : std::string(), st.tokens_per_second,
          100.0 * st.mfu, st.applied ? "" : " | SKIPPED (overflow)");
    }
    if (eval_every > 0 && (step_ % eval_every == 0 || step_ == total_steps_)) {
      ASSIGN_OR_RETURN(sum.last_val_loss, EvalLoss());
      if (metrics != nullptr) {
        std::fprintf(metrics, "{\"step\":%lld,\"val_loss\":%.9g}\n", static_cast<long long>(step_),
                     sum.last_val_loss);
        std::fflush(metrics);
      }
      spdlog::info("step {:>5}/{} | val loss {:.4f}", step_, total_steps_, sum.last_val_loss);
    }
  }
  if (saver_) {
    Status saved = Status::Ok();
    // Interrupted between saves: keep what was trained (one process only — under mpirun a
    // stop flag would not be seen by every rank at the same step).
    if (sum.interrupted && world_size() == 1 && last_saved_step_ != step_) {
      saved = SaveCheckpoint();
    }
    Status waited = saver_->Wait();
    if (saved.ok()) saved = waited;
    if (!saved.ok() && spec_.checkpoint().stop_on_error()) return saved;
  }
  if (dev_) {  // CUDA with STRATA_CUDA_PROFILE=1: the kernel-class breakdown
    const std::string report = dev_->ProfileReport(comm_wait_total);
    if (!report.empty() && options_.log_steps) spdlog::info("{}", report);
  }
  sum.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  sum.tokens_per_second = timed_seconds > 0 ? timed_tokens / timed_seconds : 0.0;
  sum.skipped_steps = scaler_.skipped();
  return sum;
}

}  // namespace strata::worker
