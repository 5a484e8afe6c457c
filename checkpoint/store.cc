#include "checkpoint/store.h"

#include <fmt/format.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/sst_file_writer.h>
#include <rocksdb/table.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "checkpoint/checksum.h"
#include "checkpoint/fault_fs.h"
#include "checkpoint/reshard.h"
#include "checkpoint/storage_internal.h"

namespace strata::checkpoint {
namespace {

constexpr char kManifestDir[] = "manifest";
constexpr char kCommitPrefix[] = "commit/";
constexpr int64_t kMaxMarkerBytes = 256 << 20;

// Commits and collections of this process touch the manifest instance one at a time (RocksDB
// would refuse a second writer anyway; this makes them wait instead of fail).
std::mutex& ManifestMutex() {
  static std::mutex m;
  return m;
}

std::string CommitKey(int64_t step) { return fmt::format("{}{:012d}", kCommitPrefix, step); }
std::string ChunkKey(const std::string& tensor, int64_t chunk) {
  return fmt::format("{}#{:06d}", tensor, chunk);
}
std::string MarkerPath(const std::string& root, int64_t step, int rank, const std::string& tag,
                       const char* suffix) {
  return fmt::format("{}/{}{}", root, InstanceName(step, rank, tag), suffix);
}

rocksdb::Options BaseOptions(Storage& storage) {
  rocksdb::Options o;
  o.env = storage.env();
  o.compression = rocksdb::kNoCompression;  // fp32 weights do not compress; it would cost time
  o.max_open_files = 64;
  o.info_log_level = rocksdb::InfoLogLevel::ERROR_LEVEL;
  o.keep_log_file_num = 1;
  rocksdb::BlockBasedTableOptions t;
  t.no_block_cache = true;  // shards are read once; a cache would only add a copy
  o.table_factory.reset(rocksdb::NewBlockBasedTableFactory(t));
  return o;
}

int64_t NowUnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

bool Exists(Storage& s, const std::string& path) {
  return s.fs()->FileExists(path, rocksdb::IOOptions(), nullptr).ok();
}

}  // namespace

std::string StepDirName(int64_t step) { return fmt::format("step-{:08d}", step); }
std::string InstanceName(int64_t step, int rank, const std::string& tag) {
  return fmt::format("{}/rank-{:05d}{}{}", StepDirName(step), rank, tag.empty() ? "" : "-", tag);
}

// ---------------------------------------------------------------------------------------------
// ShardWriter

struct ShardWriter::Impl {
  std::shared_ptr<Storage> storage;
  std::string root, instance, path, staging, tag;
  int64_t step = 0;
  int rank = 0;
  int64_t chunk_bytes = 0;
  std::vector<std::string> files;  // SST files in staging, in key order
  proto::ShardIndex index;
  std::vector<const char*> data;  // per shard of `index`, valid until Finish
  std::set<std::string> tensors;
  bool finished = false;
};

Result<std::unique_ptr<ShardWriter>> ShardWriter::Create(std::shared_ptr<Storage> storage,
                                                         const std::string& root, int64_t step,
                                                         int rank, int64_t chunk_bytes,
                                                         const std::string& tag) {
  if (chunk_bytes < 4 || chunk_bytes % 4 != 0) {
    return InvalidArgument(
        fmt::format("chunk_bytes must be a positive multiple of 4, got {}", chunk_bytes));
  }
  std::unique_ptr<ShardWriter> w(new ShardWriter());
  w->impl_ = std::make_unique<Impl>();
  Impl& m = *w->impl_;
  m.storage = std::move(storage);
  m.root = root;
  m.step = step;
  m.rank = rank;
  m.chunk_bytes = chunk_bytes;
  m.instance = InstanceName(step, rank, tag);
  m.tag = tag;
  m.path = root + "/" + m.instance;
  m.staging = m.path + ".staging";
  m.index.set_step(step);
  m.index.set_rank(rank);
  rocksdb::FileSystem* fs = m.storage->fs();
  const rocksdb::IOOptions io;
  // Leftovers of an earlier attempt at this step: never part of a commit of this attempt.
  for (const char* suffix : {".durable", ".failed"}) {
    RETURN_IF_ERROR(RemoveTree(fs, MarkerPath(root, step, rank, tag, suffix)));
  }
  RETURN_IF_ERROR(RemoveTree(fs, m.path));
  RETURN_IF_ERROR(RemoveTree(fs, m.staging));
  RETURN_IF_ERROR(CreateDirs(fs, m.staging));
  return w;
}

ShardWriter::~ShardWriter() {
  if (impl_ && !impl_->finished) (void)RemoveTree(impl_->storage->fs(), impl_->staging);
}

Status ShardWriter::Add(const ShardSpan& span) {
  Impl& m = *impl_;
  if (m.finished) return FailedPrecondition("ShardWriter::Add after Finish");
  const std::string what = fmt::format("tensor {} (rank {})", span.tensor, m.rank);
  RETURN_IF_ERROR(ValidateLayout(span.layout, what));
  if (span.tensor.empty() || span.tensor.find('#') != std::string::npos) {
    return InvalidArgument(fmt::format("{}: tensor names must be non-empty and free of '#'", what));
  }
  if (!m.tensors.insert(span.tensor).second) {
    return InvalidArgument(fmt::format("{}: added twice to one checkpoint", what));
  }
  const int64_t bytes = (span.layout.end() - span.layout.begin()) * 4;
  proto::ShardRecord* rec = m.index.add_shards();
  rec->set_tensor(span.tensor);
  *rec->mutable_layout() = span.layout;
  rec->set_dtype("F32");
  rec->set_rank(m.rank);
  rec->set_instance(m.instance);
  rec->set_bytes(bytes);
  rec->set_chunk_bytes(m.chunk_bytes);
  rec->set_checksum(Checksum(span.data, static_cast<size_t>(bytes)));
  m.data.push_back(reinterpret_cast<const char*>(span.data));
  bytes_ += bytes;
  return Status::Ok();
}

Status ShardWriter::Finish() {
  Impl& m = *impl_;
  if (m.finished) return FailedPrecondition("ShardWriter::Finish called twice");
  RETURN_IF_ERROR(WriteSstFiles());
  rocksdb::Options options = BaseOptions(*m.storage);
  options.create_if_missing = true;
  options.error_if_exists = true;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(FromIo(rocksdb::DB::Open(options, m.path, &raw), "open " + m.path));
  std::unique_ptr<rocksdb::DB> db(raw);
  if (!m.files.empty()) {
    rocksdb::IngestExternalFileOptions ingest;
    ingest.move_files = true;  // hard links: the data is written exactly once
    RETURN_IF_ERROR(FromIo(db->IngestExternalFile(m.files, ingest), "ingest into " + m.path));
  }
  // Ingestion syncs the files and the DB's own manifest; make the directory entries durable too.
  RETURN_IF_ERROR(FromIo(db->SyncWAL(), "sync " + m.path));
  RETURN_IF_ERROR(FromIo(db->Close(), "close " + m.path));
  db.reset();
  RETURN_IF_ERROR(RemoveTree(m.storage->fs(), m.staging));
  RETURN_IF_ERROR(WriteFileDurably(m.storage->fs(),
                                   MarkerPath(m.root, m.step, m.rank, m.tag, ".durable"),
                                   m.index.SerializeAsString()));
  m.finished = true;
  return Status::Ok();
}

Status ShardWriter::WriteSstFiles() {
  Impl& m = *impl_;
  // SST files take keys in order: shards sorted by name ('#' sorts below every name character,
  // so one tensor's chunk keys never interleave with another's). A new file every
  // kMaxFileBytes keeps files moderate; their key ranges do not overlap, as ingestion requires.
  constexpr int64_t kMaxFileBytes = int64_t{1} << 30;
  std::vector<int> order(static_cast<size_t>(m.index.shards_size()));
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int>(i);
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return m.index.shards(a).tensor() < m.index.shards(b).tensor(); });
  const rocksdb::Options options = BaseOptions(*m.storage);
  std::unique_ptr<rocksdb::SstFileWriter> writer;
  std::string file;
  int64_t in_file = 0;
  auto close = [&]() -> Status {
    if (!writer) return Status::Ok();
    RETURN_IF_ERROR(FromIo(writer->Finish(), "finish " + file));
    writer.reset();
    m.files.push_back(file);
    return Status::Ok();
  };
  for (int i : order) {
    const proto::ShardRecord& rec = m.index.shards(i);
    const char* data = m.data[static_cast<size_t>(i)];
    for (int64_t off = 0, chunk = 0; off < rec.bytes(); off += m.chunk_bytes, ++chunk) {
      if (!writer) {
        file = fmt::format("{}/{:06d}.sst", m.staging, m.files.size());
        writer = std::make_unique<rocksdb::SstFileWriter>(rocksdb::EnvOptions(), options);
        RETURN_IF_ERROR(FromIo(writer->Open(file), "create " + file));
        in_file = 0;
      }
      const int64_t n = std::min(m.chunk_bytes, rec.bytes() - off);
      RETURN_IF_ERROR(FromIo(writer->Put(ChunkKey(rec.tensor(), chunk),
                                         rocksdb::Slice(data + off, static_cast<size_t>(n))),
                             "write " + file));
      in_file += n;
      if (in_file >= kMaxFileBytes) RETURN_IF_ERROR(close());
    }
  }
  return close();
}

