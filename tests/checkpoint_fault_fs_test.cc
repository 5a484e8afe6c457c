// Tests for checkpoint/fault_fs: each fault of FaultInjectionFs against a real RocksDB instance
// opened on an Env over it (lost unsynced writes, failed fsyncs, a full disk, flipped bits), the
// durability model of DropUnsyncedData on plain files, and WriteFileDurably / ReadWholeFile.
#include <gtest/gtest.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <filesystem>
#include <memory>
#include <string>

#include "checkpoint/fault_fs.h"
#include "tests/test_util.h"

namespace strata::checkpoint {
namespace {

using ::strata::testing::ScratchDir;

class FaultFsTest : public ::testing::Test {
 protected:
  std::string Path(const std::string& name) const { return dir_.path() + "/" + name; }
  std::string DbPath() const { return Path("db"); }

  rocksdb::Options DbOptions() const {
    rocksdb::Options o;
    o.env = env_.get();
    o.create_if_missing = true;
    return o;
  }
  std::unique_ptr<rocksdb::DB> OpenDb(const rocksdb::Options& options) {
    rocksdb::DB* db = nullptr;
    rocksdb::Status s = rocksdb::DB::Open(options, DbPath(), &db);
    EXPECT_TRUE(s.ok()) << s.ToString();
    return std::unique_ptr<rocksdb::DB>(db);
  }
  std::unique_ptr<rocksdb::DB> OpenDb() { return OpenDb(DbOptions()); }
  // The value of `key`, "<NotFound>" or "<error ...>".
  static std::string Get(rocksdb::DB* db, const std::string& key,
                         const rocksdb::ReadOptions& ro = rocksdb::ReadOptions()) {
    std::string v;
    rocksdb::Status s = db->Get(ro, key, &v);
    if (s.IsNotFound()) return "<NotFound>";
    if (!s.ok()) return "<error " + s.ToString() + ">";
    return v;
  }
  static rocksdb::WriteOptions Synced() {
    rocksdb::WriteOptions w;
    w.sync = true;
    return w;
  }

  // Plain-file helpers through the fault fs, checking every step.
  void Create(const std::string& path, const std::string& data, bool sync, bool reopen = false) {
    std::unique_ptr<rocksdb::FSWritableFile> f;
    const rocksdb::IOStatus s =
        reopen ? fs_->ReopenWritableFile(path, rocksdb::FileOptions(), &f, nullptr)
               : fs_->NewWritableFile(path, rocksdb::FileOptions(), &f, nullptr);
    ASSERT_TRUE(s.ok()) << s.ToString();
    ASSERT_TRUE(f->Append(data, rocksdb::IOOptions(), nullptr).ok());
    if (sync) {
      ASSERT_TRUE(f->Sync(rocksdb::IOOptions(), nullptr).ok());
    }
    ASSERT_TRUE(f->Close(rocksdb::IOOptions(), nullptr).ok());
  }
  void FsyncDir() {
    std::unique_ptr<rocksdb::FSDirectory> d;
    ASSERT_TRUE(fs_->NewDirectory(dir_.path(), rocksdb::IOOptions(), &d, nullptr).ok());
    ASSERT_TRUE(d->Fsync(rocksdb::IOOptions(), nullptr).ok());
  }
  // Contents read past the fault layer; "<missing>" when absent.
  static std::string OnDisk(const std::string& path) {
    auto r = ReadWholeFile(rocksdb::FileSystem::Default().get(), path, 1 << 20);
    if (r.status().code() == StatusCode::kNotFound) return "<missing>";
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *r : "<error>";
  }

