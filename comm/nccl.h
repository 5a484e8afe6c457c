// NCCL backend: GPU collectives on DEVICE buffers, behind the ProcessGroup interface. The daemon
// mode's GPU backend (bootstrapped through a Store, torn down with Abort and re-formed under a
// new prefix) and the mpirun mode's (the unique id is broadcast over MPI by the caller).
//
// Assumption: one group = a fixed set of ranks, one CUDA device per rank (NCCL does not support
// two ranks of one communicator on one device: use the host-staging adapter, device_staged.h,
// for that). If the set changes, every member destroys (or aborts) its group and forms a new one.
//
// Every buffer passed to an op is a device pointer on options.device (or memory NCCL can reach
// from it). Communicators are non-blocking (ncclConfig_t.blocking = 0): init, every op and Split
// can be polled, so nothing in this backend blocks without a bound.
//
// Stream ordering (how callers order device buffers):
//  * Inputs: every op is enqueued on the group's own CUDA stream (created non-blocking). At issue
//    time the group records an event on its compute stream (options.compute_stream, or the one
//    set later with SetNcclComputeStream; nullptr = the legacy default stream) and the comm
//    stream waits on it before the op runs. So an op sees everything the caller enqueued on the
//    compute stream before calling it, without a host sync. Work on any OTHER stream must be
//    complete (or ordered before the compute stream) when the op is issued.
//  * Outputs: Work::Wait returning OK means the op has completed on the device: any stream or the
//    host may then use the buffers. Without a host wait, NcclStreamWaitForIssued(group, stream)
//    makes `stream` wait (on the device) for every op issued so far.
//  * Buffers must stay allocated until the op's Work returns OK, or the group is aborted.
//
// Point-to-point: Send/Recv are not launched at once: consecutive point-to-point ops are held
// and launched together in one ncclGroupStart/End (a "batch") at the next Wait on any of the
// group's Works, the next collective, Split or NcclStreamWaitForIssued. So a Send and a Recv
// posted after it (before any Wait) cannot deadlock each other across ranks, as the interface
// promises. NCCL has no tags and matches a pair's messages in posting order; within a batch
// they are posted sorted by (peer, direction, tag, issue order), so (src, dst, tag) triples
// match in issue order as long as both sides issue a pair's messages in the same batches
// (e.g. all of them before the first Wait). Across batches, messages match in issue order
// regardless of tags; the two sides must then issue them in the same order.
//
// Failure (the watchdog): each group has a thread that polls its ops (cudaEventQuery on an event
// recorded after each op) and ncclCommGetAsyncError. An op not complete `options.timeout` after
// it could start (its inputs ready on the compute stream and the group's earlier ops done, so
// queued compute work never counts against it), an op NCCL did not launch within
// `options.timeout`, or an asynchronous NCCL error, aborts the communicator (ncclCommAbort): the
// op fails with DEADLINE_EXCEEDED ("<group>: <op> timed out after <ms> ms (watchdog: ...)") or
// UNAVAILABLE (naming the group, the op and, for point-to-point, the peer), the other pending
// Works with "<their op> failed: <that reason>" (same code), and every later op at once.
// Work::Wait(timeout) polls the same way and, on its own timeout, also aborts the group (unlike the
// CPU backends, a late peer cannot be waited for again: a hung NCCL kernel also stalls the comm
// stream and everything ordered after it). The process stays healthy and can form new groups. When
// Abort() returns, no kernel of the group touches user memory any more (it waits, up to `timeout`,
// for the comm stream to drain: the stream may still wait for compute work its ops were ordered
// after). Peers are not told: their own ops fail by their watchdog (or sooner, when NCCL's
// transport reports the closed connection as an error).
//
// Numerics: bf16/f16 reduce through NCCL (kAvg = ncclAvg, kMax = ncclMax). Unlike the CPU
// backends, NCCL rounds to the element type at every step of its algorithm, so results over
// more than 2 ranks may differ from theirs in the last bits. One-rank groups are exact.
//
// Split is ncclCommSplit (colour = the new group's smallest parent rank, key = position in
// `ranks`): collective over the whole parent, bounded by options.timeout; on failure or timeout
// the parent is aborted too (its bootstrap may be mid-exchange). Ranks are not cross-checked:
// every member must pass the same list.
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "comm/process_group.h"
#include "comm/store.h"
#include "common/status.h"

