// In-process backend: every rank is a thread of one process, and data moves through shared
// memory. It is the fake backend of the engine's unit tests (no network, deterministic), with
// the full contract of process_group.h: timeouts, Abort, Split, mismatched-op detection.
//
//   InProcessWorld world(4);                       // once, shared by the 4 rank threads
//   // in thread r:
//   ASSIGN_OR_RETURN(auto pg, MakeInProcessGroup(world, r));
//
// How it works: the k-th collective of every rank meets in one shared slot; the last rank to
// arrive computes the result for everybody under the group's mutex (so no rank ever reads a
// buffer another rank is writing), then wakes the waiters. Point-to-point messages are copied
// directly from the sender's buffer into the receiver's when both sides are posted.
// Abort (or destroying a group with ops in flight) fails every pending op of the group on
// every rank at once: the shared state stands in for the network.
#pragma once

#include <memory>

#include "comm/process_group.h"

namespace strata::comm {

namespace internal {
struct InProcessRegistry;
}

class InProcessWorld {
 public:
  // size >= 1 (CHECKed: a programming error in a test, not user input).
  explicit InProcessWorld(int size);
  ~InProcessWorld();
  InProcessWorld(const InProcessWorld&) = delete;
  InProcessWorld& operator=(const InProcessWorld&) = delete;

  int size() const { return size_; }

 private:
  friend Result<std::unique_ptr<ProcessGroup>> MakeInProcessGroup(InProcessWorld&, int);
  int size_;
  std::shared_ptr<internal::InProcessRegistry> registry_;
};

// Rank `rank`'s handle on the world group (named "world"). Each rank calls it once per group
// generation: the n-th call of every rank joins the n-th world group, so a test can destroy
// the groups and form new ones. INVALID_ARGUMENT if rank is outside [0, world.size()).
// Groups may outlive the InProcessWorld object.
Result<std::unique_ptr<ProcessGroup>> MakeInProcessGroup(InProcessWorld& world, int rank);

}  // namespace strata::comm
