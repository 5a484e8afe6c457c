#include "coordinator/job_store.h"

#include <fmt/format.h>
#include <google/protobuf/util/message_differencer.h>
#include <rocksdb/db.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <map>
#include <mutex>
#include <string_view>

namespace strata::coordinator {
namespace {

constexpr char kJobPrefix[] = "job/";
constexpr char kLogPrefix[] = "log/";
constexpr char kNextSeqKey[] = "meta/next_seq";
constexpr int64_t kMaxLogSeq = 999999999999;  // 12 digits in the key

std::string JobKey(const std::string& id) { return kJobPrefix + id; }
std::string LogPrefix(const std::string& id) { return fmt::format("{}{}/", kLogPrefix, id); }
std::string LogKey(const std::string& id, int64_t seq) {
  return fmt::format("{}{}/{:012d}", kLogPrefix, id, seq);
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// RocksDB's status as ours. A checkpoint/ helper does the same, but coordinator/ does not depend
// on checkpoint/.
Status FromRocks(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::Ok();
  std::string msg = fmt::format("{}: {}", context, s.ToString());
  if (s.IsNotFound()) return NotFound(std::move(msg));
  if (s.IsCorruption()) return DataLoss(std::move(msg));
  if (s.IsNoSpace()) return ResourceExhausted(std::move(msg));
  if (s.IsIOError()) return IoError(std::move(msg));
  if (s.IsBusy() || s.IsTryAgain() || s.IsTimedOut()) {
    return Status(StatusCode::kUnavailable, std::move(msg));
  }
  return Internal(std::move(msg));
}

std::string TruncateUtf8(const std::string& s, size_t max_bytes) {
  if (s.size() <= max_bytes) return s;
  size_t n = max_bytes;
  // Do not cut a multi-byte sequence: back up over continuation bytes.
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  return s.substr(0, n) + " [truncated]";
}

}  // namespace

const char* JobStateName(proto::JobState state) {
  switch (state) {
    case proto::JOB_STATE_PENDING:
      return "PENDING";
    case proto::JOB_STATE_PLANNING:
      return "PLANNING";
    case proto::JOB_STATE_RUNNING:
      return "RUNNING";
    case proto::JOB_STATE_RECOVERING:
      return "RECOVERING";
    case proto::JOB_STATE_SUCCEEDED:
      return "SUCCEEDED";
    case proto::JOB_STATE_FAILED:
      return "FAILED";
    case proto::JOB_STATE_CANCELLED:
      return "CANCELLED";
    default:
      return "UNSPECIFIED";
  }
}

std::optional<proto::JobState> ParseJobState(const std::string& name) {
  std::string upper = name;
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (int s = proto::JOB_STATE_PENDING; s <= proto::JOB_STATE_CANCELLED; ++s) {
    const auto state = static_cast<proto::JobState>(s);
    if (upper == JobStateName(state)) return state;
  }
  return std::nullopt;
}

bool IsTerminal(proto::JobState state) {
  return state == proto::JOB_STATE_SUCCEEDED || state == proto::JOB_STATE_FAILED ||
         state == proto::JOB_STATE_CANCELLED;
}

bool IsLegalTransition(proto::JobState from, proto::JobState to) {
  using proto::JobState;
  if (from == proto::JOB_STATE_UNSPECIFIED || IsTerminal(from)) return false;
  switch (to) {
    case proto::JOB_STATE_PLANNING:
      return from == proto::JOB_STATE_PENDING;
    case proto::JOB_STATE_RUNNING:
      return from == proto::JOB_STATE_PLANNING || from == proto::JOB_STATE_RECOVERING;
    case proto::JOB_STATE_RECOVERING:  // from PLANNING: a coordinator restarted mid-plan
      return from == proto::JOB_STATE_RUNNING || from == proto::JOB_STATE_PLANNING;
    case proto::JOB_STATE_SUCCEEDED:
      return from == proto::JOB_STATE_RUNNING;
    case proto::JOB_STATE_FAILED:
    case proto::JOB_STATE_CANCELLED:
      return true;
    default:
      return false;  // nothing goes back to PENDING or to UNSPECIFIED
  }
}

struct JobStore::Impl {
  std::string dir;
  std::unique_ptr<rocksdb::DB> db;

  mutable std::mutex mu;
  std::map<std::string, proto::JobRecord> jobs;         // GUARDED_BY(mu)
  std::map<std::string, std::string> id_by_client_key;  // GUARDED_BY(mu)
  std::map<std::string, int64_t> log_count;             // GUARDED_BY(mu)
  int64_t last_seq = 0;                                 // GUARDED_BY(mu)