  ScratchDir dir_;
  std::shared_ptr<FaultInjectionFs> fs_ = NewFaultInjectionFs();
  std::unique_ptr<rocksdb::Env> env_ = NewEnvOn(fs_);
};

TEST_F(FaultFsTest, FromIoMapsRocksDbCodes) {
  EXPECT_TRUE(FromIo(rocksdb::IOStatus::OK(), "x").ok());
  Status full = FromIo(rocksdb::IOStatus::NoSpace("write", "/d/f"), "save /d/f");
  EXPECT_EQ(full.code(), StatusCode::kResourceExhausted);
  EXPECT_HAS(full.message(), "save /d/f: ");
  EXPECT_HAS(full.message(), "disk full");
  EXPECT_EQ(FromIo(rocksdb::Status::Corruption("bad block"), "c").code(), StatusCode::kDataLoss);
  EXPECT_EQ(FromIo(rocksdb::Status::NotFound("k"), "n").code(), StatusCode::kNotFound);
  EXPECT_EQ(FromIo(rocksdb::IOStatus::PathNotFound("p"), "n").code(), StatusCode::kNotFound);
  EXPECT_EQ(FromIo(rocksdb::IOStatus::IOError("eio"), "e").code(), StatusCode::kIoError);
}

// Without a fault the wrapper is transparent: a DB round-trips, and it sees the I/O.
TEST_F(FaultFsTest, UnfaultedDbRoundTrips) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "a", "1").ok());
    ASSERT_TRUE(db->Put(Synced(), "b", "2").ok());
    ASSERT_TRUE(db->Flush(rocksdb::FlushOptions()).ok());
  }
  EXPECT_GT(fs_->bytes_written(), 0u);
  EXPECT_GT(fs_->syncs(), 0u);
  EXPECT_GT(fs_->dir_syncs(), 0u);
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "a"), "1");
  EXPECT_EQ(Get(db.get(), "b"), "2");
}

// (a) A power loss keeps the writes made with sync = true and loses the later unsynced ones.
TEST_F(FaultFsTest, DropLosesUnsyncedDbWritesKeepsSyncedOnes) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(Synced(), "synced", "s").ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "unsynced1", "u").ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "unsynced2", "u").ok());
    EXPECT_EQ(Get(db.get(), "unsynced1"), "u");
  }
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "synced"), "s");
  EXPECT_EQ(Get(db.get(), "unsynced1"), "<NotFound>");
  EXPECT_EQ(Get(db.get(), "unsynced2"), "<NotFound>");
}

// The control for (a): the same writes survive a clean close and reopen without a drop.
TEST_F(FaultFsTest, WithoutDropUnsyncedDbWritesSurviveReopen) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(Synced(), "synced", "s").ok());
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "unsynced1", "u").ok());
  }
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "synced"), "s");
  EXPECT_EQ(Get(db.get(), "unsynced1"), "u");
}

// (b) A failed fsync fails the synced write and stops the DB: later writes fail too and
// Resume() cannot clear a WAL sync error, so the DB must be reopened. The write's outcome is
// unknown: its bytes reached the WAL, so a reopen without a crash replays it, while after a
// power loss it is gone (it was never durable).
TEST_F(FaultFsTest, FailedFsyncFailsSyncedPutAndStopsWrites) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(Synced(), "before", "1").ok());
    const uint64_t syncs = fs_->syncs();
    fs_->SetFailSync(true);
    rocksdb::Status s = db->Put(Synced(), "during", "2");
    EXPECT_TRUE(s.IsIOError()) << s.ToString();
    EXPECT_HAS(s.ToString(), "injected fsync failure");
    EXPECT_HAS(s.ToString(), DbPath());
    EXPECT_EQ(FromIo(s, "put").code(), StatusCode::kIoError);
    EXPECT_EQ(fs_->syncs(), syncs);
    EXPECT_EQ(Get(db.get(), "during"), "<NotFound>");
    // The background error stops every later write, synced or not.
    EXPECT_HAS(db->Put(rocksdb::WriteOptions(), "after", "3").ToString(), "injected fsync failure");
    fs_->SetFailSync(false);
    EXPECT_FALSE(db->Resume().ok());
    EXPECT_FALSE(db->Put(Synced(), "after", "3").ok());
    EXPECT_EQ(Get(db.get(), "before"), "1");  // reads still work
  }
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "before"), "1");
  EXPECT_EQ(Get(db.get(), "during"), "2");
  EXPECT_EQ(Get(db.get(), "after"), "<NotFound>");
  ASSERT_TRUE(db->Put(Synced(), "after", "3").ok());
}

TEST_F(FaultFsTest, WriteWhoseFsyncFailedIsLostOnPowerLoss) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(Synced(), "before", "1").ok());
    fs_->SetFailSync(true);
    EXPECT_FALSE(db->Put(Synced(), "during", "2").ok());
    fs_->SetFailSync(false);
  }
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "before"), "1");
  EXPECT_EQ(Get(db.get(), "during"), "<NotFound>");
}

