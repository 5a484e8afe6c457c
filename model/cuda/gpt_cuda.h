// The GPT of model/gpt.h on one CUDA device: the same tensors, layout, initialisation, tensor
// and pipeline parallelism, activation slots, recompute and gradient-ready callbacks as the CPU
// model (model/gpt.cc, the reference), with every buffer in device memory.
//
// Memory. The fp32 master weights, the fp32 gradients (params() / grads(): DEVICE pointers), the
// bf16/fp16 compute copy and every activation and scratch buffer are taken from one
// CudaAllocator at Create, sized for max_batch x max_seq: the step loop never allocates.
//
// Streams and syncs. All work is queued on the model's one compute stream (stream()). The host
// waits only where a value must reach it: ForwardStage on the last stage copies the loss back
// (one scalar per micro-batch); on a pipeline stage that is not last, ForwardStage copies its
// output activation back, and BackwardStage on a stage that is not first its input gradient.
// Tensor-parallel all-reduces are called on DEVICE buffers: the TensorParallelComm must accept
// them (an NCCL group whose compute stream is stream(), or a host-staging adapter) and order its
// op after the work queued on stream() before the call; the model queues nothing that touches
// the buffer until the call has returned.
//
// Host pointers in the interface. tokens, targets (ForwardStage) are host memory, copied in.
// Pipeline activations (input / output of ForwardStage, doutput / dinput of BackwardStage) stay
// HOST fp32 buffers, copied in and out through pinned staging: worker/pipeline.cc sends host
// memory between stages in v1 (device-to-device pipeline transfers are future work).
//
// Numerics. Same order of operations as the CPU model where the kernels allow; GEMMs use
// cuBLASLt with fp32 accumulation (TF32 off for fp32 compute), so fp32 results agree with the
// CPU to rounding, not bitwise. InitWeights gives bitwise the CPU model's master weights (they
// are drawn on the host by the CPU model's code and uploaded).
//
// Errors. Kernel launches and copies return Status; ForwardStage / BackwardStage return the
// first one with context. Methods of the Gpt interface that return void (InitWeights,
// RefreshComputeWeights, ZeroGrad) keep their first error and the next ForwardStage,
// BackwardStage or Copy* call returns it. A failed collective: as the CPU model.
//
// Threads: the model is used by one thread at a time; each public method makes the model's
// device current for the calling thread (ranks-as-threads tests share a GPU).
#pragma once

#include <memory>

#include "common/status.h"
#include "model/cuda/device_cuda.h"
#include "model/cuda/kernel_timer.h"
#include "model/gpt.h"

namespace strata::model {

// The device-side view the trainer needs beyond the Gpt interface.
class CudaGpt : public Gpt {
 public:
  Device device() const override { return Device::kCuda; }
  virtual int device_index() const = 0;
  // The cudaStream_t every kernel of the model is queued on.
  virtual void* stream() const = 0;
  // The bf16/fp16 compute copy of params() (device, num_params() elements of compute_dtype()),
  // or nullptr for fp32 compute.
  virtual void* compute_params() = 0;
  // The allocator the model's memory comes from; the trainer takes its optimizer state from it
  // (those blocks must be freed before the model is destroyed).
  virtual CudaAllocator& allocator() = 0;
  // Waits for the model's queued work; returns the first device error (or a kept one).
  virtual Status Synchronize() = 0;
  // Per-kernel-class device times of the model's kernels, when the environment had
  // STRATA_CUDA_PROFILE=1 at Create (nullptr otherwise). Times are folded in at the model's
  // synchronisation points (the loss copy, pipeline copies, TP collectives, Synchronize).
  virtual KernelTimer* timer() = 0;
};

// Builds the CUDA model on device `device_index` (cudaSetDevice numbering). Arguments and their
// INVALID_ARGUMENT errors are those of Gpt::Create; in addition UNAVAILABLE when no CUDA device
// is visible, INVALID_ARGUMENT for a device index out of range or a head size the attention
// kernels do not support, RESOURCE_EXHAUSTED when the device memory does not hold the model.
// The weights are zero until InitWeights (or CopyParamsFromHost).
Result<std::unique_ptr<Gpt>> CreateCudaGpt(const GptConfig& config, DType compute, int max_batch,
                                           int max_seq, TensorParallelComm* tp,
                                           const PipelineStage& stage, int num_slots,
                                           int device_index);

}  // namespace strata::model
