// Private to checkpoint/: the Storage behind the opaque handle of store.h — one RocksDB
// FileSystem (the real one, or a fault-injecting wrapper in tests) and an Env over it, through
// which every checkpoint file and every RocksDB instance is accessed.
#pragma once

#include <rocksdb/env.h>
#include <rocksdb/file_system.h>
#include <rocksdb/status.h>

#include <memory>
#include <string>
#include <string_view>

#include "checkpoint/fault_fs.h"
#include "checkpoint/store.h"
#include "common/status.h"

namespace strata::checkpoint {

class Storage {
 public:
  explicit Storage(std::shared_ptr<rocksdb::FileSystem> fs);
  rocksdb::FileSystem* fs() const { return fs_.get(); }
  rocksdb::Env* env() const { return env_.get(); }

 private:
  std::shared_ptr<rocksdb::FileSystem> fs_;
  std::unique_ptr<rocksdb::Env> env_;
};

std::shared_ptr<Storage> StorageOn(std::shared_ptr<rocksdb::FileSystem> fs);

// Creates `path` and its missing parents.
Status CreateDirs(rocksdb::FileSystem* fs, const std::string& path);

// Removes a file or a directory tree; a missing path is OK.
Status RemoveTree(rocksdb::FileSystem* fs, const std::string& path);

}  // namespace strata::checkpoint