void ReportSaveFailed(Storage& storage, const std::string& root, int64_t step, int rank,
                      const Status& why, const std::string& tag) {
  Status s =
      WriteFileDurably(storage.fs(), MarkerPath(root, step, rank, tag, ".failed"), why.ToString());
  if (!s.ok()) spdlog::warn("could not record the failed save of rank {}: {}", rank, s.ToString());
}

// ---------------------------------------------------------------------------------------------
// Manifests

namespace {

// Opens the manifest instance read-only; *db stays null when the root has none yet.
Status OpenManifestReadOnly(Storage& storage, const std::string& root,
                            std::unique_ptr<rocksdb::DB>* db) {
  const std::string path = root + "/" + kManifestDir;
  if (!Exists(storage, path + "/CURRENT")) return Status::Ok();
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(
      FromIo(rocksdb::DB::OpenForReadOnly(BaseOptions(storage), path, &raw), "open " + path));
  db->reset(raw);
  return Status::Ok();
}

Result<std::unique_ptr<rocksdb::DB>> OpenManifestForWrite(Storage& storage,
                                                          const std::string& root) {
  RETURN_IF_ERROR(CreateDirs(storage.fs(), root));
  rocksdb::Options options = BaseOptions(storage);
  options.create_if_missing = true;
  const std::string path = root + "/" + kManifestDir;
  rocksdb::DB* raw = nullptr;
  RETURN_IF_ERROR(FromIo(rocksdb::DB::Open(options, path, &raw), "open " + path));
  return std::unique_ptr<rocksdb::DB>(raw);
}

}  // namespace