  std::mutex observer_mu;
  std::function<void(const proto::JobRecord&)> observer;  // GUARDED_BY(observer_mu)

  void Notify(const proto::JobRecord& rec) {
    std::function<void(const proto::JobRecord&)> f;
    {
      std::lock_guard<std::mutex> lock(observer_mu);
      f = observer;
    }
    if (f) f(rec);
  }

  // Adds the log line for `text` at the job's next sequence number to `batch`.
  void AddLog(rocksdb::WriteBatch* batch, const std::string& id, int64_t seq,
              const std::string& text, int64_t now_ms) {
    proto::JobLogEntry e;
    e.set_seq(seq);
    e.set_unix_ms(now_ms);
    e.set_text(TruncateUtf8(text, kMaxLogLineBytes));
    batch->Put(LogKey(id, seq), e.SerializeAsString()).PermitUncheckedError();
  }

  Status Write(rocksdb::WriteBatch* batch, bool sync, std::string_view what) {
    rocksdb::WriteOptions wo;
    wo.sync = sync;
    return FromRocks(db->Write(wo, batch), fmt::format("{}: write {}", dir, what));
  }

  Status Load() {
    std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(kJobPrefix); it->Valid() && it->key().starts_with(kJobPrefix); it->Next()) {
      proto::JobRecord rec;
      if (!rec.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
        return DataLoss(fmt::format("{}: job record {} does not parse", dir, it->key().ToString()));
      }
      last_seq = std::max(last_seq, rec.seq());
      if (!rec.client_key().empty()) id_by_client_key[rec.client_key()] = rec.id();
      jobs[rec.id()] = std::move(rec);
    }
    RETURN_IF_ERROR(FromRocks(it->status(), dir + ": read jobs"));
    for (const auto& [id, rec] : jobs) {
      int64_t count = 0;
      it->SeekForPrev(LogKey(id, kMaxLogSeq));
      if (it->Valid() && it->key().starts_with(LogPrefix(id))) {
        proto::JobLogEntry e;
        if (!e.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
          return DataLoss(
              fmt::format("{}: log entry {} does not parse", dir, it->key().ToString()));
        }
        count = e.seq() + 1;
      }
      RETURN_IF_ERROR(FromRocks(it->status(), dir + ": read logs of " + id));
      log_count[id] = count;
    }
    std::string value;
    rocksdb::Status s = db->Get(rocksdb::ReadOptions(), kNextSeqKey, &value);
    if (s.ok()) {
      last_seq = std::max<int64_t>(last_seq, std::strtoll(value.c_str(), nullptr, 10));
    } else if (!s.IsNotFound()) {
      return FromRocks(s, dir + ": read the job counter");
    }
    return Status::Ok();
  }
};

JobStore::JobStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

JobStore::~JobStore() {
  if (impl_ && impl_->db) {
    rocksdb::Status s = impl_->db->Close();
    if (!s.ok()) spdlog::warn("job store {}: close: {}", impl_->dir, s.ToString());
  }
}

Result<std::unique_ptr<JobStore>> JobStore::Open(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return IoError(fmt::format("{}: cannot create the job store: {}", dir, ec.message()));
  rocksdb::Options options;
  options.create_if_missing = true;
  options.info_log_level = rocksdb::InfoLogLevel::ERROR_LEVEL;
  options.keep_log_file_num = 1;
  options.max_open_files = 64;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(options, dir, &raw);
  if (!s.ok()) {
    Status st = FromRocks(s, fmt::format("{}: cannot open the job store", dir));
    if (s.ToString().find("lock") != std::string::npos) {
      st = st.WithContext("is another strata-coordinator using this data directory?");
    }
    return st;
  }
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->db.reset(raw);
  RETURN_IF_ERROR(impl->Load());
  return std::unique_ptr<JobStore>(new JobStore(std::move(impl)));
}

Result<SubmitResult> JobStore::Submit(const proto::JobSpec& spec, const std::string& client_key) {
  Impl& m = *impl_;
  if (client_key.size() > kMaxClientKeyBytes) {
    return InvalidArgument(fmt::format("client_key: {} bytes is too long; use at most {}",
                                       client_key.size(), kMaxClientKeyBytes));
  }
  for (char c : client_key) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return InvalidArgument("client_key: holds a control character; use printable text");
    }
  }
  SubmitResult result;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    if (!client_key.empty()) {
      auto it = m.id_by_client_key.find(client_key);
      if (it != m.id_by_client_key.end()) {
        const proto::JobRecord& existing = m.jobs.at(it->second);
        if (!google::protobuf::util::MessageDifferencer::Equals(existing.spec(), spec)) {
          return Status(StatusCode::kAlreadyExists,
                        fmt::format("client_key: '{}' was used for {} with a different spec; "
                                    "submit with a new client key",
                                    client_key, existing.id()));
        }
        result.job = existing;
        return result;
      }
    }
    const int64_t seq = m.last_seq + 1;
    const int64_t now = NowUnixMs();
    proto::JobRecord rec;
    rec.set_id(fmt::format("job-{:06d}", seq));
    rec.set_seq(seq);
    rec.set_client_key(client_key);
    *rec.mutable_spec() = spec;
    rec.set_state(proto::JOB_STATE_PENDING);
    rec.set_created_unix_ms(now);
    rec.set_updated_unix_ms(now);
    rocksdb::WriteBatch batch;
    batch.Put(JobKey(rec.id()), rec.SerializeAsString()).PermitUncheckedError();
    batch.Put(kNextSeqKey, std::to_string(seq)).PermitUncheckedError();
    m.AddLog(&batch, rec.id(), 0,
             client_key.empty()
                 ? fmt::format("submitted '{}'", spec.name())
                 : fmt::format("submitted '{}' (client key '{}')", spec.name(), client_key),
             now);
    RETURN_IF_ERROR(m.Write(&batch, /*sync=*/true, "new job " + rec.id()));
    m.last_seq = seq;
    m.log_count[rec.id()] = 1;
    if (!client_key.empty()) m.id_by_client_key[client_key] = rec.id();
    m.jobs[rec.id()] = rec;
    result.job = std::move(rec);
    result.created = true;
  }
  m.Notify(result.job);
  return result;
}

