#include "checkpoint/fault_fs.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <utility>

namespace strata::checkpoint {
namespace {

using rocksdb::FileOptions;
using rocksdb::IODebugContext;
using rocksdb::IOOptions;
using rocksdb::IOStatus;
using rocksdb::Slice;

// Paths are compared as strings: repeated slashes collapse and a trailing one goes, so that
// "db//000004.log" and NewDirectory("db/") agree with "db/000004.log" and "db".
std::string Normalize(const std::string& path) {
  std::string out;
  out.reserve(path.size());
  for (char c : path) {
    if (c == '/' && !out.empty() && out.back() == '/') continue;
    out.push_back(c);
  }
  if (out.size() > 1 && out.back() == '/') out.pop_back();
  return out;
}

std::string DirOf(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

bool Exists(rocksdb::FileSystem* fs, const std::string& path) {
  return fs->FileExists(path, IOOptions(), nullptr).ok();
}

// Creates or truncates `path` with `data`, synced; no rename.
IOStatus WriteSynced(rocksdb::FileSystem* fs, const std::string& path, std::string_view data) {
  std::unique_ptr<rocksdb::FSWritableFile> f;
  IOStatus s = fs->NewWritableFile(path, FileOptions(), &f, nullptr);
  if (s.ok()) s = f->Append(Slice(data.data(), data.size()), IOOptions(), nullptr);
  if (s.ok()) s = f->Fsync(IOOptions(), nullptr);
  if (s.ok()) s = f->Close(IOOptions(), nullptr);
  return s;
}

// FileSystem::Truncate, or where the base lacks it (the POSIX one does), a reopened writable
// file's Truncate (ftruncate).
IOStatus TruncateFile(rocksdb::FileSystem* fs, const std::string& path, uint64_t size) {
  IOStatus s = fs->Truncate(path, size, IOOptions(), nullptr);
  if (!s.IsNotSupported()) return s;
  std::unique_ptr<rocksdb::FSWritableFile> f;
  s = fs->ReopenWritableFile(path, FileOptions(), &f, nullptr);
  if (s.ok()) s = f->Truncate(size, IOOptions(), nullptr);
  if (s.ok()) s = f->Close(IOOptions(), nullptr);
  return s;
}

IOStatus ReadAll(rocksdb::FileSystem* fs, const std::string& path, std::string* out) {
  out->clear();
  std::unique_ptr<rocksdb::FSSequentialFile> f;
  IOStatus s = fs->NewSequentialFile(path, FileOptions(), &f, nullptr);
  if (!s.ok()) return s;
  std::string buf(1 << 16, '\0');
  for (;;) {
    Slice r;
    s = f->Read(buf.size(), IOOptions(), &r, buf.data(), nullptr);
    if (!s.ok()) return s;
    if (r.empty()) return IOStatus::OK();
    out->append(r.data(), r.size());
  }
}

}  // namespace

Status FromIo(const rocksdb::Status& s, std::string_view context) {
  if (s.ok()) return Status::Ok();
  std::string m = fmt::format("{}: {}", context, s.ToString());
  if (s.IsNoSpace()) return ResourceExhausted(m + " (disk full)");
  if (s.IsCorruption()) return DataLoss(m);
  if (s.IsNotFound() || s.IsPathNotFound()) return NotFound(m);
  return IoError(m);
}

// ---- file wrappers ----

class FaultInjectionFs::WritableFile : public rocksdb::FSWritableFileOwnerWrapper {
 public:
  WritableFile(FaultInjectionFs* fs, std::string path, std::shared_ptr<FileNode> node,
               std::unique_ptr<rocksdb::FSWritableFile> base)
      : FSWritableFileOwnerWrapper(std::move(base)),
        fs_(fs),
        path_(std::move(path)),
        node_(std::move(node)) {}