Status CommitWhenDurable(std::shared_ptr<Storage> storage, const std::string& root,
                         proto::Manifest manifest, int world, std::chrono::milliseconds timeout,
                         const std::atomic<bool>* cancel, const std::string& tag,
                         const std::function<Status()>& fence) {
  const int64_t step = manifest.step();
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  std::vector<bool> done(static_cast<size_t>(world), false);
  std::vector<proto::ShardIndex> indexes(static_cast<size_t>(world));
  int remaining = world;
  while (remaining > 0) {
    for (int r = 0; r < world; ++r) {
      if (done[static_cast<size_t>(r)]) continue;
      const std::string failed = MarkerPath(root, step, r, tag, ".failed");
      if (Exists(*storage, failed)) {
        Result<std::string> why = ReadWholeFile(storage->fs(), failed, 1 << 20);
        return Internal(fmt::format("checkpoint step {} not committed: rank {} failed to save: {}",
                                    step, r, why.ok() ? *why : why.status().ToString()));
      }
      const std::string marker = MarkerPath(root, step, r, tag, ".durable");
      if (!Exists(*storage, marker)) continue;
      ASSIGN_OR_RETURN(std::string bytes, ReadWholeFile(storage->fs(), marker, kMaxMarkerBytes));
      proto::ShardIndex& index = indexes[static_cast<size_t>(r)];
      if (!index.ParseFromString(bytes) || index.step() != step || index.rank() != r) {
        return DataLoss(fmt::format("checkpoint step {}: durable marker {} is not rank {}'s index",
                                    step, marker, r));
      }
      done[static_cast<size_t>(r)] = true;
      --remaining;
    }
    if (remaining == 0) break;
    if (cancel != nullptr && cancel->load()) {
      return Cancelled(fmt::format("checkpoint step {}: commit cancelled", step));
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string missing;
      for (int r = 0; r < world; ++r) {
        if (done[static_cast<size_t>(r)]) continue;
        if (!missing.empty()) missing += ", ";
        missing += std::to_string(r);
      }
      return DeadlineExceeded(fmt::format(
          "checkpoint step {} not committed: ranks {} did not report their shards durable within "
          "{} ms",
          step, missing, timeout.count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  int64_t total = 0;
  for (const proto::ShardIndex& index : indexes) {
    for (const proto::ShardRecord& rec : index.shards()) {
      *manifest.add_shards() = rec;
      total += rec.bytes();
    }
  }
  manifest.set_world(world);
  manifest.set_total_bytes(total);
  manifest.set_created_unix_ms(NowUnixMs());
  std::lock_guard<std::mutex> lock(ManifestMutex());
  ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenManifestForWrite(*storage, root));
  if (fence) {
    Status f = fence();
    if (!f.ok()) {
      return Status(f.code(),
                    fmt::format("checkpoint step {} not committed: {}", step, f.message()));
    }
  }
  rocksdb::WriteBatch batch;
  RETURN_IF_ERROR(FromIo(batch.Put(CommitKey(step), manifest.SerializeAsString()), "manifest"));
  rocksdb::WriteOptions wo;
  wo.sync = true;
  RETURN_IF_ERROR(FromIo(db->Write(wo, &batch),
                         fmt::format("commit of step {} in {}/{}", step, root, kManifestDir)));
  return FromIo(db->Close(), "close manifest");
}

Result<std::vector<int64_t>> CommittedSteps(Storage& storage, const std::string& root) {
  std::vector<int64_t> steps;
  std::unique_ptr<rocksdb::DB> db;
  RETURN_IF_ERROR(OpenManifestReadOnly(storage, root, &db));
  if (!db) return steps;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
  for (it->Seek(kCommitPrefix); it->Valid() && it->key().starts_with(kCommitPrefix); it->Next()) {
    steps.push_back(std::stoll(it->key().ToString().substr(sizeof(kCommitPrefix) - 1)));
  }
  RETURN_IF_ERROR(FromIo(it->status(), "list " + root + "/" + kManifestDir));
  return steps;
}

Result<proto::Manifest> ReadManifest(Storage& storage, const std::string& root, int64_t step) {
  std::unique_ptr<rocksdb::DB> db;
  RETURN_IF_ERROR(OpenManifestReadOnly(storage, root, &db));
  if (!db) return NotFound(fmt::format("no committed checkpoint under {}", root));
  std::string value;
  rocksdb::Status s = db->Get(rocksdb::ReadOptions(), CommitKey(step), &value);
  if (s.IsNotFound()) {
    return NotFound(fmt::format("step {} is not a committed checkpoint under {}", step, root));
  }
  RETURN_IF_ERROR(FromIo(s, fmt::format("manifest of step {} in {}", step, root)));
  proto::Manifest m;
  if (!m.ParseFromString(value) || m.step() != step) {
    return DataLoss(
        fmt::format("manifest of step {} in {}/{} does not parse", step, root, kManifestDir));
  }
  return m;
}

Result<int> CollectGarbage(Storage& storage, const std::string& root, const RetentionPolicy& policy,
                           int64_t uncommitted_below, int64_t drop_after) {
  if (policy.keep_last < 1) return InvalidArgument("checkpoint.keep: must be at least 1");
  std::lock_guard<std::mutex> lock(ManifestMutex());
  if (!Exists(storage, root)) return 0;
  std::vector<int64_t> committed;
  {
    std::unique_ptr<rocksdb::DB> db;
    RETURN_IF_ERROR(OpenManifestReadOnly(storage, root, &db));
    if (db) {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions()));
      for (it->Seek(kCommitPrefix); it->Valid() && it->key().starts_with(kCommitPrefix);
           it->Next()) {
        committed.push_back(std::stoll(it->key().ToString().substr(sizeof(kCommitPrefix) - 1)));
      }
      RETURN_IF_ERROR(FromIo(it->status(), "list " + root));
    }
  }
  std::set<int64_t> keep;
  std::vector<int64_t> alive;
  for (int64_t s : committed) {
    if (drop_after < 0 || s <= drop_after) alive.push_back(s);
  }
  for (size_t i = 0; i < alive.size(); ++i) {
    if (i + static_cast<size_t>(policy.keep_last) >= alive.size() ||
        (policy.keep_every > 0 && alive[i] % policy.keep_every == 0)) {
      keep.insert(alive[i]);
    }
  }
  std::vector<int64_t> uncommit;
  for (int64_t s : committed) {
    if (!keep.count(s)) uncommit.push_back(s);
  }
  if (!uncommit
           .empty()) {  // the manifest first: a crash after this leaves garbage, not a torn commit
    ASSIGN_OR_RETURN(std::unique_ptr<rocksdb::DB> db, OpenManifestForWrite(storage, root));
    rocksdb::WriteBatch batch;
    for (int64_t s : uncommit) RETURN_IF_ERROR(FromIo(batch.Delete(CommitKey(s)), "manifest"));
    rocksdb::WriteOptions wo;
    wo.sync = true;
    RETURN_IF_ERROR(FromIo(db->Write(wo, &batch), "retention in " + root));
    RETURN_IF_ERROR(FromIo(db->Close(), "close manifest"));
  }
  std::vector<std::string> children;
  rocksdb::IOStatus s = storage.fs()->GetChildren(root, rocksdb::IOOptions(), &children, nullptr);
  if (!s.ok()) return FromIo(s, "list " + root);
  int removed = 0;
  for (const std::string& c : children) {
    long long step = -1;
    if (c.size() != 13 || c.rfind("step-", 0) != 0 ||
        std::sscanf(c.c_str() + 5, "%lld", &step) != 1) {
      continue;
    }
    const bool is_committed = std::binary_search(committed.begin(), committed.end(), step);
    bool remove = false;
    if (keep.count(step)) {
      remove = false;
    } else if (is_committed) {
      remove = true;  // just uncommitted above
    } else {
      remove = step < uncommitted_below || (drop_after >= 0 && step > drop_after);
    }
    if (!remove) continue;
    RETURN_IF_ERROR(RemoveTree(storage.fs(), root + "/" + c));
    ++removed;
  }
  return removed;
}

// ---------------------------------------------------------------------------------------------
// CheckpointReader

struct CheckpointReader::Impl {
  std::shared_ptr<Storage> storage;
  std::string root;
  proto::Manifest manifest;
  std::map<std::string, std::vector<int>> by_tensor;  // tensor -> indexes into manifest.shards
  std::mutex mu;                                      // guards dbs
  std::map<std::string, std::unique_ptr<rocksdb::DB>> dbs;  // GUARDED_BY(mu)

  Result<rocksdb::DB*> Instance(const std::string& instance) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = dbs.find(instance);
    if (it != dbs.end()) return it->second.get();
    const std::string path = root + "/" + instance;
    rocksdb::DB* raw = nullptr;
    rocksdb::Status s = rocksdb::DB::OpenForReadOnly(BaseOptions(*storage), path, &raw);
    if (!s.ok()) return DataLoss(FromIo(s, "open " + path).message());
    dbs[instance].reset(raw);
    return raw;
  }

  // Reads a whole shard into `out` (rec.bytes() / 4 values) and verifies its checksum.
  // Thread-safe.
  Status ReadShard(const proto::ShardRecord& rec, float* out) {
    const std::string what = fmt::format(
        "checkpoint step {}: tensor {}, shard of rank {} (elements [{}, {}), instance {}/{})",
        manifest.step(), rec.tensor(), rec.rank(), rec.layout().begin(), rec.layout().end(), root,
        rec.instance());
    if (rec.dtype() != "F32" || rec.bytes() % 4 != 0 ||
        rec.bytes() != (rec.layout().end() - rec.layout().begin()) * 4 || rec.chunk_bytes() <= 0) {
      return DataLoss(what + ": inconsistent shard record in the manifest");
    }
    char* dst = reinterpret_cast<char*>(out);
    if (rec.bytes() > 0) {
      Result<rocksdb::DB*> db = Instance(rec.instance());
      if (!db.ok()) return DataLoss(what + ": " + db.status().message());
      rocksdb::ReadOptions ro;
      ro.verify_checksums = true;
      ro.fill_cache = false;
      for (int64_t off = 0, chunk = 0; off < rec.bytes(); off += rec.chunk_bytes(), ++chunk) {
        const int64_t n = std::min(rec.chunk_bytes(), rec.bytes() - off);
        rocksdb::PinnableSlice value;
        rocksdb::Status s =
            (*db)->Get(ro, (*db)->DefaultColumnFamily(), ChunkKey(rec.tensor(), chunk), &value);
        if (s.IsNotFound()) return DataLoss(fmt::format("{}: chunk {} is missing", what, chunk));
        if (!s.ok()) return DataLoss(fmt::format("{}: chunk {}: {}", what, chunk, s.ToString()));
        if (static_cast<int64_t>(value.size()) != n) {
          return DataLoss(
              fmt::format("{}: chunk {} has {} bytes, expected {}", what, chunk, value.size(), n));
        }
        std::memcpy(dst + off, value.data(), static_cast<size_t>(n));
      }
    }
    const uint64_t sum = Checksum(dst, static_cast<size_t>(rec.bytes()));
    if (sum != rec.checksum()) {
      return DataLoss(fmt::format("{}: checksum mismatch (stored {:016x}, read {:016x})", what,
                                  rec.checksum(), sum));
    }
    return Status::Ok();
  }
};