// (c) A full disk fails the WAL append of a Put, and the SST write of a Flush, with NoSpace,
// which FromIo reports as RESOURCE_EXHAUSTED. The DB then refuses writes (RocksDB's own
// recovery from NoSpace is in progress: Resume() says Busy); a reopen with space works.
TEST_F(FaultFsTest, SpaceLimitFailsPutWithNoSpace) {
  {
    auto db = OpenDb();
    ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "small", "s").ok());
    fs_->SetSpaceLimit(1000);
    rocksdb::Status s = db->Put(rocksdb::WriteOptions(), "big", std::string(4000, 'x'));
    EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
    Status ours = FromIo(s, "put big");
    EXPECT_EQ(ours.code(), StatusCode::kResourceExhausted);
    EXPECT_HAS(ours.message(), "000004.log");
    EXPECT_TRUE(db->Put(rocksdb::WriteOptions(), "tiny", "t").IsNoSpace());
    fs_->ClearSpaceLimit();
  }
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "small"), "s");
  EXPECT_EQ(Get(db.get(), "big"), "<NotFound>");
  ASSERT_TRUE(db->Put(Synced(), "big", std::string(4000, 'x')).ok());
}

TEST_F(FaultFsTest, SpaceLimitFailsFlushWithNoSpace) {
  auto db = OpenDb();
  rocksdb::WriteOptions no_wal;
  no_wal.disableWAL = true;
  ASSERT_TRUE(db->Put(no_wal, "big", std::string(4000, 'x')).ok());
  fs_->SetSpaceLimit(1000);
  uint64_t free = 0;
  ASSERT_TRUE(fs_->GetFreeSpace(DbPath(), rocksdb::IOOptions(), &free, nullptr).ok());
  EXPECT_EQ(free, 1000u);
  rocksdb::Status s = db->Flush(rocksdb::FlushOptions());
  EXPECT_TRUE(s.IsNoSpace()) << s.ToString();
  EXPECT_HAS(s.ToString(), ".sst");
  EXPECT_EQ(FromIo(s, "flush").code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(Get(db.get(), "big"), std::string(4000, 'x'));  // still in the memtable
  fs_->ClearSpaceLimit();
}

// (d) A flipped bit in an SST is caught by the block checksum on read; the file on disk is
// intact, so without the flip a fresh instance reads it.
TEST_F(FaultFsTest, FlippedSstBitIsCorruption) {
  {
    auto db = OpenDb();
    for (int i = 0; i < 10; ++i) {
      ASSERT_TRUE(db->Put(rocksdb::WriteOptions(), "key" + std::to_string(i),
                          std::string(100, static_cast<char>('a' + i)))
                      .ok());
    }
    ASSERT_TRUE(db->Flush(rocksdb::FlushOptions()).ok());
  }
  fs_->SetFlipByteOnRead(".sst");
  {
    // A fresh instance: its block cache is empty, so the data block is read from the file.
    auto db = OpenDb();
    ASSERT_NE(db, nullptr);
    rocksdb::ReadOptions ro;
    ro.verify_checksums = true;
    std::string v;
    rocksdb::Status g = db->Get(ro, "key0", &v);
    EXPECT_TRUE(g.IsCorruption()) << g.ToString();
    EXPECT_HAS(g.ToString(), "checksum mismatch");
    EXPECT_EQ(FromIo(g, "get key0").code(), StatusCode::kDataLoss);
  }
  fs_->ClearFlip();
  auto db = OpenDb();
  EXPECT_EQ(Get(db.get(), "key0"), std::string(100, 'a'));
  EXPECT_EQ(Get(db.get(), "key9"), std::string(100, 'j'));
}

// The flip rule, on a plain file: bit 0 of every byte at offset % 4096 == 100, whatever the
// read size, only for matching paths.
TEST_F(FaultFsTest, FlipRuleOnPlainReads) {
  std::string data(10000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 7);
  const std::string path = Path("blob.bin");
  ASSERT_TRUE(WriteFileDurably(fs_.get(), path, data).ok());
  fs_->SetFlipByteOnRead("blob");
  auto r = ReadWholeFile(fs_.get(), path, 1 << 20);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ASSERT_EQ(r->size(), data.size());
  std::string expected = data;
  for (size_t o : {100, 4196, 8292}) expected[o] ^= 0x01;
  EXPECT_TRUE(*r == expected);
  EXPECT_EQ(OnDisk(path), data);

  // Random-access reads at odd offsets and lengths follow the same rule.
  std::unique_ptr<rocksdb::FSRandomAccessFile> f;
  ASSERT_TRUE(fs_->NewRandomAccessFile(path, rocksdb::FileOptions(), &f, nullptr).ok());
  std::string scratch(300, '\0');
  rocksdb::Slice got;
  ASSERT_TRUE(f->Read(4100, 200, rocksdb::IOOptions(), &got, scratch.data(), nullptr).ok());
  EXPECT_EQ(got.ToString(), expected.substr(4100, 200));

  fs_->SetFlipByteOnRead("other");
  r = ReadWholeFile(fs_.get(), path, 1 << 20);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(*r == data);
  fs_->ClearFlip();
}

// (e) Durability of plain files under the model of fault_fs.h.
TEST_F(FaultFsTest, DropKeepsDurableFilesAndUndoesTheRest) {
  const std::string durable = Path("durable");
  ASSERT_TRUE(WriteFileDurably(fs_.get(), durable, "kept").ok());
  EXPECT_FALSE(std::filesystem::exists(durable + ".tmp"));
  // Names made durable by a directory fsync; only "partly"'s first bytes were synced.
  Create(Path("dir_fsync_no_data_sync"), "data lost", /*sync=*/false);
  Create(Path("partly"), "synced", /*sync=*/true);
  FsyncDir();
  // After the last directory fsync.
  Create(Path("partly"), "+not", /*sync=*/false, /*reopen=*/true);
  Create(Path("unsynced"), "lost", /*sync=*/false);
  Create(Path("synced_no_dir_fsync"), "lost too", /*sync=*/true);
  const std::string pre = dir_.Write("preexisting", "old");  // not through the fs
  Create(pre, "+appended", /*sync=*/false, /*reopen=*/true);
  EXPECT_EQ(OnDisk(pre), "old+appended");
  EXPECT_EQ(OnDisk(Path("partly")), "synced+not");

  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(durable), "kept");
  EXPECT_EQ(OnDisk(Path("unsynced")), "<missing>");
  EXPECT_EQ(OnDisk(Path("synced_no_dir_fsync")), "<missing>");
  EXPECT_EQ(OnDisk(Path("dir_fsync_no_data_sync")), "");
  EXPECT_EQ(OnDisk(pre), "old");
  EXPECT_EQ(OnDisk(Path("partly")), "synced");

  // Tracking was forgotten: a second drop changes nothing.
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(Path("partly")), "synced");
}

