// JobStore: the coordinator's persistent job state in one RocksDB instance.
//
// Keys:  job/<id>            -> proto::JobRecord
//        key/<client key>    -> <id>              (idempotent submission)
//        log/<id>/<seq:012>  -> proto::JobLogEntry (append-only event log per job)
//        meta/next_seq       -> decimal counter of the last assigned job number
//
// Durability: Submit and Transition are each one synced WriteBatch (the record, its index
// entries and the log line saying what happened), so a job or state change that was
// acknowledged survives a crash of the process or the machine. ReportProgress and AppendLog
// write through the WAL without fsync: they survive a crash of the process (kill -9) but the
// last few may be lost with the machine; the next synced write makes them durable too.
//
// Thread-safe: every method may be called from any thread. All records are cached in memory
// (loaded at Open), so reads never touch the disk except for log pages. Writes are serialized
// by one mutex; a failed write leaves the cache and the database unchanged.
//
// Assumption: one JobStore per directory, in one process (RocksDB's lock refuses a second one).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/status.h"
#include "proto/coordinator.pb.h"

namespace strata::coordinator {

// "PENDING", "RUNNING", ... ("UNSPECIFIED" for anything else).
const char* JobStateName(proto::JobState state);
// Parses a name as JobStateName prints it, case-insensitively; nullopt when unknown.
std::optional<proto::JobState> ParseJobState(const std::string& name);
bool IsTerminal(proto::JobState state);
// The state machine of proto/coordinator.proto: PENDING -> PLANNING -> RUNNING <-> RECOVERING,
// PLANNING -> RECOVERING (a coordinator restarted mid-plan), SUCCEEDED from RUNNING, FAILED and
// CANCELLED from every non-terminal state.
bool IsLegalTransition(proto::JobState from, proto::JobState to);

// What a transition records besides the new state. All optional.
struct TransitionUpdate {
  std::string reason;  // appended to the job's log line ("cancelled via the API")
  std::string error;   // becomes last_error (kept until the next error)
  std::optional<proto::JobLayout> layout;
  // Fencing: when set, the transition fails with FAILED_PRECONDITION unless the job's current
  // generation equals it.
  std::optional<int64_t> expected_generation;
  // Entering RECOVERING counts a restart (resources.max_restarts) unless this is false (a
  // planned re-plan such as a scale-up).
  bool count_restart = true;
};

struct Progress {
  int64_t step = 0;
  double loss = 0;
  double tokens_per_second = 0;
};

struct SubmitResult {
  proto::JobRecord job;
  bool created = false;  // false: client_key named an existing job, returned unchanged
};

struct LogPage {
  std::vector<proto::JobLogEntry> entries;  // seq offset, offset+1, ...
  int64_t next_offset = 0;                  // offset + entries.size()
  int64_t total = 0;                        // entries the job has now
};

class JobStore {
 public:
  // Longest client key and log line accepted (a longer log line is truncated, not refused).
  static constexpr size_t kMaxClientKeyBytes = 128;
  static constexpr size_t kMaxLogLineBytes = 16 << 10;

  // Opens (creating when missing) the store in `dir` and loads every job record. Returns
  // IO_ERROR naming the directory when it cannot be opened (e.g. held by another process) and
  // DATA_LOSS when a record does not parse.
  static Result<std::unique_ptr<JobStore>> Open(const std::string& dir);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  // Stores a new PENDING job with `spec` (which the caller has defaulted and validated).
  // With a non-empty client_key that was used before: returns that job with created=false when
  // its spec is the same, ALREADY_EXISTS when it differs. INVALID_ARGUMENT for a key that is
  // longer than kMaxClientKeyBytes or holds control characters.
  Result<SubmitResult> Submit(const proto::JobSpec& spec, const std::string& client_key);

  // Moves job `id` to state `to` and applies `update`, in one synced write, appending a log line
  // "state FROM -> TO[: reason][: error]". Entering PLANNING or RECOVERING bumps the generation,
  // entering RECOVERING counts a restart, the first RUNNING sets started, a terminal state sets
  // finished. NOT_FOUND for an unknown job; FAILED_PRECONDITION "job-1: illegal transition
  // SUCCEEDED -> RUNNING" for an illegal one or a stale expected_generation. On error nothing
  // changes. Returns the updated record.
  Result<proto::JobRecord> Transition(const std::string& id, proto::JobState to,
                                      const TransitionUpdate& update = {});

  // Records the latest step, loss and throughput of a RUNNING job. FAILED_PRECONDITION when the
  // job is not RUNNING or `generation` is not its current one (a late report of an older
  // generation); NOT_FOUND for an unknown job.
  Status ReportProgress(const std::string& id, int64_t generation, const Progress& progress);

  // Appends one line to the job's log and returns its sequence number. Allowed in every state
  // (workers may flush their last lines after the job finished). NOT_FOUND for an unknown job.
  Result<int64_t> AppendLog(const std::string& id, const std::string& text);

  // At most `max_entries` entries (and about `max_bytes` of text, at least one entry) from
  // `offset` on. An offset at or past the end gives an empty page. NOT_FOUND for an unknown job.
  Result<LogPage> ReadLogs(const std::string& id, int64_t offset, int max_entries,
                           size_t max_bytes = 1 << 20) const;

  Result<proto::JobRecord> Get(const std::string& id) const;
  // Entries in the job's log (cheap; for long-poll loops). NOT_FOUND for an unknown job.
  Result<int64_t> LogCount(const std::string& id) const;
  // Every job, in submission order.
  std::vector<proto::JobRecord> List() const;

  // Called after every committed Submit (created only) and Transition, outside the store's lock,
  // on the thread that made the change, with the new record. For the control plane to react to
  // a cancel; must not call SetObserver. Replaces an earlier observer.
  void SetObserver(std::function<void(const proto::JobRecord&)> observer);

 private:
  struct Impl;
  explicit JobStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace strata::coordinator
