// The collectives a tensor-parallel GPT needs, as an interface the model calls.
//
// The model knows tensors and kernels, never sockets: the worker adapts its process group (NCCL,
// MPI, Gloo, in-process) to this class and hands it to Gpt::Create. One instance per TP rank.
//
// Assumptions (a Megatron TP group): a fixed set of `size()` ranks; every rank calls the same
// collectives, in the same order, with the same counts and types; every rank receives bitwise
// identical results (the model relies on it to keep replicated activations and replicated
// parameters' gradients identical across the group). If the group changes, the model built on
// it must be destroyed.
#pragma once

#include <cstdint>

#include "common/status.h"
#include "model/dtype.h"

namespace strata::model {

class TensorParallelComm {
 public:
  virtual ~TensorParallelComm() = default;

  virtual int rank() const = 0;  // in [0, size())
  virtual int size() const = 0;  // >= 1

  // buf[0, count) = sum over the TP group, in place. `type` is f32, bf16 or f16; low-precision
  // values are summed in fp32 and rounded once. Returns OK on success; on failure (timeout, peer
  // gone, aborted group) returns the error and leaves buf unspecified.
  [[nodiscard]] virtual Status AllReduceSum(void* buf, int64_t count, DType type) = 0;
  // buf[0, count) = element-wise max over the TP group, in place (fp32; -inf is a valid input).
  // Errors as AllReduceSum.
  [[nodiscard]] virtual Status AllReduceMax(float* buf, int64_t count) = 0;
};

}  // namespace strata::model