  IOStatus Append(const Slice& data, const IOOptions& options, IODebugContext* dbg) override {
    return Write(data.size(), std::nullopt, [&] { return target()->Append(data, options, dbg); });
  }
  IOStatus Append(const Slice& data, const IOOptions& options,
                  const rocksdb::DataVerificationInfo& info, IODebugContext* dbg) override {
    return Write(data.size(), std::nullopt,
                 [&] { return target()->Append(data, options, info, dbg); });
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            IODebugContext* dbg) override {
    return Write(data.size(), offset + data.size(),
                 [&] { return target()->PositionedAppend(data, offset, options, dbg); });
  }
  IOStatus PositionedAppend(const Slice& data, uint64_t offset, const IOOptions& options,
                            const rocksdb::DataVerificationInfo& info,
                            IODebugContext* dbg) override {
    return Write(data.size(), offset + data.size(),
                 [&] { return target()->PositionedAppend(data, offset, options, info, dbg); });
  }
  IOStatus Truncate(uint64_t size, const IOOptions& options, IODebugContext* dbg) override {
    IOStatus s = target()->Truncate(size, options, dbg);
    if (s.ok()) fs_->RecordTruncate(node_.get(), size);
    return s;
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    return DoSync([&] { return target()->Sync(options, dbg); });
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    return DoSync([&] { return target()->Fsync(options, dbg); });
  }
  // Fails like a sync, but is no durability point (sync_file_range syncs no metadata).
  IOStatus RangeSync(uint64_t offset, uint64_t nbytes, const IOOptions& options,
                     IODebugContext* dbg) override {
    IOStatus s = fs_->SyncFault(path_);
    if (!s.ok()) return s;
    return target()->RangeSync(offset, nbytes, options, dbg);
  }

 private:
  template <typename Op>
  IOStatus Write(uint64_t bytes, std::optional<uint64_t> end, Op op) {
    IOStatus s = fs_->ReserveSpace(path_, bytes);
    if (!s.ok()) return s;
    s = op();
    fs_->FinishWrite(node_.get(), bytes, end, s.ok());
    return s;
  }
  template <typename Op>
  IOStatus DoSync(Op op) {
    IOStatus s = fs_->SyncFault(path_);
    if (!s.ok()) return s;
    const uint64_t size = fs_->SizeOf(node_.get());
    s = op();
    if (s.ok()) fs_->RecordSync(node_.get(), size);
    return s;
  }

  FaultInjectionFs* fs_;
  const std::string path_;
  const std::shared_ptr<FileNode> node_;
};

class FaultInjectionFs::RandomRWFile : public rocksdb::FSRandomRWFileOwnerWrapper {
 public:
  RandomRWFile(FaultInjectionFs* fs, std::string path, std::shared_ptr<FileNode> node,
               std::unique_ptr<rocksdb::FSRandomRWFile> base)
      : FSRandomRWFileOwnerWrapper(std::move(base)),
        fs_(fs),
        path_(std::move(path)),
        node_(std::move(node)) {}

  IOStatus Write(uint64_t offset, const Slice& data, const IOOptions& options,
                 IODebugContext* dbg) override {
    IOStatus s = fs_->ReserveSpace(path_, data.size());
    if (!s.ok()) return s;
    s = target()->Write(offset, data, options, dbg);
    fs_->FinishWrite(node_.get(), data.size(), offset + data.size(), s.ok());
    return s;
  }
  IOStatus Read(uint64_t offset, size_t n, const IOOptions& options, Slice* result, char* scratch,
                IODebugContext* dbg) const override {
    IOStatus s = target()->Read(offset, n, options, result, scratch, dbg);
    if (s.ok()) fs_->MaybeFlip(path_, offset, result, scratch);
    return s;
  }
  IOStatus Sync(const IOOptions& options, IODebugContext* dbg) override {
    return DoSync([&] { return target()->Sync(options, dbg); });
  }
  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    return DoSync([&] { return target()->Fsync(options, dbg); });
  }

