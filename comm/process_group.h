// Process groups: the collectives Strata's engine needs, behind one interface, with three
// backends chosen at run time (one backend per file): in-process (ranks are threads, for unit
// tests), MPI (under mpirun) and Gloo (TCP, bootstrapped through a key-value Store; the daemon
// mode's backend, because a Gloo group can be destroyed and re-formed inside a live process).
// NCCL joins later behind the same interface (the GPU issue).
//
// Assumption (as in PyTorch c10d): a group is a fixed set of processes/threads. If the set
// changes, every member destroys its group and builds a new one (Gloo, in-process); MPI groups
// live as long as MPI_COMM_WORLD.
//
// Every collective is asynchronous: it returns a Work handle, and Work::Wait(timeout) returns
//   OK                  when this rank's part is complete and its output buffers may be read,
//   DEADLINE_EXCEEDED   "<group>: <op> timed out after <ms> ms" when it did not finish in time
//                       (e.g. a peer never joined); the group is then unusable (Abort() it),
//   UNAVAILABLE / INTERNAL on a transport error, naming the group, the op and the peer if known,
//   CANCELLED           when the group was aborted (by this rank or, in-process, by a peer),
//   INVALID_ARGUMENT    for a bad root/peer/tag, or (in-process) ranks that disagree on the op.
// Buffers must stay valid until Wait returns OK. After DEADLINE_EXCEEDED the op may still be in
// flight: Wait may be called again (it completes if the late peer joins), or the group must be
// aborted/destroyed before the buffers are released; when Abort() returns (in-process, Gloo) no
// op of the group touches user memory any more. MPI cannot cancel a collective: the buffers of
// an MPI op that never completes must outlive the process (a failure ends an MPI run anyway).
// Collectives must be issued in the same order on every rank of a group. count may be 0.
// A group's methods may be called from several threads; the issue order is the order of calls.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"

namespace strata::comm {

enum class ElemType { kF32, kF64, kI32, kI64, kU8, kBF16, kF16 };
size_t ElemSize(ElemType t);

// kAvg divides by the group size after summing (integer types: truncating division).
// bf16/f16 reduce in fp32 and round once.
enum class ReduceOp { kSum, kAvg, kMax };

class Work {
 public:
  virtual ~Work() = default;
  [[nodiscard]] virtual Status Wait(std::chrono::milliseconds timeout) = 0;
};

inline constexpr std::chrono::milliseconds kDefaultTimeout{30000};

class ProcessGroup {
 public:
  virtual ~ProcessGroup() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // For messages: e.g. "world", "tp[0]", "dp[3]".
  virtual const std::string& name() const = 0;

  // In place: buf[0..count) on every rank becomes the reduction over ranks.
  virtual std::unique_ptr<Work> AllReduce(void* buf, size_t count, ElemType type, ReduceOp op) = 0;
  // in: size() * count elements; out: count elements = block rank() of the reduction.
  virtual std::unique_ptr<Work> ReduceScatter(const void* in, void* out, size_t count,
                                              ElemType type, ReduceOp op) = 0;
  // in: count elements; out: size() * count elements, block r from rank r.
  virtual std::unique_ptr<Work> AllGather(const void* in, void* out, size_t count,
                                          ElemType type) = 0;
  virtual std::unique_ptr<Work> Broadcast(void* buf, size_t count, ElemType type, int root) = 0;
  // Point to point; a (src, dst, tag) triple matches in issue order and the counts must agree.
  // A Send may complete only once its Recv is posted (in-process and Gloo are rendezvous; MPI
  // may buffer small messages), so post Recvs before waiting on Sends.
  virtual std::unique_ptr<Work> Send(const void* buf, size_t count, ElemType type, int dst,
                                     int tag) = 0;
  virtual std::unique_ptr<Work> Recv(void* buf, size_t count, ElemType type, int src, int tag) = 0;
  virtual std::unique_ptr<Work> Barrier() = 0;

  // Sub-group of the given ranks of this group (in that order; this rank must be among them).
  // Collective over this whole group: every rank calls it with its own sub-group's ranks, in
  // the same order of calls. `name` is the new group's name.
  virtual Result<std::unique_ptr<ProcessGroup>> Split(const std::vector<int>& ranks,
                                                      const std::string& name) = 0;

  // Tears the group down after a failure or timeout; pending Works then fail (CANCELLED) and
  // later ops fail at once. Peers notice: in-process their pending ops fail too, Gloo closes the
  // connections; MPI only marks the local handle. Idempotent. Destroying a group with ops of
  // this rank in flight aborts it first.
  virtual void Abort() = 0;
};

}  // namespace strata::comm