Result<proto::JobRecord> JobStore::Transition(const std::string& id, proto::JobState to,
                                              const TransitionUpdate& update) {
  Impl& m = *impl_;
  proto::JobRecord next;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    auto it = m.jobs.find(id);
    if (it == m.jobs.end()) return NotFound(fmt::format("job '{}' not found", id));
    const proto::JobRecord& cur = it->second;
    const proto::JobState from = cur.state();
    if (!IsLegalTransition(from, to)) {
      return FailedPrecondition(fmt::format("{}: illegal transition {} -> {}{}", id,
                                            JobStateName(from), JobStateName(to),
                                            IsTerminal(from) ? "; the job has already ended" : ""));
    }
    if (update.expected_generation && *update.expected_generation != cur.generation()) {
      return FailedPrecondition(fmt::format(
          "{}: stale generation {} for {} -> {}; the job is at generation {}", id,
          *update.expected_generation, JobStateName(from), JobStateName(to), cur.generation()));
    }
    const int64_t now = NowUnixMs();
    next = cur;
    next.set_state(to);
    next.set_updated_unix_ms(now);
    if (to == proto::JOB_STATE_PLANNING || to == proto::JOB_STATE_RECOVERING) {
      next.set_generation(cur.generation() + 1);
    }
    if (to == proto::JOB_STATE_RECOVERING && update.count_restart) {
      next.set_restarts(cur.restarts() + 1);
    }
    if (to == proto::JOB_STATE_RUNNING && cur.started_unix_ms() == 0) {
      next.set_started_unix_ms(now);
    }
    if (IsTerminal(to)) next.set_finished_unix_ms(now);
    if (!update.error.empty()) next.set_last_error(update.error);
    if (update.layout) *next.mutable_layout() = *update.layout;

    std::string line = fmt::format("state {} -> {}", JobStateName(from), JobStateName(to));
    if (to == proto::JOB_STATE_PLANNING || to == proto::JOB_STATE_RECOVERING) {
      line += fmt::format(" (generation {})", next.generation());
    }
    if (update.layout) {
      line += fmt::format(" (layout dp={} tp={} pp={}{})", update.layout->dp(), update.layout->tp(),
                          update.layout->pp(), update.layout->zero1() ? " zero1" : "");
    }
    if (!update.reason.empty()) line += ": " + update.reason;
    if (!update.error.empty()) line += ": " + update.error;
    const int64_t seq = m.log_count[id];
    rocksdb::WriteBatch batch;
    batch.Put(JobKey(id), next.SerializeAsString()).PermitUncheckedError();
    m.AddLog(&batch, id, seq, line, now);
    RETURN_IF_ERROR(m.Write(&batch, /*sync=*/true,
                            fmt::format("{} {} -> {}", id, JobStateName(from), JobStateName(to))));
    it->second = next;
    m.log_count[id] = seq + 1;
  }
  m.Notify(next);
  return next;
}