 private:
  template <typename Op>
  IOStatus DoSync(Op op) {
    IOStatus s = fs_->SyncFault(path_);
    if (!s.ok()) return s;
    const uint64_t size = fs_->SizeOf(node_.get());
    s = op();
    if (s.ok()) fs_->RecordSync(node_.get(), size);
    return s;
  }

  FaultInjectionFs* fs_;
  const std::string path_;
  const std::shared_ptr<FileNode> node_;
};

class FaultInjectionFs::SequentialFile : public rocksdb::FSSequentialFileOwnerWrapper {
 public:
  SequentialFile(const FaultInjectionFs* fs, std::string path,
                 std::unique_ptr<rocksdb::FSSequentialFile> base)
      : FSSequentialFileOwnerWrapper(std::move(base)), fs_(fs), path_(std::move(path)) {}

  IOStatus Read(size_t n, const IOOptions& options, Slice* result, char* scratch,
                IODebugContext* dbg) override {
    IOStatus s = target()->Read(n, options, result, scratch, dbg);
    if (s.ok()) {
      fs_->MaybeFlip(path_, pos_, result, scratch);
      pos_ += result->size();
    }
    return s;
  }
  IOStatus Skip(uint64_t n) override {
    IOStatus s = target()->Skip(n);
    if (s.ok()) pos_ += n;
    return s;
  }
  IOStatus PositionedRead(uint64_t offset, size_t n, const IOOptions& options, Slice* result,
                          char* scratch, IODebugContext* dbg) override {
    IOStatus s = target()->PositionedRead(offset, n, options, result, scratch, dbg);
    if (s.ok()) fs_->MaybeFlip(path_, offset, result, scratch);
    return s;
  }

 private:
  const FaultInjectionFs* fs_;
  const std::string path_;
  uint64_t pos_ = 0;  // file offset of the next Read (one thread at a time, per RocksDB)
};

class FaultInjectionFs::RandomAccessFile : public rocksdb::FSRandomAccessFileOwnerWrapper {
 public:
  RandomAccessFile(const FaultInjectionFs* fs, std::string path,
                   std::unique_ptr<rocksdb::FSRandomAccessFile> base)
      : FSRandomAccessFileOwnerWrapper(std::move(base)), fs_(fs), path_(std::move(path)) {}

  IOStatus Read(uint64_t offset, size_t n, const IOOptions& options, Slice* result, char* scratch,
                IODebugContext* dbg) const override {
    IOStatus s = target()->Read(offset, n, options, result, scratch, dbg);
    if (s.ok()) fs_->MaybeFlip(path_, offset, result, scratch);
    return s;
  }
  IOStatus MultiRead(rocksdb::FSReadRequest* reqs, size_t num_reqs, const IOOptions& options,
                     IODebugContext* dbg) override {
    IOStatus s = target()->MultiRead(reqs, num_reqs, options, dbg);
    if (!s.ok()) return s;
    for (size_t i = 0; i < num_reqs; ++i) {
      rocksdb::FSReadRequest& r = reqs[i];
      if (r.status.ok()) fs_->MaybeFlip(path_, r.offset, &r.result, r.scratch);
    }
    return s;
  }
  // Served synchronously through Read (the FSRandomAccessFile default), so that flips apply;
  // async I/O is only used when ReadOptions::async_io asks for it.
  IOStatus ReadAsync(rocksdb::FSReadRequest& req, const IOOptions& opts,
                     std::function<void(const rocksdb::FSReadRequest&, void*)> cb, void* cb_arg,
                     void** io_handle, rocksdb::IOHandleDeleter* del_fn,
                     IODebugContext* dbg) override {
    return FSRandomAccessFile::ReadAsync(req, opts, std::move(cb), cb_arg, io_handle, del_fn, dbg);
  }

