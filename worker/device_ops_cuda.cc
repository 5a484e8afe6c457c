// DeviceOps and the CUDA model for builds with CUDA; contract in device_ops.h.
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "model/cuda/adamw_cuda.h"
#include "model/cuda/cuda_runtime_info.h"
#include "model/cuda/device_cuda.h"
#include "model/cuda/gpt_cuda.h"
#include "model/cuda/kernel_timer.h"
#include "model/cuda/reduce_cuda.h"
#include "worker/device_ops.h"

namespace strata::worker {
namespace {

class CudaDeviceOps final : public DeviceOps {
 public:
  explicit CudaDeviceOps(model::CudaGpt& model) : model_(model) {}
  ~CudaDeviceOps() override {
    model::CudaSetDevice(model_.device_index()).IgnoreError();
    model_.Synchronize().IgnoreError();  // nothing queued may still use the blocks
    for (void* p : blocks_) model_.allocator().Free(p);
  }

  Status Init() {
    reduce_bytes_ = model::CudaReduceWorkspace(model_.num_params());
    ASSIGN_OR_RETURN(reduce_ws_, Allocate(reduce_bytes_));
    return Status::Ok();
  }

  Result<void*> Allocate(size_t bytes) override {
    RETURN_IF_ERROR(model::CudaSetDevice(model_.device_index()));
    ASSIGN_OR_RETURN(void* p, model_.allocator().Allocate(bytes));
    blocks_.push_back(p);
    if (bytes > 0) RETURN_IF_ERROR(model::CudaMemsetZero(p, bytes, stream()));
    return p;
  }
  Status ToHost(void* host_dst, const void* src, size_t bytes) override {
    RETURN_IF_ERROR(model::CudaSetDevice(model_.device_index()));
    RETURN_IF_ERROR(model::CudaCopyDeviceToHost(host_dst, src, bytes, stream()));
    return model::CudaStreamSynchronize(stream());
  }
  Status ToDevice(void* dst, const void* host_src, size_t bytes) override {
    RETURN_IF_ERROR(model::CudaSetDevice(model_.device_index()));
    RETURN_IF_ERROR(model::CudaCopyHostToDevice(dst, host_src, bytes, stream()));
    return model::CudaStreamSynchronize(stream());
  }
  Status Copy(void* dst, const void* src, size_t bytes) override {
    return model::CudaCopyDeviceToDevice(dst, src, bytes, stream());
  }
  Status Zero(void* dst, size_t bytes) override {
    return model::CudaMemsetZero(dst, bytes, stream());
  }
  Status Synchronize() override { return model_.Synchronize(); }
  Status SumOfSquares(double* out, const float* x, int64_t n, bool accumulate) override {
    return model::CudaSumOfSquares(out, x, n, accumulate, reduce_ws_, reduce_bytes_, stream());
  }

  Status InitOptimizer(const model::AdamWConfig& config, int64_t offset, int64_t count) override {
    config_ = config;
    offset_ = offset;
    count_ = count;
    const size_t n = static_cast<size_t>(count);
    ASSIGN_OR_RETURN(void* m, Allocate(n * sizeof(float)));
    ASSIGN_OR_RETURN(void* v, Allocate(n * sizeof(float)));
    ASSIGN_OR_RETURN(void* d, Allocate(n));
    m_ = static_cast<float*>(m);
    v_ = static_cast<float*>(v);
    decay_ = static_cast<uint8_t*>(d);
    // The mask of model::AdamW: 1 over every tensor with decay, within the owned range.
    std::vector<uint8_t> mask(n, 0);
    for (const model::ParamTensor& t : model_.tensors()) {
      if (!t.decay) continue;
      const int64_t lo = std::max(t.offset, offset),
                    hi = std::min(t.offset + t.numel, offset + count);
      for (int64_t i = lo; i < hi; ++i) mask[static_cast<size_t>(i - offset)] = 1;
    }
    return ToDevice(decay_, mask.data(), n);
  }
  float* m() override { return m_; }
  float* v() override { return v_; }