Status JobStore::ReportProgress(const std::string& id, int64_t generation,
                                const Progress& progress) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  auto it = m.jobs.find(id);
  if (it == m.jobs.end()) return NotFound(fmt::format("job '{}' not found", id));
  const proto::JobRecord& cur = it->second;
  if (cur.state() != proto::JOB_STATE_RUNNING) {
    return FailedPrecondition(
        fmt::format("{}: progress reported while the job is {}", id, JobStateName(cur.state())));
  }
  if (generation != cur.generation()) {
    return FailedPrecondition(
        fmt::format("{}: progress of stale generation {}; the job is at generation {}", id,
                    generation, cur.generation()));
  }
  proto::JobRecord next = cur;
  next.set_step(progress.step);
  next.set_loss(progress.loss);
  next.set_tokens_per_second(progress.tokens_per_second);
  next.set_updated_unix_ms(NowUnixMs());
  rocksdb::WriteBatch batch;
  batch.Put(JobKey(id), next.SerializeAsString()).PermitUncheckedError();
  RETURN_IF_ERROR(m.Write(&batch, /*sync=*/false, "progress of " + id));
  it->second = std::move(next);
  return Status::Ok();
}

Result<int64_t> JobStore::AppendLog(const std::string& id, const std::string& text) {
  Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mu);
  if (m.jobs.find(id) == m.jobs.end()) return NotFound(fmt::format("job '{}' not found", id));
  const int64_t seq = m.log_count[id];
  if (seq >= kMaxLogSeq) return ResourceExhausted(fmt::format("{}: the log is full", id));
  rocksdb::WriteBatch batch;
  m.AddLog(&batch, id, seq, text, NowUnixMs());
  RETURN_IF_ERROR(m.Write(&batch, /*sync=*/false, "log of " + id));
  m.log_count[id] = seq + 1;
  return seq;
}

Result<LogPage> JobStore::ReadLogs(const std::string& id, int64_t offset, int max_entries,
                                   size_t max_bytes) const {
  const Impl& m = *impl_;
  LogPage page;
  {
    std::lock_guard<std::mutex> lock(m.mu);
    auto it = m.log_count.find(id);
    if (it == m.log_count.end()) return NotFound(fmt::format("job '{}' not found", id));
    page.total = it->second;
  }
  offset = std::max<int64_t>(offset, 0);
  page.next_offset = offset;
  if (offset >= page.total || max_entries <= 0) return page;
  const std::string prefix = LogPrefix(id);
  // Entries below `total` were committed before we read it; later ones are left for the next
  // page so that a page never has holes.
  std::unique_ptr<rocksdb::Iterator> it(m.db->NewIterator(rocksdb::ReadOptions()));
  size_t bytes = 0;
  for (it->Seek(LogKey(id, offset)); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    proto::JobLogEntry e;
    if (!e.ParseFromArray(it->value().data(), static_cast<int>(it->value().size()))) {
      return DataLoss(fmt::format("{}: log entry {} does not parse", m.dir, it->key().ToString()));
    }
    if (e.seq() != page.next_offset || e.seq() >= page.total) break;
    bytes += e.text().size();
    if (!page.entries.empty() && bytes > max_bytes) break;
    page.entries.push_back(std::move(e));
    ++page.next_offset;
    if (static_cast<int>(page.entries.size()) >= max_entries) break;
  }
  RETURN_IF_ERROR(FromRocks(it->status(), fmt::format("{}: read the log of {}", m.dir, id)));
  return page;
}

Result<proto::JobRecord> JobStore::Get(const std::string& id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->jobs.find(id);
  if (it == impl_->jobs.end()) return NotFound(fmt::format("job '{}' not found", id));
  return it->second;
}

Result<int64_t> JobStore::LogCount(const std::string& id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->log_count.find(id);
  if (it == impl_->log_count.end()) return NotFound(fmt::format("job '{}' not found", id));
  return it->second;
}

std::vector<proto::JobRecord> JobStore::List() const {
  std::vector<proto::JobRecord> out;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    out.reserve(impl_->jobs.size());
    for (const auto& [id, rec] : impl_->jobs) out.push_back(rec);
  }
  std::sort(out.begin(), out.end(),
            [](const proto::JobRecord& a, const proto::JobRecord& b) { return a.seq() < b.seq(); });
  return out;
}

void JobStore::SetObserver(std::function<void(const proto::JobRecord&)> observer) {
  std::lock_guard<std::mutex> lock(impl_->observer_mu);
  impl_->observer = std::move(observer);
}

}  // namespace strata::coordinator