 private:
  const FaultInjectionFs* fs_;
  const std::string path_;
};

class FaultInjectionFs::Directory : public rocksdb::FSDirectoryWrapper {
 public:
  Directory(FaultInjectionFs* fs, std::string dir, std::unique_ptr<rocksdb::FSDirectory> base)
      : FSDirectoryWrapper(std::move(base)), fs_(fs), dir_(std::move(dir)) {}

  IOStatus Fsync(const IOOptions& options, IODebugContext* dbg) override {
    return DoSync([&] { return FSDirectoryWrapper::Fsync(options, dbg); });
  }
  IOStatus FsyncWithDirOptions(const IOOptions& options, IODebugContext* dbg,
                               const rocksdb::DirFsyncOptions& dir_options) override {
    return DoSync(
        [&] { return FSDirectoryWrapper::FsyncWithDirOptions(options, dbg, dir_options); });
  }

 private:
  template <typename Op>
  IOStatus DoSync(Op op) {
    IOStatus s = fs_->SyncFault(dir_);
    if (!s.ok()) return s;
    const uint64_t seq = fs_->NextSeq();
    s = op();
    if (s.ok()) fs_->RecordDirSync(dir_, seq);
    return s;
  }

  FaultInjectionFs* fs_;
  const std::string dir_;
};

// ---- FaultInjectionFs ----

FaultInjectionFs::FaultInjectionFs(std::shared_ptr<rocksdb::FileSystem> base)
    : FileSystemWrapper(base) {}

FaultInjectionFs::~FaultInjectionFs() = default;

void FaultInjectionFs::SetFailSync(bool fail) { fail_sync_.store(fail); }

void FaultInjectionFs::SetSpaceLimit(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  space_limit_ = std::max<int64_t>(bytes, 0);
  space_used_ = 0;
}

void FaultInjectionFs::ClearSpaceLimit() {
  std::lock_guard<std::mutex> lock(mu_);
  space_limit_ = -1;
  space_used_ = 0;
}

void FaultInjectionFs::SetFlipByteOnRead(std::string path_substring) {
  std::lock_guard<std::mutex> lock(mu_);
  flip_substring_ = std::move(path_substring);
  flip_on_.store(true);
}

void FaultInjectionFs::ClearFlip() {
  std::lock_guard<std::mutex> lock(mu_);
  flip_on_.store(false);
  flip_substring_.clear();
}

uint64_t FaultInjectionFs::bytes_written() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_written_;
}

uint64_t FaultInjectionFs::syncs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return syncs_;
}

uint64_t FaultInjectionFs::dir_syncs() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dir_syncs_;
}

void FaultInjectionFs::TrackLocked(const std::string& path, std::shared_ptr<FileNode> node,
                                   bool created) {
  files_[path] = std::move(node);
  if (created) {
    pending_.push_back(
        PendingOp{PendingOp::Kind::kCreate, next_seq_++, DirOf(path), "", path, std::nullopt});
  }
}

IOStatus FaultInjectionFs::ReserveSpace(const std::string& path, uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (space_limit_ >= 0 && space_used_ + static_cast<int64_t>(bytes) > space_limit_) {
    return IOStatus::NoSpace(
        fmt::format("injected: space limit of {} bytes reached ({} used, {} more)", space_limit_,
                    space_used_, bytes),
        path);
  }
  space_used_ += static_cast<int64_t>(bytes);
  return IOStatus::OK();
}

void FaultInjectionFs::FinishWrite(FileNode* node, uint64_t bytes, std::optional<uint64_t> end,
                                   bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!ok) {
    space_used_ = std::max<int64_t>(space_used_ - static_cast<int64_t>(bytes), 0);
    return;
  }
  node->size = end ? std::max(node->size, *end) : node->size + bytes;
  bytes_written_ += bytes;
}

IOStatus FaultInjectionFs::SyncFault(const std::string& path) const {
  if (!fail_sync_.load()) return IOStatus::OK();
  return IOStatus::IOError("injected fsync failure", path);
}

uint64_t FaultInjectionFs::SizeOf(const FileNode* node) const {
  std::lock_guard<std::mutex> lock(mu_);
  return node->size;
}

