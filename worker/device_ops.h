// What the trainer needs from an accelerator, as plain C++: building the device model, and the
// few device operations of the optimizer step (copies, the gradient norm's sum of squares, the
// fused AdamW update). One implementation per build, chosen by CMake (one backend per file):
// device_ops_cuda.cc where CUDA was found at configure time (STRATA_HAVE_CUDA), else
// device_ops_unavailable.cc, whose every entry point says that the build has no CUDA.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "common/status.h"
#include "model/gpt.h"
#include "model/optimizer.h"

namespace strata::worker {

// OK when `device: cuda` can run here; INVALID_ARGUMENT "resources.device: cuda, but this build
// has no CUDA (nvcc not found at configure time)" without CUDA; UNAVAILABLE "resources.device:
// cuda, but no CUDA device is visible" when the build has CUDA but the process sees no device.
Status CudaUsable();

// Number of visible CUDA devices (0 without CUDA).
int VisibleCudaDevices();

// The CUDA model (model/cuda/gpt_cuda.h, arguments as model::Gpt::Create) on `device`. Errors:
// those of CudaUsable, then those of CreateCudaGpt.
Result<std::unique_ptr<model::Gpt>> CreateCudaModel(const model::GptConfig& config,
                                                    model::DType compute, int max_batch,
                                                    int max_seq, model::TensorParallelComm* tp,
                                                    const model::PipelineStage& stage,
                                                    int num_slots, int device);

struct DeviceAdamWStep {
  float lr = 0.f;
  int64_t step = 1;             // from 1
  float grad_scale = 1.0f;      // 1/loss scale times the clip coefficient
  bool refresh_compute = true;  // also write the model's compute copy of the updated range
};

// Device memory and operations on a CUDA model's stream and allocator. Every pointer below is
// a device pointer unless named host. "Queued" operations return once launched (errors of the
// kernels surface at the next waiting call); "waits" operations return when done.
class DeviceOps {
 public:
  virtual ~DeviceOps() = default;

  // Device memory owned by this object (freed with it), zeroed. RESOURCE_EXHAUSTED when full.
  virtual Result<void*> Allocate(size_t bytes) = 0;
  virtual Status ToHost(void* host_dst, const void* src, size_t bytes) = 0;    // waits
  virtual Status ToDevice(void* dst, const void* host_src, size_t bytes) = 0;  // waits
  virtual Status Copy(void* dst, const void* src, size_t bytes) = 0;           // queued
  virtual Status Zero(void* dst, size_t bytes) = 0;                            // queued
  virtual Status Synchronize() = 0;  // waits for the model's stream
  // *out (double) = (accumulate ? *out : 0) + sum of x[i]^2. Queued.
  virtual Status SumOfSquares(double* out, const float* x, int64_t n, bool accumulate) = 0;

  // AdamW state (m, v zero) for elements [offset, offset + count) of the model's flat buffer,
  // and the weight-decay mask from ParamTensor::decay. Call once before Update.
  virtual Status InitOptimizer(const model::AdamWConfig& config, int64_t offset, int64_t count) = 0;
  virtual float* m() = 0;  // count elements
  virtual float* v() = 0;
  // One AdamW update of the owned range: params / grads point at the range's first element.
  // When args.refresh_compute, the model's compute copy of the range is written in the same
  // pass (bf16/fp16 models). Queued.
  virtual Status Update(float* params, const float* grads, const DeviceAdamWStep& args) = 0;

  // The per-kernel-class device-time breakdown (gemm, attention, norm+act, xent, embedding,
  // copy, optimizer) when env STRATA_CUDA_PROFILE=1 was set at model creation, with
  // `comm_seconds` (host time blocked in collectives) as the comm class; "" otherwise.
  virtual std::string ProfileReport(double comm_seconds) = 0;

  // The model's stream (a cudaStream_t): collectives on device buffers order after it.
  virtual void* stream() const = 0;
  virtual int device() const = 0;
};

// For a model whose device() is kCuda (built by CreateCudaModel); must be destroyed before the
// model. Without CUDA: the CudaUsable error.
Result<std::unique_ptr<DeviceOps>> CreateDeviceOps(model::Gpt& model);

}  // namespace strata::worker