// A rename over an existing file without a directory fsync is undone: the target gets its
// old contents back, and the source (whose creation was not durable either) is gone.
TEST_F(FaultFsTest, DropUndoesRenameWithoutDirFsync) {
  const std::string path = Path("manifest");
  ASSERT_TRUE(WriteFileDurably(fs_.get(), path, "v1").ok());
  Create(Path("manifest.new"), "v2", /*sync=*/true);
  ASSERT_TRUE(fs_->RenameFile(Path("manifest.new"), path, rocksdb::IOOptions(), nullptr).ok());
  Create(Path("fresh.new"), "f", /*sync=*/true);
  ASSERT_TRUE(
      fs_->RenameFile(Path("fresh.new"), Path("fresh"), rocksdb::IOOptions(), nullptr).ok());
  EXPECT_EQ(OnDisk(path), "v2");

  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(path), "v1");
  EXPECT_EQ(OnDisk(Path("manifest.new")), "<missing>");
  EXPECT_EQ(OnDisk(Path("fresh")), "<missing>");
  EXPECT_EQ(OnDisk(Path("fresh.new")), "<missing>");

  // The same renames followed by a directory fsync are durable.
  Create(Path("manifest.new"), "v2", /*sync=*/true);
  ASSERT_TRUE(fs_->RenameFile(Path("manifest.new"), path, rocksdb::IOOptions(), nullptr).ok());
  FsyncDir();
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(path), "v2");
}

