// Private to checkpoint/: the RocksDB FileSystem every checkpoint file and every checkpoint
// RocksDB instance goes through, a fault-injecting wrapper of it for tests, and helpers for our
// own (non-RocksDB) files on any FileSystem.
//
// FaultInjectionFs forwards to a base FileSystem (the real one by default) and, when a test
// asks, fails fsyncs, runs out of space, flips bits on read, and simulates a power loss by
// dropping everything that was not made durable. All switches are off by default, so an
// unfaulted FaultInjectionFs behaves like its base.
//
// Durability model (what DropUnsyncedData keeps). Conservative, like POSIX without ext4's
// helpful extras:
//   * Contents: a file written through this fs keeps only the bytes it had at its last
//     successful Sync/Fsync (of the writable or random-rw handle). Close, Flush and RangeSync
//     are not durability points (RangeSync is sync_file_range: no metadata, no guarantee).
//     A file re-created with NewWritableFile over an existing name starts at 0 durable bytes.
//     Files not written through this fs since the last drop are left alone.
//   * Names: creating a file (NewWritableFile, ReopenWritableFile or NewRandomRWFile of a
//     missing name, LinkFile) and RenameFile are durable only once the directory holding the
//     new name is fsynced (FSDirectory::Fsync / FsyncWithDirOptions) after the operation. A
//     file whose creation was not made durable disappears, even if its data was synced; one
//     whose directory was fsynced but data never synced stays, empty. A non-durable rename is
//     undone: the target gets back its previous contents (or disappears if it had none) and
//     the source name comes back (unless its own creation was not durable either). A rename
//     across directories counts as durable when the target's directory is fsynced.
//   * Deletions (DeleteFile, DeleteDir), directory creation, directory renames (tracked files
//     under the directory move along) and FileSystem::Truncate take effect at once and are
//     never undone. A pending rename whose target was deleted since is dropped, not undone.
//     Overwrites inside the synced part of a random-rw file are not undone.
//   * The info LOG (NewLogger) and LOCK files bypass the fault layer (diagnostics only).
// Undoing a rename needs the target's previous contents: they are read into memory at rename
// time, which is fine for the small files (CURRENT, OPTIONS, manifests) this is used with.
#pragma once

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/status.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace strata::checkpoint {

// A RocksDB (IO)Status as ours, with `context` (name the path or key) in front:
// NoSpace -> RESOURCE_EXHAUSTED, Corruption -> DATA_LOSS, NotFound/PathNotFound -> NOT_FOUND,
// anything else -> IO_ERROR. OK stays OK. Takes rocksdb::Status so that DB results and
// IOStatus (a subclass) both convert.
Status FromIo(const rocksdb::Status& s, std::string_view context);

// Bit flips on read hit every byte at a file offset O with O % kFlipPeriod == kFlipOffset
// (bit 0 is inverted): offset 100 lands inside the first data block of an SST, and the rule
// does not depend on how a reader splits its reads.
inline constexpr uint64_t kFlipPeriod = 4096;
inline constexpr uint64_t kFlipOffset = 100;

// Thread-safe: switches and counters may be used while other threads do I/O through the fs.
// Every handle it returns refers back to it, so the fs must outlive them (RocksDB: keep the Env
// and this fs alive until the DB is closed).
class FaultInjectionFs : public rocksdb::FileSystemWrapper {
 public:
  explicit FaultInjectionFs(
      std::shared_ptr<rocksdb::FileSystem> base = rocksdb::FileSystem::Default());
  ~FaultInjectionFs() override;

  static const char* kClassName() { return "StrataFaultInjectionFs"; }
  const char* Name() const override { return kClassName(); }

  // While on, Sync/Fsync of writable and random-rw files, RangeSync of writable files and
  // directory fsyncs return IOError("injected fsync failure: <path>") without syncing, so
  // nothing becomes durable.
  void SetFailSync(bool fail);
  // From now on, appends (and random-rw writes) that would take the bytes written since this
  // call beyond `bytes` fail with IOStatus::NoSpace, writing nothing; GetFreeSpace reports
  // what is left. Calling it again restarts the count. ClearSpaceLimit lifts the limit.
  void SetSpaceLimit(int64_t bytes);
  void ClearSpaceLimit();
  // Reads of files whose path contains `path_substring` (sequential, random-access incl.
  // MultiRead and ReadAsync, random-rw) return data with bit 0 of every byte at an offset
  // matching kFlipPeriod/kFlipOffset inverted. Files stay intact on disk. Also applies to
  // handles opened before the call. ClearFlip stops it.
  void SetFlipByteOnRead(std::string path_substring);
  void ClearFlip();

  // Simulates a power loss under the model above: truncates every tracked file to its durable
  // size, undoes non-durable creations and renames (newest first), then forgets all tracking
  // (what is left is durable). Only call it while nothing has a file of this fs open (no DB
  // open on it, no writer or reader alive): open handles would write past the truncation.
  // Keeps going after an error and returns the first one (IO_ERROR naming the path).
  Status DropUnsyncedData();

  // Bytes appended/written successfully through this fs, all time.
  uint64_t bytes_written() const;
  // Successful file Sync/Fsync calls, and directory fsyncs, all time.
  uint64_t syncs() const;
  uint64_t dir_syncs() const;

  // ---- rocksdb::FileSystem ----
  rocksdb::IOStatus NewSequentialFile(const std::string& fname,
                                      const rocksdb::FileOptions& file_opts,
                                      std::unique_ptr<rocksdb::FSSequentialFile>* result,
                                      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomAccessFile(const std::string& fname,
                                        const rocksdb::FileOptions& file_opts,
                                        std::unique_ptr<rocksdb::FSRandomAccessFile>* result,
                                        rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewWritableFile(const std::string& fname, const rocksdb::FileOptions& file_opts,
                                    std::unique_ptr<rocksdb::FSWritableFile>* result,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus ReopenWritableFile(const std::string& fname,
                                       const rocksdb::FileOptions& file_opts,
                                       std::unique_ptr<rocksdb::FSWritableFile>* result,
                                       rocksdb::IODebugContext* dbg) override;
  // Rename + NewWritableFile (the file is truncated rather than recycled in place).
  rocksdb::IOStatus ReuseWritableFile(const std::string& fname, const std::string& old_fname,
                                      const rocksdb::FileOptions& file_opts,
                                      std::unique_ptr<rocksdb::FSWritableFile>* result,
                                      rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewRandomRWFile(const std::string& fname, const rocksdb::FileOptions& file_opts,
                                    std::unique_ptr<rocksdb::FSRandomRWFile>* result,
                                    rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus NewDirectory(const std::string& name, const rocksdb::IOOptions& io_opts,
                                 std::unique_ptr<rocksdb::FSDirectory>* result,
                                 rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus DeleteFile(const std::string& fname, const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus Truncate(const std::string& fname, size_t size,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus RenameFile(const std::string& src, const std::string& target,
                               const rocksdb::IOOptions& options,
                               rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus LinkFile(const std::string& src, const std::string& target,
                             const rocksdb::IOOptions& options,
                             rocksdb::IODebugContext* dbg) override;
  rocksdb::IOStatus GetFreeSpace(const std::string& path, const rocksdb::IOOptions& options,
                                 uint64_t* diskfree, rocksdb::IODebugContext* dbg) override;

 private:
  class WritableFile;
  class RandomRWFile;
  class SequentialFile;
  class RandomAccessFile;
  class Directory;

  // What we know of one file (one inode: hard links share it).
  struct FileNode {
    uint64_t size = 0;         // bytes written, as far as this fs saw
    uint64_t synced_size = 0;  // bytes durable after a power loss
  };
  // A namespace change not yet made durable by an fsync of `dir`.
  struct PendingOp {
    enum class Kind { kCreate, kRename };
    Kind kind;
    uint64_t seq;
    std::string dir;  // directory of `dst`
    std::string src;  // kRename only
    std::string dst;
    std::optional<std::string> old_dst_contents;  // kRename: durable contents dst had, if any
  };

  // With mu_ held: tracks `path` (normalised) as `node`; logs its creation when `created`.
  void TrackLocked(const std::string& path, std::shared_ptr<FileNode> node, bool created);
  // A directory `from` was renamed to `to`: tracked paths under it move along.
  void RekeyDir(const std::string& from, const std::string& to);
  // Takes `bytes` from the space limit: NoSpace naming `path` when it would go beyond it.
  rocksdb::IOStatus ReserveSpace(const std::string& path, uint64_t bytes);
  // After the write of a reservation: on success the node grows to `end` (or by `bytes` when
  // `end` is unset) and bytes_written() counts it; on failure the reservation is returned.
  void FinishWrite(FileNode* node, uint64_t bytes, std::optional<uint64_t> end, bool ok);
  // The injected fsync error while SetFailSync is on, OK otherwise.
  rocksdb::IOStatus SyncFault(const std::string& path) const;
  uint64_t SizeOf(const FileNode* node) const;
  // A sync that began when the node held `size_at_start` bytes succeeded.
  void RecordSync(FileNode* node, uint64_t size_at_start);
  void RecordTruncate(FileNode* node, uint64_t size);
  // The sequence number the next namespace operation gets.
  uint64_t NextSeq() const;
  // An fsync of `dir` that began before operation `seq_at_start` succeeded.
  void RecordDirSync(const std::string& dir, uint64_t seq_at_start);
  // Flips the configured bytes of a read of `path` at `offset`, first moving the data into
  // `scratch` when the base returned it elsewhere (mmap); without a scratch it is left alone.
  void MaybeFlip(const std::string& path, uint64_t offset, rocksdb::Slice* result,
                 char* scratch) const;
  rocksdb::IOStatus OpenWritable(const std::string& fname, const rocksdb::FileOptions& file_opts,
                                 std::unique_ptr<rocksdb::FSWritableFile>* result,
                                 rocksdb::IODebugContext* dbg, bool reopen);

  std::atomic<bool> fail_sync_{false};
  std::atomic<bool> flip_on_{false};  // fast path for reads; flip_substring_ holds the rule

  mutable std::mutex mu_;  // guards everything below
  std::map<std::string, std::shared_ptr<FileNode>> files_;
  std::vector<PendingOp> pending_;
  uint64_t next_seq_ = 0;
  int64_t space_limit_ = -1;  // < 0: none
  int64_t space_used_ = 0;    // bytes reserved since SetSpaceLimit
  std::string flip_substring_;
  uint64_t bytes_written_ = 0;
  uint64_t syncs_ = 0;
  uint64_t dir_syncs_ = 0;
};

std::shared_ptr<FaultInjectionFs> NewFaultInjectionFs(
    std::shared_ptr<rocksdb::FileSystem> base = rocksdb::FileSystem::Default());

// An Env (default threads and clock) whose file I/O goes to `fs`, for rocksdb::Options::env.
// The Env keeps `fs` alive; keep the Env alive until every DB using it is closed.
std::unique_ptr<rocksdb::Env> NewEnvOn(const std::shared_ptr<rocksdb::FileSystem>& fs);

// Replaces `path` with `data` atomically and durably: writes path + ".tmp", syncs and closes
// it, renames it over `path` and fsyncs the parent directory. Returns OK once the new contents
// are durable. On error (IO_ERROR, RESOURCE_EXHAUSTED when the disk is full, naming the path)
// `path` holds either its previous contents (failure before the rename; the temp file is
// removed, best effort) or the new ones but not durably (the directory fsync failed) — never
// a mix. One writer per path at a time (the temp name is fixed); readers listing a directory
// must ignore "*.tmp" leftovers of a crash.
Status WriteFileDurably(rocksdb::FileSystem* fs, const std::string& path, std::string_view data);

// The whole contents of `path`. NOT_FOUND when it does not exist, OUT_OF_RANGE when it holds
// more than `max_bytes` bytes (a guard against reading a wrong or corrupt file into memory),
// INVALID_ARGUMENT for a negative `max_bytes`, IO_ERROR naming the path otherwise.
Result<std::string> ReadWholeFile(rocksdb::FileSystem* fs, const std::string& path,
                                  int64_t max_bytes);

}  // namespace strata::checkpoint
