// Gloo backend: CPU collectives over TCP, bootstrapped through a Store (store.h). This is the
// daemon mode's CPU backend: a group can be torn down (Abort / destroy) and a new one formed in
// the same process under a new prefix, e.g. after the coordinator bumps the job's generation.
//
// Gloo's algorithms block, so each group runs its collectives in order on its own worker
// thread; the ProcessGroup interface stays asynchronous and Work::Wait can time out. Gloo's own
// per-op timeout is set to the group's timeout, so an op stuck on a dead peer ends by itself.
// Point-to-point ops are posted at issue time and completed on a second thread, so a Send
// queued behind a blocking collective can never deadlock an exchange.
// After any transport error or Gloo timeout the group is broken: later ops fail at once.
// Gloo exceptions never leave this backend; they become Status values.
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "comm/process_group.h"
#include "comm/store.h"

namespace strata::comm {

struct GlooOptions {
  // The address this rank listens on and advertises through the store. Loopback by default;
  // a host name or IP for multi-host. Ignored when `iface` is set.
  std::string hostname = "127.0.0.1";
  // A network interface name ("lo", "eth0") to bind instead of a host name.
  std::string iface;
  // The group's name in messages; the prefix when empty.
  std::string name;
};

// Forms a group of `size` ranks through `store`: every rank calls it with the same prefix
// (unique per group generation: keys are never reused) and its own rank. Blocks until all
// ranks have connected. `timeout` bounds the rendezvous and is every Gloo op's own timeout.
// INVALID_ARGUMENT for bad rank/size, DEADLINE_EXCEEDED if a rank does not show up in time,
// UNAVAILABLE if connecting fails, UNIMPLEMENTED where Strata was built without Gloo.
Result<std::unique_ptr<ProcessGroup>> MakeGlooGroup(std::shared_ptr<Store> store,
                                                    const std::string& prefix, int rank, int size,
                                                    std::chrono::milliseconds timeout,
                                                    const GlooOptions& options = {});

}  // namespace strata::comm
