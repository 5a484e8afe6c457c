// The checkpoint store: named tensor shards in RocksDB instances under a checkpoint root, and
// the manifests that commit them.
//
// Layout of a checkpoint root (a local directory, or a shared filesystem across hosts):
//   ROOT/manifest/                      RocksDB: "commit/<step, 12 digits>" -> proto::Manifest
//   ROOT/step-<8 digits>/rank-<5 digits>/         one RocksDB instance per writing rank
//   ROOT/step-<8 digits>/rank-<5 digits>.durable  that rank's proto::ShardIndex, once durable
//   ROOT/step-<8 digits>/rank-<5 digits>.failed   the error of a failed save
// A shard is stored as keys "<tensor>#<chunk, 6 digits>" of chunk_bytes each, bulk-loaded as a
// few SST files (written once, no write-ahead log) and ingested into the rank's instance.
// One writer per instance (RocksDB allows one writing process); readers open read-only.
//
// The commit rule: the committer writes a step's manifest, in one synced WriteBatch, only after
// every rank's durable marker exists; that write is the commit. Nothing uncommitted is ever
// loaded, and "latest" means the latest committed step. Deleting a checkpoint first removes its
// manifest (synced), then its files, so a crash in between leaves only uncommitted garbage.
//
// Every file and RocksDB access goes through a Storage (a file system that tests can fault).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/checkpoint.pb.h"

namespace strata::checkpoint {

class Storage;  // opaque; storage_internal.h makes one over any file system
std::shared_ptr<Storage> DefaultStorage();

inline constexpr int64_t kDefaultChunkBytes = 8 << 20;

std::string StepDirName(int64_t step);  // "step-00000020"
// "step-00000020/rank-00003", or with a tag "step-00000020/rank-00003-g7". A tag (daemon mode:
// the job's generation) keeps the writers of different generations of one step apart, so a
// stale writer that wakes up late can never touch a newer generation's shards or markers.
std::string InstanceName(int64_t step, int rank, const std::string& tag = "");

// One rank's piece of one tensor to save: local elements [layout.begin, layout.end) of the
// local tensor described by `layout`, at `data` (fp32, end - begin values).
struct ShardSpan {
  std::string tensor;
  proto::ShardLayout layout;
  const float* data = nullptr;
};

// Writes one rank's shards of one step. Not thread-safe; one per (step, rank).
class ShardWriter {
 public:
  // Creates the rank's instance afresh (a leftover of an earlier, crashed attempt at the same
  // step is removed first). IO_ERROR / RESOURCE_EXHAUSTED naming the path on failure.
  static Result<std::unique_ptr<ShardWriter>> Create(std::shared_ptr<Storage> storage,
                                                     const std::string& root, int64_t step,
                                                     int rank,
                                                     int64_t chunk_bytes = kDefaultChunkBytes,
                                                     const std::string& tag = "");
  ~ShardWriter();
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Records the shard and its checksum; span.data must stay valid and unchanged until Finish.
  // INVALID_ARGUMENT for a bad layout or a tensor added twice.
  Status Add(const ShardSpan& span);
  // Writes every shard (bulk-loaded SST files, about 1 GiB each), ingests them into the
  // instance, syncs and closes it, and writes the durable marker (this rank's ShardIndex).
  // I/O errors name the file (RESOURCE_EXHAUSTED when the disk is full); on error nothing is
  // reported durable.
  Status Finish();
  int64_t bytes() const { return bytes_; }

 private:
  ShardWriter() = default;
  Status WriteSstFiles();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int64_t bytes_ = 0;
};

// Records that `rank`'s save of `step` failed (so the committer stops waiting). Best effort.
void ReportSaveFailed(Storage& storage, const std::string& root, int64_t step, int rank,
                      const Status& why, const std::string& tag = "");

// `fence` (optional) is called right before the manifest write; its error aborts the commit
// (daemon mode: "is this rank's generation still current?", so a stale committer that wakes up
// late cannot commit an abandoned branch).
// Waits until each of ranks [0, world) has made its shards of manifest.step() durable, then
// commits `manifest` with every rank's shard records added. DEADLINE_EXCEEDED naming the ranks
// still missing after `timeout`; ABORTED-like CANCELLED when *cancel becomes true; the error of
// a rank that reported a failed save; I/O errors of the manifest write. Nothing is committed on
// error. Thread-safe with respect to other commits and collections in this process.
Status CommitWhenDurable(std::shared_ptr<Storage> storage, const std::string& root,
                         proto::Manifest manifest, int world, std::chrono::milliseconds timeout,
                         const std::atomic<bool>* cancel = nullptr, const std::string& tag = "",
                         const std::function<Status()>& fence = nullptr);

// Committed steps, ascending (empty for a root without checkpoints).
Result<std::vector<int64_t>> CommittedSteps(Storage& storage, const std::string& root);
// NOT_FOUND when `step` is not committed.
Result<proto::Manifest> ReadManifest(Storage& storage, const std::string& root, int64_t step);

struct RetentionPolicy {
  int keep_last = 3;       // newest committed checkpoints kept (>= 1)
  int64_t keep_every = 0;  // also keep committed steps that are multiples of this (0: none)
};
// Deletes committed checkpoints that the policy does not keep, every uncommitted step directory
// below `uncommitted_below` (saves at or above it may be in flight), and — when
// drop_after >= 0 — every checkpoint, committed or not, above step drop_after (a run resumed
// from drop_after forks history; later checkpoints belong to the abandoned branch).
// Returns the number of step directories removed.
Result<int> CollectGarbage(Storage& storage, const std::string& root, const RetentionPolicy& policy,
                           int64_t uncommitted_below, int64_t drop_after = -1);

// Reads slices of a committed checkpoint's tensors onto any layout. Read, ReadMany and
// ReadGlobal may be called from several threads.
class CheckpointReader {
 public:
  static Result<std::unique_ptr<CheckpointReader>> Open(std::shared_ptr<Storage> storage,
                                                        const std::string& root,
                                                        proto::Manifest manifest);
  ~CheckpointReader();
  const proto::Manifest& manifest() const;

  // Fills dst with local elements [layout.begin, layout.end) of `tensor` as laid out by
  // `layout` (padding 0), reading exactly the shards that overlap them and verifying each
  // one's checksum. NOT_FOUND when the checkpoint lacks the tensor or does not cover every
  // element (e.g. a different model shape); DATA_LOSS naming tensor, shard, rank and instance
  // when a shard is missing, unreadable or fails its checksum.
  Status Read(const std::string& tensor, const proto::ShardLayout& layout, float* dst);
  // Read() of every request, `threads` at a time (overlapping disk reads with checksums and
  // copies); the first error, after which the remaining requests may not have been read.
  struct ReadRequest {
    std::string tensor;
    proto::ShardLayout layout;
    float* dst = nullptr;
  };
  Status ReadMany(const std::vector<ReadRequest>& requests, int threads = 4);
  // The whole global tensor (row-major) and its shape.
  Result<std::vector<float>> ReadGlobal(const std::string& tensor, std::vector<int64_t>* shape);
  // Reads every shard and verifies it; OK, or DATA_LOSS with every problem found (one a line).
  Status VerifyAll();
  // Tensor names, in manifest order, without duplicates.
  std::vector<std::string> TensorNames() const;

 private:
  CheckpointReader() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::checkpoint