void FaultInjectionFs::RecordSync(FileNode* node, uint64_t size_at_start) {
  std::lock_guard<std::mutex> lock(mu_);
  // A concurrent Truncate may have shrunk the file since the sync began.
  node->synced_size = std::min(std::max(node->synced_size, size_at_start), node->size);
  ++syncs_;
}

void FaultInjectionFs::RecordTruncate(FileNode* node, uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  node->size = size;
  node->synced_size = std::min(node->synced_size, size);
}

uint64_t FaultInjectionFs::NextSeq() const {
  std::lock_guard<std::mutex> lock(mu_);
  return next_seq_;
}

void FaultInjectionFs::RecordDirSync(const std::string& dir, uint64_t seq_at_start) {
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(pending_,
                [&](const PendingOp& op) { return op.seq < seq_at_start && op.dir == dir; });
  ++dir_syncs_;
}

void FaultInjectionFs::MaybeFlip(const std::string& path, uint64_t offset, Slice* result,
                                 char* scratch) const {
  if (!flip_on_.load() || result->empty()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (path.find(flip_substring_) == std::string::npos) return;
  }
  if (result->data() != scratch) {
    if (scratch == nullptr) return;
    std::memmove(scratch, result->data(), result->size());
    *result = Slice(scratch, result->size());
  }
  const uint64_t first = (kFlipOffset + kFlipPeriod - offset % kFlipPeriod) % kFlipPeriod;
  for (uint64_t i = first; i < result->size(); i += kFlipPeriod) scratch[i] ^= 0x01;
}

IOStatus FaultInjectionFs::OpenWritable(const std::string& fname, const FileOptions& file_opts,
                                        std::unique_ptr<rocksdb::FSWritableFile>* result,
                                        IODebugContext* dbg, bool reopen) {
  const std::string path = Normalize(fname);
  const bool existed = Exists(target(), fname);
  uint64_t old_size = 0;
  if (reopen && existed) {
    IOStatus s = target()->GetFileSize(fname, file_opts.io_options, &old_size, dbg);
    if (!s.ok()) return s;
  }
  std::unique_ptr<rocksdb::FSWritableFile> base;
  IOStatus s = reopen ? target()->ReopenWritableFile(fname, file_opts, &base, dbg)
                      : target()->NewWritableFile(fname, file_opts, &base, dbg);
  if (!s.ok()) return s;
  std::shared_ptr<FileNode> node;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(path);
    if (reopen && it != files_.end()) {
      node = it->second;
    } else {
      // A reopened untracked file's existing bytes count as durable; a new or truncated one
      // has none.
      node = std::make_shared<FileNode>(FileNode{old_size, old_size});
    }
    TrackLocked(path, node, !existed);
  }
  *result = std::make_unique<WritableFile>(this, path, std::move(node), std::move(base));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::NewWritableFile(const std::string& fname, const FileOptions& file_opts,
                                           std::unique_ptr<rocksdb::FSWritableFile>* result,
                                           IODebugContext* dbg) {
  return OpenWritable(fname, file_opts, result, dbg, /*reopen=*/false);
}

IOStatus FaultInjectionFs::ReopenWritableFile(const std::string& fname,
                                              const FileOptions& file_opts,
                                              std::unique_ptr<rocksdb::FSWritableFile>* result,
                                              IODebugContext* dbg) {
  return OpenWritable(fname, file_opts, result, dbg, /*reopen=*/true);
}

IOStatus FaultInjectionFs::ReuseWritableFile(const std::string& fname, const std::string& old_fname,
                                             const FileOptions& file_opts,
                                             std::unique_ptr<rocksdb::FSWritableFile>* result,
                                             IODebugContext* dbg) {
  IOStatus s = RenameFile(old_fname, fname, file_opts.io_options, dbg);
  if (!s.ok()) return s;
  return NewWritableFile(fname, file_opts, result, dbg);
}

