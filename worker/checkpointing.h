// Saving and restoring a trainer's state through the checkpoint store (checkpoint/store.h).
//
// CheckpointSaver writes one rank's shards of a step and, on the committing rank, commits the
// manifest once every rank's shards are durable, then applies retention. Asynchronous mode:
// Save() copies the state into one host staging buffer and returns; a background thread writes
// it. The buffer is reused: a new Save() first waits until the previous save has finished
// (written and, on the committer, committed), so a buffer is never overwritten while its save
// is in flight and memory stays bounded by one copy of this rank's state. Synchronous mode:
// Save() returns when the save has finished.
//
// A failed save (disk full, fsync error, a rank that never reports) is logged, leaves every
// committed checkpoint intact, and is returned once by the next Save(), Poll() or Wait(), so
// the trainer decides whether it stops training (checkpoint.stop_on_error).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/store.h"
#include "common/status.h"
#include "model/gpt.h"
#include "proto/checkpoint.pb.h"

namespace strata::worker {

// How local elements [begin, end) of a model tensor map onto its global tensor.
proto::ShardLayout LayoutOf(const model::ParamTensor& t, int64_t begin, int64_t end);

struct SaveItem {
  std::string tensor;
  proto::ShardLayout layout;  // elements [begin, end) of the local tensor
  const float* data = nullptr;
};

struct SaverOptions {
  std::shared_ptr<checkpoint::Storage> storage;
  std::string root;
  int rank = 0;
  int world = 1;
  bool commit = true;  // this rank commits (world rank 0 under mpirun; the coordinator otherwise)
  bool async = true;
  checkpoint::RetentionPolicy retention;
  std::chrono::milliseconds commit_timeout{600000};
  std::string tag;  // instance tag (checkpoint/store.h InstanceName); daemon mode: "g<generation>"
  // Checked right before a commit and before retention deletes anything; an error skips both
  // (daemon mode: the rank's generation is no longer current).
  std::function<Status()> fence;
  // Called (on the saving thread) once this rank's shards of a step are durable — `written` OK —
  // or failed to be written, with the manifest this rank would commit (everything but the
  // shards). Daemon mode reports it to the coordinator, which commits (commit = false there).
  std::function<void(const proto::Manifest& manifest, const Status& written)> on_written;
};

class CheckpointSaver {
 public:
  explicit CheckpointSaver(SaverOptions options);
  // Waits for the save in flight to be written, but not for peers that never report: a commit
  // still waiting for other ranks is cancelled (the checkpoint stays uncommitted).
  ~CheckpointSaver();
  CheckpointSaver(const CheckpointSaver&) = delete;
  CheckpointSaver& operator=(const CheckpointSaver&) = delete;

  // Saves `items` (data read during this call only in async mode) as step manifest.step();
  // `manifest` carries everything but the shards. Returns the status of the previous save when
  // that one failed and was not reported yet, else that of this one in synchronous mode.
  // *stall_seconds (optional) receives the time the caller was blocked (waiting for the
  // previous save plus copying, in async mode).
  Status Save(const proto::Manifest& manifest, const std::vector<SaveItem>& items,
              double* stall_seconds = nullptr);
  // Async mode: allocates (and touches) the staging buffer for `floats` values now, so that the
  // first save does not pay for page faults inside the step loop.
  void Reserve(size_t floats);
  // Waits for the save in flight; returns its status if not reported yet.
  Status Wait();
  // Non-blocking: the status of a finished, unreported save, or OK.
  Status Poll();
  int64_t last_committed_step() const;
  // Ends a commit that is waiting for other ranks (CANCELLED; nothing committed) — for a rank
  // being aborted, whose peers may be gone. Thread-safe; later saves are not affected.
  void CancelCommitWait() { cancel_.store(true); }

 private:
  void Run(proto::Manifest manifest, std::vector<SaveItem> items);  // background or inline
  Status TakeResult();

  SaverOptions options_;
  std::vector<float> staging_;
  std::thread thread_;
  std::atomic<bool> cancel_{false};
  mutable std::mutex mu_;
  bool done_ = true;         // GUARDED_BY(mu_)
  bool unreported_ = false;  // GUARDED_BY(mu_)
  Status result_;            // GUARDED_BY(mu_)
  int64_t committed_ = -1;   // GUARDED_BY(mu_)
};

}  // namespace strata::worker