Result<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(std::shared_ptr<Storage> storage,
                                                                 const std::string& root,
                                                                 proto::Manifest manifest) {
  std::unique_ptr<CheckpointReader> r(new CheckpointReader());
  r->impl_ = std::make_unique<Impl>();
  Impl& m = *r->impl_;
  m.storage = std::move(storage);
  m.root = root;
  m.manifest = std::move(manifest);
  for (int i = 0; i < m.manifest.shards_size(); ++i) {
    const proto::ShardRecord& rec = m.manifest.shards(i);
    RETURN_IF_ERROR(ValidateLayout(
        rec.layout(),
        fmt::format("checkpoint step {}: tensor {} shard {}", m.manifest.step(), rec.tensor(), i)));
    m.by_tensor[rec.tensor()].push_back(i);
  }
  return r;
}

CheckpointReader::~CheckpointReader() = default;

const proto::Manifest& CheckpointReader::manifest() const { return impl_->manifest; }

std::vector<std::string> CheckpointReader::TensorNames() const {
  std::vector<std::string> names;
  std::set<std::string> seen;
  for (const proto::ShardRecord& rec : impl_->manifest.shards()) {
    if (seen.insert(rec.tensor()).second) names.push_back(rec.tensor());
  }
  return names;
}

Status CheckpointReader::Read(const std::string& tensor, const proto::ShardLayout& layout,
                              float* dst) {
  Impl& m = *impl_;
  RETURN_IF_ERROR(ValidateLayout(layout, "requested tensor " + tensor));
  auto it = m.by_tensor.find(tensor);
  if (it == m.by_tensor.end()) {
    return NotFound(fmt::format("checkpoint step {} has no tensor {}", m.manifest.step(), tensor));
  }
  const int64_t n = layout.end() - layout.begin();
  std::fill(dst, dst + n, 0.f);
  const std::vector<Run> want = LocalRuns(layout);
  std::vector<Run> want_sorted = want;
  SortByGlobal(&want_sorted);
  int64_t need = 0;
  for (const Run& r : want) need += r.len;
  int64_t got = 0;
  std::vector<float> buf;
  for (int idx : it->second) {
    const proto::ShardRecord& rec = m.manifest.shards(idx);
    if (std::vector<int64_t>(rec.layout().global_shape().begin(),
                             rec.layout().global_shape().end()) !=
        std::vector<int64_t>(layout.global_shape().begin(), layout.global_shape().end())) {
      return NotFound(fmt::format(
          "checkpoint step {}: tensor {} has a different global shape than this model's; was "
          "the model changed?",
          m.manifest.step(), tensor));
    }
    if (rec.layout().SerializeAsString() == layout.SerializeAsString()) {
      // Saved exactly as requested (a restore onto the writing layout): straight into dst.
      RETURN_IF_ERROR(m.ReadShard(rec, dst));
      got += need;
      continue;
    }
    std::vector<Run> have = LocalRuns(rec.layout());
    SortByGlobal(&have);
    if (!Overlaps(want_sorted, have)) continue;
    buf.resize(static_cast<size_t>(rec.bytes() / 4));
    RETURN_IF_ERROR(m.ReadShard(rec, buf.data()));
    got += CopyOverlap(want, layout.begin(), dst, have, rec.layout().begin(), buf.data());
  }
  if (got != need) {
    return NotFound(
        fmt::format("checkpoint step {}: tensor {}: the shards cover {} of the {} elements needed",
                    m.manifest.step(), tensor, got, need));
  }
  return Status::Ok();
}