IOStatus FaultInjectionFs::NewRandomRWFile(const std::string& fname, const FileOptions& file_opts,
                                           std::unique_ptr<rocksdb::FSRandomRWFile>* result,
                                           IODebugContext* dbg) {
  const std::string path = Normalize(fname);
  const bool existed = Exists(target(), fname);
  uint64_t old_size = 0;
  if (existed) {
    IOStatus s = target()->GetFileSize(fname, file_opts.io_options, &old_size, dbg);
    if (!s.ok()) return s;
  }
  std::unique_ptr<rocksdb::FSRandomRWFile> base;
  IOStatus s = target()->NewRandomRWFile(fname, file_opts, &base, dbg);
  if (!s.ok()) return s;
  std::shared_ptr<FileNode> node;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(path);
    node =
        it != files_.end() ? it->second : std::make_shared<FileNode>(FileNode{old_size, old_size});
    TrackLocked(path, node, !existed);
  }
  *result = std::make_unique<RandomRWFile>(this, path, std::move(node), std::move(base));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::NewSequentialFile(const std::string& fname, const FileOptions& file_opts,
                                             std::unique_ptr<rocksdb::FSSequentialFile>* result,
                                             IODebugContext* dbg) {
  std::unique_ptr<rocksdb::FSSequentialFile> base;
  IOStatus s = target()->NewSequentialFile(fname, file_opts, &base, dbg);
  if (!s.ok()) return s;
  *result = std::make_unique<SequentialFile>(this, Normalize(fname), std::move(base));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::NewRandomAccessFile(const std::string& fname,
                                               const FileOptions& file_opts,
                                               std::unique_ptr<rocksdb::FSRandomAccessFile>* result,
                                               IODebugContext* dbg) {
  std::unique_ptr<rocksdb::FSRandomAccessFile> base;
  IOStatus s = target()->NewRandomAccessFile(fname, file_opts, &base, dbg);
  if (!s.ok()) return s;
  *result = std::make_unique<RandomAccessFile>(this, Normalize(fname), std::move(base));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::NewDirectory(const std::string& name, const IOOptions& io_opts,
                                        std::unique_ptr<rocksdb::FSDirectory>* result,
                                        IODebugContext* dbg) {
  std::unique_ptr<rocksdb::FSDirectory> base;
  IOStatus s = target()->NewDirectory(name, io_opts, &base, dbg);
  if (!s.ok()) return s;
  *result = std::make_unique<Directory>(this, Normalize(name), std::move(base));
  return IOStatus::OK();
}

IOStatus FaultInjectionFs::DeleteFile(const std::string& fname, const IOOptions& options,
                                      IODebugContext* dbg) {
  IOStatus s = target()->DeleteFile(fname, options, dbg);
  if (s.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    files_.erase(Normalize(fname));
  }
  return s;
}

IOStatus FaultInjectionFs::Truncate(const std::string& fname, size_t size, const IOOptions& options,
                                    IODebugContext* dbg) {
  IOStatus s = target()->Truncate(fname, size, options, dbg);
  if (s.ok()) {
    std::shared_ptr<FileNode> node;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = files_.find(Normalize(fname));
      if (it != files_.end()) node = it->second;
    }
    if (node) RecordTruncate(node.get(), size);
  }
  return s;
}

void FaultInjectionFs::RekeyDir(const std::string& from, const std::string& to) {
  const std::string prefix = from + "/";
  auto moved = [&](std::string* path) {
    if (*path == from) {
      *path = to;
    } else if (path->starts_with(prefix)) {
      *path = to + path->substr(from.size());
    }
  };
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, std::shared_ptr<FileNode>> files;
  for (auto& [path, node] : files_) {
    std::string p = path;
    moved(&p);
    files.emplace(std::move(p), std::move(node));
  }
  files_.swap(files);
  for (PendingOp& op : pending_) {
    moved(&op.dir);
    moved(&op.dst);
    if (!op.src.empty()) moved(&op.src);
  }
}

IOStatus FaultInjectionFs::RenameFile(const std::string& src, const std::string& dst,
                                      const IOOptions& options, IODebugContext* dbg) {
  const std::string src_path = Normalize(src);
  const std::string dst_path = Normalize(dst);
  bool is_dir = false;
  if (target()->IsDirectory(src, options, &is_dir, dbg).ok() && is_dir) {
    IOStatus s = target()->RenameFile(src, dst, options, dbg);
    if (s.ok()) RekeyDir(src_path, dst_path);
    return s;
  }
  // What the target holds durably now, to put back if the rename does not become durable.
  std::optional<std::string> old_contents;
  if (Exists(target(), dst)) {
    std::string contents;
    IOStatus s = ReadAll(target(), dst, &contents);
    if (!s.ok()) return s;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = files_.find(dst_path);
    if (it != files_.end() && contents.size() > it->second->synced_size) {
      contents.resize(it->second->synced_size);
    }
    old_contents = std::move(contents);
  }
  IOStatus s = target()->RenameFile(src, dst, options, dbg);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(src_path);
  if (it != files_.end()) {
    std::shared_ptr<FileNode> node = std::move(it->second);
    files_.erase(it);
    files_[dst_path] = std::move(node);
  } else {
    files_.erase(dst_path);
  }
  pending_.push_back(PendingOp{PendingOp::Kind::kRename, next_seq_++, DirOf(dst_path), src_path,
                               dst_path, std::move(old_contents)});
  return s;
}

IOStatus FaultInjectionFs::LinkFile(const std::string& src, const std::string& dst,
                                    const IOOptions& options, IODebugContext* dbg) {
  IOStatus s = target()->LinkFile(src, dst, options, dbg);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = files_.find(Normalize(src));
  // Both names share the inode, hence the node; an untracked inode stays untracked.
  std::shared_ptr<FileNode> node = it != files_.end() ? it->second : nullptr;
  const std::string dst_path = Normalize(dst);
  if (node) {
    TrackLocked(dst_path, std::move(node), /*created=*/true);
  } else {
    pending_.push_back(PendingOp{PendingOp::Kind::kCreate, next_seq_++, DirOf(dst_path), "",
                                 dst_path, std::nullopt});
  }
  return s;
}

IOStatus FaultInjectionFs::GetFreeSpace(const std::string& path, const IOOptions& options,
                                        uint64_t* diskfree, IODebugContext* dbg) {
  IOStatus s = target()->GetFreeSpace(path, options, diskfree, dbg);
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  if (space_limit_ >= 0) {
    *diskfree = std::min<uint64_t>(*diskfree, std::max<int64_t>(space_limit_ - space_used_, 0));
  }
  return s;
}

Status FaultInjectionFs::DropUnsyncedData() {
  std::map<std::string, std::shared_ptr<FileNode>> files;
  std::vector<PendingOp> pending;
  {
    std::lock_guard<std::mutex> lock(mu_);
    files.swap(files_);
    pending.swap(pending_);
  }
  Status first;
  auto note = [&first](const IOStatus& s, const std::string& what) {
    if (!s.ok() && first.ok()) first = FromIo(s, what);
  };
  // Contents first, under the current names; then the namespace, newest change first.
  for (const auto& [path, node] : files) {
    uint64_t size = 0;
    if (!target()->GetFileSize(path, IOOptions(), &size, nullptr).ok()) continue;  // gone
    if (size > node->synced_size) {
      note(TruncateFile(target(), path, node->synced_size), "drop unsynced data: truncate " + path);
    }
  }
  for (auto op = pending.rbegin(); op != pending.rend(); ++op) {
    if (!Exists(target(), op->dst)) continue;  // deleted since: deletions are durable at once
    if (op->kind == PendingOp::Kind::kCreate) {
      note(target()->DeleteFile(op->dst, IOOptions(), nullptr),
           "drop unsynced data: delete " + op->dst);
      continue;
    }
    note(target()->RenameFile(op->dst, op->src, IOOptions(), nullptr),
         "drop unsynced data: rename " + op->dst + " back to " + op->src);
    if (op->old_dst_contents) {
      note(WriteSynced(target(), op->dst, *op->old_dst_contents),
           "drop unsynced data: restore " + op->dst);
    }
  }
  return first;
}

// ---- factories and helpers ----

std::shared_ptr<FaultInjectionFs> NewFaultInjectionFs(std::shared_ptr<rocksdb::FileSystem> base) {
  return std::make_shared<FaultInjectionFs>(std::move(base));
}

std::unique_ptr<rocksdb::Env> NewEnvOn(const std::shared_ptr<rocksdb::FileSystem>& fs) {
  return rocksdb::NewCompositeEnv(fs);
}

Status WriteFileDurably(rocksdb::FileSystem* fs, const std::string& path, std::string_view data) {
  const IOOptions io;
  const std::string tmp = path + ".tmp";
  std::unique_ptr<rocksdb::FSWritableFile> file;
  IOStatus s = fs->NewWritableFile(tmp, FileOptions(), &file, nullptr);
  if (!s.ok()) return FromIo(s, "create " + tmp);
  const char* step = "append to";
  s = file->Append(Slice(data.data(), data.size()), io, nullptr);
  if (s.ok()) {
    step = "fsync";
    s = file->Fsync(io, nullptr);
  }
  if (s.ok()) {
    step = "close";
    s = file->Close(io, nullptr);
  }
  file.reset();
  if (s.ok()) {
    step = "rename into place";
    s = fs->RenameFile(tmp, path, io, nullptr);
  }
  if (!s.ok()) {
    fs->DeleteFile(tmp, io, nullptr).PermitUncheckedError();  // best effort; *.tmp is ignored
    return FromIo(s, fmt::format("{} {} (writing {})", step, tmp, path));
  }
  const std::string dir = DirOf(Normalize(path));
  std::unique_ptr<rocksdb::FSDirectory> d;
  s = fs->NewDirectory(dir, io, &d, nullptr);
  if (!s.ok()) return FromIo(s, "open directory " + dir + " to fsync it after writing " + path);
  s = d->Fsync(io, nullptr);
  if (!s.ok()) return FromIo(s, "fsync directory " + dir + " after writing " + path);
  return FromIo(d->Close(io, nullptr), "close directory " + dir);
}

Result<std::string> ReadWholeFile(rocksdb::FileSystem* fs, const std::string& path,
                                  int64_t max_bytes) {
  if (max_bytes < 0) return InvalidArgument(fmt::format("max_bytes {} < 0", max_bytes));
  const IOOptions io;
  std::unique_ptr<rocksdb::FSSequentialFile> file;
  IOStatus s = fs->NewSequentialFile(path, FileOptions(), &file, nullptr);
  if (!s.ok()) return FromIo(s, "open " + path);
  auto too_big = [&](uint64_t at_least) {
    return OutOfRange(fmt::format("{} holds at least {} bytes, more than the limit of {}", path,
                                  at_least, max_bytes));
  };
  std::string out;
  uint64_t size = 0;
  if (fs->GetFileSize(path, io, &size, nullptr).ok()) {
    if (size > static_cast<uint64_t>(max_bytes)) return too_big(size);
    out.reserve(size);
  }
  std::string buf(1 << 20, '\0');
  for (;;) {
    Slice r;
    s = file->Read(buf.size(), io, &r, buf.data(), nullptr);
    if (!s.ok()) return FromIo(s, "read " + path);
    if (r.empty()) return out;
    if (out.size() + r.size() > static_cast<uint64_t>(max_bytes)) {
      return too_big(out.size() + r.size());
    }
    out.append(r.data(), r.size());
  }
}

}  // namespace strata::checkpoint
