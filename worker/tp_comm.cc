#include "worker/tp_comm.h"

namespace strata::worker {
namespace {

comm::ElemType ToElemType(model::DType t) {
  switch (t) {
    case model::DType::kF32:
      return comm::ElemType::kF32;
    case model::DType::kBF16:
      return comm::ElemType::kBF16;
    case model::DType::kF16:
      return comm::ElemType::kF16;
  }
  return comm::ElemType::kF32;
}

}  // namespace

Status ProcessGroupTpComm::AllReduceSum(void* buf, int64_t count, model::DType type) {
  return group_->AllReduce(buf, static_cast<size_t>(count), ToElemType(type), comm::ReduceOp::kSum)
      ->Wait(timeout_);
}

Status ProcessGroupTpComm::AllReduceMax(float* buf, int64_t count) {
  return group_
      ->AllReduce(buf, static_cast<size_t>(count), comm::ElemType::kF32, comm::ReduceOp::kMax)
      ->Wait(timeout_);
}

}  // namespace strata::worker