// A rename of a durable file is undone back to its source name.
TEST_F(FaultFsTest, DropRestoresSourceOfUndoneRename) {
  ASSERT_TRUE(WriteFileDurably(fs_.get(), Path("a"), "A").ok());
  ASSERT_TRUE(fs_->RenameFile(Path("a"), Path("b"), rocksdb::IOOptions(), nullptr).ok());
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(Path("a")), "A");
  EXPECT_EQ(OnDisk(Path("b")), "<missing>");
}

// Renaming a directory is durable at once; the tracking of the files in it moves along.
TEST_F(FaultFsTest, DirectoryRenameKeepsTrackingFilesInside) {
  const rocksdb::IOOptions io;
  ASSERT_TRUE(fs_->CreateDir(Path("sub"), io, nullptr).ok());
  Create(Path("sub/kept"), "synced", /*sync=*/true);
  std::unique_ptr<rocksdb::FSDirectory> d;
  ASSERT_TRUE(fs_->NewDirectory(Path("sub"), io, &d, nullptr).ok());
  ASSERT_TRUE(d->Fsync(io, nullptr).ok());
  Create(Path("sub/kept"), "+not", /*sync=*/false, /*reopen=*/true);
  Create(Path("sub/new"), "new", /*sync=*/true);
  ASSERT_TRUE(fs_->RenameFile(Path("sub"), Path("moved"), io, nullptr).ok());
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(Path("moved/kept")), "synced");
  EXPECT_EQ(OnDisk(Path("moved/new")), "<missing>");
  EXPECT_EQ(OnDisk(Path("sub/kept")), "<missing>");
}

// (f) A failed WriteFileDurably leaves the previous file intact, before and after a crash.
TEST_F(FaultFsTest, FailedWriteFileDurablyKeepsPreviousFile) {
  const std::string path = Path("state");
  ASSERT_TRUE(WriteFileDurably(fs_.get(), path, "v1").ok());

  fs_->SetFailSync(true);
  Status s = WriteFileDurably(fs_.get(), path, "v2 is longer");
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_HAS(s.message(), "injected fsync failure");
  EXPECT_HAS(s.message(), path);
  fs_->SetFailSync(false);
  EXPECT_EQ(OnDisk(path), "v1");
  EXPECT_EQ(OnDisk(path + ".tmp"), "<missing>");

  fs_->SetSpaceLimit(5);
  s = WriteFileDurably(fs_.get(), path, "v2 is longer");
  EXPECT_EQ(s.code(), StatusCode::kResourceExhausted) << s.ToString();
  EXPECT_HAS(s.message(), path);
  fs_->ClearSpaceLimit();
  EXPECT_EQ(OnDisk(path), "v1");
  EXPECT_EQ(OnDisk(path + ".tmp"), "<missing>");

  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(path), "v1");
  auto r = ReadWholeFile(fs_.get(), path, 100);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "v1");

  ASSERT_TRUE(WriteFileDurably(fs_.get(), path, "v2").ok());
  ASSERT_TRUE(fs_->DropUnsyncedData().ok());
  EXPECT_EQ(OnDisk(path), "v2");
}

TEST_F(FaultFsTest, ReadWholeFileErrors) {
  auto missing = ReadWholeFile(fs_.get(), Path("nope"), 100);
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_HAS(missing.status().message(), Path("nope"));
  ASSERT_TRUE(WriteFileDurably(fs_.get(), Path("ten"), "0123456789").ok());
  auto big = ReadWholeFile(fs_.get(), Path("ten"), 9);
  EXPECT_EQ(big.status().code(), StatusCode::kOutOfRange);
  auto exact = ReadWholeFile(fs_.get(), Path("ten"), 10);
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(*exact, "0123456789");
  ASSERT_TRUE(WriteFileDurably(fs_.get(), Path("empty"), "").ok());
  auto empty = ReadWholeFile(fs_.get(), Path("empty"), 0);
  ASSERT_TRUE(empty.ok());
  EXPECT_EQ(*empty, "");
  EXPECT_EQ(ReadWholeFile(fs_.get(), Path("ten"), -1).status().code(),
            StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace strata::checkpoint
