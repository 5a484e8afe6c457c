// Adapts a comm::ProcessGroup (the tensor-parallel group) to the model's TensorParallelComm, so
// that model/ calls collectives without knowing process groups or transports.
#pragma once

#include <chrono>

#include "comm/process_group.h"
#include "model/tensor_parallel.h"

namespace strata::worker {

class ProcessGroupTpComm final : public model::TensorParallelComm {
 public:
  // `group` must outlive this object. Each collective waits up to `timeout`.
  ProcessGroupTpComm(comm::ProcessGroup* group, std::chrono::milliseconds timeout)
      : group_(group), timeout_(timeout) {}

  int rank() const override { return group_->rank(); }
  int size() const override { return group_->size(); }
  Status AllReduceSum(void* buf, int64_t count, model::DType type) override;
  Status AllReduceMax(float* buf, int64_t count) override;

 private:
  comm::ProcessGroup* group_;
  std::chrono::milliseconds timeout_;
};

}  // namespace strata::worker
