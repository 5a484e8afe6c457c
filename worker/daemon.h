// The worker daemon (architecture mode 3): a long-lived process per device that registers with
// the coordinator's control plane, heartbeats, and runs the ranks it is assigned with the same
// Trainer as `strata train` / `strata-worker` — its process groups are Gloo groups formed
// through the coordinator's rendezvous store (comm/tcp_store.h) under the job's generation.
//
// On AbortJob (or a failed collective, which it reports in RankExit) it aborts its groups, drops
// the trainer and waits for the next assignment without exiting; messages of another generation
// than the one it runs are ignored. When the coordinator goes away it reconnects (with backoff)
// and registers again; a rank it was running is aborted (the coordinator re-plans).
#pragma once

#include <atomic>
#include <chrono>
#include <string>

#include "common/status.h"

namespace strata::worker {

struct DaemonOptions {
  std::string coordinator = "127.0.0.1:8471";  // the control plane's HOST:PORT
  std::string worker_id;                       // default: <host>:<pid>
  std::string host = "127.0.0.1";  // the address peers reach this worker at (Gloo binds it)
  int threads = -1;                // compute threads (-1: the job's resources.threads)
  std::string secret;              // the control plane's shared secret, if it has one
  std::chrono::milliseconds collective_timeout{10000};
  // "cpu" or "cuda": registered with the coordinator, which assigns this worker only jobs of
  // that resources.device. With cuda the rank trains on CUDA device `cuda_device`; its data-
  // and tensor-parallel groups are Gloo groups wrapped with host staging (comm/device_staged.h:
  // correct, not fast — NCCL through the rendezvous store is not wired into daemon mode yet).
  std::string device = "cpu";
  int cuda_device = 0;
};

// Runs until *stop becomes true. Returns OK then; INVALID_ARGUMENT for bad options or when the
// coordinator refuses the registration (wrong secret).
Status RunWorkerDaemon(const DaemonOptions& options, const std::atomic<bool>* stop);

}  // namespace strata::worker
