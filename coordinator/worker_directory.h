// WorkerDirectory: what the API server needs to know about workers, provided by the control
// plane (worker registry). The API server only reads through it (GET /v1/workers, /metrics).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace strata::coordinator {

struct WorkerInfo {
  std::string id;      // unique per registration
  std::string host;    // "host:port" or hostname the worker registered with
  std::string device;  // "cpu", "cuda:0", ...
  int64_t memory_bytes = 0;
  std::string state;                 // e.g. "idle", "busy", "lost" (the control plane's words)
  std::string job_id;                // job it is assigned to ("" when none)
  double heartbeat_lag_seconds = 0;  // time since its last heartbeat
};

// Implementations must be thread-safe: List may be called from several API threads at once.
class WorkerDirectory {
 public:
  virtual ~WorkerDirectory() = default;
  virtual std::vector<WorkerInfo> List() = 0;
};

// No workers: the directory until the control plane provides one.
class EmptyWorkerDirectory : public WorkerDirectory {
 public:
  std::vector<WorkerInfo> List() override { return {}; }
};

}  // namespace strata::coordinator