namespace strata::comm {

// Size of an NCCL unique id (NCCL_UNIQUE_ID_BYTES; nccl.cc static_asserts that they agree).
inline constexpr size_t kNcclUniqueIdBytes = 128;

struct NcclGroupOptions {
  int rank = 0;
  int size = 1;
  // CUDA device index of this rank (cudaSetDevice numbering).
  int device = 0;
  // Rendezvous (daemon mode): rank 0 creates the unique id and sets it under "<prefix>/nccl_id";
  // the others Get it (bounded by `timeout`). Prefixes are never reused (keys are never
  // deleted): re-forming a group uses a new one, e.g. with the job's generation in it.
  std::shared_ptr<Store> store;
  std::string prefix;
  // Pre-shared id (mpirun mode): kNcclUniqueIdBytes bytes from NcclUniqueId() on one rank,
  // broadcast by the caller. When set, `store` is not used. Not needed for size == 1.
  std::string unique_id;
  // The group's name in messages; the prefix when empty, "nccl" when both are empty.
  std::string name;
  // Bounds init (including the wait for the id in the store), Split, teardown and the drain
  // after an abort, and is the watchdog's per-op limit (see above). Must be positive.
  std::chrono::milliseconds timeout = kDefaultTimeout;
  // Every op waits (on the device) for the work enqueued on this stream before it is issued.
  // A cudaStream_t of options.device; nullptr = the legacy default stream.
  void* compute_stream = nullptr;
};

// True when this build of Strata has the NCCL backend (false: CreateNcclGroup is UNIMPLEMENTED).
bool NcclAvailable();

// A new NCCL unique id (kNcclUniqueIdBytes bytes) for the caller to distribute itself, e.g. by
// MPI_Bcast from rank 0. UNAVAILABLE if NCCL cannot create one (no usable network interface),
// UNIMPLEMENTED without NCCL.
Result<std::string> NcclUniqueId();

// The mpirun mode's id exchange over any CPU group (MPI): rank 0 of `cpu_group` makes an id and
// broadcasts it (one Broadcast of 1 + kNcclUniqueIdBytes bytes, host memory); every rank returns
// the same id, to pass as NcclGroupOptions::unique_id. Collective over `cpu_group`. If rank 0
// cannot make an id, every rank returns UNAVAILABLE; the Broadcast's error (e.g.
// DEADLINE_EXCEEDED after `timeout`) otherwise. UNIMPLEMENTED without NCCL (on every rank,
// without communicating).
Result<std::string> ShareNcclUniqueId(ProcessGroup& cpu_group,
                                      std::chrono::milliseconds timeout = kDefaultTimeout);

// Forms this rank's handle on a group: every rank calls it with the same prefix or id and its
// own rank. Returns once the communicator is ready. Errors:
//   INVALID_ARGUMENT   bad rank/size/timeout/device, an id of the wrong length, or neither a
//                      store nor an id for size > 1;
//   UNAVAILABLE        no CUDA device or driver, or NCCL init failed (naming rank and group);
//   DEADLINE_EXCEEDED  the id was not published, or a rank did not join within `timeout` (the
//                      half-made communicator is aborted; the process stays usable);
//   UNIMPLEMENTED      where Strata was built without CUDA or NCCL.
Result<std::unique_ptr<ProcessGroup>> CreateNcclGroup(const NcclGroupOptions& options);

// Changes the compute stream that later ops of `group` wait for (see above). INVALID_ARGUMENT if
// `group` is not an NCCL group.
Status SetNcclComputeStream(ProcessGroup& group, void* stream);

// Makes `stream` wait on the device, without blocking the host, for every op issued on `group`
// so far (held point-to-point ops are launched first). The host blocks only while NCCL is still
// launching an earlier op (ncclInProgress, e.g. connecting on a first op), bounded by the
// group's timeout (then the group is aborted, DEADLINE_EXCEEDED). INVALID_ARGUMENT if `group` is
// not an NCCL group; the group's error if it is broken; INTERNAL on a CUDA error. `stream` then
// also waits out the watchdog: a hung op is aborted within the timeout and the stream moves on
// (check the op's Work before trusting the data).
Status NcclStreamWaitForIssued(ProcessGroup& group, void* stream);

}  // namespace strata::comm
