// Host staging: lets a CPU backend (MPI, Gloo, in-process) serve DEVICE buffers, by copying them
// through pinned host memory around each op. This is the slow path, for when NCCL cannot be
// used: e.g. two ranks sharing one GPU (NCCL needs one device per rank) under mpirun, or a
// build without NCCL. Every byte crosses PCIe twice and the host synchronises with the device
// at every op, so it is not for the step loop of a multi-GPU run.
//
// Per op: at issue, the device inputs are copied to a pinned host buffer (cudaMemcpyAsync on
// options.stream, then a synchronisation of that stream, so the copy sees everything enqueued
// on it before the call) and the inner op is issued on the host buffers. Work::Wait waits for
// the inner op and, when it is OK, copies the outputs back to the device buffers (again on
// options.stream, synchronised before Wait returns). So:
//  * device inputs must be complete on options.stream (or before it) when the op is issued;
//  * device outputs are written only inside Wait: an op whose Work is never waited for leaves
//    its output buffer untouched;
//  * the staging buffers live until the op is complete (a Work destroyed early hands them to
//    the group, which frees them after the inner group is destroyed).
// Buffers may also be host memory (copies use cudaMemcpyDefault, which needs a CUDA driver).
// Errors of the copies are UNAVAILABLE (no device/driver) or INTERNAL, naming the group and op;
// the inner backend's errors pass through unchanged. Split wraps the inner group's result.
// Pinned buffers are cached per group (reused for later ops of the same or smaller size).
//
// Built only with CUDA; without it WrapWithHostStaging returns `inner` unchanged (there is no
// device memory to stage).
#pragma once

#include <memory>

#include "comm/process_group.h"

namespace strata::comm {

struct HostStagingOptions {
  // The CUDA device of the buffers (made current around each copy).
  int device = 0;
  // The stream that produces the inputs and consumes the outputs (a cudaStream_t of `device`);
  // nullptr = the legacy default stream.
  void* stream = nullptr;
};

std::unique_ptr<ProcessGroup> WrapWithHostStaging(std::unique_ptr<ProcessGroup> inner,
                                                  const HostStagingOptions& options = {});

}  // namespace strata::comm