Status CheckpointReader::ReadMany(const std::vector<ReadRequest>& requests, int threads) {
  std::atomic<size_t> next{0};
  std::mutex mu;
  Status first;  // GUARDED_BY(mu)
  auto work = [&] {
    for (size_t i; (i = next.fetch_add(1)) < requests.size();) {
      const ReadRequest& r = requests[i];
      Status s = Read(r.tensor, r.layout, r.dst);
      if (s.ok()) continue;
      std::lock_guard<std::mutex> lock(mu);
      if (first.ok()) first = s;
      next.store(requests.size());  // stop early
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < std::max(1, threads); ++t) pool.emplace_back(work);
  work();
  for (std::thread& t : pool) t.join();
  return first;
}

Result<std::vector<float>> CheckpointReader::ReadGlobal(const std::string& tensor,
                                                        std::vector<int64_t>* shape) {
  auto it = impl_->by_tensor.find(tensor);
  if (it == impl_->by_tensor.end()) {
    return NotFound(
        fmt::format("checkpoint step {} has no tensor {}", impl_->manifest.step(), tensor));
  }
  const proto::ShardRecord& rec = impl_->manifest.shards(it->second.front());
  proto::ShardLayout whole;
  int64_t n = 1;
  for (int64_t d : rec.layout().global_shape()) {
    whole.add_global_shape(d);
    whole.add_local_shape(d);
    n *= d;
  }
  whole.set_shard_dim(-1);
  whole.set_shard_blocks(1);
  whole.set_begin(0);
  whole.set_end(n);
  std::vector<float> out(static_cast<size_t>(n));
  RETURN_IF_ERROR(Read(tensor, whole, out.data()));
  if (shape != nullptr)
    shape->assign(rec.layout().global_shape().begin(), rec.layout().global_shape().end());
  return out;
}

Status CheckpointReader::VerifyAll() {
  std::string problems;
  std::vector<float> buf;
  for (const proto::ShardRecord& rec : impl_->manifest.shards()) {
    buf.resize(static_cast<size_t>(rec.bytes() / 4));
    Status s = impl_->ReadShard(rec, buf.data());
    if (s.ok()) continue;
    if (!problems.empty()) problems.push_back('\n');
    problems.append(s.message());
  }
  // Coverage: the shards of each tensor hold every element of the global tensor exactly once.
  for (const auto& [tensor, idxs] : impl_->by_tensor) {
    int64_t have = 0, n = 1;
    for (int64_t d : impl_->manifest.shards(idxs.front()).layout().global_shape()) n *= d;
    for (int i : idxs) have += CountReal(impl_->manifest.shards(i).layout());
    if (have != n) {
      if (!problems.empty()) problems.push_back('\n');
      problems += fmt::format(
          "checkpoint step {}: tensor {}: shards hold {} elements, the tensor "
          "has {}",
          impl_->manifest.step(), tensor, have, n);
    }
  }
  if (!problems.empty()) return DataLoss(problems);
  return Status::Ok();
}

}  // namespace strata::checkpoint