  Status Update(float* params, const float* grads, const DeviceAdamWStep& a) override {
    model::CudaAdamWArgs args;
    args.lr = a.lr;
    args.beta1 = config_.beta1;
    args.beta2 = config_.beta2;
    args.eps = config_.eps;
    args.weight_decay = config_.weight_decay;
    args.step = a.step;
    args.grad_scale = a.grad_scale;
    void* compute = nullptr;
    if (a.refresh_compute && model_.compute_params() != nullptr) {
      compute = static_cast<char*>(model_.compute_params()) +
                static_cast<size_t>(offset_) * model::DTypeSize(model_.compute_dtype());
    }
    auto launch = [&] {
      return model::CudaAdamWUpdate(params, grads, m_, v_, decay_, compute, model_.compute_dtype(),
                                    args, count_, stream());
    };
    model::KernelTimer* timer = model_.timer();
    return timer ? timer->Time(model::KernelTimer::kOptimizer, stream(), launch) : launch();
  }

  std::string ProfileReport(double comm_seconds) override {
    model::KernelTimer* timer = model_.timer();
    if (timer == nullptr) return "";
    model_.Synchronize().IgnoreError();  // folds the last times in
    double total = comm_seconds * 1e3;
    for (int c = 0; c < model::KernelTimer::kNumClasses; ++c) total += timer->ms(c);
    std::string out = "CUDA profile (device ms per kernel class, % of the listed total):";
    char line[160];
    for (int c = 0; c < model::KernelTimer::kNumClasses; ++c) {
      std::snprintf(line, sizeof(line), "\n  %-10s %12.1f ms %6.1f%% %10lld launches",
                    model::KernelTimer::Name(c), timer->ms(c),
                    total > 0 ? 100.0 * timer->ms(c) / total : 0.0,
                    static_cast<long long>(timer->calls(c)));
      out += line;
    }
    std::snprintf(line, sizeof(line), "\n  %-10s %12.1f ms %6.1f%% (host time blocked)", "comm",
                  comm_seconds * 1e3, total > 0 ? 100.0 * comm_seconds * 1e3 / total : 0.0);
    out += line;
    return out;
  }

  void* stream() const override { return model_.stream(); }
  int device() const override { return model_.device_index(); }

 private:
  model::CudaGpt& model_;
  std::vector<void*> blocks_;
  void* reduce_ws_ = nullptr;
  size_t reduce_bytes_ = 0;
  model::AdamWConfig config_;
  int64_t offset_ = 0, count_ = 0;
  float* m_ = nullptr;
  float* v_ = nullptr;
  uint8_t* decay_ = nullptr;
};

}  // namespace

Status CudaUsable() {
  if (model::CudaDeviceCount() == 0) {
    return Status(StatusCode::kUnavailable,
                  "resources.device: cuda, but no CUDA device is visible");
  }
  return Status::Ok();
}

int VisibleCudaDevices() { return model::CudaDeviceCount(); }

Result<std::unique_ptr<model::Gpt>> CreateCudaModel(const model::GptConfig& config,
                                                    model::DType compute, int max_batch,
                                                    int max_seq, model::TensorParallelComm* tp,
                                                    const model::PipelineStage& stage,
                                                    int num_slots, int device) {
  RETURN_IF_ERROR(CudaUsable());
  return model::CreateCudaGpt(config, compute, max_batch, max_seq, tp, stage, num_slots, device);
}

Result<std::unique_ptr<DeviceOps>> CreateDeviceOps(model::Gpt& model) {
  RETURN_IF_ERROR(CudaUsable());
  CHECK_MSG(model.device() == model::Device::kCuda, "CreateDeviceOps needs a CUDA model");
  auto ops = std::make_unique<CudaDeviceOps>(static_cast<model::CudaGpt&>(model));
  RETURN_IF_ERROR(ops->Init());
  return std::unique_ptr<DeviceOps>(std::move(ops));
}

}  // namespace strata::worker
